"""Training a DDPM (PyTorch): the reference U-Net on a dataset, saved in diffusers' layout.

    from fastddpm.train import TrainConfig, train
    result = train(TrainConfig.preset("digits"), out_dir="my-digits")
    fastddpm.load("my-digits")                                   # or DDPMPipeline.from_pretrained

What it does: AdamW, a linear learning-rate warm-up (then constant or cosine decay), gradient
clipping, an EMA of the weights (the EMA is what gets saved), a tqdm bar with the running loss,
the loss curve as CSV and PNG, atomic checkpoints and exact resume.

Class conditioning (classifier-free guidance): a U-Net with ``num_class_embeds`` (diffusers'
``nn.Embedding`` class table) is trained on the dataset's labels (digits: ``data.digit_labels()``;
a folder of images has none). With ``cond_drop`` = p > 0 each training label is replaced by the
*null class* with probability p, so the one network learns the conditional and the unconditional
model; the null class is the table's LAST row (num_class_embeds = number of classes + 1), and the
saved model names it (model_index.json ``_fastddpm_null_class``) with ``guidance_scale``, the
default scale of a guided sample (``_fastddpm_guidance_scale``). Preset "digits-cond".

Reproducibility: every random draw of step s (which images, which timesteps, which noise, which
labels are dropped) comes from generators seeded by (seed, s), so a run is a function of its config alone, and a run that is
interrupted and resumed from a checkpoint takes exactly the steps of an uninterrupted one. Bitwise
equality also needs the same torch build and thread count (CPU kernels reduce in a thread-dependent
order); python/numpy/torch global RNG states are saved in the checkpoint too.

Files: ``out_dir`` gets the model (model_index.json, unet/, scheduler/); ``work_dir`` (default
``out_dir/training``) gets checkpoint.pt, loss.csv, loss.png and train_config.json.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ._atomic import atomic_write
from .schedulers import DDPMScheduler
from .unet_config import UNetConfig

__all__ = ["TrainConfig", "TrainResult", "train", "TRAIN_PRESETS", "DIGITS_UNET", "DIGITS_CLASSES", "TrainError"]

CHECKPOINT = "checkpoint.pt"
_CKPT_VERSION = 1


class TrainError(ValueError):
    """A training request that cannot run (bad knob, mismatched checkpoint...)."""


DIGITS_CLASSES = 10               # data.digit_labels(): 0..9
_DROP_STREAM = 0x0D0F             # keys the label-dropout generator apart from the other draws


# The bundled digits model: 16x16x1. Chosen for quality per CPU second: 16 channels at full
# resolution (where the pixels, hence the FLOPs, are), attention only at 8x8 (64 tokens), one
# resnet per level; ~0.65M parameters, ~0.05 GFLOP per image per step.
DIGITS_UNET: dict[str, Any] = dict(
    _class_name="UNet2DModel", sample_size=16, in_channels=1, out_channels=1,
    block_out_channels=[16, 32, 64], layers_per_block=1,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    norm_num_groups=8, attention_head_dim=None, act_fn="silu", center_input_sample=False,
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=1,
    norm_eps=1e-6, time_embedding_type="positional")


@dataclass
class TrainConfig:
    """Every knob of a training run (all JSON-serialisable; saved as train_config.json)."""

    # data
    dataset: str = "digits"              # "digits" or a folder of images
    image_size: int = 16
    channels: int = 1                    # folder datasets: 1 = grayscale, 3 = RGB
    # model: a diffusers UNet2DModel config (sample_size/in/out channels follow the data)
    unet: dict = field(default_factory=lambda: dict(DIGITS_UNET))
    # class conditioning (a unet with num_class_embeds): the probability that a training label is
    # replaced by the null class (the table's last row), for classifier-free guidance; and the
    # default guidance scale the saved model names (None: 1, no guidance). Both need cond_drop > 0
    # for a null class to exist.
    cond_drop: float = 0.0
    guidance_scale: float | None = None
    # noise schedule (diffusers DDPMScheduler keys)
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    trained_betas: list | None = None
    prediction_type: str = "epsilon"
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    # optimisation
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: tuple = (0.9, 0.999)
    warmup_steps: int = 100
    lr_schedule: str = "cosine"          # after warm-up: "constant" or "cosine" (decay to lr_min_ratio*lr)
    lr_min_ratio: float = 0.1
    grad_clip: float = 1.0               # max global grad norm; 0 = no clipping
    batch_size: int = 64
    steps: int | None = 2000
    epochs: float | None = None          # alternative to steps: passes over the data
    ema_decay: float = 0.999             # with a warm-up: min(decay, (1 + s) / (10 + s))
    seed: int = 0
    threads: int | None = None           # torch CPU threads (None: torch's default)
    device: str = "cpu"
    # bookkeeping
    checkpoint_every: int = 500          # steps between checkpoints (0: only at the end)
    log_every: int = 10                  # steps between progress-bar updates

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "TrainConfig":
        if name not in TRAIN_PRESETS:
            raise TrainError(f"unknown training preset {name!r}; presets: {', '.join(TRAIN_PRESETS)}")
        return cls.from_dict({**TRAIN_PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    # -- derived -------------------------------------------------------------------------------
    def unet_config(self) -> UNetConfig:
        cfg = {k: v for k, v in self.unet.items()}
        cfg.update(sample_size=self.image_size, in_channels=self.data_channels, out_channels=self.data_channels)
        return UNetConfig.from_dict(cfg)

    @property
    def data_channels(self) -> int:
        return 1 if self.dataset == "digits" else self.channels

    @property
    def conditional(self) -> bool:
        return self.unet_config().class_embedding_kind is not None

    @property
    def null_class(self) -> int | None:
        """The null label ("no label") of a model trained with label dropout: the table's last row."""
        return self.unet_config().num_class_embeds - 1 if self.cond_drop > 0 else None

    def check_classes(self, num_classes: int) -> None:
        """The class table fits a dataset with labels 0 .. num_classes-1 (and the null class)."""
        k = self.unet_config().num_class_embeds
        want = num_classes + 1 if self.cond_drop > 0 else num_classes
        if k != want:
            why = (f"the {num_classes} classes and the null class (the last row) for cond_drop = {self.cond_drop}"
                   if self.cond_drop > 0 else f"the {num_classes} classes (cond_drop = 0: no null class)")
            raise TrainError(f"num_class_embeds must be {want}: {why}; the unet config has {k}")

    def scheduler_config(self) -> dict:
        return dict(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
                    beta_start=self.beta_start, beta_end=self.beta_end, trained_betas=self.trained_betas,
                    prediction_type=self.prediction_type, variance_type=self.variance_type,
                    clip_sample=self.clip_sample)

    def scheduler(self) -> DDPMScheduler:
        return DDPMScheduler(**self.scheduler_config())

    def total_steps(self, dataset_size: int) -> int:
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * dataset_size / self.batch_size))
        return int(self.steps)

    def validate(self) -> None:
        def pos_int(name, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise TrainError(f"{name} must be a positive integer, got {v!r}")

        def nonneg(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise TrainError(f"{name} must be a finite number >= 0, got {v!r}")

        for name in ("image_size", "batch_size", "log_every"):
            pos_int(name)
        pos_int("threads", allow_none=True)
        for name in ("warmup_steps", "checkpoint_every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise TrainError(f"{name} must be an integer >= 0, got {v!r}")
        for name in ("weight_decay", "grad_clip"):
            nonneg(name)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise TrainError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1):
            raise TrainError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise TrainError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not 0 <= self.lr_min_ratio <= 1:
            raise TrainError(f"lr_min_ratio must be in [0, 1], got {self.lr_min_ratio!r}")
        if (self.steps is None) == (self.epochs is None):
            raise TrainError("give exactly one of steps and epochs")
        if self.steps is not None:
            pos_int("steps")
        if self.epochs is not None and not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise TrainError(f"epochs must be a positive number, got {self.epochs!r}")
        if self.dataset != "digits" and self.channels not in (1, 3):
            raise TrainError(f"channels must be 1 or 3, got {self.channels!r}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise TrainError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        if not isinstance(self.unet, dict):
            raise TrainError(f"unet must be a UNet2DModel config dict, got {type(self.unet).__name__}")
        ucfg = self.unet_config()    # raises UNetConfigError naming the field
        self.scheduler()             # raises SchedulerConfigError naming the key
        self._validate_conditioning(ucfg)

    def _validate_conditioning(self, ucfg: UNetConfig) -> None:
        p = self.cond_drop
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 <= p < 1):
            raise TrainError(f"cond_drop must be a number in [0, 1), got {p!r}")
        kind = ucfg.class_embedding_kind
        if kind is None:
            if p > 0:
                raise TrainError(f"cond_drop = {p} needs a class-conditional unet (num_class_embeds = "
                                 "number of classes + 1); this one is unconditional")
        elif kind != "table":
            raise TrainError(f"training supports the num_class_embeds class table (class_embed_type None), "
                             f"not class_embed_type={ucfg.class_embed_type!r}")
        elif self.dataset != "digits":
            raise TrainError(f"the unet is class-conditional (num_class_embeds = {ucfg.num_class_embeds}) but "
                             f"the dataset {self.dataset!r} is a folder of images, which has no labels: "
                             "train an unconditional unet (no num_class_embeds) on it")
        else:
            self.check_classes(DIGITS_CLASSES)
        g = self.guidance_scale
        if g is not None:
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
                raise TrainError(f"guidance_scale must be a finite number >= 0, got {g!r}")
            if p == 0 and g != 1:
                raise TrainError(f"guidance_scale = {g} needs a null class, i.e. training with cond_drop > 0")


# Training presets: TrainConfig fields. "digits" is the bundled model.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "digits": dict(
        dataset="digits", image_size=16, unet=dict(DIGITS_UNET),
        # 200 timesteps: fastddpm.sample() runs every training timestep by default (DDPM), so T
        # sets the cost of a default sample; the cosine schedule keeps 16x16 images from being
        # drowned in noise too early (Nichol & Dhariwal 2021).
        num_train_timesteps=200, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
        lr=2e-3, warmup_steps=100, lr_schedule="cosine", lr_min_ratio=0.05, grad_clip=1.0,
        batch_size=64, steps=4000, ema_decay=0.998, seed=0, threads=2, checkpoint_every=200),
}
# The bundled digits-cond model: "digits" with a class table (10 digits + the null class, row 10)
# and 10% label dropout, for classifier-free guidance; guidance_scale is the default of a sample.
TRAIN_PRESETS["digits-cond"] = dict(TRAIN_PRESETS["digits"], unet=dict(DIGITS_UNET, num_class_embeds=11),
                                    cond_drop=0.1, guidance_scale=3.0)


@dataclass
class TrainResult:
    out_dir: str
    work_dir: str
    steps: int
    losses: list
    seconds: float                # wall time of this call's training loop
    resumed_from: int | None


# ---------------------------------------------------------------------- helpers

def _load_dataset(cfg: TrainConfig) -> np.ndarray:
    from .data import load_digits, load_image_folder
    if cfg.dataset == "digits":
        return load_digits(cfg.image_size)
    return load_image_folder(cfg.dataset, cfg.image_size, channels=cfg.channels)


def _dataset_labels(cfg: TrainConfig) -> np.ndarray:
    from .data import digit_labels
    if cfg.dataset == "digits":
        return digit_labels()
    raise TrainError(f"the dataset {cfg.dataset!r} has no labels")   # validate() refuses this first


def _dropped(seed: int, step: int, batch: int, p: float) -> np.ndarray:
    """Which of step ``step``'s ``batch`` labels become the null class: bool [batch], each True with
    probability p; a pure function of (seed, step), for exact resume."""
    return np.random.default_rng([seed, step, _DROP_STREAM]).random(batch) < p


def _batch_indices(seed: int, step: int, n: int, batch: int) -> np.ndarray:
    """Sample indices of step ``step``: consecutive slices of per-epoch permutations, so each
    epoch sees every image once; a pure function of (seed, step) for exact resume."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, pos = divmod(start, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = perm[pos:pos + batch - len(out)]
        out.extend(take.tolist())
        start += len(take)
    return np.asarray(out, dtype=np.int64)


def _lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, total - cfg.warmup_steps)
    p = min(1.0, (step - cfg.warmup_steps) / span)
    lo = cfg.lr * cfg.lr_min_ratio
    return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * p))


def noised(x0, t, eps, abar, prediction_type: str):
    """One training batch's (x_t, regression target): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    (x0, eps: [B, C, H, W] tensors; t: [B] timesteps; abar: [T]); the target is what the U-Net
    learns to output for ``prediction_type``."""
    a = abar[t][:, None, None, None]                                         # [B, 1, 1, 1]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    if prediction_type == "epsilon":
        return xt, eps
    if prediction_type == "sample":
        return xt, x0
    return xt, a.sqrt() * eps - (1 - a).sqrt() * x0                           # v_prediction


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """write(tmp_path), then rename over ``path`` (creating its directory): no half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, write)


def write_loss_csv(path: str, losses: list, lrs: list) -> None:
    def w(tmp):
        with open(tmp, "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["step", "loss", "lr"])
            for i, (loss, lr) in enumerate(zip(losses, lrs)):
                wr.writerow([i + 1, f"{loss:.6g}", f"{lr:.6g}"])
    _atomic_write(path, w)


def write_loss_png(path: str, losses: list, title: str = "training loss") -> None:
    import matplotlib
    matplotlib.use("Agg")    # no display needed
    import matplotlib.pyplot as plt
    y = np.asarray(losses, dtype=np.float64)
    x = np.arange(1, len(y) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(x, y, lw=0.5, alpha=0.35, label="loss per step")
    if len(y) >= 2:
        k = max(1, min(100, len(y) // 10))
        smooth = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(x[k - 1:], smooth, lw=1.5, label=f"mean of {k} steps")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def _rng_states() -> dict:
    """Global RNG states in types torch.load(weights_only=True) accepts (no pickled NumPy)."""
    import torch
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}}


def _set_rng_states(st: dict) -> None:
    import torch
    random.setstate(_as_tuple(st["python"]))
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(st["torch"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# may change on resume (guidance_scale is only written into the saved model_index.json)
_RESUME_FREE = ("steps", "epochs", "checkpoint_every", "log_every", "threads", "guidance_scale")


# ---------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, out_dir, *, work_dir=None, resume: bool = False, quiet: bool = False,
          stop_after: int | None = None, dataset: np.ndarray | None = None,
          labels: np.ndarray | None = None) -> TrainResult:
    """Train, then save the EMA weights to ``out_dir`` in diffusers' layout.

    resume: continue from ``work_dir/checkpoint.pt`` (an error if there is none, or if it was
    made with different knobs other than steps/epochs/checkpoint_every/log_every/threads).
    stop_after: end (with a checkpoint, without saving the model) once this many steps are
    done: what an interruption does, for tests. dataset: a float32 [N, C, H, W] array in [-1, 1]
    to use instead of ``cfg.dataset``; labels: its integer classes [N] (0 .. K-1), which a
    class-conditional unet needs (with ``dataset``; else the ``cfg.dataset`` labels are used)."""
    import torch
    from .pipeline import Pipeline
    from .reference import ReferenceUNet

    cfg.validate()
    out_dir = os.path.abspath(os.fspath(out_dir))
    work_dir = os.path.abspath(os.fspath(work_dir)) if work_dir is not None else os.path.join(out_dir, "training")
    ckpt_path = os.path.join(work_dir, CHECKPOINT)
    for d in (out_dir, work_dir):
        if os.path.exists(d) and not os.path.isdir(d):
            raise TrainError(f"{d} exists and is not a directory")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)

    data = _load_dataset(cfg) if dataset is None else np.ascontiguousarray(dataset, dtype=np.float32)
    ucfg = cfg.unet_config()
    expect = (ucfg.in_channels, cfg.image_size, cfg.image_size)
    if data.ndim != 4 or tuple(data.shape[1:]) != expect:
        raise TrainError(f"dataset images are {tuple(data.shape[1:])}, the model expects {expect}")
    n = len(data)
    label_t = null = None
    if cfg.conditional:
        if dataset is not None and labels is None:
            raise TrainError("the unet is class-conditional: pass labels= (one class per image) with dataset=")
        lab = _dataset_labels(cfg) if labels is None else np.asarray(labels)
        if lab.shape != (n,) or lab.dtype.kind not in "iu" or (n and lab.min() < 0):
            raise TrainError(f"labels must be {n} integer classes >= 0 (one per image), got "
                             f"{lab.dtype} shape {lab.shape}")
        cfg.check_classes(int(lab.max()) + 1)
        label_t = torch.from_numpy(lab.astype(np.int64)).to(device)
        null = cfg.null_class
    elif labels is not None:
        raise TrainError("labels were given but the unet is unconditional (no num_class_embeds)")
    total = cfg.total_steps(n)
    sched = cfg.scheduler()
    data_t = torch.from_numpy(data).to(device)
    abar = torch.tensor(sched.alphas_cumprod, dtype=torch.float32, device=device)      # [T]
    T = sched.num_train_timesteps

    # seeds: python/numpy/torch globals (anything that draws from them), then the model init
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    model = ReferenceUNet(ucfg, init_seed=cfg.seed).to(device).train()
    ema = ReferenceUNet(ucfg, init_seed=None).to(device).eval()
    ema.load_state_dict(model.state_dict())
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas),
                            weight_decay=cfg.weight_decay)
    losses: list[float] = []
    lrs: list[float] = []
    start = 0
    resumed_from = None

    if resume:
        if not os.path.isfile(ckpt_path):
            raise TrainError(f"cannot resume: no checkpoint at {ckpt_path}")
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ck.get("version") != _CKPT_VERSION:
            raise TrainError(f"{ckpt_path}: checkpoint version {ck.get('version')!r}, expected {_CKPT_VERSION}")
        # knobs newer than the checkpoint: it was made with their defaults
        saved = {**{f.name: f.default for f in dataclasses.fields(TrainConfig)
                    if f.name in ("cond_drop", "guidance_scale")}, **json.loads(ck["config"])}
        now = cfg.to_dict()
        diff = sorted(k for k in set(saved) | set(now) if k not in _RESUME_FREE and saved.get(k) != now.get(k))
        if diff:
            raise TrainError(f"cannot resume from {ckpt_path}: it was made with different {', '.join(diff)} "
                             f"({', '.join(f'{k}={saved.get(k)!r}' for k in diff)})")
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        start = resumed_from = int(ck["step"])
        losses, lrs = list(ck["losses"]), list(ck["lrs"])
        _set_rng_states(ck["rng"])
    elif os.path.isfile(ckpt_path):
        raise TrainError(f"{ckpt_path} exists: pass resume=True (--resume) to continue that run, "
                         "or choose another work directory")
    if start > total:
        raise TrainError(f"the checkpoint is at step {start}, beyond the {total} steps asked for")

    os.makedirs(work_dir, exist_ok=True)
    _atomic_write(os.path.join(work_dir, "train_config.json"),
                  lambda tmp: _dump_json(tmp, {**cfg.to_dict(), "dataset_size": n, "total_steps": total}))

    def save_checkpoint(step: int) -> None:
        ck = {"version": _CKPT_VERSION, "config": json.dumps(cfg.to_dict(), sort_keys=True), "step": step,
              "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
              "losses": losses, "lrs": lrs, "rng": _rng_states()}
        _atomic_write(ckpt_path, lambda tmp: torch.save(ck, tmp))

    end = total if stop_after is None else min(total, max(start, int(stop_after)))
    bar = None
    if not quiet:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
    running = None
    t0 = time.perf_counter()
    step = start
    # Ctrl-C is deferred to the end of the step in flight, so the checkpoint holds whole steps only
    interrupted = []
    old_handler = None
    # (not where SIGINT is ignored, e.g. under nohup: that run was asked not to stop on it)
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN):
        def on_sigint(*_):
            if interrupted:   # a second Ctrl-C: stop now, without a checkpoint
                raise KeyboardInterrupt
            interrupted.append(True)
        old_handler = signal.signal(signal.SIGINT, on_sigint)
    try:
        for step in range(start, end):
            lr = _lr_at(cfg, step, total)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = torch.from_numpy(_batch_indices(cfg.seed, step, n, cfg.batch_size)).to(device)
            x0 = data_t[idx]                                                     # [B, C, H, W]
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)     # this step's draws
            t = torch.randint(0, T, (len(idx),), generator=gen).to(device)
            eps = torch.randn(x0.shape, generator=gen).to(device)
            xt, target = noised(x0, t, eps, abar, cfg.prediction_type)
            if label_t is None:
                out = model(xt, t)
            else:
                y = label_t[idx]
                if null is not None:
                    drop = torch.from_numpy(_dropped(cfg.seed, step, len(idx), cfg.cond_drop)).to(device)
                    y = torch.where(drop, torch.full_like(y, null), y)
                out = model(xt, t, class_labels=y)
            loss = torch.nn.functional.mse_loss(out, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - decay)
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise FloatingPointError(f"the loss became {lv} at step {step + 1}: lower lr "
                                         f"(now {cfg.lr}) or check the data")
            losses.append(lv)
            lrs.append(lr)
            running = lv if running is None else 0.98 * running + 0.02 * lv
            done = step + 1
            if bar is not None and (done % cfg.log_every == 0 or done == end):
                bar.update(done - bar.n)
                bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2e}", refresh=False)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < end:
                save_checkpoint(done)
            if interrupted:
                save_checkpoint(done)   # resume picks up exactly here
                raise KeyboardInterrupt
        step = end
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0

    save_checkpoint(step)
    write_loss_csv(os.path.join(work_dir, "loss.csv"), losses, lrs)
    if losses:
        write_loss_png(os.path.join(work_dir, "loss.png"), losses)
    if step >= total:
        Pipeline(ucfg, ema.numpy_weights(), sched, name=os.path.basename(out_dir), null_class=null,
                 guidance_scale=cfg.guidance_scale if null is not None else None).save(out_dir)
    return TrainResult(out_dir=out_dir, work_dir=work_dir, steps=step, losses=losses, seconds=seconds,
                       resumed_from=resumed_from)


def _dump_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
