"""load(), Pipeline and sample(): a U-Net + a scheduler + a backend + the Philox noise.

A Pipeline holds a validated U-Net config, its weights (float32 NumPy, diffusers' keys) and a
scheduler. Sampling runs on one of two paths:

- an engine: a backend that executes the whole loop natively (``backend.make_engine``: U-Net,
  fused step and noise in one call, GIL released); used whenever the chosen backend has one;
- otherwise the reference U-Net (PyTorch) computes the model output and the fused step runs on the
  chosen backend (``backend="torch"`` is the all-PyTorch reference sampler).

Noise: x_T is the spec's noise at noise step -1; the step at timestep t adds the noise of step t;
sample i of a call with ``first_index=f`` is sample f + i of the seed's stream. So the first k
images of ``sample(n=N, seed=s)`` are the images of ``sample(n=k, seed=s)``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import executors as _backends
from ._files import check_inside, errors_name, read_json_object
from .dispatch import check_first_index, check_positive_int, check_seed
from .limits import check_request, engine_cache_size
from .philox import INITIAL_STEP
from .schedulers import DDIMScheduler, DDPMScheduler, SchedulerConfigError
from .unet_config import PRESETS, UNetConfig, UNetConfigError, random_weights, weight_shapes
from .weights import WeightsError, check_weights, load_safetensors, save_safetensors

__all__ = ["Pipeline", "SampleResult", "load", "sample", "BUNDLED_MODELS", "PRESET_MODELS"]

_MODELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")
BUNDLED_MODELS = ("digits",)
PRESET_MODELS = tuple(PRESETS)
DEFAULT_MODEL = "digits"
_DIFFUSERS_VERSION = "0.42.1"   # what the saved files say they were written for
_SCHEDULERS = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler}
_OUTPUTS = ("uint8", "float")


@dataclass
class SampleResult:
    """What ``sample(..., trajectory=[...])`` returns.

    images: the finished images (as ``output`` asks). trajectory: one frame per kept loop position,
    stacked [K, ...] in the same format as ``images``; trajectory_steps: those positions (0 = the
    pure static x_T, ``steps`` = the finished image); timesteps: the scheduler timestep of each
    position (-1 for x_T)."""

    images: np.ndarray
    trajectory: np.ndarray
    trajectory_steps: list = field(default_factory=list)
    timesteps: list = field(default_factory=list)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """float [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C], as diffusers' pipelines round."""
    img = np.clip(x.astype(np.float32) / 2 + 0.5, 0.0, 1.0)
    return np.ascontiguousarray((img.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8))


def _format(x: np.ndarray, output: str) -> np.ndarray:
    return to_uint8(x) if output == "uint8" else np.clip(x, -1.0, 1.0).astype(np.float32)


class Pipeline:
    """A U-Net (config + float32 weights) and a scheduler; call it to sample."""

    def __init__(self, unet_config: UNetConfig | dict, weights: dict, scheduler, name: str | None = None):
        self.unet_config = unet_config if isinstance(unet_config, UNetConfig) else UNetConfig.from_dict(unet_config)
        self.weights = check_weights(weights, weight_shapes(self.unet_config))  # name -> float32 array
        if not isinstance(scheduler, (DDPMScheduler, DDIMScheduler)):
            raise TypeError(f"scheduler must be a fastddpm DDPMScheduler or DDIMScheduler, got {type(scheduler).__name__}")
        self.scheduler = scheduler
        self.name = name
        self._reference = None            # the torch ReferenceUNet, built on first use
        self._engines: OrderedDict = OrderedDict()   # (backend, batch, h, w, dtype) -> engine, LRU order
        self._per_sample_floats: dict = {}          # (h, w) -> the plan's activation floats per sample
        self._lock = threading.Lock()

    def __repr__(self):
        cfg = self.unet_config
        return (f"Pipeline({self.name or 'unnamed'}: {cfg.in_channels}x{self.image_size[0]}x{self.image_size[1]}, "
                f"block_out_channels={list(cfg.block_out_channels)}, {type(self.scheduler).__name__})")

    @property
    def image_size(self) -> tuple[int, int]:
        return self.unet_config.sample_hw or (32, 32)

    # ------------------------------------------------------------------ U-Net
    def _per_sample_unet(self, device="cpu"):
        """The reference U-Net applied one sample at a time: torch picks conv algorithms by batch
        size, so batched calls would break batch invariance (sample(n=N)[:k] == sample(n=k))."""
        import torch
        unet = self.reference_unet(device)

        def forward(x, t):                  # x: [N, C, H, W] tensor -> model output [N, C', H, W]
            return torch.cat([unet(x[i:i + 1], t) for i in range(x.shape[0])])
        return forward

    def reference_unet(self, device="cpu"):
        """The PyTorch reference U-Net with this pipeline's weights (needs torch)."""
        with self._lock:
            if self._reference is None:
                from .reference import ReferenceUNet
                self._reference = ReferenceUNet.from_weights(self.unet_config, self.weights).eval()
            return self._reference.to(device)

    def _engine(self, be, batch: int, height: int, width: int, dtype: str | None = None):
        """The backend's native loop engine for this shape (and, on CUDA, precision), or None."""
        make = getattr(be, "make_engine", None)
        if make is None:
            return None
        key = (be.name, batch, height, width, dtype)
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                extra = {"dtype": dtype} if "cuda" in be.devices else {}
                engine = make(self.unet_config, self.weights, batch, height, width, **extra)
                self._engines[key] = engine
                while len(self._engines) > engine_cache_size():   # bounded: drop the least recently used
                    self._engines.popitem(last=False)
            self._engines.move_to_end(key)
            return engine

    def _check_request(self, n: int, height: int, width: int, frames: int, what: str) -> None:
        """Refuse, before any allocation, a request whose buffers would exceed the limit
        (limits.py): the plan's activations of n samples plus n images per kept frame."""
        with self._lock:
            per = self._per_sample_floats.get((height, width))
            if per is None:
                from .plan import build_plan
                per = self._per_sample_floats[(height, width)] = sum(build_plan(self.unet_config, 1, height, width)
                                                                     .slot_sizes)
        image = self.unet_config.in_channels * height * width
        check_request(what, 4 * n * (per + image * (2 + frames)))

    def unet(self, sample, timestep, backend="auto"):
        """One U-Net forward: the model output for ``sample`` [N, C, H, W] at ``timestep`` (an int,
        or one per sample). NumPy in, NumPy out; torch tensors in, torch tensors out."""
        is_numpy = isinstance(sample, np.ndarray)
        if is_numpy:
            if sample.ndim != 4 or sample.shape[1] != self.unet_config.in_channels:
                raise ValueError(f"sample must be [N, {self.unet_config.in_channels}, H, W], got {sample.shape}")
            if sample.dtype != np.float32:
                raise TypeError(f"sample must be float32, got {sample.dtype}")
            self.unet_config.check_image_size(sample.shape[2], sample.shape[3])
            be = _backends.select(backend, "cpu")
            self._check_request(sample.shape[0], sample.shape[2], sample.shape[3], 0,
                                f"a U-Net forward of batch {sample.shape[0]}")
            engine = self._engine(be, *sample.shape[:1], *sample.shape[2:])
            if engine is not None:
                return engine.forward(np.ascontiguousarray(sample), timestep)
        import torch
        x = torch.from_numpy(sample) if is_numpy else sample
        if not is_numpy:
            _backends.select(backend, "cuda" if x.is_cuda else "cpu")   # refuse an impossible request
        with torch.no_grad():
            out = self.reference_unet(x.device)(x, timestep)
        return out.numpy() if is_numpy else out

    # ------------------------------------------------------------------ sampling
    def scheduler_for(self, sampler: str, steps: int | None):
        """A fresh scheduler of the kind ``sampler`` names, from this pipeline's config, with
        ``steps`` timesteps (default: every training timestep for ddpm, 50 for ddim)."""
        cfg = {k: v for k, v in self.scheduler.config.items()}
        if sampler == "ddpm":
            cfg.pop("set_alpha_to_one", None)
            sched = DDPMScheduler(**cfg)
            default = sched.num_train_timesteps
        elif sampler == "ddim":
            cfg.pop("variance_type", None)
            sched = DDIMScheduler(**cfg)
            default = min(50, sched.num_train_timesteps)
        else:
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        if steps is None:
            steps = default
        sched.set_timesteps(steps)
        return sched

    def __call__(self, n: int = 1, *, steps: int | None = None, sampler: str = "ddpm", seed: int | None = 0,
                 backend: str = "auto", eta: float = 0.0, output: str = "uint8", progress: bool = False,
                 trajectory: Sequence[int] | None = None, first_index: int = 0, dtype: str | None = None):
        n = check_positive_int("n", n)
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}")
        eta = float(eta)
        if not (np.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        if sampler == "ddpm" and eta != 0.0:
            raise ValueError("eta is a DDIM parameter; use sampler='ddim' (or eta=0)")
        seed = check_seed(seed)
        first_index = check_first_index(first_index, n)
        sched = self.scheduler_for(sampler, steps)
        total = len(sched.timesteps)
        keep = _trajectory_positions(trajectory, total)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        be = _backends.select(backend, _sampling_device(backend))
        dtype = _check_dtype(dtype, be)
        h, w = self.image_size
        shape = (n, self.unet_config.in_channels, h, w)
        self._check_request(n, h, w, len(keep), f"sampling n={n} images of {h}x{w}")

        bar = _progress_bar(total, progress, f"{sampler} {total} steps on {be.name}")
        try:
            callback = None if bar is None else (lambda k: bar.update(k - bar.n))
            if be.name == "torch":
                x, frames = self._reference_loop(sched, shape, seed, eta, first_index, keep, callback)
            else:
                engine = self._engine(be, n, h, w, dtype)
                if engine is not None:
                    x, frames = engine.run(sched, shape, seed=seed, eta=eta, first_index=first_index,
                                           keep=keep, callback=callback)
                else:
                    x, frames = self._stepped_loop(sched, be, shape, seed, eta, first_index, keep, callback)
        finally:
            if bar is not None:
                bar.close()
        images = _format(x, output)
        if trajectory is None:
            return images
        stack = np.stack([_format(frames[k], output) for k in keep]) if keep else images[:0][None]
        ts = [-1 if k == 0 else int(sched.timesteps[k - 1]) for k in keep]
        return SampleResult(images=images, trajectory=stack, trajectory_steps=list(keep), timesteps=ts)

    def _reference_loop(self, sched, shape, seed, eta, first_index, keep, callback):
        """The all-PyTorch reference sampler (backend="torch")."""
        from .reference import reference_sample
        unet = self._per_sample_unet("cpu")
        x, frames = reference_sample(unet, sched, shape, seed=seed, eta=eta, first_index=first_index,
                                     keep=keep, callback=callback)
        return x.numpy(), {k: v.numpy() for k, v in frames.items()}

    def _stepped_loop(self, sched, be, shape, seed, eta, first_index, keep, callback):
        """Reference U-Net (torch) for the model output, the fused step on ``be`` in place."""
        import torch
        from .philox import noise as spec_noise
        unet = self._per_sample_unet("cpu")
        native_noise = getattr(be, "noise", None)
        try:
            x = native_noise(seed, shape, INITIAL_STEP, first_index)           # x_T: [N, C, H, W]
        except NotImplementedError:
            x = spec_noise(seed, shape, -1, first_index)
        x = np.ascontiguousarray(x, dtype=np.float32)
        frames = {0: x.copy()} if 0 in keep else {}
        opts = {"eta": eta} if isinstance(sched, DDIMScheduler) else {}
        xt = torch.from_numpy(x)
        for k, t in enumerate(int(t) for t in sched.timesteps):
            with torch.no_grad():
                m = unet(xt, t).numpy()
            sched.step(m, t, x, seed=seed, first_index=first_index, backend=be.name, out=x, **opts)
            if k + 1 in keep:
                frames[k + 1] = x.copy()
            if callback is not None:
                callback(k + 1)
        return x, frames

    # ------------------------------------------------------------------ saving
    def save(self, path) -> str:
        """Write the diffusers layout (model_index.json, unet/, scheduler/) into ``path``.

        Everything is written into a temporary sibling directory first and moved into place file by
        file, so a failure leaves neither a half-written model nor a damaged earlier one."""
        path = os.path.abspath(os.fspath(path))
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        if os.path.exists(path) and not os.path.isdir(path):
            raise FileExistsError(f"{path} exists and is not a directory")
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
        try:
            os.makedirs(os.path.join(tmp, "unet"))
            _write_json(os.path.join(tmp, "unet", "config.json"),
                        {**self.unet_config.to_dict(), "_diffusers_version": _DIFFUSERS_VERSION})
            save_safetensors(self.weights, os.path.join(tmp, "unet", "diffusion_pytorch_model.safetensors"))
            self.scheduler.save_config(os.path.join(tmp, "scheduler"))
            _write_json(os.path.join(tmp, "model_index.json"), {
                "_class_name": "DDPMPipeline", "_diffusers_version": _DIFFUSERS_VERSION,
                "scheduler": ["diffusers", type(self.scheduler).__name__], "unet": ["diffusers", "UNet2DModel"]})
            for rel in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                        "scheduler/scheduler_config.json", "model_index.json"):
                os.makedirs(os.path.dirname(os.path.join(path, rel)), exist_ok=True)
                os.replace(os.path.join(tmp, rel), os.path.join(path, rel))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path


def _sampling_device(backend: str) -> str:
    """Where a whole sampling loop runs: on the GPU for native-cuda (and for "auto" when it can)."""
    if backend == "native-cuda" or (backend == "auto" and not _backends.reasons("native-cuda", "cuda")):
        return "cuda"
    return "cpu"


def _check_dtype(dtype, be) -> str | None:
    """None or the engine precision; only the CUDA engine has others than fp32."""
    if dtype is None:
        return None
    if "cuda" in be.devices and be.name == "native-cuda":
        from .executors.native_cuda import check_dtype
        return check_dtype(dtype)
    if dtype != "fp32":
        raise ValueError(f"dtype={dtype!r} needs backend='native-cuda'; {be.name} computes in fp32 "
                         "(pass dtype=None or 'fp32')")
    return None


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _trajectory_positions(trajectory, total: int) -> list[int]:
    """Sorted unique loop positions in [0, total]; negative ones count from the end (-1 = final)."""
    if trajectory is None:
        return []
    if isinstance(trajectory, (str, bytes)) or not hasattr(trajectory, "__iter__"):
        raise TypeError("trajectory must be a list of step indices (0 = the initial static, "
                        f"{total} = the finished image)")
    out = set()
    for k in trajectory:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"trajectory entries must be integers, got {k!r}")
        k = int(k)
        if not -(total + 1) <= k <= total:
            raise ValueError(f"trajectory step {k} is outside [0, {total}] (steps of this run)")
        out.add(k % (total + 1))
    return sorted(out)


def _progress_bar(total: int, progress: bool, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="step")


# ---------------------------------------------------------------------- loading

_MODEL_FILES = ("unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                "scheduler/scheduler_config.json")


def _model_file(directory: str, rel: str) -> str:
    """``directory/rel``, once it is known to exist and to lie inside ``directory`` (a symlink out
    of the model directory, to /etc/passwd or anywhere else, is refused before anything is read)."""
    path = os.path.join(directory, *rel.split("/"))
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path} is missing: a fastddpm/diffusers model directory needs "
                                f"{', '.join(_MODEL_FILES)}")
    check_inside(directory, path)
    return path


def _read_json(path: str) -> dict:
    try:
        return read_json_object(path)
    except FileNotFoundError:  # a dangling symlink inside the directory
        raise FileNotFoundError(f"{path} is missing or a broken symlink") from None


def _load_directory(path: str, name: str | None = None) -> Pipeline:
    """A diffusers-layout directory, read as possibly hostile: each problem is a ValueError,
    TypeError or OSError subclass whose message names the file (and the field)."""
    unet_path, weights_path, sched_path = (_model_file(path, rel) for rel in _MODEL_FILES)
    with errors_name(unet_path, UNetConfigError):
        cfg = UNetConfig.from_dict(_read_json(unet_path))  # bounded before anything is built
    weights = load_safetensors(weights_path)
    sched_cfg = _read_json(sched_path)
    cls_name = sched_cfg.get("_class_name", "DDPMScheduler")
    if not isinstance(cls_name, str) or cls_name not in _SCHEDULERS:
        raise SchedulerConfigError(f"{sched_path}: _class_name = {cls_name!r:.100} is not one of "
                                   f"{sorted(_SCHEDULERS)}")
    with errors_name(sched_path, SchedulerConfigError):
        scheduler = _SCHEDULERS[cls_name].from_config(sched_cfg)
    with errors_name(f"{weights_path} (against {unet_path})", WeightsError):
        return Pipeline(cfg, weights, scheduler, name=name or os.path.basename(os.path.normpath(path)))


_cache: dict[str, Pipeline] = {}
_cache_lock = threading.Lock()


def load(name_or_path) -> Pipeline:
    """A bundled model (``"digits"``), a benchmark preset (``"bench-small"``, ``"ddpm-cifar10"``:
    seeded random weights) or a diffusers-layout directory."""
    if isinstance(name_or_path, Pipeline):
        return name_or_path
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model must be a name, a directory or a Pipeline, got {type(name_or_path).__name__}")
    key = os.fspath(name_or_path)
    if key in PRESETS:
        cfg = UNetConfig.from_dict(PRESETS[key])
        return Pipeline(cfg, random_weights(cfg, seed=0), DDPMScheduler(), name=key)
    if key in BUNDLED_MODELS:
        path = os.path.join(_MODELS_DIR, key)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"the bundled model {key!r} is not installed at {path} "
                                    "(train it with `fastddpm train --preset digits`)")
        return _load_directory(path, name=key)
    if os.path.isdir(key):
        return _load_directory(key)
    raise FileNotFoundError(f"no model {key!r}: not a bundled model {BUNDLED_MODELS}, not a preset "
                            f"{PRESET_MODELS} and not a directory")


def _cached(model) -> Pipeline:
    """Named models are loaded once per process (repeated sample() calls skip the file reads)."""
    if isinstance(model, Pipeline):
        return model
    key = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    if key in BUNDLED_MODELS or key in PRESETS:
        with _cache_lock:
            if key not in _cache:
                _cache[key] = load(key)
            return _cache[key]
    return load(model)


def default_model() -> str:
    """The bundled model, or (until it is installed) the bench-small preset, with a warning."""
    if os.path.isdir(os.path.join(_MODELS_DIR, DEFAULT_MODEL)):
        return DEFAULT_MODEL
    warnings.warn(f"the bundled model {DEFAULT_MODEL!r} is not installed: sampling the bench-small "
                  "architecture with random weights (the images will be noise-like)", stacklevel=3)
    return "bench-small"


def sample(model=None, n: int = 1, *, steps: int | None = None, sampler: str = "ddpm", seed: int | None = 0,
           backend: str = "auto", eta: float = 0.0, output: str = "uint8", progress: bool = False,
           trajectory: Sequence[int] | None = None, dtype: str | None = None):
    """Sample ``n`` images. ``model=None``: the bundled model. Returns uint8 [n, H, W, C]
    (``output="float"``: float32 [n, C, H, W] in [-1, 1]); with ``trajectory`` a SampleResult.
    ``dtype`` ("fp32", "tf32", "bf16", "fp16"): the CUDA engine's precision (default tf32; fp32
    means no TF32); CPU backends compute in fp32."""
    pipe = _cached(default_model() if model is None else model)
    return pipe(n, steps=steps, sampler=sampler, seed=seed, backend=backend, eta=eta, output=output,
                progress=progress, trajectory=trajectory, dtype=dtype)
