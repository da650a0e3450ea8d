"""The plan: a U-Net config + (batch, height, width) -> a flat list of fused ops over buffer slots.

NumPy only (no torch). Every engine (C++ in csrc/cpu, numba) executes the same plan; the C++ side
reads it as plain arrays (``Plan.arrays()``), its field layout mirrored in
csrc/include/fastddpm/plan.h.

Tensors and slots
-----------------
Every tensor is per sample, batch-major: a slot of per-sample size S holds [N, S] floats.
Activations are NCHW ([N, C, H, W]). A "padded" tensor is [N, C, H+2, W+2] with a zero border of
one pixel (the input of a 3x3 pad-1 conv); engines must allow reads a little past a slot's end
(the C++ engine allocates 128 floats of slack per slot). Slot 0 is the U-Net input x
[N, in_channels, H, W], slot 1 the model output [N, out_channels, H, W]; on a class-conditional
model slot 2 is the class embedding [N, time_embed_dim], an input the engine fills from the caller
(conditioning.py computes it once per call: labels do not change between steps). None of these is
reused. The
other slots are reused by liveness: a slot is handed to a new tensor once the last op reading
its previous tensor has run (never to the output of that op itself, so no op's output aliases
its inputs). ``slot_sizes[s]`` is the per-sample float count of slot s.

Ops (``Plan.ops``, in execution order); each is an ``Op`` with these fields (-1 = unused):

- ``TIME_EMB``  out [N, c_out] = sinusoidal embedding of the per-sample timestep t:
  freqs[k] = exp(-ln(10000) * k / (c_out//2 - freq_shift)), k < c_out//2; [sin, cos] of t*freqs,
  or [cos, sin] when ``flip``; an odd c_out gets a zero last column. (freq_shift in ``shift``.)
  ``mode`` LEARNED (TIME_MODES): row t of the table weights[w] [rows, c_out] instead (a learned
  embedding; t must be an integer in [0, rows), or the engine raises); FOURIER: [sin, cos] of
  2 pi W ln(t), W = weights[w] [c_out / 2], the argument in float64 (t > 0).
- ``DIVIDE_BY_T`` out [N, c_in, h, w] = in / t[n] (a Fourier-embedded U-Net's output).
- ``LINEAR``    out [N, c_out] = W @ act(in[N, c_in]) + b (+ residual[N, c_out] when residual >= 0);
  act = ``act`` (see Activations). W = weights[w] [c_out, c_in], b = weights[b]. The
  residual is the class embedding (slot 2) on a class-conditional model's
  ``time_embedding.linear_2``: diffusers' ``emb = time_embedding(t_emb) + class_emb``.
- ``PAD``       out (padded) = a * concat(in, in2) + b in the interior, 0 on the border.
  concat: channels [0, c_in) from ``in``, [c_in, c_in + c_in2) from ``in2`` (when in2 >= 0).
  a, b in ``scale``/``shift`` (2, -1 for center_input_sample; else 1, 0).
- ``GROUPNORM`` out = GroupNorm(concat(in, in2); ``groups``, eps, gamma=weights[w],
  beta=weights[b]), then, when ``temb`` >= 0 (a slot [N, 2C]: diffusers' scale_shift time
  embedding), y * (1 + temb[n, c]) + temb[n, C + c], then ``act``; written padded if
  ``padded_out``. Statistics per (sample, group) over all of the group's channels and pixels
  (biased variance). ``mode`` POOL (padded_out only): the output is the 2x2 average pooling of
  that, [N, C, h/2+2, w/2+2] (the first half of a downsampling resnet: norm1, act, avg-pool).
- ``RESAMPLE``  out [N, C, Ho, Wo] = ``mode`` POOL: 2x2 average pooling (Ho, Wo = h/2, w/2), or
  NEAREST: nearest x2 upsampling (2h, 2w), of in [N, C, h, w]; written padded if ``padded_out``
  (the resampled input of a downsampling / upsampling resnet: its residual or shortcut input).
  FIR_DOWN / FIR_UP: score-SDE's [1, 3, 3, 1] FIR resampling, separable, zero outside the image:
  down (h/2, w/2) y[i] = (x[2i-1] + 3 x[2i] + 3 x[2i+1] + x[2i+2]) / 8 per axis; up (2h, 2w)
  y[2i] = (x[i-1] + 3 x[i]) / 4, y[2i+1] = (3 x[i] + x[i+1]) / 4 per axis (diffusers'
  downsample_2d / upsample_2d with that kernel: the FIR resnets' norm1 output and input, and the
  image pyramid of the skip blocks).
- ``CONV``      out [N, c_out, Ho, Wo] = scale * (conv(in) + bias + temb + conv1x1(in2) + residual):
    ``mode`` CONV3 : 3x3 stride 1 pad 1 on a padded ``in`` [c_in, h+2, w+2]; Ho, Wo = h, w.
    ``mode`` CONV1 : 1x1 on an unpadded ``in`` [c_in, h, w].
    ``mode`` DOWN1 : 3x3 stride 2 pad 1 on an unpadded ``in``; Ho, Wo = h/2, w/2.
    ``mode`` DOWN0 : 3x3 stride 2 on ``in`` padded by one pixel right and bottom only (diffusers'
                     downsample_padding=0); Ho, Wo = h/2, w/2.
    ``mode`` UP    : nearest x2 upsample of a padded ``in`` then 3x3 pad 1; Ho, Wo = 2h, 2w.
                     (Folded: each output phase is a 2x2 conv on the low-res input with summed
                     taps, 4/9 of the multiply-adds, and no upsampled tensor.)
  weights[w] [c_out, c_in, k, k], weights[b] [c_out]; ``temb`` (slot [N, c_out], or -1) is added
  per channel; ``in2`` (padded [c_in2, h+2, w+2], or -1) goes through the 1x1 shortcut
  weights[w2] [c_out, c_in2, 1, 1] + weights[b2]; ``residual`` (slot [N, c_out, Ho, Wo], or -1)
  is added; ``scale`` multiplies the sum (1 / mid_block_scale_factor in the mid block).
  ``scratch`` (DOWN modes) is a slot for the engine's im2col matrix [c_in * 9, Ho * Wo].
- ``ATTENTION`` out [N, C, h, w] = scale * (to_out(MHA(in)) + residual), where ``in`` is the
  group-normed input [N, C, h, w] (the GROUPNORM op just before), ``residual`` the block input,
  C = c_in, ``heads`` heads of C // heads channels, softmax scale 1/sqrt(C // heads). Weights:
  weights[w .. w+7] = to_q.weight, to_q.bias, to_k.weight, to_k.bias, to_v.weight, to_v.bias,
  to_out.0.weight, to_out.0.bias. ``scratch``: 3*C*L + C*L + heads*L*L floats per sample
  (q, k, v [3C, L]; attention output [C, L]; scores), L = h*w.

Activations (``act``): "" (identity), "silu", "mish" (x tanh(softplus x)), "gelu" (the exact,
erf form, as torch's nn.GELU) or "relu"; one flag each in the int rows (FLAG_SILU, FLAG_MISH,
FLAG_GELU, FLAG_RELU), at most one per op.

Weight indices point into ``Plan.weight_names`` (diffusers' state-dict keys, exactly
``weight_shapes(cfg)``), so ``[weights[name] for name in plan.weight_names]`` is what an engine
receives.

Fusions: group norm + SiLU (+ the zero pad the next conv needs); conv + bias + time-embedding add
(resnet conv1); conv + 1x1 shortcut + residual add + mid-block scale (resnet conv2: the shortcut
is extra rows of the same GEMM); nearest upsample + conv (phase decomposition); attention
out-projection + residual + scale; the up-block concat is free (GROUPNORM / PAD read two sources).
center_input_sample is the affine of the first PAD.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from . import validate
from .unet_config import SKIP_ATTN_GROUPS, SKIP_SCALE, UNetConfig, weight_shapes

__all__ = ["Plan", "Op", "PlanError", "build_plan", "OP_CODES", "CONV_MODES", "INT_FIELDS",
           "FLOAT_FIELDS", "ACT_FLAGS", "RESAMPLE_MODES", "TIME_MODES", "INPUT_SLOT", "OUTPUT_SLOT", "CLASS_SLOT"]


class PlanError(ValueError):
    """A config / size the plan cannot run; the message names the field."""


# Op codes, conv modes, columns and flags: the same in csrc/include/fastddpm/plan.h, which the
# extensions export (layout()); tests/test_layout.py asserts the two agree.
OP_CODES = {"TIME_EMB": 1, "LINEAR": 2, "PAD": 3, "GROUPNORM": 4, "CONV": 5, "ATTENTION": 6, "RESAMPLE": 7,
            "DIVIDE_BY_T": 8}
CONV_MODES = {"CONV3": 0, "CONV1": 1, "DOWN1": 2, "DOWN0": 3, "UP": 4}
RESAMPLE_MODES = {"NONE": 0, "POOL": 1, "NEAREST": 2, "FIR_DOWN": 3, "FIR_UP": 4}
TIME_MODES = {"SINUSOIDAL": 0, "LEARNED": 1, "FOURIER": 2}       # the mode column of TIME_EMB
# Column order of Plan.arrays()["ints"] and ["floats"]: Op attribute names ("code" and "flags"
# are derived from Op.kind and the boolean flags).
INT_FIELDS = ("code", "out", "in_", "c_in", "in2", "c_in2", "h", "w", "c_out", "w_idx", "b_idx", "w2_idx",
              "b2_idx", "temb", "residual", "scratch", "mode", "groups", "heads", "flags")
FLOAT_FIELDS = ("eps", "scale", "a", "shift")
FLAG_SILU, FLAG_PADDED_OUT, FLAG_FLIP, FLAG_MISH, FLAG_GELU, FLAG_RELU = 1, 2, 4, 8, 16, 32
ACT_FLAGS = {"": 0, "silu": FLAG_SILU, "mish": FLAG_MISH, "gelu": FLAG_GELU, "relu": FLAG_RELU}
INPUT_SLOT, OUTPUT_SLOT, CLASS_SLOT = 0, 1, 2


@dataclass
class Op:
    """One fused op (see the module docstring). Slot fields hold *value* ids until slots are
    assigned; ``Plan.ops`` holds slot ids."""

    kind: str
    out: int = -1
    in_: int = -1
    c_in: int = 0
    in2: int = -1
    c_in2: int = 0
    h: int = 0
    w: int = 0
    c_out: int = 0
    w_idx: int = -1
    b_idx: int = -1
    w2_idx: int = -1
    b2_idx: int = -1
    temb: int = -1
    residual: int = -1
    scratch: int = -1
    mode: int = 0
    groups: int = 0
    heads: int = 0
    act: str = ""           # the activation (ACT_FLAGS): LINEAR's input, GROUPNORM's output
    padded_out: bool = False
    flip: bool = False
    eps: float = 0.0
    scale: float = 1.0
    a: float = 1.0
    shift: float = 0.0
    name: str = ""          # the diffusers module this op comes from (for messages and debugging)

    def reads(self) -> list[int]:
        return [v for v in (self.in_, self.in2, self.temb, self.residual) if v >= 0]

    def int_row(self) -> list[int]:
        flags = ACT_FLAGS[self.act] | (FLAG_PADDED_OUT if self.padded_out else 0) | (FLAG_FLIP if self.flip else 0)
        derived = {"code": OP_CODES[self.kind], "flags": flags}
        return [derived[f] if f in derived else getattr(self, f) for f in INT_FIELDS]

    def float_row(self) -> list[float]:
        return [getattr(self, f) for f in FLOAT_FIELDS]


@dataclass
class Plan:
    """The executable description of one U-Net forward at a fixed (batch, height, width)."""

    config: UNetConfig
    batch: int
    height: int
    width: int
    ops: list[Op]
    slot_sizes: list[int]          # per-sample floats of each slot
    weight_names: list[str]        # diffusers keys; weight index i -> weight_names[i]
    weight_shapes: dict[str, tuple] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.config.in_channels, self.height, self.width)

    @property
    def conditional(self) -> bool:
        """Whether the engine must fill slot CLASS_SLOT with a class embedding [N, time_embed_dim]."""
        return self.config.class_embedding_kind is not None

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.config.out_channels, self.height, self.width)

    def arrays(self) -> dict[str, Any]:
        """The plan as plain arrays for a compiled engine: ints int64 [n_ops, len(INT_FIELDS)],
        floats float64 [n_ops, len(FLOAT_FIELDS)], slot_sizes int64 [n_slots], weight_shapes
        (a list of int tuples, in weight_names order)."""
        return {
            "ints": np.array([op.int_row() for op in self.ops], dtype=np.int64).reshape(-1, len(INT_FIELDS)),
            "floats": np.array([op.float_row() for op in self.ops], dtype=np.float64).reshape(-1, len(FLOAT_FIELDS)),
            "slot_sizes": np.array(self.slot_sizes, dtype=np.int64),
            "weight_shapes": [tuple(int(d) for d in self.weight_shapes[n]) for n in self.weight_names],
        }

    def scratch_floats(self) -> int:
        """Total floats the slots take for this batch (without the engine's slack)."""
        return int(sum(self.slot_sizes)) * self.batch

    def describe(self) -> str:
        lines = [f"plan: {len(self.ops)} ops, {len(self.slot_sizes)} slots, "
                 f"{self.scratch_floats() * 4 / 2**20:.2f} MiB of activations"]
        for i, op in enumerate(self.ops):
            lines.append(f"{i:3d} {op.kind:9s} {op.name:40s} out={op.out} in={op.in_}"
                         + (f" in2={op.in2}" if op.in2 >= 0 else "")
                         + (f" res={op.residual}" if op.residual >= 0 else "")
                         + (f" temb={op.temb}" if op.temb >= 0 else ""))
        return "\n".join(lines)


class _Builder:
    def __init__(self, cfg: UNetConfig, batch: int, height: int, width: int):
        self.cfg = cfg
        self.shapes = weight_shapes(cfg)
        self.names = list(self.shapes)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.ops: list[Op] = []
        self.sizes: list[int] = []       # per value: per-sample floats
        self.batch, self.height, self.width = batch, height, width
        self.class_value = -1             # the class-embedding input (conditional models)

    def value(self, size: int) -> int:
        self.sizes.append(int(size))
        return len(self.sizes) - 1

    def widx(self, key: str) -> int:
        if key not in self.index:  # a plan/config mismatch: a bug, but say which key
            raise PlanError(f"the plan needs weight {key!r}, which this config does not have")
        return self.index[key]

    def emit(self, op: Op) -> int:
        self.ops.append(op)
        return op.out

    # ------------------------------------------------------------------ layers
    def time_embedding(self) -> int:
        cfg = self.cfg
        c0 = cfg.block_out_channels[0]
        if cfg.time_embedding_type == "learned":
            t = self.emit(Op("TIME_EMB", out=self.value(c0), c_out=c0, mode=TIME_MODES["LEARNED"],
                             w_idx=self.widx("time_proj.weight"), name="time_proj"))
        elif cfg.time_embedding_type == "fourier":
            t = self.emit(Op("TIME_EMB", out=self.value(2 * c0), c_out=2 * c0, mode=TIME_MODES["FOURIER"],
                             w_idx=self.widx("time_proj.weight"), name="time_proj"))
        else:
            t = self.emit(Op("TIME_EMB", out=self.value(c0), c_out=c0, flip=cfg.flip_sin_to_cos,
                             shift=float(cfg.freq_shift), name="time_proj"))
        d = cfg.time_embed_dim
        h = self.emit(Op("LINEAR", out=self.value(d), in_=t, c_in=cfg.timestep_input_dim, c_out=d,
                         w_idx=self.widx("time_embedding.linear_1.weight"),
                         b_idx=self.widx("time_embedding.linear_1.bias"), name="time_embedding.linear_1"))
        # diffusers' TimestepEmbedding keeps its default act (SiLU) whatever the model's act_fn
        return self.emit(Op("LINEAR", out=self.value(d), in_=h, c_in=d, c_out=d, act="silu",
                            residual=self.class_value,
                            w_idx=self.widx("time_embedding.linear_2.weight"),
                            b_idx=self.widx("time_embedding.linear_2.bias"), name="time_embedding.linear_2"))

    def pad(self, src, c, h, w, src2=-1, c2=0, a=1.0, b=0.0, name="") -> int:
        return self.emit(Op("PAD", out=self.value((c + c2) * (h + 2) * (w + 2)), in_=src, c_in=c,
                            in2=src2, c_in2=c2, h=h, w=w, a=a, shift=b, name=name))

    def norm(self, key, src, c, h, w, groups, act, padded, src2=-1, c2=0, scale_shift=-1, pool=False) -> int:
        ctot = c + c2
        if ctot % groups:
            raise PlanError(f"{key}: {ctot} channels are not divisible by {groups} groups")
        ho, wo = (h // 2, w // 2) if pool else (h, w)
        size = ctot * ((ho + 2) * (wo + 2) if padded else ho * wo)
        return self.emit(Op("GROUPNORM", out=self.value(size), in_=src, c_in=c, in2=src2, c_in2=c2,
                            h=h, w=w, groups=groups, act=act, padded_out=padded, temb=scale_shift,
                            mode=RESAMPLE_MODES["POOL" if pool else "NONE"],
                            eps=float(self.cfg.norm_eps), w_idx=self.widx(f"{key}.weight"),
                            b_idx=self.widx(f"{key}.bias"), name=key))

    def conv(self, key, mode, src, c_in, h, w, c_out, *, temb=-1, src2=-1, c2=0, short_key=None,
             residual=-1, scale=1.0) -> tuple[int, int, int]:
        ho, wo = {"CONV3": (h, w), "CONV1": (h, w), "DOWN1": (h // 2, w // 2),
                  "DOWN0": (h // 2, w // 2), "UP": (2 * h, 2 * w)}[mode]
        scratch = self.value(c_in * 9 * ho * wo) if mode in ("DOWN0", "DOWN1") else -1
        out = self.emit(Op("CONV", out=self.value(c_out * ho * wo), in_=src, c_in=c_in, in2=src2,
                           c_in2=c2, h=h, w=w, c_out=c_out, mode=CONV_MODES[mode],
                           w_idx=self.widx(f"{key}.weight"), b_idx=self.widx(f"{key}.bias"),
                           w2_idx=self.widx(f"{short_key}.weight") if short_key else -1,
                           b2_idx=self.widx(f"{short_key}.bias") if short_key else -1,
                           temb=temb, residual=residual, scratch=scratch, scale=scale, name=key))
        return out, ho, wo

    def resample(self, src, c, h, w, mode, padded, name="") -> int:
        ho, wo = (h // 2, w // 2) if mode in ("POOL", "FIR_DOWN") else (2 * h, 2 * w)
        size = c * ((ho + 2) * (wo + 2) if padded else ho * wo)
        return self.emit(Op("RESAMPLE", out=self.value(size), in_=src, c_in=c, h=h, w=w, c_out=c,
                            mode=RESAMPLE_MODES[mode], padded_out=padded, name=name))

    def resnet(self, key, x, c_in, h, w, c_out, emb, x2=-1, c2=0, scale=1.0, resample=None,
               groups=None, shortcut=None) -> int:
        """diffusers ResnetBlock2D on concat(x, x2) (c_in + c2 channels) -> [c_out, h, w];
        resample "down" / "up" (its down=True / up=True: x and norm1's output are average-pooled /
        upsampled x2 before conv1 and the shortcut), "fir_down" / "fir_up" (the same with the
        [1, 3, 3, 1] FIR kernel: score-SDE's kernel="fir") -> [c_out, h/2, w/2] / [c_out, 2h, 2w].
        groups: (norm1, norm2) group counts (default norm_num_groups); shortcut: force the 1x1
        conv_shortcut (use_in_shortcut=True) even where the channel count stays."""
        cfg = self.cfg
        cin_tot = c_in + c2
        g1, g2 = groups if groups is not None else (cfg.norm_groups(cin_tot), cfg.norm_groups(c_out))
        has_shortcut = cin_tot != c_out if shortcut is None else shortcut
        if resample is not None and x2 >= 0:  # diffusers' resampling resnets never take a concat
            raise PlanError(f"{key}: a resampling resnet with a concatenated input")
        act = cfg.act
        # scale_shift: time_emb_proj gives [scale, shift] rows applied after norm2 (its epilogue);
        # default: one row added after conv1 (its epilogue)
        shifts = cfg.resnet_time_scale_shift == "scale_shift"
        tp = self.emit(Op("LINEAR", out=self.value((2 if shifts else 1) * c_out), in_=emb,
                          c_in=cfg.time_embed_dim, c_out=(2 if shifts else 1) * c_out, act=act,
                          w_idx=self.widx(f"{key}.time_emb_proj.weight"),
                          b_idx=self.widx(f"{key}.time_emb_proj.bias"), name=f"{key}.time_emb_proj"))
        # down: norm1 + act + avg-pool in one op, then a plain conv1 at h/2; up: conv1's UP mode
        # folds the nearest x2 upsampling into the conv (4 phases of 2x2 taps); FIR: norm1 + act,
        # then the separable 4x4 stencil into conv1's padded input
        fir = resample in ("fir_down", "fir_up")
        n1 = self.norm(f"{key}.norm1", x, c_in, h, w, g1, act, not fir, x2, c2, pool=resample == "down")
        if fir:
            n1 = self.resample(n1, c_in, h, w, resample.upper(), True, name=f"{key}.{resample}(norm1)")
        h0, w0 = h, w
        if resample in ("down", "fir_down"):
            h, w = h // 2, w // 2
        elif resample == "fir_up":
            h, w = 2 * h, 2 * w
        h1, h, w = self.conv(f"{key}.conv1", "UP" if resample == "up" else "CONV3", n1, cin_tot, h, w, c_out,
                             temb=-1 if shifts else tp)
        n2 = self.norm(f"{key}.norm2", h1, c_out, h, w, g2, act, True,
                       scale_shift=tp if shifts else -1)
        if resample is not None:  # the shortcut reads x resampled (padded for a 1x1 shortcut)
            mode = {"down": "POOL", "up": "NEAREST"}.get(resample, resample.upper())
            x = self.resample(x, c_in, h0, w0, mode, has_shortcut, name=f"{key}.{resample}(input)")
        if has_shortcut:
            # the 1x1 shortcut runs inside conv2's GEMM: it reads a padded copy of its input
            xp = x if resample is not None else self.pad(x, c_in, h, w, x2, c2, name=f"{key}.conv_shortcut(input)")
            out, _, _ = self.conv(f"{key}.conv2", "CONV3", n2, c_out, h, w, c_out, src2=xp,
                                  c2=cin_tot, short_key=f"{key}.conv_shortcut", scale=scale)
        else:
            if x2 >= 0:  # cannot happen with diffusers' channel rules (concat always widens)
                raise PlanError(f"{key}: a concatenated input without a shortcut")
            out, _, _ = self.conv(f"{key}.conv2", "CONV3", n2, c_out, h, w, c_out, residual=x,
                                  scale=scale)
        return out

    def attention(self, key, x, c, h, w, groups, scale=1.0) -> int:
        """diffusers' Attention on x [c, h, w]; groups None: no group norm (reads x itself)."""
        if groups is not None and c % groups:
            raise PlanError(f"{key}.group_norm: {c} channels are not divisible by {groups} groups")
        heads = self.cfg.heads(c)
        if heads < 1 or c % heads:
            raise PlanError(f"{key}: {c} channels cannot be split into {heads} heads")
        n = x if groups is None else self.norm(f"{key}.group_norm", x, c, h, w, groups, "", False)
        L = h * w
        w0 = self.widx(f"{key}.to_q.weight")
        order = [f"{key}.{p}.{s}" for p in ("to_q", "to_k", "to_v", "to_out.0") for s in ("weight", "bias")]
        if [self.names[w0 + i] for i in range(8)] != order:  # the engines rely on this layout
            raise PlanError(f"{key}: attention weights are not in diffusers' order")
        scratch = self.value(4 * c * L + heads * L * L)
        return self.emit(Op("ATTENTION", out=self.value(c * L), in_=n, c_in=c, h=h, w=w,
                            c_out=c, heads=heads, residual=x, scratch=scratch, w_idx=w0,
                            scale=scale, name=key))

    # ------------------------------------------------------------------ the network
    def build(self) -> list[Op]:
        cfg = self.cfg
        ch, nb, lpb = cfg.block_out_channels, cfg.num_blocks, cfg.layers_per_block
        H, W = self.height, self.width
        x = self.value(cfg.in_channels * H * W)          # value 0 = slot 0: the input
        assert x == INPUT_SLOT
        if cfg.class_embedding_kind is not None:
            self.class_value = self.value(cfg.time_embed_dim)
        emb = self.time_embedding()
        a, b = (2.0, -1.0) if cfg.center_input_sample else (1.0, 0.0)
        xp = self.pad(x, cfg.in_channels, H, W, a=a, b=b, name="conv_in(input)")
        h, _, _ = self.conv("conv_in", "CONV3", xp, cfg.in_channels, H, W, ch[0])
        skips = [(h, ch[0])]
        c, hh, ww = ch[0], H, W
        img = x                                           # score-SDE's image pyramid (skip blocks)
        inv2 = 1.0 / SKIP_SCALE
        for i, t in enumerate(cfg.down_block_types):
            p, skip = f"down_blocks.{i}", cfg.skip_down(i)
            for j in range(lpb):
                groups = (cfg.norm_groups(c, True), cfg.norm_groups(ch[i], True)) if skip else None
                h = self.resnet(f"{p}.resnets.{j}", h, c, hh, ww, ch[i], emb, groups=groups,
                                scale=inv2 if skip else 1.0)
                c = ch[i]
                if t == "AttnDownBlock2D":
                    h = self.attention(f"{p}.attentions.{j}", h, c, hh, ww, cfg.norm_groups(c))
                elif t == "AttnSkipDownBlock2D":
                    h = self.attention(f"{p}.attentions.{j}", h, c, hh, ww, SKIP_ATTN_GROUPS, scale=inv2)
                skips.append((h, c))
            if i < nb - 1 and skip:
                g = cfg.norm_groups(c, True)
                h = self.resnet(f"{p}.resnet_down", h, c, hh, ww, c, emb, resample="fir_down", groups=(g, g),
                                shortcut=True, scale=inv2)
                img = self.resample(img, 3, hh, ww, "FIR_DOWN", False, name=f"{p}.downsamplers.0(skip)")
                hh, ww = hh // 2, ww // 2
                h, _, _ = self.conv(f"{p}.skip_conv", "CONV1", img, 3, hh, ww, c, residual=h)
                skips.append((h, c))
            elif i < nb - 1 and cfg.resnet_downsampler(i):
                h = self.resnet(f"{p}.downsamplers.0", h, c, hh, ww, c, emb, resample="down")
                hh, ww = hh // 2, ww // 2
                skips.append((h, c))
            elif i < nb - 1:
                mode = "DOWN1" if cfg.downsample_padding == 1 else "DOWN0"
                h, hh, ww = self.conv(f"{p}.downsamplers.0.conv", mode, h, c, hh, ww, c)
                skips.append((h, c))
        s = float(cfg.mid_block_scale_factor)
        inv = 1.0 / s
        h = self.resnet("mid_block.resnets.0", h, c, hh, ww, c, emb, scale=inv)
        if cfg.add_attention:
            h = self.attention("mid_block.attentions.0", h, c, hh, ww, cfg.attn_norm_groups(), scale=inv)
        h = self.resnet("mid_block.resnets.1", h, c, hh, ww, c, emb, scale=inv)
        rev = ch[::-1]
        pyramid = -1                                      # the output pyramid [3, hh, ww] (skip up blocks)
        for i, t in enumerate(cfg.up_block_types):
            p, skip = f"up_blocks.{i}", cfg.skip_up(i)
            for j in range(lpb + 1):
                sk, cs = skips.pop()
                groups = None
                if skip:   # AttnSkipUpBlock2D's norm1: diffusers' min(c_in + c_skip // 4, 32), precedence as written
                    g1 = min(c + cs // 4, 32) if t == "AttnSkipUpBlock2D" else cfg.norm_groups(c + cs, True)
                    groups = (g1, cfg.norm_groups(rev[i], True))
                h = self.resnet(f"{p}.resnets.{j}", h, c, hh, ww, rev[i], emb, x2=sk, c2=cs, groups=groups,
                                scale=inv2 if skip else 1.0)
                c = rev[i]
                if t == "AttnUpBlock2D":
                    h = self.attention(f"{p}.attentions.{j}", h, c, hh, ww, cfg.norm_groups(c))
            if t == "AttnSkipUpBlock2D":
                h = self.attention(f"{p}.attentions.0", h, c, hh, ww, SKIP_ATTN_GROUPS, scale=inv2)
            if skip and pyramid >= 0:   # the pyramid of the level below, FIR-upsampled to this one
                pyramid = self.resample(pyramid, 3, hh // 2, ww // 2, "FIR_UP", False, name=f"{p}.upsampler(skip)")
            if i < nb - 1 and skip:
                g = cfg.norm_groups(c, True)
                sn = self.norm(f"{p}.skip_norm", h, c, hh, ww, g, "silu", True)   # diffusers' nn.SiLU here
                pyramid, _, _ = self.conv(f"{p}.skip_conv", "CONV3", sn, c, hh, ww, 3, residual=pyramid)
                h = self.resnet(f"{p}.resnet_up", h, c, hh, ww, c, emb, resample="fir_up", groups=(g, g),
                                shortcut=True, scale=inv2)
                hh, ww = 2 * hh, 2 * ww
            elif i < nb - 1 and cfg.resnet_upsampler(i):
                h = self.resnet(f"{p}.upsamplers.0", h, c, hh, ww, c, emb, resample="up")
                hh, ww = 2 * hh, 2 * ww
            elif i < nb - 1:
                hp = self.pad(h, c, hh, ww, name=f"{p}.upsamplers.0(input)")
                h, hh, ww = self.conv(f"{p}.upsamplers.0.conv", "UP", hp, c, hh, ww, c)
        assert not skips and (hh, ww) == (H, W)
        n = self.norm("conv_norm_out", h, c, H, W, cfg.norm_groups(c), "silu", True)  # diffusers' conv_act: SiLU
        # score-SDE: conv_out's output + the output pyramid (diffusers' sample += skip_sample)
        out, _, _ = self.conv("conv_out", "CONV3", n, c, H, W, cfg.out_channels, residual=pyramid)
        if cfg.time_embedding_type == "fourier":   # diffusers divides a Fourier model's output by t
            out = self.emit(Op("DIVIDE_BY_T", out=self.value(cfg.out_channels * H * W), in_=out,
                               c_in=cfg.out_channels, h=H, w=W, c_out=cfg.out_channels, name="sample / timesteps"))
        return self.assign_slots(out)

    def assign_slots(self, out_value: int) -> list[Op]:
        """Values -> slots by liveness (best fit among free slots of at least the size)."""
        ops = self.ops
        last = {}
        for k, op in enumerate(ops):
            for v in op.reads():
                last[v] = k
            if op.scratch >= 0:
                last[op.scratch] = k
        slot_of = {INPUT_SLOT: INPUT_SLOT, out_value: OUTPUT_SLOT}
        sizes = [self.sizes[INPUT_SLOT], self.sizes[out_value]]
        if self.class_value >= 0:
            slot_of[self.class_value] = CLASS_SLOT
            sizes.append(self.sizes[self.class_value])
        fixed = set(slot_of.values())     # inputs and the output: never handed to another value
        free: list[int] = []
        for k, op in enumerate(ops):
            for v in (op.scratch, op.out):
                if v < 0 or v in slot_of:
                    continue
                need = self.sizes[v]
                fits = [s for s in free if sizes[s] >= need]
                if fits:
                    s = min(fits, key=lambda s: sizes[s])
                else:  # grow the largest free slot rather than adding one
                    s = max(free, key=lambda s: sizes[s]) if free else None
                    if s is None:
                        s = len(sizes)
                        sizes.append(need)
                    else:
                        sizes[s] = need
                free.remove(s) if s in free else None
                slot_of[v] = s
            # release what dies here (after the outputs are placed: no output aliases an input)
            for v in set(op.reads()) | ({op.scratch} if op.scratch >= 0 else set()):
                if last.get(v) == k and slot_of[v] not in fixed:
                    free.append(slot_of[v])
            if op.out >= 0 and op.out not in last and slot_of[op.out] not in fixed:
                free.append(slot_of[op.out])  # never read (cannot happen in a U-Net)
        m = lambda v: slot_of[v] if v >= 0 else -1  # noqa: E731
        for op in ops:
            op.out, op.in_, op.in2 = m(op.out), m(op.in_), m(op.in2)
            op.temb, op.residual, op.scratch = m(op.temb), m(op.residual), m(op.scratch)
        self.slot_sizes = sizes
        return ops


def build_plan(cfg: UNetConfig | Mapping[str, Any], batch: int, height: int | None = None,
               width: int | None = None) -> Plan:
    """The plan of one forward of ``cfg`` on [batch, in_channels, height, width] (height and
    width default to the config's sample_size). Raises UNetConfigError / PlanError / ValueError
    naming the problem."""
    if not isinstance(cfg, UNetConfig):
        cfg = UNetConfig.from_dict(cfg)  # raises UNetConfigError naming the field
    batch = validate.count("batch", batch)
    height, width = cfg.image_hw(height, width)
    b = _Builder(cfg, int(batch), int(height), int(width))
    ops = b.build()
    used = {i for i, n in enumerate(b.names) if n.startswith("class_embedding.")}  # conditioning.py's
    for op in ops:
        for i in (op.w_idx, op.b_idx, op.w2_idx, op.b2_idx):
            if i >= 0:
                used.add(i)
        if op.kind == "ATTENTION":
            used.update(range(op.w_idx, op.w_idx + 8))
    unused = [n for i, n in enumerate(b.names) if i not in used]
    if unused:  # every diffusers parameter must be consumed by some op
        raise PlanError(f"the plan leaves weights unused: {unused[:5]}")
    return Plan(cfg, int(batch), int(height), int(width), ops, b.slot_sizes, b.names, dict(b.shapes))
