"""Sampling a data set to disk in shards: resumable, exact, in-process or on a Ray cluster.

Sample i of a run depends only on (model, sampler, seed, i) (the noise is keyed by seed, sample
index and step, and the engines are batch invariant), so shard j = images [j*k, j*k + k) is one
``pipe(k, seed=seed, first_index=j*k)`` call, and the union of the shards is bit for bit the one
``sample(n, seed)`` call, whatever the shard size, the workers or the order they finish in.

out_dir/
  manifest.json          the request (model hash, sampler, steps, eta, seed, n, shard size, image
                         shape; for a class-conditional model the labels and the guidance scale)
                         and each finished shard's range and SHA-256, rewritten atomically
  shard-000000.npz ...   uint8 [k, H, W, C] under the key "images", each written atomically
  png/000000123.png      (png=True) one picture per image

A rerun of the same request skips the shards whose file matches its recorded checksum and redoes
the rest (missing, corrupt, or in flight when a run was killed); another request in the same
directory is an error naming the fields that differ.

A class-conditional model's labels are one label for every image, or one per image (shard j gets
its slice; the noise stays keyed by the image index, so the shards are still the one call
``sample(n, seed, labels=...)``); the manifest records a single label as itself and a list by its
SHA-256, and the guidance scale the run used (the model's default when none is given).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from typing import Any

import numpy as np

from ._atomic import atomic_write
from . import validate

FORMAT = 1
MANIFEST = "manifest.json"


class ManifestMismatchError(ValueError):
    """out_dir holds shards of another request (model, sampler, seed, ...)."""


def model_hash(pipe) -> str:
    """SHA-256 of what decides the images: the U-Net config, the scheduler config, every weight."""
    h = hashlib.sha256()
    h.update(json.dumps(pipe.unet_config.to_dict(), sort_keys=True, default=str).encode())
    h.update(json.dumps(pipe.scheduler.config, sort_keys=True, default=str).encode())
    for name in sorted(pipe.weights):
        a = np.ascontiguousarray(pipe.weights[name], dtype=np.float32)
        h.update(name.encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.npz"


def _file_sha256(path: str) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except FileNotFoundError:
        return None
    return h.hexdigest()


def _npz_bytes(images: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, images=images)
    return buf.getvalue()


def _entry(shards: dict, index: int) -> dict | None:
    """The manifest's record of shard ``index`` if it is well formed (its own file name, a digest)."""
    entry = shards.get(str(index))
    if not isinstance(entry, dict) or entry.get("file") != shard_name(index) \
            or not isinstance(entry.get("sha256"), str):
        return None
    return entry


class _Manifest:
    """manifest.json: the request and the finished shards; every change rewritten atomically."""

    def __init__(self, out_dir: str, request: dict):
        self.path = os.path.join(out_dir, MANIFEST)
        self.lock = threading.Lock()
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                try:
                    data = json.load(f)
                except ValueError as exc:
                    raise ManifestMismatchError(f"{self.path} is not a fastddpm shard manifest: {exc}") from None
            if not isinstance(data, dict) or not isinstance(data.get("request"), dict) \
                    or not isinstance(data.get("shards"), dict):
                raise ManifestMismatchError(f"{self.path} is not a fastddpm shard manifest")
            old = data["request"]
            differ = [f"{k}: {old.get(k)!r} there, {v!r} asked" for k, v in request.items() if old.get(k) != v]
            if differ:
                raise ManifestMismatchError(f"{out_dir} holds shards of another request ({'; '.join(differ)}); "
                                            "use another directory")
            self.data = data
        else:
            self.data = {"request": request, "shards": {}}
            self._write()

    def _write(self) -> None:
        text = json.dumps(self.data, indent=1, sort_keys=True)

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
        atomic_write(self.path, write, fsync=True)

    def verified(self, out_dir: str, index: int) -> bool:
        """The shard's file exists and matches its recorded checksum (a malformed entry: redo it)."""
        entry = _entry(self.data["shards"], index)
        return entry is not None and _file_sha256(os.path.join(out_dir, entry["file"])) == entry["sha256"]

    def record(self, index: int, first: int, count: int, file: str, digest: str) -> None:
        with self.lock:
            self.data["shards"][str(index)] = {"first": first, "count": count, "file": file, "sha256": digest}
            self._write()


def _write_shard(out_dir: str, index: int, first: int, images: np.ndarray, png: bool) -> tuple[str, str]:
    """The shard's .npz (and PNGs) written atomically; returns (file name, sha256 of the file)."""
    payload = _npz_bytes(images)
    name = shard_name(index)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(payload)
    atomic_write(os.path.join(out_dir, name), write, fsync=True)
    if png:
        _write_pngs(out_dir, first, images)
    return name, hashlib.sha256(payload).hexdigest()


def _png_path(out_dir: str, i: int) -> str:
    return os.path.join(out_dir, "png", f"{i:09d}.png")


def _write_pngs(out_dir: str, first: int, images: np.ndarray) -> None:
    from .images import to_pil
    os.makedirs(os.path.join(out_dir, "png"), exist_ok=True)
    for i, pic in enumerate(to_pil(images)):
        atomic_write(_png_path(out_dir, first + i), lambda tmp, pic=pic: pic.save(tmp, format="PNG"))


# ------------------------------------------------------------------ the work of one shard

_WORKER_PIPES: dict[tuple[str, str], Any] = {}   # (model spec, hash) -> Pipeline, per process (a Ray worker too)
_WORKER_CACHE = 2                                 # models kept per process (each holds its engines)
_WORKER_LOCK = threading.Lock()


def _remember(key: tuple[str, str], pipe) -> None:
    _WORKER_PIPES.pop(key, None)
    _WORKER_PIPES[key] = pipe                        # the newest last
    while len(_WORKER_PIPES) > _WORKER_CACHE:
        _WORKER_PIPES.pop(next(iter(_WORKER_PIPES)))


def _worker_pipeline(spec: str, expect_hash: str):
    from .pipeline import load
    key = (spec, expect_hash)
    with _WORKER_LOCK:
        pipe = _WORKER_PIPES.get(key)
        if pipe is None:
            pipe = load(spec)
            got = model_hash(pipe)
            if got != expect_hash:
                raise ManifestMismatchError(f"the model {spec!r} on this worker hashes to {got[:12]}, "
                                            f"the run's to {expect_hash[:12]}: the workers must see the same files")
            _remember(key, pipe)
        return pipe


def _fault_for_tests(index: int) -> None:
    """Test hook: with FASTDDPM_SHARD_FAULT_DIR set, the first attempt at a shard listed in
    FASTDDPM_SHARD_FAULT_SHARDS kills its own worker process (a crash mid-task, retried by Ray)."""
    fault_dir = os.environ.get("FASTDDPM_SHARD_FAULT_DIR")
    if not fault_dir or str(index) not in os.environ.get("FASTDDPM_SHARD_FAULT_SHARDS", "").split(","):
        return
    try:
        os.close(os.open(os.path.join(fault_dir, f"fault-{index}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)


def _run_shard(spec: str, expect_hash: str, index: int, first: int, count: int, opts: dict,
               labels=None) -> np.ndarray:
    """labels: this shard's (None for an unconditional model)."""
    _fault_for_tests(index)
    pipe = _worker_pipeline(spec, expect_hash)
    return pipe(count, first_index=first, output="uint8", labels=labels, **opts)   # uint8 [count, H, W, C]


def _labels_record(given, labels: np.ndarray):
    """How the manifest names a run's labels: one label as itself, a list by the SHA-256 of its
    checked values (dtype and shape included), so a rerun with other labels is refused."""
    if np.ndim(given) == 0:
        return labels[0].item()
    h = hashlib.sha256(f"{labels.dtype.str}{labels.shape}".encode())
    h.update(np.ascontiguousarray(labels).tobytes())
    return f"sha256:{h.hexdigest()}"


# ------------------------------------------------------------------ the driver

def sample_to_disk(model, n: int, out_dir, *, seed: int = 0, shard_size: int = 1000, sampler: str | None = None,
                   steps: int | None = None, eta: float = 0.0, backend: str = "auto", cluster=None,
                   threads: int | None = None, png: bool = False, progress: bool = False, labels=None,
                   guidance_scale: float | None = None) -> dict:
    """Sample ``n`` images into ``out_dir`` as shards of ``shard_size`` (see the module doc).

    sampler: None for the model's own (Pipeline.default_sampler); steps: as for sample() (a list:
    a consistency model's explicit timesteps, recorded as such).
    labels: a class-conditional model's labels, one for all images or a sequence of n (shard j
    gets its slice); guidance_scale: classifier-free guidance (None: the model's default).

    model: a bundled name, a preset, a model directory or a Pipeline (saved into out_dir/model
    for the workers of a cluster). cluster: None or "local" (in this process), "ray" (a local Ray
    instance, or the one already initialised) or a Ray address ("auto", "ray://host:port").
    threads: on a cluster, the native engine's threads per shard task (the task asks for that many
    CPUs; default 1); in-process runs use the process's own thread setting.
    Returns the manifest (request and shards)."""
    from .pipeline import load
    n = validate.count("n", n)
    shard_size = validate.count("shard_size", shard_size)
    seed = validate.seed(seed)   # an int: every shard of a run shares it (None, a fresh seed, is refused)
    if threads is not None:
        threads = validate.count("threads", threads)
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    with _DirectoryLock(out_dir):
        return _sample_to_disk(load(model), model, n, out_dir, seed, shard_size, sampler, steps, eta, backend,
                               cluster, threads, png, progress, labels, guidance_scale)


class _DirectoryLock:
    """One driver per output directory (an flock on out_dir/.lock, released if the process dies)."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, ".lock")
        self.fd = None

    def __enter__(self):
        import fcntl
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise RuntimeError(f"another sample_to_disk is writing to {os.path.dirname(self.path)}") from None
        return self

    def __exit__(self, *exc):
        os.close(self.fd)   # closing releases the lock


def _sample_to_disk(pipe, model, n, out_dir, seed, shard_size, sampler, steps, eta, backend, cluster, threads,
                    png, progress, given_labels=None, guidance_scale=None) -> dict:
    from . import executors
    from .conditioning import check_labels
    from .pipeline import Pipeline
    labels = check_labels(pipe.unet_config, given_labels, n)   # before anything is written
    guidance = pipe._guidance(guidance_scale)
    for stale in os.listdir(out_dir):   # temporary files of a killed run (this driver holds the lock)
        if stale.startswith((".shard-", f".{MANIFEST}.")) and stale.endswith(".tmp"):
            os.unlink(os.path.join(out_dir, stale))
    if isinstance(model, Pipeline):
        spec = os.path.join(out_dir, "model")
        if not os.path.isdir(spec):
            pipe.save(spec)
    else:
        spec = os.fspath(model)
        if os.path.isdir(spec):
            spec = os.path.abspath(spec)
    sampler = pipe.default_sampler() if sampler is None else sampler
    sched = pipe.scheduler_for(sampler, steps)   # validates sampler and steps
    # what the workers run: the step count, or explicit timesteps as given (their count would
    # space the timesteps differently)
    steps = [int(s) for s in steps] if isinstance(steps, (list, tuple)) else len(sched.timesteps)
    h, w = pipe.image_size
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    # the backend by name, decided here: another backend rounds differently, so a run never mixes them
    # (a worker without it fails loudly instead of falling back)
    backend = executors.sampling_backend(backend).name
    request = {"format": FORMAT, "model_hash": model_hash(pipe), "sampler": sampler,
               "steps": steps, "eta": float(eta), "seed": seed, "n": n,
               "shard_size": shard_size, "image_shape": [h, w, pipe.unet_config.in_channels], "backend": backend}
    if labels is not None:   # only for a conditional model: an unconditional run's manifest is as it was
        request.update({"labels": _labels_record(given_labels, labels), "null_class": pipe.null_class,
                        "guidance_scale": 1.0 if guidance is None else guidance})
    manifest = _Manifest(out_dir, request)
    opts = {"seed": seed, "sampler": sampler, "steps": steps, "eta": float(eta), "backend": backend,
            "guidance_scale": 1.0 if guidance is None else guidance}
    shards = [(j, j * shard_size, min(shard_size, n - j * shard_size)) for j in range(-(-n // shard_size))]
    todo = [s for s in shards if not manifest.verified(out_dir, s[0])]
    if png:   # verified shards of an earlier run without PNGs get theirs from the shard files
        for index, first, count in shards:
            if (index, first, count) not in todo and not all(
                    os.path.exists(_png_path(out_dir, first + i)) for i in range(count)):
                with np.load(os.path.join(out_dir, shard_name(index))) as z:
                    _write_pngs(out_dir, first, z["images"])
    _remember((spec, request["model_hash"]), pipe)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(shards), initial=len(shards) - len(todo), unit="shard", desc=f"{n} images")

    def finish(index, first, count, images):
        name, digest = _write_shard(out_dir, index, first, images, png)
        manifest.record(index, first, count, name, digest)
        if bar is not None:
            bar.update(1)

    try:
        if cluster in (None, "local"):
            for index, first, count in todo:
                finish(index, first, count, _run_shard(spec, request["model_hash"], index, first, count, opts,
                                                       _slice(labels, first, count)))
        else:
            _run_on_ray(cluster, spec, request["model_hash"], todo, opts, threads, finish, labels)
    finally:
        if bar is not None:
            bar.close()
    return manifest.data


def _slice(labels, first: int, count: int):
    return None if labels is None else labels[first:first + count]


def _run_on_ray(cluster, spec, expect_hash, todo, opts, threads, finish, labels=None) -> None:
    """One Ray task per shard (retried if its worker dies); the driver writes what comes back."""
    try:
        import ray
    except ImportError:
        raise ImportError("cluster needs Ray: pip install 'fastddpm[ray]'") from None
    if not isinstance(cluster, str):
        raise TypeError(f"cluster must be None, 'local', 'ray' or a Ray address, got {cluster!r}")
    if not ray.is_initialized():
        if cluster == "ray":   # a local instance on this machine, loopback only
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=cluster, log_to_driver=False)
    cpus = threads or 1
    env = {"FASTDDPM_NUM_THREADS": str(cpus), "NUMBA_NUM_THREADS": str(cpus), "OMP_NUM_THREADS": str(cpus)}
    env.update({k: v for k, v in os.environ.items() if k.startswith("FASTDDPM_SHARD_FAULT_")})  # tests only
    task = ray.remote(_run_shard).options(num_cpus=cpus, max_retries=3, retry_exceptions=False,
                                          runtime_env={"env_vars": env})
    pending = {task.remote(spec, expect_hash, index, first, count, opts, _slice(labels, first, count)):
               (index, first, count) for index, first, count in todo}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index, first, count = pending.pop(ref)
                finish(index, first, count, ray.get(ref))
    finally:   # a shard that failed after its retries (or Ctrl-C): stop the others, keep what is written
        for ref in pending:
            ray.cancel(ref)


def read_shards(out_dir) -> np.ndarray:
    """Every image of a finished run, in sample order (checksums verified): uint8 [n, H, W, C]."""
    out_dir = os.fspath(out_dir)
    with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as f:
        data = json.load(f)
    req, shards = data["request"], data["shards"]
    count = -(-req["n"] // req["shard_size"])
    parts = []
    for j in range(count):
        entry = _entry(shards, j)
        if entry is None:
            raise ValueError(f"{out_dir}: shard {j} of {count} is not finished; rerun the same request")
        path = os.path.join(out_dir, entry["file"])
        if _file_sha256(path) != entry["sha256"]:
            raise ValueError(f"{path} does not match its checksum in the manifest; rerun the same request")
        with np.load(path) as z:
            parts.append(z["images"])
    return np.concatenate(parts)
