"""The U-Net description: a validated diffusers ``UNet2DModel`` config and what follows from it.

NumPy only (no torch): the native and numba backends build their plans from this module on a
machine without PyTorch.

- ``UNetConfig.from_dict(d)`` reads a diffusers ``unet/config.json`` dict (keys starting with "_"
  are ignored), checks it against the subset fastddpm runs, and ``to_dict()`` writes it back in a
  form ``UNet2DModel.from_config`` accepts.
- ``weight_shapes(cfg)``: every parameter of diffusers' ``UNet2DModel`` for that config, with
  diffusers' state-dict keys, shapes and order.
- ``flops(cfg, ...)``: the arithmetic of one forward pass.
- ``random_weights(cfg, seed)``: seeded weights with a healthy activation scale.
- ``PRESETS``: the benchmark architectures.

diffusers semantics this module (and every engine) must reproduce, read from diffusers 0.42.1:

- ``attention_head_dim`` is the number of channels *per head*; ``None`` means one head holding all
  channels of the block. heads = channels // attention_head_dim, and softmax scale 1/sqrt(head dim).
- Attention in the down and up blocks normalises with ``norm_num_groups`` groups;
  ``attn_norm_num_groups`` only sets the group count of the mid block's attention (None = use
  ``norm_num_groups``). All norms use ``norm_eps``, attention norms included.
- ``mid_block_scale_factor`` divides the output of both mid-block resnets *and* of the mid-block
  attention (after its residual add): ``(x + f(x)) / s``. Down/up blocks always use 1.
- ``downsample_padding=0`` pads only the right and bottom by one pixel, then a 3x3 stride-2 conv
  without padding; ``downsample_padding=1`` is a plain symmetric pad-1 stride-2 conv. (Other
  values would change the spatial size and are rejected.)
- Upsampling is nearest x2, then a 3x3 pad-1 conv. Each up block has ``layers_per_block + 1``
  resnets; its last resnet takes the skip from the previous resolution (or conv_in).
- The time embedding is sin/cos of t * exp(-ln(10000) * k / (half - freq_shift)), k < half =
  block_out_channels[0] // 2, ordered [sin, cos] or, with flip_sin_to_cos, [cos, sin]; then
  linear_1, SiLU, linear_2 (SiLU whatever ``act_fn`` says). With resnet_time_scale_shift
  "default" every resnet adds time_emb_proj(act(emb)) after conv1; with "scale_shift"
  time_emb_proj gives 2 * out_channels rows [scale, shift] and norm2's output becomes
  norm2(h) * (1 + scale) + shift (before the activation).
- ``time_embedding_type="learned"``: the embedding is row t of ``time_proj.weight``
  [num_train_timesteps, C0] (nn.Embedding), so t must be an integer in [0, num_train_timesteps).
- ``time_embedding_type="fourier"`` (score-SDE): [sin, cos] of 2 pi W ln(t) with
  ``time_proj.weight`` W [C0] (GaussianFourierProjection; diffusers never flips it), so
  linear_1 takes 2 C0; the U-Net's output is divided by t at the end. t must be > 0.
- ``act_fn`` ("silu" = "swish", "mish", "gelu" (erf), "relu") is the resnets' activation only
  (norm1, norm2, and the one before time_emb_proj); the output's conv_act is always SiLU.
- State-dict order follows diffusers' module registration, not execution: conv_in,
  time_embedding, down_blocks, up_blocks, *then* mid_block, conv_norm_out, conv_out; inside a
  block with attention all ``attentions.*`` come before ``resnets.*``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Iterator, Mapping

import numpy as np

from . import validate

__all__ = ["UNetConfigError", "UNetConfig", "weight_shapes", "parameter_count", "flops",
           "random_weights", "PRESETS", "CM_IMAGENET64", "SKIP_SCALE", "SKIP_ATTN_GROUPS", "DOWN_BLOCK_TYPES", "UP_BLOCK_TYPES", "MAX_DIMENSION",
           "MAX_RESNET_BLOCKS", "MAX_PARAMETERS", "MAX_SAMPLE_FLOATS"]


class UNetConfigError(ValueError):
    """A U-Net config that fastddpm cannot run; the message names the offending field."""


# Bounds that keep an absurd config (a hostile config.json) from taking the machine down before
# anything checks it against the weights: each is far beyond any real UNet2DModel (ddpm-cifar10:
# 36M parameters, 8 resnet blocks; a 256x256 model's largest activation ~17M floats).
MAX_DIMENSION = 2**31 - 1          # any one size or count (channels, sample_size, ...)
MAX_RESNET_BLOCKS = 4096           # len(block_out_channels) x (2 layers_per_block + 1) + 2
MAX_PARAMETERS = 2**32             # 16 GiB of float32 weights
MAX_SAMPLE_FLOATS = 2**30          # the largest activation of one sample at sample_size: 4 GiB

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D", "SkipDownBlock2D",
                    "AttnSkipDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D")
_MID_BLOCK_TYPES = ("UNetMidBlock2D",)
_ATTN_BLOCKS = ("AttnDownBlock2D", "AttnUpBlock2D", "AttnSkipDownBlock2D", "AttnSkipUpBlock2D")
# score-SDE's NCSN++ blocks: FIR resampling resnets, a 3-channel image pyramid beside the features
_SKIP_BLOCKS = ("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D")
SKIP_SCALE = math.sqrt(2.0)   # the skip blocks' output_scale_factor (resnets and attention divide by it)
SKIP_ATTN_GROUPS = 32         # their attention's group norm: 32 groups whatever norm_num_groups says

# Fields whose value is fixed in the supported subset: field -> the supported values.
_CHOICES: dict[str, tuple] = {
    "mid_block_type": _MID_BLOCK_TYPES,
    "act_fn": ("silu", "swish", "mish", "gelu", "relu"),
    "time_embedding_type": ("positional", "learned", "fourier"),
    "downsample_type": ("conv", "resnet"),
    "upsample_type": ("conv", "resnet"),
    "resnet_time_scale_shift": ("default", "scale_shift"),
    "class_embed_type": (None, "timestep", "identity"),
    "downsample_padding": (0, 1),
}


@dataclass(frozen=True)
class UNetConfig:
    """A validated diffusers ``UNet2DModel`` config (defaults = diffusers' defaults).

    Build it with ``UNetConfig.from_dict``; the constructor validates too. Lists are stored as
    tuples; ``sample_size`` keeps the form it was given (int, pair or None)."""

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    freq_shift: float = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                         "AttnDownBlock2D")
    mid_block_type: str = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D",
                                       "UpBlock2D")
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int | None = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    num_train_timesteps: int | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNetConfig":
        """Read a diffusers ``UNet2DModel`` config dict; keys starting with "_" are ignored."""
        if not isinstance(d, Mapping):
            raise UNetConfigError(f"a U-Net config must be a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if not isinstance(key, str):
                raise UNetConfigError(f"config key {key!r} is not a string")
            if key.startswith("_"):
                continue
            if key not in known:
                raise UNetConfigError(
                    f"unknown U-Net config key {key!r}; known keys: {', '.join(sorted(known))}")
            kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that diffusers' ``UNet2DModel.from_config`` accepts."""
        out: dict[str, Any] = {"_class_name": "UNet2DModel"}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def replace(self, **changes) -> "UNetConfig":
        """A copy with some fields changed (validated again)."""
        d = self.to_dict()
        d.update(changes)
        return UNetConfig.from_dict(d)

    def __post_init__(self):
        for name, value in _normalise(self).items():
            object.__setattr__(self, name, value)
        _check_structure(self)

    # ------------------------------------------------------------------ derived facts

    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    @property
    def act(self) -> str:
        """The resnets' activation as the plan names it (plan.ACT_FLAGS): act_fn, "swish" as "silu"."""
        return "silu" if self.act_fn == "swish" else self.act_fn

    @property
    def timestep_input_dim(self) -> int:
        """Width of the time projection (time_embedding.linear_1's input): 2 C0 for "fourier" ([sin, cos])."""
        return 2 * self.block_out_channels[0] if self.time_embedding_type == "fourier" else self.block_out_channels[0]

    @property
    def time_proj_rows(self) -> int:
        """Rows of time_emb_proj per output channel: 2 ([scale, shift]) with scale_shift, else 1."""
        return 2 if self.resnet_time_scale_shift == "scale_shift" else 1

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding (diffusers: ``time_embedding_dim or 4 * C0``)."""
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def class_embedding_kind(self) -> str | None:
        """How class labels reach the time embedding (diffusers' ``UNet2DModel`` rules): "table"
        (an ``nn.Embedding`` of num_class_embeds rows: integer labels), "timestep" (labels through
        the sinusoidal projection and an MLP: real labels), "identity" (the caller gives the
        [N, time_embed_dim] embedding itself), or None for an unconditional model."""
        if self.class_embed_type is None:
            return "table" if self.num_class_embeds is not None else None
        return self.class_embed_type

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this (one halving per down block)."""
        return 2 ** (self.num_blocks - 1)

    @property
    def sample_hw(self) -> tuple[int, int] | None:
        """(height, width) of ``sample_size``, or None when the config gives none."""
        s = self.sample_size
        if s is None:
            return None
        return (s, s) if isinstance(s, int) else (s[0], s[1])

    def resnet_downsampler(self, block: int) -> bool:
        """Whether down block ``block`` downsamples with a resnet (ResnetBlock2D down=True: avg-pool
        2x2 inside) rather than a stride-2 conv: ResnetDownsampleBlock2D, or AttnDownBlock2D
        with downsample_type "resnet" (DownBlock2D ignores downsample_type, as in diffusers)."""
        t = self.down_block_types[block]
        return t == "ResnetDownsampleBlock2D" or (t == "AttnDownBlock2D" and self.downsample_type == "resnet")

    def resnet_upsampler(self, block: int) -> bool:
        """Whether up block ``block`` upsamples with a resnet (ResnetBlock2D up=True: nearest x2
        inside): ResnetUpsampleBlock2D, or AttnUpBlock2D with upsample_type "resnet"."""
        t = self.up_block_types[block]
        return t == "ResnetUpsampleBlock2D" or (t == "AttnUpBlock2D" and self.upsample_type == "resnet")

    def skip_down(self, block: int) -> bool:
        """Whether down block ``block`` is a score-SDE skip block (SkipDownBlock2D /
        AttnSkipDownBlock2D: FIR-downsampling resnet, the input image pyramid added by a 1x1 conv)."""
        return self.down_block_types[block] in _SKIP_BLOCKS

    def skip_up(self, block: int) -> bool:
        """Whether up block ``block`` is a score-SDE skip block (SkipUpBlock2D / AttnSkipUpBlock2D)."""
        return self.up_block_types[block] in _SKIP_BLOCKS

    @property
    def has_skip_pyramid(self) -> bool:
        """Whether the up path builds score-SDE's 3-channel output pyramid (added to conv_out's output)."""
        return any(self.skip_up(i) for i in range(self.num_blocks))

    def norm_groups(self, channels: int, skip_block: bool = False) -> int:
        """Groups of a resnet / output norm over ``channels`` channels: norm_num_groups, or
        min(channels // 4, 32) where diffusers uses that (inside the skip blocks, whatever
        norm_num_groups says; in the mid block and conv_norm_out when norm_num_groups is None)."""
        if skip_block or self.norm_num_groups is None:
            return min(channels // 4, 32)
        return self.norm_num_groups

    def attn_norm_groups(self) -> int | None:
        """Group count of the mid block's attention norm (down/up attention uses norm_num_groups);
        None when it has no norm: diffusers' UNetMidBlock2D gives its attention a norm only with
        attn_norm_num_groups set or the "default" time embedding."""
        if self.attn_norm_num_groups is not None:
            return self.attn_norm_num_groups
        return self.norm_groups(self.block_out_channels[-1]) if self.resnet_time_scale_shift == "default" else None

    def heads(self, channels: int) -> int:
        """Attention heads of a block with ``channels`` channels (diffusers' rule)."""
        return 1 if self.attention_head_dim is None else channels // self.attention_head_dim

    def image_hw(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """(height, width) of a forward: the given ones, else sample_size's; checked to run
        through this U-Net (ValueError otherwise)."""
        hw = self.sample_hw
        height = height if height is not None else (hw[0] if hw else None)
        width = width if width is not None else (hw[1] if hw else None)
        if height is None or width is None:
            raise ValueError("the config has no sample_size: pass height and width")
        self.check_image_size(height, width)
        return height, width

    def check_image_size(self, height: int, width: int) -> None:
        """Raise ValueError unless (height, width) can run through this U-Net."""
        m = self.size_multiple
        for name, v in (("height", height), ("width", width)):
            if not _is_int(v) or v <= 0 or v % m:
                raise ValueError(f"image {name} must be a positive multiple of {m} "
                                 f"(2**(len(block_out_channels)-1)), got {v!r}")


# ---------------------------------------------------------------------- validation

def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _same(v, choice) -> bool:
    # plain `in` would accept True for 1 and 1.0 for 1; numpy ints still count as ints
    if _is_int(choice):
        return _is_int(v) and v == choice
    return v is choice or (type(v) is type(choice) and v == choice)


def _pos_int(name: str, v) -> int:
    if not _is_int(v) or v <= 0:
        raise UNetConfigError(f"{name} must be a positive integer, got {v!r}")
    if v > MAX_DIMENSION:
        raise UNetConfigError(f"{name} = {v} is over the limit of {MAX_DIMENSION}")
    return int(v)


def _opt_pos_int(name: str, v) -> int | None:
    return None if v is None else _pos_int(name, v)


def _finite(name: str, v) -> float:
    try:
        ok = _is_real(v) and math.isfinite(float(v))
    except OverflowError:  # an int beyond float range (JSON allows 4300 digits)
        ok = False
    if not ok:
        raise UNetConfigError(f"{name} must be a finite number, got {v!r}")
    return v if _is_int(v) else float(v)  # keep ints as ints so to_dict round-trips


def _flag(name: str, v) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise UNetConfigError(f"{name} must be true or false, got {v!r}")
    return bool(v)


def _str_list(name: str, v, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)) or len(v) == 0:
        raise UNetConfigError(f"{name} must be a non-empty list of block types, got {v!r}")
    for i, item in enumerate(v):
        if item not in allowed:
            raise UNetConfigError(f"{name}[{i}] = {item!r} is not supported; "
                                  f"supported: {', '.join(allowed)}")
    return tuple(v)


def _normalise(cfg: UNetConfig) -> dict[str, Any]:
    """Check each field on its own and return canonical values (tuples, plain ints)."""
    out: dict[str, Any] = {}
    for name, allowed in _CHOICES.items():
        v = getattr(cfg, name)
        if not any(_same(v, a) for a in allowed):
            raise UNetConfigError(f"{name} = {v!r} is not supported; supported: "
                                  f"{', '.join(repr(a) for a in allowed)}")
    out["downsample_padding"] = int(cfg.downsample_padding)

    s = cfg.sample_size
    if s is not None:
        if _is_int(s):
            out["sample_size"] = _pos_int("sample_size", s)
        elif isinstance(s, (list, tuple)) and len(s) == 2:
            out["sample_size"] = (_pos_int("sample_size[0]", s[0]), _pos_int("sample_size[1]", s[1]))
        else:
            raise UNetConfigError(f"sample_size must be an int or a [height, width] pair, got {s!r}")
    for name in ("in_channels", "out_channels", "layers_per_block"):
        out[name] = _pos_int(name, getattr(cfg, name))
    for name in ("time_embedding_dim", "attention_head_dim", "attn_norm_num_groups", "norm_num_groups",
                 "num_train_timesteps", "num_class_embeds"):
        out[name] = _opt_pos_int(name, getattr(cfg, name))
    for name in ("center_input_sample", "flip_sin_to_cos", "add_attention"):
        out[name] = _flag(name, getattr(cfg, name))
    out["freq_shift"] = _finite("freq_shift", cfg.freq_shift)
    out["norm_eps"] = _finite("norm_eps", cfg.norm_eps)
    if out["norm_eps"] <= 0:
        raise UNetConfigError(f"norm_eps must be > 0, got {cfg.norm_eps!r}")
    out["mid_block_scale_factor"] = _finite("mid_block_scale_factor", cfg.mid_block_scale_factor)
    if out["mid_block_scale_factor"] <= 0:
        raise UNetConfigError(
            f"mid_block_scale_factor must be > 0, got {cfg.mid_block_scale_factor!r}")
    out["dropout"] = _finite("dropout", cfg.dropout)
    if not 0 <= out["dropout"] <= 1:
        raise UNetConfigError(f"dropout must be in [0, 1], got {cfg.dropout!r}")

    out["down_block_types"] = _str_list("down_block_types", cfg.down_block_types, DOWN_BLOCK_TYPES)
    out["up_block_types"] = _str_list("up_block_types", cfg.up_block_types, UP_BLOCK_TYPES)
    ch = cfg.block_out_channels
    if isinstance(ch, (str, bytes)) or not isinstance(ch, (list, tuple)) or len(ch) == 0:
        raise UNetConfigError(f"block_out_channels must be a non-empty list of ints, got {ch!r}")
    out["block_out_channels"] = tuple(_pos_int(f"block_out_channels[{i}]", c)
                                      for i, c in enumerate(ch))
    return out


def _check_structure(cfg: UNetConfig) -> None:
    """Checks that relate fields to each other."""
    if cfg.time_embedding_type == "learned" and cfg.num_train_timesteps is None:
        raise UNetConfigError("time_embedding_type 'learned' needs num_train_timesteps (the rows of its table)")
    if cfg.time_embedding_type != "positional" and cfg.class_embed_type == "timestep":
        # diffusers sends the labels through time_proj (here a table): not built, refused rather than
        # embedding them with the sinusoid
        raise UNetConfigError(f"class_embed_type 'timestep' with time_embedding_type "
                              f"{cfg.time_embedding_type!r} is not supported (only with 'positional')")
    n = cfg.num_blocks
    if len(cfg.down_block_types) != n:
        raise UNetConfigError(
            f"down_block_types has {len(cfg.down_block_types)} entries but block_out_channels "
            f"has {n}; they must match")
    if len(cfg.up_block_types) != len(cfg.down_block_types):
        raise UNetConfigError(
            f"up_block_types has {len(cfg.up_block_types)} entries but down_block_types has "
            f"{len(cfg.down_block_types)}; they must match")
    _check_skip_blocks(cfg)
    g = cfg.norm_num_groups
    for i, c in enumerate(cfg.block_out_channels):
        if g is not None and c % g:
            raise UNetConfigError(f"block_out_channels[{i}] = {c} is not divisible by "
                                  f"norm_num_groups = {g}")
        if g is None and c < 4:   # min(c // 4, 32) groups: none below 4 channels (diffusers fails too)
            raise UNetConfigError(f"block_out_channels[{i}] = {c}: with norm_num_groups null the norms "
                                  f"take min(channels // 4, 32) groups, which needs at least 4 channels")
    if cfg.add_attention and cfg.attn_norm_groups() and cfg.block_out_channels[-1] % cfg.attn_norm_groups():
        raise UNetConfigError(
            f"block_out_channels[-1] = {cfg.block_out_channels[-1]} (the mid-block attention) is "
            f"not divisible by attn_norm_num_groups = {cfg.attn_norm_num_groups}")
    hd = cfg.attention_head_dim
    if hd is not None:
        for c, where in _attention_channels(cfg):
            if c % hd:
                raise UNetConfigError(f"attention_head_dim = {hd} does not divide the {c} "
                                      f"channels of {where}")
    half = cfg.block_out_channels[0] // 2
    if half == 0 or half - cfg.freq_shift == 0:
        raise UNetConfigError(
            f"freq_shift = {cfg.freq_shift!r} with block_out_channels[0] = "
            f"{cfg.block_out_channels[0]} gives a zero frequency divisor (half - freq_shift); "
            f"block_out_channels[0] must be >= 2 and freq_shift != block_out_channels[0] // 2")
    hw = cfg.sample_hw
    if hw is not None:
        for v in hw:
            if v % cfg.size_multiple:
                raise UNetConfigError(
                    f"sample_size = {cfg.sample_size!r} must be a multiple of "
                    f"{cfg.size_multiple} (2**(len(block_out_channels)-1))")
    _check_size(cfg)


def _check_skip_blocks(cfg: UNetConfig) -> None:
    """The score-SDE skip blocks' constraints: the ones diffusers' forward would trip over (shape
    errors deep in a run) or silently not build; each refused here by name."""
    n, ch = cfg.num_blocks, cfg.block_out_channels
    if cfg.norm_num_groups is None:
        plain = [t for t in cfg.down_block_types + cfg.up_block_types if t not in _SKIP_BLOCKS]
        if plain:   # their resnets take norm_num_groups as is: GroupNorm(None) fails in diffusers
            raise UNetConfigError(f"norm_num_groups null is supported with the score-SDE skip blocks only; "
                                  f"{plain[0]} needs a group count")
    for i in range(n - 1):   # a downsampling skip block reads the image pyramid: every block before must keep it
        if cfg.skip_down(i) and not all(cfg.skip_down(j) for j in range(i)):
            raise UNetConfigError(f"down_block_types[{i}] = {cfg.down_block_types[i]!r} after a non-skip block: "
                                  f"the image pyramid it downsamples would be at the wrong resolution")
    if any(cfg.skip_down(i) for i in range(n - 1)) and cfg.center_input_sample:
        raise UNetConfigError("center_input_sample with the skip down blocks is not supported (their image "
                              "pyramid would start from the centred input)")
    if any(cfg.skip_down(i) for i in range(n - 1)) and cfg.in_channels != 3:
        raise UNetConfigError(f"the skip down blocks add a 1x1 conv of the 3-channel input image: "
                              f"in_channels must be 3, got {cfg.in_channels}")
    first = next((i for i in range(n) if cfg.skip_up(i)), None)
    if first is not None:
        for i in range(first, n):
            if not cfg.skip_up(i):
                raise UNetConfigError(f"up_block_types[{i}] = {cfg.up_block_types[i]!r} after a skip up block: the "
                                      f"skip up blocks must be the last ones (each upsamples the output pyramid "
                                      f"of the one before)")
        if first < n - 1 and cfg.out_channels != 3:
            raise UNetConfigError(f"the skip up blocks build a 3-channel output pyramid added to the "
                                  f"output: out_channels must be 3, got {cfg.out_channels}")
    for i, c in enumerate(ch):
        attn = cfg.down_block_types[i] == "AttnSkipDownBlock2D" or cfg.up_block_types[n - 1 - i] == "AttnSkipUpBlock2D"
        if attn and c % SKIP_ATTN_GROUPS:
            raise UNetConfigError(f"block_out_channels[{i}] = {c}: the skip blocks' attention norm has "
                                  f"{SKIP_ATTN_GROUPS} groups, which must divide it")
        if (cfg.skip_down(i) or cfg.skip_up(n - 1 - i)) and c < 4:
            raise UNetConfigError(f"block_out_channels[{i}] = {c}: the skip blocks' norms take "
                                  f"min(channels // 4, 32) groups, which needs at least 4 channels")


def _check_size(cfg: UNetConfig) -> None:
    """The bounds above, each checked before anything proportional to it is built."""
    blocks = cfg.num_blocks * (2 * cfg.layers_per_block + 1) + 2
    if blocks > MAX_RESNET_BLOCKS:
        raise UNetConfigError(
            f"layers_per_block = {cfg.layers_per_block} with {cfg.num_blocks} entries in "
            f"block_out_channels gives {blocks} resnet blocks, over the limit of "
            f"{MAX_RESNET_BLOCKS}")
    params = parameter_count(cfg)
    if params > MAX_PARAMETERS:
        raise UNetConfigError(
            f"block_out_channels = {list(cfg.block_out_channels)!r:.200}, time_embedding_dim = "
            f"{cfg.time_embedding_dim!r} give {params:.3g} parameters ({4 * params / 2**30:.3g} "
            f"GiB as float32), over the limit of {MAX_PARAMETERS:.3g}")
    hw = cfg.sample_hw
    if hw is not None:
        floats, where = _largest_activation(cfg, *hw)
        if floats > MAX_SAMPLE_FLOATS:
            raise UNetConfigError(
                f"sample_size = {cfg.sample_size!r} with block_out_channels = "
                f"{list(cfg.block_out_channels)!r:.200} needs {floats:.3g} floats "
                f"({4 * floats / 2**30:.3g} GiB) for one sample's activation in {where}, over "
                f"the limit of {MAX_SAMPLE_FLOATS:.3g}")


def _largest_activation(cfg: UNetConfig, height: int, width: int) -> tuple[int, str]:
    """(floats, module) of the largest single buffer of a one-sample forward: a module's input or
    output, or an attention's scores (heads x pixels^2) and projections."""
    best = (0, "")
    for ly in _layers(cfg):
        px = (height >> ly.level) * (width >> ly.level)
        out_px = px // 4 if ly.kind in ("down", "resnet_down") else px * 4 if ly.kind in ("up", "resnet_up") else px
        floats = max(ly.c_in * px, ly.c_out * out_px)
        if ly.kind == "attn":
            floats = max(floats, cfg.heads(ly.c_in) * px * px + 4 * ly.c_in * px)
        best = max(best, (floats, ly.name))
    return best


def _attention_channels(cfg: UNetConfig) -> Iterator[tuple[int, str]]:
    """(channels, where) of every attention layer."""
    ch = cfg.block_out_channels
    for i, t in enumerate(cfg.down_block_types):
        if t in _ATTN_BLOCKS:
            yield ch[i], f"down_blocks.{i}"
    if cfg.add_attention:
        yield ch[-1], "mid_block"
    for i, t in enumerate(cfg.up_block_types):
        if t in _ATTN_BLOCKS:
            yield ch[-1 - i], f"up_blocks.{i}"


# ---------------------------------------------------------------------- the layer walk

@dataclass(frozen=True)
class _Layer:
    """One parametrised module of the U-Net (listed in diffusers' registration order).

    kind: "conv3" (3x3 pad 1), "conv1" (1x1), "down" (3x3 stride 2), "up" (nearest x2 then 3x3), "linear",
    "class_linear" (the class MLP, run once per call), "embedding" (c_in rows of c_out),
    "fourier" (c_in Gaussian Fourier frequencies),
    "norm", "resnet", "resnet_down" / "resnet_up" (a resnet that avg-pools / upsamples x2 after
    norm1), "attn". level: halvings of the input image size at the module's input."""

    name: str
    kind: str
    c_in: int
    c_out: int
    level: int = 0
    shortcut: bool | None = None   # a resnet's 1x1 conv_shortcut: None = where c_in != c_out

    @property
    def has_shortcut(self) -> bool:
        return self.c_in != self.c_out if self.shortcut is None else self.shortcut


def _layers(cfg: UNetConfig) -> list[_Layer]:
    ch, n, temb = cfg.block_out_channels, cfg.num_blocks, cfg.time_embed_dim
    L: list[_Layer] = [_Layer("conv_in", "conv3", cfg.in_channels, ch[0])]
    if cfg.time_embedding_type == "learned":   # nn.Embedding(num_train_timesteps, C0), before time_embedding
        L.append(_Layer("time_proj", "embedding", cfg.num_train_timesteps, ch[0]))
    elif cfg.time_embedding_type == "fourier":   # GaussianFourierProjection's frequencies [C0]
        L.append(_Layer("time_proj", "fourier", ch[0], ch[0]))
    L += [_Layer("time_embedding.linear_1", "linear", cfg.timestep_input_dim, temb),
          _Layer("time_embedding.linear_2", "linear", temb, temb)]
    # diffusers registers class_embedding right after time_embedding
    if cfg.class_embedding_kind == "table":
        L.append(_Layer("class_embedding", "embedding", cfg.num_class_embeds, temb))
    elif cfg.class_embedding_kind == "timestep":
        L += [_Layer("class_embedding.linear_1", "class_linear", ch[0], temb),
              _Layer("class_embedding.linear_2", "class_linear", temb, temb)]
    c_out = ch[0]
    for i, t in enumerate(cfg.down_block_types):
        c_in, c_out = c_out, ch[i]
        p = f"down_blocks.{i}"
        if t in ("AttnDownBlock2D", "AttnSkipDownBlock2D"):  # diffusers registers `attentions` before `resnets`
            L += [_Layer(f"{p}.attentions.{j}", "attn", c_out, c_out, i)
                  for j in range(cfg.layers_per_block)]
        L += [_Layer(f"{p}.resnets.{j}", "resnet", c_in if j == 0 else c_out, c_out, i)
              for j in range(cfg.layers_per_block)]
        if i < n - 1 and cfg.skip_down(i):   # FIR resnet (always a 1x1 shortcut), then the pyramid's 1x1 conv
            L += [_Layer(f"{p}.resnet_down", "resnet_down", c_out, c_out, i, shortcut=True),
                  _Layer(f"{p}.skip_conv", "conv1", 3, c_out, i + 1)]
        elif i < n - 1 and cfg.resnet_downsampler(i):
            L.append(_Layer(f"{p}.downsamplers.0", "resnet_down", c_out, c_out, i))
        elif i < n - 1:
            L.append(_Layer(f"{p}.downsamplers.0.conv", "down", c_out, c_out, i))
    rev = ch[::-1]
    c_out = rev[0]
    for i, t in enumerate(cfg.up_block_types):
        prev, c_out = c_out, rev[i]
        skip_last = rev[min(i + 1, n - 1)]  # the last resnet takes the previous level's skip
        p, level, m = f"up_blocks.{i}", n - 1 - i, cfg.layers_per_block + 1
        if t == "AttnUpBlock2D":
            L += [_Layer(f"{p}.attentions.{j}", "attn", c_out, c_out, level) for j in range(m)]
        elif t == "AttnSkipUpBlock2D":   # one attention, after the last resnet
            L.append(_Layer(f"{p}.attentions.0", "attn", c_out, c_out, level))
        for j in range(m):
            c_in = (prev if j == 0 else c_out) + (skip_last if j == m - 1 else c_out)
            L.append(_Layer(f"{p}.resnets.{j}", "resnet", c_in, c_out, level))
        if i < n - 1 and cfg.skip_up(i):   # FIR resnet; the pyramid's norm + act + 3x3 conv to 3 channels
            L += [_Layer(f"{p}.resnet_up", "resnet_up", c_out, c_out, level, shortcut=True),
                  _Layer(f"{p}.skip_conv", "conv3", c_out, 3, level),
                  _Layer(f"{p}.skip_norm", "norm", c_out, c_out, level)]
        elif i < n - 1 and cfg.resnet_upsampler(i):
            L.append(_Layer(f"{p}.upsamplers.0", "resnet_up", c_out, c_out, level))
        elif i < n - 1:
            L.append(_Layer(f"{p}.upsamplers.0.conv", "up", c_out, c_out, level))
    # diffusers registers up_blocks before mid_block, so the mid block's keys come after them
    c = ch[-1]
    if cfg.add_attention:
        L.append(_Layer("mid_block.attentions.0", "attn", c, c, n - 1))
    L += [_Layer(f"mid_block.resnets.{j}", "resnet", c, c, n - 1) for j in range(2)]
    L += [_Layer("conv_norm_out", "norm", ch[0], ch[0]),
          _Layer("conv_out", "conv3", ch[0], cfg.out_channels)]
    return L


def _conv(out: dict, name: str, c_in: int, c_out: int, k: int) -> None:
    out[f"{name}.weight"] = (c_out, c_in, k, k)
    out[f"{name}.bias"] = (c_out,)


def _linear(out: dict, name: str, c_in: int, c_out: int) -> None:
    out[f"{name}.weight"] = (c_out, c_in)
    out[f"{name}.bias"] = (c_out,)


def _norm(out: dict, name: str, c: int) -> None:
    out[f"{name}.weight"] = (c,)
    out[f"{name}.bias"] = (c,)


def weight_shapes(cfg: UNetConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of diffusers' ``UNet2DModel`` for ``cfg``: state-dict key -> shape, in
    diffusers' state_dict order."""
    out: dict[str, tuple[int, ...]] = {}
    temb = cfg.time_embed_dim
    for ly in _layers(cfg):
        if ly.kind in ("conv3", "down", "up"):
            _conv(out, ly.name, ly.c_in, ly.c_out, 3)
        elif ly.kind == "conv1":
            _conv(out, ly.name, ly.c_in, ly.c_out, 1)
        elif ly.kind in ("linear", "class_linear"):
            _linear(out, ly.name, ly.c_in, ly.c_out)
        elif ly.kind == "embedding":
            out[f"{ly.name}.weight"] = (ly.c_in, ly.c_out)
        elif ly.kind == "fourier":
            out[f"{ly.name}.weight"] = (ly.c_in,)
        elif ly.kind == "norm":
            _norm(out, ly.name, ly.c_in)
        elif ly.kind in ("resnet", "resnet_down", "resnet_up"):
            _norm(out, f"{ly.name}.norm1", ly.c_in)
            _conv(out, f"{ly.name}.conv1", ly.c_in, ly.c_out, 3)
            _linear(out, f"{ly.name}.time_emb_proj", temb, cfg.time_proj_rows * ly.c_out)
            _norm(out, f"{ly.name}.norm2", ly.c_out)
            _conv(out, f"{ly.name}.conv2", ly.c_out, ly.c_out, 3)
            if ly.has_shortcut:
                _conv(out, f"{ly.name}.conv_shortcut", ly.c_in, ly.c_out, 1)
        elif ly.kind == "attn":
            if not (ly.name.startswith("mid_block.") and cfg.attn_norm_groups() is None):
                _norm(out, f"{ly.name}.group_norm", ly.c_in)
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                _linear(out, f"{ly.name}.{proj}", ly.c_in, ly.c_in)
        else:  # pragma: no cover - _layers only makes the kinds above
            raise AssertionError(ly.kind)
    return out


def parameter_count(cfg: UNetConfig) -> int:
    return sum(math.prod(s) for s in weight_shapes(cfg).values())


# ---------------------------------------------------------------------- arithmetic

def flops(cfg: UNetConfig, batch: int = 1, height: int | None = None,
          width: int | None = None, *, attention_matmuls: bool = True) -> float:
    """Floating-point operations of one forward pass, counted as 2 x multiply-adds.

    Counted: every convolution (3x3, stride-2 3x3, 1x1 shortcuts), every linear layer (time
    embedding MLP, per-resnet time projections, attention q/k/v/out) and the two attention
    matmuls (Q K^T and P V; ``attention_matmuls=False`` leaves them out, which is what counters
    that only see weight layers report). Not counted: bias adds, norms, activations, softmax,
    residual adds, upsampling copies and concatenation (together a few percent at these sizes).
    ``height``/``width`` default to ``sample_size``."""
    height, width = cfg.image_hw(height, width)
    batch = validate.count("batch", batch)
    temb = cfg.time_embed_dim
    total = 0
    for ly in _layers(cfg):
        px = (height >> ly.level) * (width >> ly.level)  # pixels at the module's input
        if ly.kind == "conv3":
            total += 9 * ly.c_in * ly.c_out * px
        elif ly.kind == "conv1":
            total += ly.c_in * ly.c_out * px
        elif ly.kind == "down":
            total += 9 * ly.c_in * ly.c_out * px // 4
        elif ly.kind == "up":
            total += 9 * ly.c_in * ly.c_out * px * 4
        elif ly.kind == "linear":
            total += ly.c_in * ly.c_out
        elif ly.kind in ("resnet", "resnet_down", "resnet_up"):
            # the convs run at the resampled size (the UP conv counted as a plain 3x3 at 2x, as "up")
            px = px // 4 if ly.kind == "resnet_down" else px * 4 if ly.kind == "resnet_up" else px
            total += 9 * ly.c_in * ly.c_out * px + 9 * ly.c_out * ly.c_out * px + temb * cfg.time_proj_rows * ly.c_out
            if ly.has_shortcut:
                total += ly.c_in * ly.c_out * px
        elif ly.kind == "attn":
            c = ly.c_in
            total += 4 * px * c * c  # q, k, v, out projections
            if attention_matmuls:
                total += 2 * px * px * c  # Q K^T and P V, summed over heads
    return 2.0 * total * batch


# ---------------------------------------------------------------------- random weights

def _is_norm(key: str) -> bool:
    module = key.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    return module in ("norm1", "norm2", "group_norm", "conv_norm_out", "skip_norm")


def random_weights(cfg: UNetConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float32 weights, deterministic for ``seed``, in weight_shapes order.

    Convs and linears follow PyTorch's default init (weights and biases uniform in
    +-1/sqrt(fan_in)); norm scales are 1 + 0.1 N(0, 1) and shifts 0.1 N(0, 1), so that tests
    exercise the affine terms."""
    rng = np.random.default_rng(seed)
    shapes = weight_shapes(cfg)
    out: dict[str, np.ndarray] = {}
    fan_in = 1
    for key, shape in shapes.items():
        if _is_norm(key):
            a = 0.1 * rng.standard_normal(shape, dtype=np.float32)
            if key.endswith(".weight"):
                a += np.float32(1.0)
        else:
            if key.endswith(".weight"):
                fan_in = math.prod(shape[1:])  # the bias that follows shares this fan-in
            bound = np.float32(1.0 / math.sqrt(fan_in))
            a = (rng.random(shape, dtype=np.float32) * np.float32(2.0) - np.float32(1.0)) * bound
        out[key] = np.ascontiguousarray(a, dtype=np.float32)
    return out


# ---------------------------------------------------------------------- presets

# Settings shared with google/ddpm-cifar10-32 (the original DDPM code's conventions).
_DDPM_STYLE = dict(
    act_fn="silu", attention_head_dim=None, center_input_sample=False, downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=1, norm_eps=1e-6,
    time_embedding_type="positional",
)

# The U-Net of openai's ImageNet-64 consistency models as diffusers converts them (cd_imagenet64_l2
# and friends: ADM blocks, scale_shift, 1000 classes, 296M parameters): the shape the consistency-
# model tests and benchmark run with random weights. Not a preset: no weights ship with it.
CM_IMAGENET64: dict[str, Any] = dict(
    sample_size=64, in_channels=3, out_channels=3, layers_per_block=3, num_class_embeds=1000,
    block_out_channels=[192, 384, 576, 768], attention_head_dim=64,
    down_block_types=["ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"],
    resnet_time_scale_shift="scale_shift", attn_norm_num_groups=32, upsample_type="resnet", downsample_type="resnet")

PRESETS: dict[str, dict[str, Any]] = {
    # The small benchmark network: 32x32x1, attention at 16x16.
    "bench-small": dict(
        _class_name="UNet2DModel", sample_size=32, in_channels=1, out_channels=1,
        block_out_channels=[32, 64, 64], layers_per_block=2,
        down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        norm_num_groups=8, **_DDPM_STYLE),
    # Exactly google/ddpm-cifar10-32's unet/config.json.
    "ddpm-cifar10": dict(
        _class_name="UNet2DModel", sample_size=32, in_channels=3, out_channels=3,
        block_out_channels=[128, 256, 256, 256], layers_per_block=2,
        down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        norm_num_groups=32, **_DDPM_STYLE),
}
