"""Every CUDA kernel of fastddpm once, without torch, for compute-sanitizer (memcheck, initcheck,
racecheck): benchmarks/gpu_check.sh runs it under each tool. Each result is also checked against
the CPU (NumPy spec, float64 plan interpreter, the C++ engine), so a kernel that runs clean but
wrong still fails.

    python benchmarks/gpu_sanitize.py [--quick]      (--quick: fewer shapes, for racecheck)
Exit status 0 when every check passed; the last line says how many failed.
"""
from __future__ import annotations

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import fastddpm  # noqa: E402
from fastddpm.executors import EngineOptions  # noqa: E402
from fastddpm.executors.engine_options import cuda_engine_options  # noqa: E402
from fastddpm.executors.native_cuda import CUDA_BACKEND, _C_cuda  # noqa: E402
from fastddpm.philox import INITIAL_STEP  # noqa: E402
from fastddpm.philox import noise as noise_spec  # noqa: E402
from fastddpm.philox import philox_uint32 as philox_spec  # noqa: E402
from fastddpm.unet_config import PRESETS, UNetConfig, random_weights  # noqa: E402

QUICK = "--quick" in sys.argv
FAILED: list[str] = []
TOL = {"fp32": 1e-4, "tf32": 3e-3, "fp16": 3e-3, "bf16": 2e-2}


def check(ok: bool, what: str) -> None:
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        FAILED.append(what)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


class Dev:
    """A device copy of a float32 / uint32 array, at an optional float offset (misaligned views)."""

    def __init__(self, a: np.ndarray, offset: int = 0):
        self.shape, self.dtype, self.offset = a.shape, a.dtype, offset
        pad = np.zeros(offset, a.dtype)
        self.base = _C_cuda.upload(np.ascontiguousarray(np.concatenate([pad, a.reshape(-1)])))
        self.ptr = self.base + 4 * offset

    def get(self) -> np.ndarray:
        raw = _C_cuda.download(self.ptr, int(np.prod(self.shape)) * 4)
        return np.frombuffer(raw, self.dtype).reshape(self.shape).copy()

    def free(self):
        _C_cuda.free(self.base)


def step_kernels():
    sched = fastddpm.DDPMScheduler(clip_sample=True)
    t = 500
    row = sched.coefficients()[sched.row_index(t)]  # [COEF_WIDTH] float32
    coef = Dev(np.ascontiguousarray(row))
    shapes = [(1, 35), (3, 867), (2, 48)] if QUICK else [(1, 35), (3, 867), (2, 48), (5, 1), (4, 4096), (2, 12288)]
    rng = np.random.default_rng(0)
    for batch, per in shapes:
        for offset in (0, 1):
            x = rng.standard_normal((batch, per), dtype=np.float32)
            m = rng.standard_normal((batch, per), dtype=np.float32)
            z = rng.standard_normal((batch, per), dtype=np.float32)
            dx, dm, dz = Dev(x, offset), Dev(m, offset), Dev(z, offset)
            out = Dev(np.full((batch, per), np.nan, np.float32), offset)
            _C_cuda.fused_step(dx.ptr, dm.ptr, out.ptr, coef.ptr, 0, batch, per, 7, t, 3)
            want = sched.step(m, t, x, seed=7, first_index=3, backend="native-cpu")
            err = float(np.abs(out.get() - want).max())
            check(err < 1e-4, f"fused step, in-kernel noise, {batch}x{per} offset {offset}: max abs {err:.2e}")
            _C_cuda.fused_step(dx.ptr, dm.ptr, dx.ptr, coef.ptr, dz.ptr, batch, per, 7, t, 3)  # in place, given noise
            want = sched.step(m, t, x, noise=z, backend="native-cpu")
            err = float(np.abs(dx.get() - want).max())
            check(err < 1e-4, f"fused step, given noise, in place, {batch}x{per} offset {offset}: max abs {err:.2e}")
            _C_cuda.normals(out.ptr, batch, per, 11, -1, 2)
            err = float(np.abs(out.get() - noise_spec(11, (batch, per), INITIAL_STEP, first_index=2)).max())
            check(err < 2e-5, f"normals {batch}x{per} offset {offset}: max abs {err:.2e}")
            padded = -(-per // 4) * 4
            bits = Dev(np.zeros((batch, padded), np.uint32), offset)
            _C_cuda.philox_uint32(bits.ptr, batch, per, 2**40 + 3, 17, 5)
            check(np.array_equal(bits.get(), philox_spec(2**40 + 3, batch, per, 17, first_index=5)),
                  f"philox stream {batch}x{per} offset {offset}")
            for d in (dx, dm, dz, out, bits):
                d.free()
    coef.free()
    _C_cuda.synchronize()


def history_step_kernels():
    """The fused step with the multistep history (h1, h2, x0_out), both memory paths, against native-cpu."""
    from fastddpm.dispatch import fused_step
    from _stepkit import history_inputs, history_row
    row = history_row(clip=1.0)
    coef = Dev(np.ascontiguousarray(row))
    shapes = [(1, 35), (2, 48)] if QUICK else [(1, 35), (3, 867), (2, 48), (2, 12288)]
    for batch, per in shapes:
        x, m, _, a, b = history_inputs((batch, per), seed=batch + per)
        for offset in (0, 1):
            for depth in (0, 1, 2):   # 0: x0_out alone (the first step of a multistep run)
                h1, h2 = (a if depth >= 1 else None), (b if depth >= 2 else None)
                dx, dm = Dev(x, offset), Dev(m, offset)
                dh = [Dev(h, offset) for h in (h1, h2) if h is not None]
                out, x0 = (Dev(np.full((batch, per), np.nan, np.float32), offset) for _ in range(2))
                ptrs = [d.ptr for d in dh] + [0] * (2 - len(dh))
                _C_cuda.fused_step(dx.ptr, dm.ptr, out.ptr, coef.ptr, 0, batch, per, 7, 300, 3,
                                   h1=ptrs[0], h2=ptrs[1], x0_out=x0.ptr)
                cpu_x0 = np.empty((batch, per), np.float32)
                want = fused_step(x, m, row.reshape(1, -1), 0, 300, None, 7, 3, backend="native-cpu",
                                  history=(h1, h2, cpu_x0))
                err = max(float(np.abs(out.get() - want).max()), float(np.abs(x0.get() - cpu_x0).max()))
                check(err < 1e-4, f"fused step with history {depth}, {batch}x{per} offset {offset}: max abs {err:.2e}")
                for d in [dx, dm, out, x0] + dh:
                    d.free()
    coef.free()
    _C_cuda.synchronize()


def guided_step_kernels():
    """The guided fused step (m_uncond, guidance): both memory paths, with and without the history,
    given and Philox noise, in place on m_uncond, against native-cpu's guided step."""
    from fastddpm import _C
    from _stepkit import history_inputs, history_row
    row = history_row(clip=1.0)
    coef = Dev(np.ascontiguousarray(row))
    shapes = [(1, 35), (2, 48)] if QUICK else [(1, 35), (3, 867), (2, 48), (2, 12288)]
    for batch, per in shapes:
        x, m, z, a, mu = history_inputs((batch, per), seed=batch + per + 1)
        for offset in (0, 1):
            for hist, given in ((False, False), (True, True)):
                dx, dm, dmu, dz, da = (Dev(v, offset) for v in (x, m, mu, z, a))
                out, x0 = (Dev(np.full((batch, per), np.nan, np.float32), offset) for _ in range(2))
                _C_cuda.fused_step(dx.ptr, dm.ptr, out.ptr, coef.ptr, dz.ptr if given else 0, batch, per, 7, 300, 3,
                                   h1=da.ptr if hist else 0, x0_out=x0.ptr if hist else 0, m_uncond=dmu.ptr,
                                   guidance=3.5)
                cpu, cpu_x0 = np.empty_like(x), np.empty_like(x)
                _C.fused_step(x, m, cpu, row, 7, 300, 3, z if given else None, h1=a if hist else None,
                              x0_out=cpu_x0 if hist else None, m_uncond=mu, guidance=3.5)
                err = float(np.abs(out.get() - cpu).max())
                if hist:
                    err = max(err, float(np.abs(x0.get() - cpu_x0).max()))
                # in place: out = m_uncond
                _C_cuda.fused_step(dx.ptr, dm.ptr, dmu.ptr, coef.ptr, dz.ptr if given else 0, batch, per, 7, 300, 3,
                                   h1=da.ptr if hist else 0, m_uncond=dmu.ptr, guidance=3.5)
                err = max(err, float(np.abs(dmu.get() - cpu).max()))
                check(err < 1e-4, f"guided fused step, history {hist}, given noise {given}, {batch}x{per} "
                                  f"offset {offset}: max abs {err:.2e}")
                for d in (dx, dm, dmu, dz, da, out, x0):
                    d.free()
    coef.free()
    _C_cuda.synchronize()


def plan_ops():
    """The single-op plans of tests/_plan_cases.py in every precision, against the float64 interpreter."""
    try:
        import _plan_cases as pc
    except ImportError as exc:
        check(False, f"tests/_plan_cases.py not importable: {exc}")
        return

    def make(dtype):
        def engine(ints, floats, sizes, weights, batch, in_c, out_c):
            return _C_cuda.Engine(ints, floats, sizes, weights, batch, in_c, out_c, 1, 1, dtype, 0,
                                  **cuda_engine_options())
        return engine

    cases = [("time-emb+linear", c) for c in pc.time_emb_linear_cases()]
    modes = ["CONV3", "UP"] if QUICK else ["CONV3", "CONV1", "DOWN1", "DOWN0", "UP"]
    cases += [(f"conv {mode}", pc.conv_mode_case(mode)) for mode in modes]
    cases += [("groupnorm+concat+shortcut+residual", c) for c in pc.groupnorm_concat_shortcut_residual_cases()]
    heads = [(3, 12, 6, 6)] if QUICK else list(pc.ATTENTION_SHAPES)
    cases += [(f"attention {h}", pc.attention_case(*h)) for h in heads]
    for dtype in (["fp32", "bf16"] if QUICK else ["fp32", "tf32", "bf16", "fp16"]):
        for name, case in cases:
            err = pc.check_ops(make(dtype), *case)
            tol = TOL["fp32"] if name.startswith("time-emb") else TOL[dtype]
            check(err <= tol, f"plan op {name} {dtype}: rel L2 {err:.2e} (bound {tol:g})")


def forwards():
    from fastddpm.executors.native import CPU_BACKEND
    runs = [("bench-small", 1)] if QUICK else [("bench-small", 1), ("bench-small", 3), ("ddpm-cifar10", 1)]
    for name, batch in runs:
        cfg = UNetConfig.from_dict(PRESETS[name])
        w = random_weights(cfg, seed=0)
        rng = np.random.default_rng(1)
        x = rng.standard_normal((batch, cfg.in_channels, 32, 32)).astype(np.float32)
        t = rng.integers(0, 1000, size=batch).astype(np.float32)
        want = CPU_BACKEND.make_engine(cfg, w, batch, 32, 32).forward(x, t)
        for dtype in (["fp32"] if QUICK else ["fp32", "tf32", "bf16", "fp16"]):
            got = CUDA_BACKEND.make_engine(cfg, w, batch, 32, 32, EngineOptions(dtype=dtype)).forward(x, t)
            err = rel(got, want)
            check(err <= TOL[dtype], f"forward {name} b{batch} {dtype} vs the CPU engine: rel L2 {err:.2e}")


def loop():
    pipe = fastddpm.load("bench-small")
    sched = pipe.scheduler_for("ddim", 4)

    from fastddpm.executors.native import CPU_BACKEND
    cpu = CPU_BACKEND.make_engine(pipe.unet_config, pipe.weights, 2, *pipe.image_size)
    gpu = CUDA_BACKEND.make_engine(pipe.unet_config, pipe.weights, 2, *pipe.image_size, EngineOptions(dtype="fp32"))
    seen = []
    gpu.callback_every = 2
    xg, frames = gpu.run(sched.schedule(), seed=5, first_index=1, keep=[0, 2, 4], callback=seen.append)
    xc, _ = cpu.run(sched.schedule(), seed=5, first_index=1)
    err = float(np.abs(xg - xc).max())
    check(err < 1e-3 and seen == [2, 4] and np.array_equal(frames[4], xg),
          f"4-step DDIM loop vs the CPU engine: max abs {err:.2e}, callbacks {seen}")
    # a multistep loop (the history ring, its graph): DPM-Solver++ 3M SDE, then 2M (depth 1)
    from fastddpm.schedulers import scheduler_for
    cfg = {**fastddpm.DDPMScheduler().config, "algorithm_type": "sde-dpmsolver++"}
    for name in ("dpm++3m", "dpm++2m"):
        schedule = scheduler_for(name, cfg, 5).schedule()
        xg, frames = gpu.run(schedule, seed=5, first_index=1, keep=[0, 1, 5])
        xc, _ = cpu.run(schedule, seed=5, first_index=1)
        err = float(np.abs(xg - xc).max())
        check(err < 1e-3 and np.array_equal(frames[5], xg),
              f"5-step {name} SDE loop (history {schedule.history}) vs the CPU engine: max abs {err:.2e}")


def conditional_engine():
    """A class-conditional U-Net (the class slot, linear_2's residual): forwards of each class
    embedding kind, and guided loops (their own step graphs, with and without the history ring),
    against the CPU engine."""
    import fastddpm.train
    from fastddpm.conditioning import check_labels, class_embedding
    from fastddpm.executors.native import CPU_BACKEND
    from fastddpm.schedulers import scheduler_for
    kinds = {"table": {"num_class_embeds": 11}, "timestep": {"class_embed_type": "timestep"},
             "identity": {"class_embed_type": "identity"}}
    for kind in (["table"] if QUICK else list(kinds)):
        cfg = UNetConfig.from_dict({**fastddpm.train.DIGITS_UNET, **kinds[kind]})
        w = random_weights(cfg, seed=3)
        rng = np.random.default_rng(2)
        labels = {"table": np.array([2, 7, 10, 10]), "timestep": np.array([1.0, 250.0, 500.0, 999.0]),
                  "identity": rng.standard_normal((4, cfg.time_embed_dim)).astype(np.float32)}[kind]
        ce = class_embedding(cfg, w, check_labels(cfg, labels, 4))
        x = rng.standard_normal((4, cfg.in_channels, 16, 16)).astype(np.float32)
        t = rng.integers(0, 1000, size=4).astype(np.float32)
        cpu = CPU_BACKEND.make_engine(cfg, w, 4, 16, 16)
        gpu = CUDA_BACKEND.make_engine(cfg, w, 4, 16, 16, EngineOptions(dtype="fp32"))
        err = rel(gpu.forward(x, t, ce), cpu.forward(x, t, ce))
        check(err <= TOL["fp32"], f"conditional forward ({kind}) vs the CPU engine: rel L2 {err:.2e}")
        if kind != "table":
            continue
        base = fastddpm.DDPMScheduler().config
        for name, steps in (("ddim", 4), ("dpm++2m", 5)):
            schedule = scheduler_for(name, base, steps).schedule()
            xg, frames = gpu.run(schedule, seed=5, first_index=1, keep=[0, steps], class_emb=ce, guidance=3.0)
            xc, _ = cpu.run(schedule, seed=5, first_index=1, class_emb=ce, guidance=3.0)
            err = float(np.abs(xg - xc).max())
            check(err < 1e-3 and xg.shape[0] == 2 and np.array_equal(frames[steps], xg),
                  f"guided {steps}-step {name} loop (history {schedule.history}) vs the CPU engine: max abs {err:.2e}")
        xg, _ = gpu.run(schedule, seed=5, class_emb=ce)   # the unguided conditional loop after them
        xc, _ = cpu.run(schedule, seed=5, class_emb=ce)
        err = float(np.abs(xg - xc).max())
        check(err < 1e-3 and xg.shape[0] == 4, f"unguided conditional loop vs the CPU engine: max abs {err:.2e}")


def main() -> int:
    count, why = _C_cuda.device_count() if _C_cuda is not None else (0, "fastddpm._C_cuda not built")
    if count == 0:
        print(f"FAIL no CUDA device: {why}")
        return 1
    for part in (step_kernels, history_step_kernels, guided_step_kernels, plan_ops, forwards, loop,
                 conditional_engine):
        try:
            part()
        except Exception as exc:  # noqa: BLE001 - report and go on to the next part
            check(False, f"{part.__name__} raised {type(exc).__name__}: {exc}")
    print(f"gpu_sanitize: {len(FAILED)} failed" + (": " + "; ".join(FAILED) if FAILED else ""))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
