"""Class conditioning: labels -> the class embedding the U-Net adds to its time embedding, and the
guidance scale of classifier-free guidance (CFG).

A sampling call's labels are fixed for all of its steps, so the class embedding [rows, D]
(D = time_embed_dim) is computed here once per call, in float64 and rounded to float32, and every
engine (C++, CUDA, numba, the reference U-Net) receives the same rows: the plan's
``time_embedding.linear_2`` op adds them to its output (plan.py, CLASS_SLOT).

diffusers' ``UNet2DModel`` rules (``UNetConfig.class_embedding_kind``):
- "table": ``class_embed_type=None`` with ``num_class_embeds``: integer labels in
  [0, num_class_embeds), embedding = ``class_embedding.weight[label]``;
- "timestep": real labels through the timestep sinusoid (the model's flip_sin_to_cos and
  freq_shift) and the MLP ``class_embedding.linear_1 -> SiLU -> linear_2``;
- "identity": the caller passes the embedding itself, float [N, D].

Guidance: a model trained with label dropout has a *null class* (the usual convention: one extra
label, the last row of the table, meaning "no label"); the model directory names it
(model_index.json ``_fastddpm_null_class``). A guided step combines the conditional and the
null-class model outputs as ``m_u + w (m_c - m_u)``; the engines run both as one batch of 2n rows
(conditional rows first) and the fused step reads both halves. ``w = 1`` is the plain conditional
model: the null rows are not computed at all.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import numpy as np

from .unet_config import UNetConfig

__all__ = ["check_labels", "check_guidance", "check_null_class", "class_embedding", "guided_labels",
           "num_labels"]


def num_labels(cfg: UNetConfig) -> int | None:
    """How many integer labels a "table" model has (None for the other kinds)."""
    return cfg.num_class_embeds if cfg.class_embedding_kind == "table" else None


def check_null_class(cfg: UNetConfig, null_class) -> int | float | None:
    """A model's null class (None: the model was not trained for guidance), checked against it."""
    if null_class is None:
        return None
    kind = cfg.class_embedding_kind
    if kind is None:
        raise ValueError("null_class is set but the U-Net has no class embedding (num_class_embeds / "
                         "class_embed_type): an unconditional model has no null class")
    if kind == "identity":
        raise ValueError("null_class cannot be used with class_embed_type='identity' (its labels are "
                         "embedding vectors, not classes)")
    return _label_values(cfg, null_class, 1, "null_class")[0].item()


def check_labels(cfg: UNetConfig, labels, n: int) -> np.ndarray | None:
    """``labels`` for n samples of this model, checked: None for an unconditional model; int64 [n]
    ("table"), float64 [n] ("timestep") or float32 [n, D] ("identity"). One label (a scalar) is
    used for every sample. Every problem is a ValueError / TypeError naming it."""
    kind = cfg.class_embedding_kind
    if kind is None:
        if labels is not None:
            raise ValueError("labels were given but this model is unconditional (its U-Net config has no "
                             "num_class_embeds / class_embed_type)")
        return None
    if labels is None:
        what = (f"an int in [0, {cfg.num_class_embeds}) or one per sample" if kind == "table" else
                "a number or one per sample" if kind == "timestep" else
                f"float embeddings [n, {cfg.time_embed_dim}]")
        raise ValueError(f"this model is class-conditional: pass labels= ({what})")
    if kind == "identity":
        a = np.asarray(labels)
        d = cfg.time_embed_dim
        if a.dtype.kind not in "fiu" or a.dtype == np.bool_:
            raise TypeError(f"labels of a class_embed_type='identity' model are float embeddings, got dtype {a.dtype}")
        if a.shape == (d,):
            a = np.broadcast_to(a, (n, d))
        if a.shape != (n, d):
            raise ValueError(f"labels of a class_embed_type='identity' model must be [n, {d}] = [{n}, {d}] "
                             f"embeddings (or one [{d}] vector for all), got shape {a.shape}")
        a = np.ascontiguousarray(a, dtype=np.float32)
        if not np.isfinite(a).all():
            raise ValueError("labels (identity embeddings) must be finite")
        return a
    return _label_values(cfg, labels, n, "labels")


def _label_values(cfg: UNetConfig, labels, n: int, what: str) -> np.ndarray:
    kind = cfg.class_embedding_kind
    if isinstance(labels, (str, bytes, bool, np.bool_)):
        raise TypeError(f"{what} must be an int or a sequence of ints, got {labels!r:.60}")
    a = np.asarray(labels)
    scalar = a.ndim == 0
    if scalar:
        a = np.broadcast_to(a, (n,))
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{what} must be one label or {n} (one per sample), got shape {a.shape}")
    if kind == "table":
        if a.dtype.kind not in "iu":
            if a.dtype.kind == "O" and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in a):
                a = a.astype(np.int64)
            else:
                raise TypeError(f"{what} of this model are integer class indices, got {a.dtype} values")
        k = cfg.num_class_embeds
        bad = (a < 0) | (a >= k)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{what if scalar else f'{what}[{i}]'} = {a[i]} is out of range: this model has classes 0 .. {k - 1} "
                             f"(num_class_embeds = {k})")
        return np.ascontiguousarray(a, dtype=np.int64)
    if a.dtype.kind not in "iuf":
        raise TypeError(f"{what} of a class_embed_type='timestep' model are numbers, got {a.dtype} values")
    a = np.ascontiguousarray(a, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{what} must be finite numbers")
    return a


def check_guidance(scale, null_class) -> float | None:
    """The guidance scale w as a float, or None for an unguided run (scale None or 1). Guidance needs
    a model with a null class. w >= 0; w = 0 samples the null class (unconditional), 0 < w < 1 mixes
    toward it (diffusers' pipelines ignore w <= 1 instead; here every w != 1 is applied as written)."""
    if scale is None:
        return None
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"guidance_scale must be a number, got {type(scale).__name__}")
    w = float(scale)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {scale!r}")
    if w == 1.0:
        return None
    if null_class is None:
        raise ValueError(f"guidance_scale={scale!r} needs a model trained for classifier-free guidance "
                         "(a null class, model_index.json _fastddpm_null_class); this model has none: "
                         "use guidance_scale=1")
    return w


def guided_labels(labels: np.ndarray, null_class) -> np.ndarray:
    """The 2n labels of a guided batch: the n conditional ones, then n null labels."""
    return np.concatenate([labels, np.full(labels.shape[0], null_class, dtype=labels.dtype)])


def _sinusoid(cfg: UNetConfig, t: np.ndarray) -> np.ndarray:
    """diffusers' get_timestep_embedding (max_period 10000, scale 1) in float64: t [N] -> [N, C0]."""
    dim = cfg.block_out_channels[0]
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half, dtype=np.float64) / (half - cfg.freq_shift))
    args = t[:, None] * freqs[None, :]
    parts = [np.cos(args), np.sin(args)] if cfg.flip_sin_to_cos else [np.sin(args), np.cos(args)]
    emb = np.concatenate(parts, axis=1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb


def class_embedding(cfg: UNetConfig, weights: Mapping[str, Any], labels: np.ndarray) -> np.ndarray:
    """float32 [N, time_embed_dim]: what the U-Net adds to its time embedding for ``labels`` (as
    check_labels returns them)."""
    kind = cfg.class_embedding_kind
    if kind == "table":
        return np.ascontiguousarray(np.asarray(weights["class_embedding.weight"], dtype=np.float32)[labels])
    if kind == "identity":
        return np.ascontiguousarray(labels, dtype=np.float32)
    if kind == "timestep":
        def linear(name, v):
            w = np.asarray(weights[f"{name}.weight"], dtype=np.float64)
            b = np.asarray(weights[f"{name}.bias"], dtype=np.float64)
            return v @ w.T + b
        # diffusers rounds the sinusoid to float32 before its MLP (time_proj's output dtype)
        h = linear("class_embedding.linear_1", _sinusoid(cfg, labels).astype(np.float32).astype(np.float64))
        h = h / (1.0 + np.exp(-h))                              # SiLU
        return np.ascontiguousarray(linear("class_embedding.linear_2", h), dtype=np.float32)
    raise ValueError("this model has no class embedding")
