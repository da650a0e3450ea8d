"""The fixed calls whose outputs must not change bit for bit when the code is restructured.

Each case is (name, portable, fn): fn() returns arrays; their SHA-256 is compared with
tests/golden/hashes.json. "Portable" cases do the same arithmetic on any x86-64 (the fused step,
the Philox noise, the C++ engine with its ISA path forced); the others go through a BLAS or torch
kernel that CPUs choose for themselves, so their hashes are recorded per CPU model.

Record (only before a change that must keep the bits): python tests/golden_cases.py --record
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import sys

import numpy as np

HASHES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "hashes.json")


def cpu_model() -> str:
    """The model name, family/model numbers and a digest of the feature flags: VMs often mask the
    name, and BLAS and oneDNN pick their kernels from the numbers and flags."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                fields.setdefault(k.strip(), v.strip())
    except OSError:
        return platform.processor() or platform.machine()
    flags = hashlib.sha256(" ".join(sorted(fields.get("flags", "").split())).encode()).hexdigest()[:8]
    return f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')} model " \
           f"{fields.get('model', '?')}, flags {flags})"


def digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _native():
    return importlib.import_module("fastddpm.executors").get("native-cpu")


def _with_isa(isa, fn):
    be = _native()
    prev = be.isa()
    be.set_isa(isa)
    try:
        return fn()
    finally:
        be.set_isa(prev)


def _step_inputs(shape=(3, 1, 7, 5), seed=11):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    m = rng.standard_normal(shape).astype(np.float32)
    z = rng.standard_normal(shape).astype(np.float32)
    return x, m, z


def _scheduler_steps(backend):
    import fastddpm
    outs = []
    for cls, cfg, steps, eta in (
            (fastddpm.DDPMScheduler, {}, 10, None),
            (fastddpm.DDPMScheduler, {"variance_type": "fixed_large", "prediction_type": "v_prediction"}, 7, None),
            (fastddpm.DDPMScheduler, {"clip_sample": False, "prediction_type": "sample",
                                      "beta_schedule": "squaredcos_cap_v2"}, 5, None),
            (fastddpm.DDIMScheduler, {}, 10, 0.0),
            (fastddpm.DDIMScheduler, {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True}, 6, 0.7),
            (fastddpm.DDIMScheduler, {"prediction_type": "v_prediction", "set_alpha_to_one": False}, 4, 1.0)):
        s = cls(**cfg)
        s.set_timesteps(steps)
        x, m, z = _step_inputs()
        opts = {} if eta is None else {"eta": eta}
        for t in (int(s.timesteps[0]), int(s.timesteps[len(s.timesteps) // 2]), int(s.timesteps[-1])):
            outs.append(s.step(m, t, x, seed=5, first_index=2, backend=backend, **opts))
            outs.append(s.step(m, t, x, noise=z, backend=backend, **opts))
    return outs


def _noise():
    import fastddpm
    return [fastddpm.noise(7, (3, 1, 5, 6), -1), fastddpm.noise(7, (2, 3, 4, 4), 999, first_index=5),
            fastddpm.noise(2**64 - 1, (1, 1, 3, 3), 0)]


def _samples(backend):
    import fastddpm
    try:
        import torch
    except ImportError:
        torch = None
    threads = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(1)   # the torch reference rounds differently on other thread counts
    try:
        return _samples_on(fastddpm, backend)
    finally:
        if torch:
            torch.set_num_threads(threads)


def _samples_on(fastddpm, backend):
    pipe = fastddpm.load("digits")
    a = pipe(3, steps=4, sampler="ddpm", seed=1, backend=backend, output="float", trajectory=[0, 2, -1])
    b = pipe(2, steps=5, sampler="ddim", seed=3, backend=backend, output="float", eta=0.5, first_index=4)
    c = pipe(1, steps=3, sampler="ddim", seed=9, backend=backend)
    x, _, _ = _step_inputs((2, 1, 28, 28), seed=4)
    u = pipe.unet(x, np.array([999, 3]), backend=backend)
    return [a.images, a.trajectory, b, c, u]


def cases():
    """(name, portable, fn) for every recorded call."""
    out = [("noise", True, _noise)]
    for isa in ("generic", "avx2", "avx512"):
        out.append((f"step-native-cpu-{isa}", True,
                    lambda isa=isa: _with_isa(isa, lambda: _scheduler_steps("native-cpu"))))
        out.append((f"sample-native-cpu-{isa}", True,
                    lambda isa=isa: _with_isa(isa, lambda: _samples("native-cpu"))))
    out.append(("step-numba", True, lambda: _scheduler_steps("numba")))
    out.append(("step-torch", True, lambda: _scheduler_steps("torch")))
    out.append(("sample-numba", False, lambda: _samples("numba")))
    out.append(("sample-torch", False, lambda: _samples("torch")))
    return out


def key(name: str, portable: bool) -> str:
    return name if portable else f"{name}@{cpu_model()}"


def record() -> None:
    found = {}
    for name, portable, fn in cases():
        if name.endswith(("avx2", "avx512")) and name.rsplit("-", 1)[1] not in _native().supported_isas():
            continue
        found[key(name, portable)] = digest(*fn())
        print(key(name, portable), found[key(name, portable)][:16])
    old = {}
    if os.path.exists(HASHES):
        with open(HASHES) as f:
            old = json.load(f)
    for k, v in found.items():
        if k in old and old[k] != v:
            sys.exit(f"{k}: recorded {old[k][:16]}, now {v[:16]}: refusing to overwrite a golden hash")
    with open(HASHES, "w") as f:
        json.dump({**old, **found}, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit(__doc__)
    record()
