"""Sampling a data set to disk in shards: resumable, exact, in-process or on a Ray cluster.

Sample i of a run depends only on (model, sampler, seed, i) (the noise is keyed by seed, sample
index and step, and the engines are batch invariant), so shard j = images [j*k, j*k + k) is one
``pipe(k, seed=seed, first_index=j*k)`` call, and the union of the shards is bit for bit the one
``sample(n, seed)`` call, whatever the shard size, the workers or the order they finish in.

out_dir/
  manifest.json          the request (model hash, sampler, steps, eta, seed, n, shard size, image
                         shape) and each finished shard's range and SHA-256, rewritten atomically
  shard-000000.npz ...   uint8 [k, H, W, C] under the key "images", each written atomically
  png/000000123.png      (png=True) one picture per image

A rerun of the same request skips the shards whose file matches its recorded checksum and redoes
the rest (missing, corrupt, or in flight when a run was killed); another request in the same
directory is an error naming the fields that differ.
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
from .dispatch import check_seed

FORMAT = 1
MANIFEST = "manifest.json"
_REQUEST_KEYS = ("format", "model_hash", "sampler", "steps", "eta", "seed", "n", "shard_size", "image_shape")


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


def _positive(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


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
            differ = [f"{k}: {old.get(k)!r} there, {request[k]!r} asked"
                      for k in _REQUEST_KEYS if old.get(k) != request[k]]
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
        entry = self.data["shards"].get(str(index))
        return bool(entry) and _file_sha256(os.path.join(out_dir, entry["file"])) == entry["sha256"]

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
        from .images import to_pil
        os.makedirs(os.path.join(out_dir, "png"), exist_ok=True)
        for i, pic in enumerate(to_pil(images)):
            atomic_write(os.path.join(out_dir, "png", f"{first + i:09d}.png"),
                         lambda tmp, pic=pic: pic.save(tmp, format="PNG"))
    return name, hashlib.sha256(payload).hexdigest()


# ------------------------------------------------------------------ the work of one shard

_WORKER_PIPES: dict[str, Any] = {}     # model spec -> Pipeline, once per process (a Ray worker too)
_WORKER_LOCK = threading.Lock()


def _worker_pipeline(spec: str, expect_hash: str):
    from .pipeline import load
    with _WORKER_LOCK:
        pipe = _WORKER_PIPES.get(spec)
        if pipe is None:
            pipe = load(spec)
            got = model_hash(pipe)
            if got != expect_hash:
                raise ManifestMismatchError(f"the model {spec!r} on this worker hashes to {got[:12]}, "
                                            f"the run's to {expect_hash[:12]}: the workers must see the same files")
            pipe = _WORKER_PIPES[spec] = pipe
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


def _run_shard(spec: str, expect_hash: str, index: int, first: int, count: int, opts: dict) -> np.ndarray:
    _fault_for_tests(index)
    pipe = _worker_pipeline(spec, expect_hash)
    return pipe(count, first_index=first, output="uint8", **opts)   # uint8 [count, H, W, C]


# ------------------------------------------------------------------ the driver

def sample_to_disk(model, n: int, out_dir, *, seed: int = 0, shard_size: int = 1000, sampler: str = "ddpm",
                   steps: int | None = None, eta: float = 0.0, backend: str = "auto", cluster=None,
                   threads: int | None = None, png: bool = False, progress: bool = False) -> dict:
    """Sample ``n`` images into ``out_dir`` as shards of ``shard_size`` (see the module doc).

    model: a bundled name, a preset, a model directory or a Pipeline (saved into out_dir/model
    for the workers of a cluster). cluster: None or "local" (in this process), "ray" (a local Ray
    instance, or the one already initialised) or a Ray address ("auto", "ray://host:port").
    threads: on a cluster, the native engine's threads per shard task (the task asks for that many
    CPUs; default 1); in-process runs use the process's own thread setting.
    Returns the manifest (request and shards)."""
    from .pipeline import Pipeline, load
    n = _positive("n", n)
    shard_size = _positive("shard_size", shard_size)
    if seed is None or isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int (every shard of a run shares it), got {seed!r}")
    seed = check_seed(seed)
    if threads is not None:
        threads = _positive("threads", threads)
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    for stale in os.listdir(out_dir):   # temporary files of a killed run (one driver per directory)
        if stale.startswith((".shard-", f".{MANIFEST}.")) and stale.endswith(".tmp"):
            os.unlink(os.path.join(out_dir, stale))
    pipe = load(model)
    if isinstance(model, Pipeline):
        spec = os.path.join(out_dir, "model")
        if not os.path.isdir(spec):
            pipe.save(spec)
    else:
        spec = os.fspath(model)
        if os.path.isdir(spec):
            spec = os.path.abspath(spec)
    sched = pipe.scheduler_for(sampler, steps)   # validates sampler and steps
    h, w = pipe.image_size
    request = {"format": FORMAT, "model_hash": model_hash(pipe), "sampler": sampler,
               "steps": len(sched.timesteps), "eta": float(eta), "seed": seed, "n": n,
               "shard_size": shard_size, "image_shape": [h, w, pipe.unet_config.in_channels]}
    manifest = _Manifest(out_dir, request)
    opts = {"seed": seed, "sampler": sampler, "steps": len(sched.timesteps), "eta": float(eta), "backend": backend}
    shards = [(j, j * shard_size, min(shard_size, n - j * shard_size)) for j in range(-(-n // shard_size))]
    todo = [s for s in shards if not manifest.verified(out_dir, s[0])]
    _WORKER_PIPES.setdefault(spec, pipe)

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
                finish(index, first, count, _run_shard(spec, request["model_hash"], index, first, count, opts))
        else:
            _run_on_ray(cluster, spec, request["model_hash"], todo, opts, threads, finish)
    finally:
        if bar is not None:
            bar.close()
    return manifest.data


def _run_on_ray(cluster, spec, expect_hash, todo, opts, threads, finish) -> None:
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
    pending = {task.remote(spec, expect_hash, index, first, count, opts): (index, first, count)
               for index, first, count in todo}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            index, first, count = pending.pop(ref)
            finish(index, first, count, ray.get(ref))


def read_shards(out_dir) -> np.ndarray:
    """Every image of a finished run, in sample order (checksums verified): uint8 [n, H, W, C]."""
    out_dir = os.fspath(out_dir)
    with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as f:
        data = json.load(f)
    req, shards = data["request"], data["shards"]
    count = -(-req["n"] // req["shard_size"])
    parts = []
    for j in range(count):
        entry = shards.get(str(j))
        if entry is None:
            raise ValueError(f"{out_dir}: shard {j} of {count} is not finished; rerun the same request")
        path = os.path.join(out_dir, entry["file"])
        if _file_sha256(path) != entry["sha256"]:
            raise ValueError(f"{path} does not match its checksum in the manifest; rerun the same request")
        with np.load(path) as z:
            parts.append(z["images"])
    return np.concatenate(parts)
