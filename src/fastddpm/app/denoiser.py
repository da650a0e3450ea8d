"""The "Train a denoiser" tab's work, in plain Python (no Gradio): a small U-Net (the project's
reference U-Net) learns to predict the noise in one target image at random timesteps, in a
background thread; the page polls ``snapshot()``.

    tr = DenoiserTrainer(target, DenoiserConfig(lr=2e-3, steps=200))   # target: float32 [1, 16, 16]
    tr.start()
    snap = tr.snapshot()       # steps done, losses, clean / noisy / denoised images
    tr.stop()

The knobs, the noise schedule and the U-Net come from ``fastddpm.train`` (TrainConfig, its
scheduler, the learning-rate warm-up and the noising of a batch), so this is the project's own
training step on a data set of one image. ``RunRegistry`` bounds the runs of a server: one per
browser session and a fixed number at a time.
"""
from __future__ import annotations

import functools
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..train import DIGITS_UNET, TrainConfig, _lr_at, noised

__all__ = ["DenoiserConfig", "DenoiserTrainer", "Snapshot", "RunRegistry", "ServerBusy", "IMAGE_SIZE",
           "DENOISER_UNET", "BETA_SCHEDULES"]

IMAGE_SIZE = 16           # the digits' size: every target is scaled to it
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
# The digits U-Net cut to two levels without attention (~164k parameters): a training step of a
# batch of 16 takes tens of milliseconds on two CPU cores, so the loss curve moves while you watch.
DENOISER_UNET = dict(DIGITS_UNET, block_out_channels=[16, 32], down_block_types=["DownBlock2D", "DownBlock2D"],
                     up_block_types=["UpBlock2D", "UpBlock2D"])
_CURVE_POINTS = 400       # the loss curve sent to the page: at most this many (block means)
_AVG_WINDOW = 20          # "average loss": the mean of the last this many steps


@dataclass(frozen=True)
class DenoiserConfig:
    """One run's knobs, already validated against the page limits (server.py)."""

    lr: float = 2e-3
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    num_train_timesteps: int = 1000
    steps: int = 500
    show_t: int = 500             # the timestep of the noisy input shown
    batch: int = 16
    seed: int = 0
    max_seconds: float = 300.0    # a run ends itself after this long

    def train_config(self) -> TrainConfig:
        """The same knobs as a fastddpm.train config (its validation, scheduler, lr warm-up)."""
        return TrainConfig(dataset="digits", image_size=IMAGE_SIZE, unet=dict(DENOISER_UNET), lr=self.lr,
                           beta_start=self.beta_start, beta_end=self.beta_end, beta_schedule=self.beta_schedule,
                           num_train_timesteps=self.num_train_timesteps, steps=self.steps, batch_size=self.batch,
                           warmup_steps=min(20, self.steps // 10), lr_schedule="constant", seed=self.seed,
                           prediction_type="epsilon", clip_sample=True)


@dataclass
class Snapshot:
    """What the page shows at one moment of a run."""

    state: str                    # "starting", "running", "done", "stopped", "time limit", "failed"
    steps_done: int
    total_steps: int
    average_loss: float | None    # mean of the last _AVG_WINDOW losses
    curve: tuple                  # (steps int [P], losses float [P]): block means, P <= _CURVE_POINTS
    clean: np.ndarray             # uint8 [H, W, 1]
    noisy: np.ndarray             # uint8 [H, W, 1]: the target noised to show_t
    denoised: np.ndarray          # uint8 [H, W, 1]: the model's x̂_0 of ``noisy``
    show_t: int
    seconds: float
    message: str = ""


@functools.cache
def digit_targets() -> np.ndarray:
    """The bundled digits at the app's size, float32 [1797, 1, 16, 16], loaded once per process
    (scikit-learn's import and the resize take seconds: the server's warm-up pays them)."""
    from ..data import load_digits
    digits = load_digits(IMAGE_SIZE)
    digits.setflags(write=False)     # shared by every run: nobody may change it
    return digits


def _u8(x: np.ndarray) -> np.ndarray:
    """float [1, H, W] in [-1, 1] -> uint8 [H, W, 1]."""
    return np.round(np.clip(x.transpose(1, 2, 0) / 2 + 0.5, 0, 1) * 255).astype(np.uint8)


class DenoiserTrainer:
    """Trains a fresh small U-Net on ``target`` (float32 [1, H, W] in [-1, 1]); thread-safe."""

    def __init__(self, target: np.ndarray, cfg: DenoiserConfig):
        target = np.array(target, dtype=np.float32)       # its own copy: the caller's may be read-only or change
        if target.shape != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"target must be [1, {IMAGE_SIZE}, {IMAGE_SIZE}], got {target.shape}")
        self.cfg = cfg
        self.tcfg = cfg.train_config()
        self.tcfg.validate()                       # TrainError / SchedulerConfigError naming the knob
        self.target = target
        self.abar = np.asarray(self.tcfg.scheduler().alphas_cumprod, dtype=np.float64)    # [T]
        self._lock = threading.Lock()              # the model: one training step or one preview at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._losses: list[float] = []
        self._state, self._message = "starting", ""
        self._show_t = int(cfg.show_t)
        self._t0 = None
        self._model = None
        # the noisy input shown: fixed noise, so the denoised output changes only as the model learns
        self._show_eps = np.random.default_rng(cfg.seed).standard_normal(target.shape).astype(np.float32)

    # -- control ---------------------------------------------------------------------------------
    def start(self) -> "DenoiserTrainer":
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self.run, name="fastddpm-denoiser", daemon=True)
        self._thread.start()
        return self

    def stop(self, wait: float | None = 5.0) -> None:
        self._stop.set()
        if self._thread is not None and wait:
            self._thread.join(wait)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def steps_done(self) -> int:
        return len(self._losses)

    def set_show_t(self, t: int) -> None:
        self._show_t = int(t)

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> None:
        """The training loop (the thread's body; call it directly to train in this thread)."""
        try:
            self._train()
        except Exception as exc:        # shown in the page; the server keeps running
            self._state, self._message = "failed", f"{type(exc).__name__}: {exc}"

    def _train(self) -> None:
        import torch
        from ..reference import ReferenceUNet
        cfg, tcfg = self.cfg, self.tcfg
        if self._t0 is None:
            self._t0 = time.monotonic()
        model = ReferenceUNet(tcfg.unet_config(), init_seed=cfg.seed).train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(tcfg.adam_betas), weight_decay=0.0)
        with self._lock:
            self._model = model
        abar = torch.tensor(self.abar, dtype=torch.float32)                            # [T]
        x0 = torch.from_numpy(self.target)[None].expand(cfg.batch, -1, -1, -1)         # [B, 1, H, W]
        gen = torch.Generator().manual_seed(cfg.seed)
        T = cfg.num_train_timesteps
        self._state = "running"
        for step in range(cfg.steps):
            if self._stop.is_set():
                self._state = "stopped"
                return
            if time.monotonic() - self._t0 > cfg.max_seconds:
                self._state, self._message = "time limit", f"stopped at the {cfg.max_seconds:g} s limit of a run"
                return
            t = torch.randint(0, T, (cfg.batch,), generator=gen)                       # [B]
            eps = torch.randn(x0.shape, generator=gen)                                 # [B, 1, H, W]
            xt, want = noised(x0, t, eps, abar, "epsilon")
            for g in opt.param_groups:
                g["lr"] = _lr_at(tcfg, step, cfg.steps)
            with self._lock:
                loss = torch.nn.functional.mse_loss(model(xt, t), want)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
                opt.step()
            lv = float(loss.detach())
            if not math.isfinite(lv):
                self._state = "failed"
                self._message = f"the loss became {lv} at step {step + 1}: lower the learning rate (now {cfg.lr:g})"
                return
            self._losses.append(lv)          # list.append is atomic: the poller reads a consistent prefix
        self._state = "done"

    # -- what the page shows -----------------------------------------------------------------------
    def preview(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(noisy input x_t, the model's x̂_0 of it), float32 [1, H, W] each, at timestep t."""
        a = float(self.abar[t])
        xt = (math.sqrt(a) * self.target + math.sqrt(1 - a) * self._show_eps).astype(np.float32)
        with self._lock:
            model = self._model
            if model is None:
                return xt, np.zeros_like(xt)
            import torch
            with torch.no_grad():
                eps = model(torch.from_numpy(xt)[None], torch.tensor([t]))[0].numpy()   # [1, H, W]
        x0 = np.clip((xt - math.sqrt(1 - a) * eps) / math.sqrt(a), -1, 1)
        return xt, x0.astype(np.float32)

    def snapshot(self) -> Snapshot:
        state, message = self._state, self._message  # first: a finished run's losses are then all there
        losses = self._losses[:]                     # a consistent copy (appends only)
        n = len(losses)
        t = min(max(self._show_t, 0), self.cfg.num_train_timesteps - 1)
        noisy, den = self.preview(t)
        avg = float(np.mean(losses[-_AVG_WINDOW:])) if n else None
        return Snapshot(state=state, steps_done=n, total_steps=self.cfg.steps, average_loss=avg,
                        curve=_curve(losses), clean=_u8(self.target), noisy=_u8(noisy), denoised=_u8(den),
                        show_t=t, seconds=0.0 if self._t0 is None else time.monotonic() - self._t0,
                        message=message)


def _curve(losses: list) -> tuple[np.ndarray, np.ndarray]:
    """The loss curve, at most _CURVE_POINTS points: the means of equal blocks of steps."""
    y = np.asarray(losses, dtype=np.float64)                 # [n]
    n = len(y)
    if n <= _CURVE_POINTS:
        return np.arange(1, n + 1), y
    k = math.ceil(n / _CURVE_POINTS)
    m = n // k
    return (np.arange(m) * k + k).astype(np.int64), y[:m * k].reshape(m, k).mean(axis=1)


class ServerBusy(RuntimeError):
    """Too many training runs at once; the message is shown in the page."""


@dataclass
class RunRegistry:
    """The training runs of one server: at most one per session, at most ``max_runs`` at a time."""

    max_runs: int = 2
    _runs: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, key: str, trainer: DenoiserTrainer) -> DenoiserTrainer:
        """Start ``trainer`` as session ``key``'s run (its previous run is stopped first)."""
        old = self.stop(key)
        with self._lock:
            busy = sum(1 for k, tr in self._runs.items() if k != key and tr.running)
            if busy >= self.max_runs:
                raise ServerBusy(f"the server is busy: {busy} training run(s) are going (the limit is "
                                 f"{self.max_runs}); press Start again when one has finished")
            self._runs[key] = trainer
        del old
        return trainer.start()

    def get(self, key: str) -> DenoiserTrainer | None:
        with self._lock:
            return self._runs.get(key)

    def stop(self, key: str) -> DenoiserTrainer | None:
        with self._lock:
            tr = self._runs.get(key)
        if tr is not None:
            tr.stop()
        return tr

    def forget(self, key: str) -> None:
        """Stop and drop a session's run (the browser tab closed)."""
        self.stop(key)
        with self._lock:
            self._runs.pop(key, None)

    def stop_all(self) -> None:
        with self._lock:
            keys = list(self._runs)
        for k in keys:
            self.forget(k)
