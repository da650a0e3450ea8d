"""The reference U-Net: diffusers' ``UNet2DModel`` (the supported subset) in plain PyTorch.

Written independently of diffusers as an ordinary ``nn.Module`` (F.conv2d, F.group_norm, F.silu,
nearest upsampling, softmax attention written out with matmuls). Its state-dict keys, shapes and
order equal ``unet_config.weight_shapes(cfg)``, so a diffusers checkpoint loads unchanged.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..unet_config import SKIP_ATTN_GROUPS, SKIP_SCALE, UNetConfig, random_weights, weight_shapes
from ..weights import check_weights

__all__ = ["ReferenceUNet"]


# ---------------------------------------------------------------------- parameter holders
# Uninitialised on purpose: ReferenceUNet fills every parameter (seeded init or given weights).

class _Conv(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c_out, c_in, k, k))  # [Cout, Cin, k, k]
        self.bias = nn.Parameter(torch.empty(c_out))


class _Linear(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c_out, c_in))  # [out, in]
        self.bias = nn.Parameter(torch.empty(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _GroupNorm(nn.Module):
    def __init__(self, c: int, groups: int, eps: float):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.empty(c))
        self.bias = nn.Parameter(torch.empty(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.groups, self.weight, self.bias, self.eps)


# ---------------------------------------------------------------------- layers

# act_fn -> the activation (as torch.nn's SiLU, Mish, GELU (erf form), ReLU)
_ACTS = {"silu": F.silu, "swish": F.silu, "mish": F.mish, "gelu": F.gelu, "relu": F.relu}


def _fir_kernel(c: int, x: torch.Tensor, norm: float) -> torch.Tensor:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=x.dtype, device=x.device)
    return (k[:, None] * k[None, :] / norm).expand(c, 1, 4, 4)          # [C, 1, 4, 4] depthwise


def fir_down(x: torch.Tensor) -> torch.Tensor:
    """score-SDE's FIR downsampling (diffusers' downsample_2d, kernel [1, 3, 3, 1]): [N, C, H, W] -> [N, C, H/2, W/2]."""
    return F.conv2d(F.pad(x, (1, 1, 1, 1)), _fir_kernel(x.shape[1], x, 64.0), stride=2, groups=x.shape[1])


def fir_up(x: torch.Tensor) -> torch.Tensor:
    """score-SDE's FIR upsampling (diffusers' upsample_2d, kernel [1, 3, 3, 1]): [N, C, H, W] -> [N, C, 2H, 2W]."""
    n, c, h, w = x.shape
    u = x.new_zeros(n, c, 2 * h, 2 * w)
    u[:, :, ::2, ::2] = x                                                 # zero insertion
    return F.conv2d(F.pad(u, (2, 1, 2, 1)), _fir_kernel(c, x, 16.0), groups=c)


_RESAMPLE = {"down": lambda t: F.avg_pool2d(t, 2), "up": lambda t: F.interpolate(t, scale_factor=2.0, mode="nearest"),
             "fir_down": fir_down, "fir_up": fir_up}


class _Resnet(nn.Module):
    """diffusers ResnetBlock2D (pre-norm; "default" or "scale_shift" time embedding; act_fn)."""

    def __init__(self, cfg: UNetConfig, c_in: int, c_out: int, out_scale: float = 1.0, resample: str | None = None,
                 groups: tuple[int, int] | None = None, shortcut: bool | None = None):
        super().__init__()
        g1, g2 = groups if groups is not None else (cfg.norm_groups(c_in), cfg.norm_groups(c_out))
        eps = cfg.norm_eps
        # "down" (avg-pool 2x2) / "up" (nearest x2) / "fir_down" / "fir_up" (score-SDE's FIR kernel)
        # after norm1, on it and on the input: diffusers' down=True / up=True
        self.resample = resample
        self.norm1 = _GroupNorm(c_in, g1, eps)
        self.conv1 = _Conv(c_in, c_out, 3)
        self.scale_shift = cfg.resnet_time_scale_shift == "scale_shift"
        self.time_emb_proj = _Linear(cfg.time_embed_dim, cfg.time_proj_rows * c_out)
        self.act = _ACTS[cfg.act_fn]
        self.norm2 = _GroupNorm(c_out, g2, eps)
        self.conv2 = _Conv(c_out, c_out, 3)
        # a 1x1 conv where the channel count changes (or where diffusers forces use_in_shortcut)
        self.conv_shortcut = _Conv(c_in, c_out, 1) if (c_in != c_out if shortcut is None else shortcut) else None
        self.out_scale = out_scale

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x: [N, Cin, H, W], emb: [N, T]
        h = self.act(self.norm1(x))
        if self.resample is not None:
            x, h = _RESAMPLE[self.resample](x), _RESAMPLE[self.resample](h)   # [N, C, H/2 or 2H, ...]
        h = F.conv2d(h, self.conv1.weight, self.conv1.bias, padding=1)   # [N, Cout, H, W]
        t = self.time_emb_proj(self.act(emb))[:, :, None, None]         # [N, Cout or 2 Cout, 1, 1]
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + t)
        h = self.act(h)
        h = F.conv2d(h, self.conv2.weight, self.conv2.bias, padding=1)
        skip = x if self.conv_shortcut is None else \
            F.conv2d(x, self.conv_shortcut.weight, self.conv_shortcut.bias)
        return (skip + h) / self.out_scale


class _Attention(nn.Module):
    """diffusers Attention as built for UNet2DModel: group norm, multi-head self-attention over
    the H*W positions, output projection, residual add, then division by ``out_scale``."""

    def __init__(self, cfg: UNetConfig, c: int, groups: int | None, out_scale: float = 1.0):
        super().__init__()
        # groups None: no norm (the mid block's attention with scale_shift, as diffusers builds it)
        self.group_norm = _GroupNorm(c, groups, cfg.norm_eps) if groups is not None else nn.Identity()
        self.to_q = _Linear(c, c)
        self.to_k = _Linear(c, c)
        self.to_v = _Linear(c, c)
        self.to_out = nn.ModuleList([_Linear(c, c)])  # diffusers' to_out.0 (to_out.1 = dropout)
        self.heads = cfg.heads(c)
        self.out_scale = out_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, hgt, wid = x.shape                                         # x: [N, C, H, W]
        L, heads, d = hgt * wid, self.heads, c // self.heads
        h = self.group_norm(x).reshape(n, c, L).transpose(1, 2)          # [N, L, C]

        def split(t: torch.Tensor) -> torch.Tensor:                      # -> [N, heads, L, d]
            return t.reshape(n, L, heads, d).transpose(1, 2)

        q, k, v = split(self.to_q(h)), split(self.to_k(h)), split(self.to_v(h))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(d))  # [N, heads, L, L]
        p = torch.softmax(scores, dim=-1)
        o = torch.matmul(p, v).transpose(1, 2).reshape(n, L, c)           # [N, L, C]
        o = self.to_out[0](o).transpose(1, 2).reshape(n, c, hgt, wid)     # [N, C, H, W]
        return (o + x) / self.out_scale


class _Downsample(nn.Module):
    def __init__(self, c: int, padding: int):
        super().__init__()
        self.conv = _Conv(c, c, 3)
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C, H, W] -> [N, C, H/2, W/2]
        if self.padding == 0:  # diffusers pads right and bottom only, then a valid conv
            return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.conv.weight, self.conv.bias, stride=2)
        return F.conv2d(x, self.conv.weight, self.conv.bias, stride=2, padding=1)


class _Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = _Conv(c, c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")           # [N, C, 2H, 2W]
        return F.conv2d(x, self.conv.weight, self.conv.bias, padding=1)


class _DownBlock(nn.Module):
    """DownBlock2D / AttnDownBlock2D / ResnetDownsampleBlock2D: resnets (each followed by attention
    in the Attn variant), then a stride-2 conv (or a downsampling resnet) except in the last block. Every resnet (or attention) output and the
    downsampled output are skips. SkipDownBlock2D / AttnSkipDownBlock2D (score-SDE): min(C/4, 32)
    groups, outputs divided by sqrt 2, a FIR-downsampling resnet, and the FIR-downsampled input
    image through a 1x1 conv added to its output."""

    def __init__(self, cfg: UNetConfig, i: int, c_in: int, c_out: int):
        super().__init__()
        m, t = cfg.layers_per_block, cfg.down_block_types[i]
        self.skip = cfg.skip_down(i)
        s = SKIP_SCALE if self.skip else 1.0
        if t in ("AttnDownBlock2D", "AttnSkipDownBlock2D"):  # registered first, as in diffusers
            g = SKIP_ATTN_GROUPS if self.skip else cfg.norm_groups(c_out)
            self.attentions = nn.ModuleList([_Attention(cfg, c_out, g, s) for _ in range(m)])
        else:
            self.attentions = None
        self.resnets = nn.ModuleList([
            _Resnet(cfg, c_in if j == 0 else c_out, c_out, s,
                    groups=(cfg.norm_groups(c_in if j == 0 else c_out, True), cfg.norm_groups(c_out, True))
                    if self.skip else None) for j in range(m)])
        last = i == cfg.num_blocks - 1
        self.downsamplers = None
        if self.skip and not last:
            g = cfg.norm_groups(c_out, True)
            self.resnet_down = _Resnet(cfg, c_out, c_out, s, resample="fir_down", groups=(g, g), shortcut=True)
            self.skip_conv = _Conv(3, c_out, 1)
        elif not last:
            self.downsamplers = nn.ModuleList(
                [_Resnet(cfg, c_out, c_out, resample="down") if cfg.resnet_downsampler(i)
                 else _Downsample(c_out, cfg.downsample_padding)])

    def forward(self, h, emb, skips: list, img):
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, emb)
            if self.attentions is not None:
                h = self.attentions[j](h)
            skips.append(h)
        if self.skip and hasattr(self, "resnet_down"):
            h = self.resnet_down(h, emb)
            img = fir_down(img)                                          # [N, 3, H/2, W/2]
            h = F.conv2d(img, self.skip_conv.weight, self.skip_conv.bias) + h
            skips.append(h)
        elif self.downsamplers is not None:
            d = self.downsamplers[0]
            h = d(h, emb) if isinstance(d, _Resnet) else d(h)
            skips.append(h)
        return h, img


class _UpBlock(nn.Module):
    """UpBlock2D / AttnUpBlock2D: layers_per_block + 1 resnets, each on [h, skip] concatenated
    along channels (attention after each in the Attn variant), then nearest x2 + conv (or an
    upsampling resnet) except in the last block. SkipUpBlock2D / AttnSkipUpBlock2D (score-SDE):
    one attention after the last resnet, outputs divided by sqrt 2, and the 3-channel output
    pyramid: FIR-upsampled from the level below, plus conv(SiLU(skip_norm(h))) where the block
    upsamples (with a FIR resnet)."""

    def __init__(self, cfg: UNetConfig, i: int, prev: int, c_out: int, skip_last: int):
        super().__init__()
        m, t = cfg.layers_per_block + 1, cfg.up_block_types[i]
        self.skip = cfg.skip_up(i)
        s = SKIP_SCALE if self.skip else 1.0
        if t == "AttnUpBlock2D":
            self.attentions = nn.ModuleList([_Attention(cfg, c_out, cfg.norm_groups(c_out)) for _ in range(m)])
        elif t == "AttnSkipUpBlock2D":
            self.attentions = nn.ModuleList([_Attention(cfg, c_out, SKIP_ATTN_GROUPS, s)])
        else:
            self.attentions = None
        resnets = []
        for j in range(m):
            c_h, c_s = prev if j == 0 else c_out, skip_last if j == m - 1 else c_out
            groups = None
            if self.skip:  # AttnSkipUpBlock2D: diffusers' min(c_h + c_s // 4, 32), precedence as written
                g1 = min(c_h + c_s // 4, 32) if t == "AttnSkipUpBlock2D" else cfg.norm_groups(c_h + c_s, True)
                groups = (g1, cfg.norm_groups(c_out, True))
            resnets.append(_Resnet(cfg, c_h + c_s, c_out, s, groups=groups))
        self.resnets = nn.ModuleList(resnets)
        last = i == cfg.num_blocks - 1
        self.upsamplers = None
        self.pyramid_step = self.skip and not last
        if self.pyramid_step:
            g = cfg.norm_groups(c_out, True)
            self.resnet_up = _Resnet(cfg, c_out, c_out, s, resample="fir_up", groups=(g, g), shortcut=True)
            self.skip_conv = _Conv(c_out, 3, 3)
            self.skip_norm = _GroupNorm(c_out, g, cfg.norm_eps)
        elif not last:
            self.upsamplers = nn.ModuleList(
                [_Resnet(cfg, c_out, c_out, resample="up") if cfg.resnet_upsampler(i) else _Upsample(c_out)])

    def forward(self, h, emb, skips: list, pyramid):
        for j, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), emb)          # [N, Ch + Cskip, H, W]
            if self.attentions is not None and (len(self.attentions) > 1 or j == len(self.resnets) - 1):
                h = self.attentions[j if len(self.attentions) > 1 else 0](h)
        if self.skip and pyramid is not None:
            pyramid = fir_up(pyramid)                                    # [N, 3, H, W]
        if self.pyramid_step:
            p = F.conv2d(F.silu(self.skip_norm(h)), self.skip_conv.weight, self.skip_conv.bias, padding=1)
            pyramid = p if pyramid is None else pyramid + p
            h = self.resnet_up(h, emb)
        elif self.upsamplers is not None:
            u = self.upsamplers[0]
            h = u(h, emb) if isinstance(u, _Resnet) else u(h)
        return h, pyramid


class _MidBlock(nn.Module):
    """UNetMidBlock2D: resnet, attention (if add_attention), resnet; all three divide their
    output by mid_block_scale_factor."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        c, s = cfg.block_out_channels[-1], cfg.mid_block_scale_factor
        self.attentions = nn.ModuleList(
            [_Attention(cfg, c, cfg.attn_norm_groups(), s)] if cfg.add_attention else [])
        self.resnets = nn.ModuleList([_Resnet(cfg, c, c, s), _Resnet(cfg, c, c, s)])

    def forward(self, h, emb):
        h = self.resnets[0](h, emb)
        for attn in self.attentions:
            h = attn(h)
        return self.resnets[1](h, emb)


class _TimestepEmbedding(nn.Module):
    def __init__(self, c_in: int, dim: int):
        super().__init__()
        self.linear_1 = _Linear(c_in, dim)
        self.linear_2 = _Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class _Embedding(nn.Module):
    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))


# ---------------------------------------------------------------------- the network

class ReferenceUNet(nn.Module):
    """diffusers' ``UNet2DModel`` (the subset ``UNetConfig`` accepts) in plain PyTorch.

    This is the oracle that the native plan (C++, CUDA and numba engines) is checked against,
    and the "torch-eager" benchmark baseline; it is itself checked against diffusers.

    ``ReferenceUNet(cfg, init_seed=0)`` fills the weights from ``random_weights(cfg, init_seed)``
    (``init_seed=None`` leaves them uninitialised, for a caller that loads a state dict);
    ``ReferenceUNet.from_weights(cfg, weights)`` loads a dict of NumPy arrays (diffusers keys).
    ``forward(sample, timestep)`` returns the model output tensor [N, out_channels, H, W].
    """

    def __init__(self, cfg: UNetConfig | Mapping[str, Any], *, init_seed: int | None = 0):
        super().__init__()
        cfg = cfg if isinstance(cfg, UNetConfig) else UNetConfig.from_dict(cfg)
        self.config = cfg
        ch, n = cfg.block_out_channels, cfg.num_blocks
        # registration order = diffusers' state_dict order (up_blocks before mid_block)
        self.conv_in = _Conv(cfg.in_channels, ch[0], 3)
        if cfg.time_embedding_type != "positional":   # nn.Embedding's table [num_train_timesteps, C0]
            self.time_proj = nn.Module()                # or GaussianFourierProjection's W [C0]
            shape = (cfg.num_train_timesteps, ch[0]) if cfg.time_embedding_type == "learned" else (ch[0],)
            self.time_proj.weight = nn.Parameter(torch.empty(shape))
        self.time_embedding = _TimestepEmbedding(cfg.timestep_input_dim, cfg.time_embed_dim)
        kind = cfg.class_embedding_kind
        if kind == "table":
            self.class_embedding = _Embedding(cfg.num_class_embeds, cfg.time_embed_dim)
        elif kind == "timestep":
            self.class_embedding = _TimestepEmbedding(ch[0], cfg.time_embed_dim)
        self.down_blocks = nn.ModuleList(
            [_DownBlock(cfg, i, ch[max(i - 1, 0)], ch[i]) for i in range(n)])
        rev = ch[::-1]
        self.up_blocks = nn.ModuleList(
            [_UpBlock(cfg, i, rev[max(i - 1, 0)], rev[i], rev[min(i + 1, n - 1)])
             for i in range(n)])
        self.mid_block = _MidBlock(cfg)
        self.conv_norm_out = _GroupNorm(ch[0], cfg.norm_groups(ch[0]), cfg.norm_eps)
        self.conv_out = _Conv(ch[0], cfg.out_channels, 3)
        if init_seed is not None:
            self._fill(random_weights(cfg, init_seed))

    @classmethod
    def from_weights(cls, cfg: UNetConfig | Mapping[str, Any],
                     weights: Mapping[str, Any]) -> "ReferenceUNet":
        """Build from a dict of arrays with diffusers' state-dict keys (checked: every key
        present, no extra keys, right shapes, finite values)."""
        cfg = cfg if isinstance(cfg, UNetConfig) else UNetConfig.from_dict(cfg)
        model = cls(cfg, init_seed=None)
        model._fill(check_weights(weights, weight_shapes(cfg)))
        return model

    def _fill(self, weights: Mapping[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(torch.from_numpy(np.array(weights[name], dtype=np.float32)))  # a copy: weights may be read-only

    def numpy_weights(self) -> dict[str, np.ndarray]:
        """The weights as float32 NumPy arrays, diffusers' keys and order."""
        return {k: v.detach().cpu().float().numpy().copy() for k, v in self.state_dict().items()}

    # -------------------------------------------------------------- forward

    def time_embedding_input(self, t: torch.Tensor) -> torch.Tensor:
        """The time embedding of timesteps t [N] -> [N, C0]: a learned table's rows, or the
        sinusoidal one (diffusers' get_timestep_embedding with max_period 10000, scale 1)."""
        cfg = self.config
        if cfg.time_embedding_type == "learned":
            return F.embedding(t.long(), self.time_proj.weight)
        if cfg.time_embedding_type == "fourier":   # [sin, cos](2 pi W ln t), never flipped (diffusers)
            arg = torch.log(t.float())[:, None] * self.time_proj.weight[None, :] * 2 * math.pi
            return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
        dim = cfg.block_out_channels[0]
        half = dim // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(exponent / (half - cfg.freq_shift))             # [half]
        args = t[:, None].float() * freqs[None, :]                        # [N, half]
        sin, cos = torch.sin(args), torch.cos(args)
        emb = torch.cat([cos, sin] if cfg.flip_sin_to_cos else [sin, cos], dim=-1)
        if dim % 2:
            emb = F.pad(emb, (0, 1))  # odd width: a zero last column
        return emb

    def _timesteps(self, timestep, n: int, device) -> torch.Tensor:
        """An int / float / 0-d or 1-d tensor (length 1 or N) -> a timestep per sample [N]."""
        if torch.is_tensor(timestep):
            t = timestep.to(device)
        elif isinstance(timestep, (bool, np.bool_)):
            raise TypeError("timestep must be a number or a tensor, not a bool")
        elif isinstance(timestep, (int, np.integer)):
            t = torch.tensor(int(timestep), dtype=torch.long, device=device)  # as diffusers
        else:
            t = torch.as_tensor(np.asarray(timestep), device=device)
        if t.dim() == 0:
            t = t[None]
        if t.dim() != 1 or t.shape[0] not in (1, n):
            raise ValueError(f"timestep must be a scalar or have shape [1] or [{n}] "
                             f"(one per sample), got shape {tuple(t.shape)}")
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"timestep must be a real number, got dtype {t.dtype}")
        return t.expand(n)

    def class_embedding_of(self, class_labels, n: int, device) -> torch.Tensor:
        """The class embedding [N, T] of diffusers' ``UNet2DModel.forward(..., class_labels)``."""
        cfg = self.config
        kind = cfg.class_embedding_kind
        if kind is None:
            raise ValueError("class_labels were given but this U-Net has no class embedding")
        if class_labels is None:
            raise ValueError("this U-Net is class-conditional: pass class_labels")
        labels = torch.as_tensor(class_labels, device=device)
        if labels.dim() == 0 or (kind == "identity" and labels.dim() == 1):
            labels = labels.expand(n, *labels.shape[1:]) if labels.dim() else labels[None].expand(n)
        if labels.shape[0] != n:
            raise ValueError(f"class_labels must have {n} rows (one per sample), got shape {tuple(labels.shape)}")
        if kind == "table":
            return self.class_embedding.weight[labels.long()]
        if kind == "timestep":
            return self.class_embedding(self.time_embedding_input(labels))
        return labels.to(self.conv_in.weight.dtype)

    def forward(self, sample: torch.Tensor, timestep, class_labels=None, *,
                class_emb: torch.Tensor | None = None) -> torch.Tensor:
        """sample [N, in_channels, H, W] (H, W multiples of 2**(num_blocks-1)), timestep an int
        or a 0-d / 1-d tensor -> model output [N, out_channels, H, W]. A class-conditional model
        takes ``class_labels`` as diffusers does, or ``class_emb`` [N, T], the embedding itself
        (conditioning.class_embedding: what the engines receive)."""
        cfg = self.config
        if not torch.is_tensor(sample) or sample.dim() != 4 or sample.shape[1] != cfg.in_channels:
            shape = tuple(sample.shape) if hasattr(sample, "shape") else type(sample).__name__
            raise ValueError(f"sample must be a tensor [N, {cfg.in_channels}, H, W], got {shape}")
        n, _, hgt, wid = sample.shape
        if n == 0:
            raise ValueError("sample has batch size 0")
        cfg.check_image_size(hgt, wid)
        x = sample.to(self.conv_in.weight.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0

        t = self._timesteps(timestep, n, x.device)
        emb = self.time_embedding(self.time_embedding_input(t).to(x.dtype))  # [N, T]
        if class_emb is not None:
            if cfg.class_embedding_kind is None:
                raise ValueError("class_emb was given but this U-Net has no class embedding")
            if tuple(class_emb.shape) != (n, cfg.time_embed_dim):
                raise ValueError(f"class_emb must be [{n}, {cfg.time_embed_dim}], got {tuple(class_emb.shape)}")
            emb = emb + class_emb.to(device=x.device, dtype=x.dtype)
        elif class_labels is not None or cfg.class_embedding_kind is not None:
            emb = emb + self.class_embedding_of(class_labels, n, x.device).to(x.dtype)

        h = F.conv2d(x, self.conv_in.weight, self.conv_in.bias, padding=1)   # [N, C0, H, W]
        skips, img, pyramid = [h], x, None                                # img: score-SDE's input pyramid
        for block in self.down_blocks:
            h, img = block(h, emb, skips, img)
        h = self.mid_block(h, emb)                                        # [N, C[-1], H/m, W/m]
        for block in self.up_blocks:
            h, pyramid = block(h, emb, skips, pyramid)
        h = F.silu(self.conv_norm_out(h))                                 # [N, C0, H, W]
        out = F.conv2d(h, self.conv_out.weight, self.conv_out.bias, padding=1)
        if pyramid is not None:                                           # skip up blocks: + [N, 3, H, W]
            out = out + pyramid
        if cfg.time_embedding_type == "fourier":                          # diffusers: sample / timesteps
            out = out / t.to(out.dtype).reshape(n, 1, 1, 1)
        return out
