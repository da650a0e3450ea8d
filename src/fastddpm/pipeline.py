"""load(), Pipeline, Sampler and sample(): a U-Net + a scheduler + an engine.

A Pipeline holds a validated U-Net config, its weights (float32 NumPy, diffusers' keys) and a
scheduler. A call picks a backend (executors.sampling_backend), asks it for an engine of the
request's shape (executors.engine_for: the backend's own, or the reference U-Net with its fused
step) and runs the scheduler's StepSchedule on it; loop.py defines what that run means (noise
keying, trajectory, callback, cancel), so the first k images of ``sample(n=N, seed=s)`` are the
images of ``sample(n=k, seed=s)`` on every backend.
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

from . import executors, validate
from . import threads as _budget
from ._files import check_inside, errors_name, read_json_object
from .conditioning import check_guidance, check_labels, check_null_class, class_embedding, guided_labels
from .executors import EngineOptions
from .limits import check_request, engine_cache_size
from .schedulers import (CMStochasticIterativeScheduler, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                         EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, SchedulerConfigError, scheduler_for)
from .unet_config import PRESETS, UNetConfig, UNetConfigError, random_weights, weight_shapes
from .weights import WeightsError, check_weights, load_safetensors, save_safetensors

__all__ = ["Pipeline", "Sampler", "SampleResult", "load", "sample", "BUNDLED_MODELS", "PRESET_MODELS"]

_MODELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")
BUNDLED_MODELS = ("digits", "digits-cond")
PRESET_MODELS = tuple(PRESETS)
DEFAULT_MODEL = "digits"
_DIFFUSERS_VERSION = "0.42.1"   # what the saved files say they were written for
_SCHEDULERS = {cls.__name__: cls for cls in (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler,
                                             EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
                                             CMStochasticIterativeScheduler)}   # loadable from a model directory
_OUTPUTS = ("uint8", "float")
# model_index.json keys of a model trained for classifier-free guidance (conditioning.py)
_NULL_CLASS_KEY, _GUIDANCE_KEY = "_fastddpm_null_class", "_fastddpm_guidance_scale"


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


class Sampler:
    """A Pipeline's engine and schedule, fixed for repeated calls (``Pipeline.sampler``): for
    applications that want the latency of one image, each call only runs the loop.

        s = fastddpm.load("digits").sampler(batch=1, sampler="ddim", steps=50)
        x0 = s(seed=1)            # float32 [1, C, H, W] in the model's range

    A class-conditional model's sampler takes the labels per call (``s(seed=1, labels=[3])``); its
    guidance scale is fixed when it is made (a guided sampler's engine runs 2 x batch rows)."""

    def __init__(self, pipeline, engine, schedule, guidance: float | None = None, threads: int | None = None):
        self.pipeline, self.engine, self.schedule = pipeline, engine, schedule
        self.threads = threads              # asked of the thread budget per call (None: all of it)
        self.guidance_scale = guidance      # None: unguided (w = 1)
        self.batch = engine.samples(guidance)
        self.shape = (self.batch,) + tuple(engine.input_shape[1:])
        self._class_emb = (None, None)      # (labels, embedding) of the last call

    @property
    def steps(self) -> int:
        return len(self.schedule)

    def __call__(self, seed: int = 0, *, labels=None, first_index: int = 0, keep=(), callback=None):
        """x0 float32 [N, C, H, W] (NumPy); with ``keep``: (x0, {position: frame})."""
        labels = check_labels(self.pipeline.unet_config, labels, self.batch)
        last, emb = self._class_emb
        if labels is not None and not (last is not None and np.array_equal(last, labels)):
            emb = self.pipeline._class_rows(labels, self.guidance_scale)
            self._class_emb = (labels.copy(), emb)   # a copy: the caller may reuse its array
        with _budget.request(self.threads):
            x, frames = self.engine.run(self.schedule, seed=seed, first_index=first_index, keep=keep,
                                        callback=callback, class_emb=None if labels is None else emb,
                                        guidance=self.guidance_scale)
        return (x, frames) if keep else x


class Pipeline:
    """A U-Net (config + float32 weights) and a scheduler; call it to sample."""

    def __init__(self, unet_config: UNetConfig | dict, weights: dict, scheduler, name: str | None = None, *,
                 null_class=None, guidance_scale=None, threads: int | None = None):
        self.unet_config = unet_config if isinstance(unet_config, UNetConfig) else UNetConfig.from_dict(unet_config)
        self.weights = check_weights(weights, weight_shapes(self.unet_config))  # name -> float32 array
        # classifier-free guidance (conditioning.py): the label meaning "no label" (None: the model
        # was not trained for guidance) and the scale a call uses when it names none
        self.null_class = check_null_class(self.unet_config, null_class)
        default = 1.0 if guidance_scale is None else guidance_scale
        check_guidance(default, self.null_class)    # refuses a default this model cannot run
        self.guidance_scale = float(default)
        if not isinstance(scheduler, tuple(_SCHEDULERS.values())):
            raise TypeError(f"scheduler must be a fastddpm DDPMScheduler or DDIMScheduler, got {type(scheduler).__name__}")
        self.scheduler = scheduler
        self.name = name
        self.threads = threads            # each call's default threads= (None: the whole budget)
        self._reference = None            # the torch ReferenceUNet, built on first use
        self._engines: OrderedDict = OrderedDict()   # (backend, batch, h, w, options) -> engine, LRU order
        self._schedulers: OrderedDict = OrderedDict()   # (scheduler, sampler, steps) -> scheduler, LRU order
        self._per_sample_floats: dict = {}          # (h, w) -> the plan's activation floats per sample
        self._lock = threading.Lock()

    @property
    def threads(self) -> int | None:
        """Threads each call of this pipeline asks of the process-wide budget (threads.py) when
        it names none; None: the whole budget."""
        return self._threads

    @threads.setter
    def threads(self, value) -> None:
        self._threads = _budget.check(value)

    def _threads_for(self, threads) -> int | None:
        return self._threads if threads is None else _budget.check(threads)

    def __repr__(self):
        cfg = self.unet_config
        return (f"Pipeline({self.name or 'unnamed'}: {cfg.in_channels}x{self.image_size[0]}x{self.image_size[1]}, "
                f"block_out_channels={list(cfg.block_out_channels)}, {type(self.scheduler).__name__})")

    @property
    def image_size(self) -> tuple[int, int]:
        return self.unet_config.sample_hw or (32, 32)

    # ------------------------------------------------------------------ U-Net
    def _per_sample_unet(self, device="cpu"):
        """The reference U-Net applied one sample at a time (batch invariant)."""
        from .reference.sampler import per_sample
        return per_sample(self.reference_unet(device))

    def reference_unet(self, device="cpu"):
        """The PyTorch reference U-Net with this pipeline's weights (needs torch)."""
        with self._lock:
            if self._reference is None:
                from .reference import ReferenceUNet
                self._reference = ReferenceUNet.from_weights(self.unet_config, self.weights).eval()
            return self._reference.to(device)

    def _engine(self, be, batch: int, height: int, width: int, options: EngineOptions):
        """The engine of this backend for this shape and options (cached, least recently used out)."""
        key = (be.name, batch, height, width, options)
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                engine = executors.engine_for(be, self.unet_config, self.weights, batch, height, width, options)
                self._engines[key] = engine
                while len(self._engines) > engine_cache_size():
                    self._engines.popitem(last=False)
            self._engines.move_to_end(key)
            return engine

    def _check_request(self, n: int, height: int, width: int, frames: int, what: str, history: int = 0,
                       rows: int | None = None) -> None:
        """Refuse, before any allocation, a request whose buffers would exceed the limit
        (limits.py): the plan's activations of the engine's rows (n, or 2n for a guided run) plus
        n images per kept frame, and for a multistep solver (history > 0) the engines' ring of
        three x0 images."""
        with self._lock:
            per = self._per_sample_floats.get((height, width))
            if per is None:
                from .plan import build_plan
                per = self._per_sample_floats[(height, width)] = sum(build_plan(self.unet_config, 1, height, width)
                                                                     .slot_sizes)
        image = self.unet_config.in_channels * height * width
        rows = n if rows is None else rows
        check_request(what, 4 * (rows * per + n * image * (2 + frames + (3 if history else 0))))

    # ------------------------------------------------------------------ conditioning
    def _guidance(self, guidance_scale) -> float | None:
        """The guidance scale of a call, checked (None: the pipeline's default); None for w = 1."""
        return check_guidance(self.guidance_scale if guidance_scale is None else guidance_scale, self.null_class)

    def _class_rows(self, labels: np.ndarray, guidance: float | None) -> np.ndarray:
        """The class embedding of an engine's rows for checked labels: [n, D], or with guidance
        [2n, D] (the labels' rows, then the null class's)."""
        if guidance is not None:
            labels = guided_labels(labels, self.null_class)
        return class_embedding(self.unet_config, self.weights, labels)

    def _class_emb(self, labels, n: int, guidance: float | None) -> np.ndarray | None:
        """The class embedding of a request's engine rows, its labels checked (None for an
        unconditional model: a guidance != 1 was refused by _guidance, for want of a null class).
        Called after the request-size check: it allocates [rows, D]."""
        labels = check_labels(self.unet_config, labels, n)
        return None if labels is None else self._class_rows(labels, guidance)

    def unet(self, sample, timestep, backend="auto", *, labels=None, threads: int | None = None):
        """One U-Net forward: the model output for ``sample`` [N, C, H, W] at ``timestep`` (an int,
        or one per sample), conditioned on ``labels`` (one, or one per sample) for a class-
        conditional model. NumPy in, NumPy out; torch tensors in, torch tensors out. ``threads``:
        asked of the process-wide thread budget (None: the pipeline's ``threads``)."""
        threads = self._threads_for(threads)
        is_numpy = isinstance(sample, np.ndarray)
        if getattr(sample, "ndim", None) != 4 or sample.shape[1] != self.unet_config.in_channels:
            shape = tuple(sample.shape) if hasattr(sample, "shape") else type(sample).__name__
            raise ValueError(f"sample must be [N, {self.unet_config.in_channels}, H, W], got {shape}")
        labels = check_labels(self.unet_config, labels, int(sample.shape[0]))
        class_emb = None if labels is None else self._class_rows(labels, None)
        if is_numpy:
            if sample.dtype != np.float32:
                raise TypeError(f"sample must be float32, got {sample.dtype}")
            self.unet_config.check_image_size(sample.shape[2], sample.shape[3])
            be = executors.select(backend, "cpu")
            self._check_request(sample.shape[0], sample.shape[2], sample.shape[3], 0,
                                f"a U-Net forward of batch {sample.shape[0]}")
            engine = self._engine(be, *sample.shape[:1], *sample.shape[2:], EngineOptions(dtype=be.check_dtype(None)))
            with _budget.request(threads):
                return engine.forward(np.ascontiguousarray(sample), timestep, class_emb)
        import torch
        executors.select(backend, "cuda" if sample.is_cuda else "cpu")   # refuse an impossible request
        with torch.no_grad():
            ce = None if class_emb is None else torch.from_numpy(class_emb).to(sample.device)
            return self.reference_unet(sample.device)(sample, timestep, class_emb=ce)

    # ------------------------------------------------------------------ sampling
    def default_sampler(self) -> str:
        """The sampler a call that names none runs: "cm" for a consistency model, else "ddpm"."""
        return "cm" if isinstance(self.scheduler, CMStochasticIterativeScheduler) else "ddpm"

    def scheduler_for(self, sampler: str | None, steps: int | None):
        """A scheduler of the kind ``sampler`` names (None: ``default_sampler()``), from this
        pipeline's scheduler config, with ``steps`` timesteps (None: the sampler's default). Kept
        for reuse; do not modify it."""
        sampler = self.default_sampler() if sampler is None else sampler
        if isinstance(steps, (list, tuple)):   # explicit CM timesteps: hashable for the cache
            steps = tuple(steps)
        key = (id(self.scheduler), sampler, steps)
        with self._lock:
            found = self._schedulers.get(key)
            if found is not None and found[0] is self.scheduler:
                self._schedulers.move_to_end(key)
                return found[1]
        sched = scheduler_for(sampler, self.scheduler.config, steps, source=type(self.scheduler))
        with self._lock:
            self._schedulers[key] = (self.scheduler, sched)
            while len(self._schedulers) > 8:
                self._schedulers.popitem(last=False)
        return sched

    def _prepare(self, n, sampler, steps, eta, backend, dtype):
        """(schedule, backend, engine options) of a request, every argument checked."""
        n = validate.count("n", n)
        sched = self.scheduler_for(sampler, steps)
        schedule = sched.schedule(eta=eta)
        be = executors.sampling_backend(backend, schedule.history)
        options = EngineOptions(dtype=be.check_dtype(dtype))
        return n, schedule, be, options

    def __call__(self, n: int = 1, *, steps: int | None = None, sampler: str | None = None, seed: int | None = 0,
                 backend: str = "auto", eta: float = 0.0, output: str = "uint8", progress: bool = False,
                 trajectory: Sequence[int] | None = None, first_index: int = 0, dtype: str | None = None,
                 labels=None, guidance_scale: float | None = None, threads: int | None = None):
        """``labels``: a class-conditional model's labels (one for all, or one per sample);
        ``guidance_scale``: classifier-free guidance w (None: the pipeline's default,
        ``self.guidance_scale``; 1: the conditional model alone); ``threads``: asked of the
        process-wide thread budget (None: the pipeline's ``threads``; the result never depends on it)."""
        threads = self._threads_for(threads)
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}")
        n, schedule, be, options = self._prepare(n, sampler, steps, eta, backend, dtype)
        guidance = self._guidance(guidance_scale)
        rows = n if guidance is None else 2 * n      # guided: the n samples twice (labels, null class)
        seed = validate.seed(seed, fresh_if_none=True)
        first_index = validate.first_index(first_index, n)
        total = len(schedule)
        keep = validate.positions(trajectory, total)
        h, w = self.image_size
        self._check_request(n, h, w, len(keep), f"sampling n={n} images of {h}x{w}"
                            + ("" if guidance is None else f" with guidance ({rows} U-Net rows)"),
                            schedule.history, rows=rows)
        class_emb = self._class_emb(labels, n, guidance)

        bar = _progress_bar(total, progress, f"{sampler or self.default_sampler()} {total} steps on {be.name}")
        try:
            callback = None if bar is None else (lambda k: bar.update(k - bar.n))
            engine = self._engine(be, rows, h, w, options)
            with _budget.request(threads):
                x, frames = engine.run(schedule, seed=seed, first_index=first_index, keep=keep, callback=callback,
                                       class_emb=class_emb, guidance=guidance)
        finally:
            if bar is not None:
                bar.close()
        images = _format(x, output)
        if trajectory is None:
            return images
        stack = np.stack([_format(frames[k], output) for k in keep]) if keep else images[:0][None]
        return SampleResult(images=images, trajectory=stack, trajectory_steps=list(keep),
                            timesteps=schedule.position_timesteps(keep))

    def sampler(self, batch: int = 1, *, sampler: str | None = None, steps: int | None = None, eta: float = 0.0,
                backend: str = "auto", dtype: str | None = None, device: int = 0,
                guidance_scale: float | None = None, threads: int | None = None) -> "Sampler":
        """A fixed (batch, sampler, steps, eta, backend, dtype, guidance) ready to run again and
        again: the engine and the schedule are made once (on CUDA: weights on the device, graph
        captured). A class-conditional model's labels are given per call (Sampler.__call__).
        ``threads``: what each run asks of the thread budget (None: the pipeline's ``threads``)."""
        threads = self._threads_for(threads)
        batch, schedule, be, options = self._prepare(batch, sampler, steps, eta, backend, dtype)
        guidance = self._guidance(guidance_scale)
        rows = batch if guidance is None else 2 * batch
        h, w = self.image_size
        self._check_request(batch, h, w, 0, f"a sampler of batch {batch} for {h}x{w} images", schedule.history,
                            rows=rows)
        options = EngineOptions(dtype=options.dtype, device=validate.integer(device, "device"))
        engine = executors.engine_for(be, self.unet_config, self.weights, rows, h, w, options)
        return Sampler(self, engine, schedule, guidance, threads)

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
            index = {"_class_name": "DDPMPipeline", "_diffusers_version": _DIFFUSERS_VERSION,
                     "scheduler": ["diffusers", type(self.scheduler).__name__], "unet": ["diffusers", "UNet2DModel"]}
            if self.null_class is not None:   # "_" keys: diffusers ignores them
                index.update({_NULL_CLASS_KEY: self.null_class, _GUIDANCE_KEY: self.guidance_scale})
            _write_json(os.path.join(tmp, "model_index.json"), index)
            for rel in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                        "scheduler/scheduler_config.json", "model_index.json"):
                os.makedirs(os.path.dirname(os.path.join(path, rel)), exist_ok=True)
                os.replace(os.path.join(tmp, rel), os.path.join(path, rel))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


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
    guidance = {}
    index_path = os.path.join(path, "model_index.json")
    if os.path.lexists(index_path):    # optional: a bare unet/ + scheduler/ directory loads too
        check_inside(path, index_path)
        index = _read_json(index_path)
        guidance = {"null_class": index.get(_NULL_CLASS_KEY), "guidance_scale": index.get(_GUIDANCE_KEY)}
        with errors_name(f"{index_path} (against {unet_path})", ValueError, TypeError):
            null_class = check_null_class(cfg, guidance["null_class"])
            check_guidance(1.0 if guidance["guidance_scale"] is None else guidance["guidance_scale"], null_class)
    with errors_name(f"{weights_path} (against {unet_path})", WeightsError):
        return Pipeline(cfg, weights, scheduler, name=name or os.path.basename(os.path.normpath(path)), **guidance)


_cache: dict[str, Pipeline] = {}
_cache_lock = threading.Lock()


def load(name_or_path, *, threads: int | None = None) -> Pipeline:
    """A bundled model (``"digits"``), a benchmark preset (``"bench-small"``, ``"ddpm-cifar10"``:
    seeded random weights) or a diffusers-layout directory. ``threads``: the pipeline's default
    threads= (what its calls ask of the process-wide thread budget; None: all of it)."""
    threads = _budget.check(threads)
    pipe = _load(name_or_path)
    if threads is not None:
        pipe.threads = threads
    return pipe


def _load(name_or_path) -> Pipeline:
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
                                    f"(train it with `fastddpm train --preset {key}`)")
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
                _cache[key] = _load(key)
            return _cache[key]
    return _load(model)


def default_model() -> str:
    """The bundled model, or (until it is installed) the bench-small preset, with a warning."""
    if os.path.isdir(os.path.join(_MODELS_DIR, DEFAULT_MODEL)):
        return DEFAULT_MODEL
    warnings.warn(f"the bundled model {DEFAULT_MODEL!r} is not installed: sampling the bench-small "
                  "architecture with random weights (the images will be noise-like)", stacklevel=3)
    return "bench-small"


def sample(model=None, n: int = 1, *, steps: int | None = None, sampler: str | None = None, seed: int | None = 0,
           backend: str = "auto", eta: float = 0.0, output: str = "uint8", progress: bool = False,
           trajectory: Sequence[int] | None = None, dtype: str | None = None, labels=None,
           guidance_scale: float | None = None, threads: int | None = None):
    """Sample ``n`` images. ``model=None``: the bundled model. ``sampler`` (SAMPLERS; None: "cm" for
    a consistency model, else "ddpm") and ``steps`` (None: the sampler's default). Returns uint8 [n, H, W, C]
    (``output="float"``: float32 [n, C, H, W] in [-1, 1]); with ``trajectory`` a SampleResult.
    ``dtype`` ("fp32", "tf32", "bf16", "fp16"): the CUDA engine's precision (default tf32; fp32
    means no TF32); CPU backends compute in fp32. ``labels``: a class-conditional model's class
    (one for all, or one per sample); ``guidance_scale``: classifier-free guidance w (None: the
    model's default; 1: no guidance); ``threads``: asked of the process-wide thread budget
    (``fastddpm.set_num_threads``; None: the pipeline's default, else all of it)."""
    pipe = _cached(default_model() if model is None else model)
    return pipe(n, steps=steps, sampler=sampler, seed=seed, backend=backend, eta=eta, output=output,
                progress=progress, trajectory=trajectory, dtype=dtype, labels=labels,
                guidance_scale=guidance_scale, threads=threads)
