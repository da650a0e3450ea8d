"""Class conditioning and classifier-free guidance on the CUDA core (fastddpm._C_cuda, native-cuda),
against the C++ CPU core (tests/test_conditioning_native.py checks that one against diffusers, the
reference U-Net and float64):

- the guided fused step (both memory paths, with and without the history, given and Philox noise)
  against the CPU's guided step, and bit for bit against the CUDA step of NumPy's float32
  combination m_u + w (m_c - m_u) (step.h step_guided_output is never contracted);
- the conditional forward of every class_embed_type against the CPU engine (fp32);
- guided runs (their own captured graphs, with and without the history ring) against the CPU
  engine, batch invariance and first_index, and the errors.

Every test is marked `cuda` (conftest skips it, with the reason, where the CUDA engine cannot run);
those handing torch CUDA tensors in are also marked `torch_cuda`.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastddpm
from fastddpm.coefficients import H1, H2, SIGMA
from fastddpm.executors import EngineOptions
from fastddpm.executors.native import CPU_BACKEND, _C
from fastddpm.executors.native_cuda import CUDA_BACKEND, _C_cuda

from _stepkit import STEP_RTOL, history_inputs, history_row

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_C is None, reason="fastddpm._C is not built")]

pytest.importorskip("torch")   # the CPU side's reference helpers need it
from test_conditioning_native import (GUIDANCE, H, KINDS, NUM_CLASSES, W,  # noqa: E402
                                      assert_class_emb_refusals, class_rows, guided_reference, labels_for,
                                      model, rel_err, run_model, sampler)

NORMALS_ATOL = 2e-5   # in-kernel normals of the two cores against each other (tests/test_cuda_step.py)
FP32 = EngineOptions(dtype="fp32")


class Dev:
    """A device copy of a float32 array at a float offset (offset 1: off the float4 path)."""

    def __init__(self, a: np.ndarray, offset: int = 0):
        self.shape, self.offset = a.shape, offset
        flat = np.concatenate([np.zeros(offset, np.float32), np.ascontiguousarray(a, np.float32).reshape(-1)])
        self.base = _C_cuda.upload(flat)
        self.ptr = self.base + 4 * offset

    def get(self) -> np.ndarray:
        raw = _C_cuda.download(self.ptr, int(np.prod(self.shape)) * 4)
        return np.frombuffer(raw, np.float32).reshape(self.shape).copy()

    def __del__(self):
        if getattr(self, "base", 0):
            _C_cuda.free(self.base)


def _cuda_step(row, x, m, noise=None, mu=None, w=1.0, h1=None, h2=None, x0=False, offset=0, seed=7, step=300,
               first=3, in_place_mu=False):
    """(out, x0 or None) of _C_cuda.fused_step on device copies of the arrays."""
    batch, per = x.shape[0], int(np.prod(x.shape[1:]))
    coef = Dev(row)
    d = {k: Dev(v, offset) for k, v in dict(x=x, m=m, noise=noise, mu=mu, h1=h1, h2=h2).items() if v is not None}
    out = d["mu"] if in_place_mu else Dev(np.full(x.shape, np.nan, np.float32), offset)
    x0_out = Dev(np.full(x.shape, np.nan, np.float32), offset) if x0 else None
    ptr = lambda k: d[k].ptr if k in d else 0  # noqa: E731
    _C_cuda.fused_step(d["x"].ptr, d["m"].ptr, out.ptr, coef.ptr, ptr("noise"), batch, per, seed, step, first,
                       h1=ptr("h1"), h2=ptr("h2"), x0_out=x0_out.ptr if x0_out else 0, m_uncond=ptr("mu"),
                       guidance=w)
    _C_cuda.synchronize()
    return out.get(), (x0_out.get() if x0_out else None)


GUIDED_SHAPES = [(1, 1), (2, 17), (3, 48), (2, 12288)]   # scalar path, partial groups, float4 path


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("history", ["none", "h1+h2"])
@pytest.mark.parametrize("noise", ["given", "philox"])
@pytest.mark.parametrize("w", [0.0, 2.5, 7.0])
@pytest.mark.parametrize("shape", GUIDED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_guided_step_matches_the_cpu_and_the_unguided_step(shape, w, noise, history, offset):
    x, mc, z, a, b = history_inputs(shape, seed=sum(shape) + int(w))
    mu = np.random.default_rng(int(10 * w)).standard_normal(shape).astype(np.float32)
    row = history_row(clip=1.5)
    hist = history != "none"
    h1, h2 = (a, b) if hist else (None, None)
    zz = z if noise == "given" else None
    got, x0 = _cuda_step(row, x, mc, zz, mu, w, h1, h2, x0=hist, offset=offset)
    # the CPU core's guided step: both within the float32 bound of the exact step (they differ in
    # which products the compilers fuse into FMAs), the in-kernel normals within NORMALS_ATOL
    cpu, cpu_x0 = np.empty_like(x), (np.empty_like(x) if hist else None)
    _C.fused_step(x, mc, cpu, row, 7, 300, 3, zz, h1=h1, h2=h2, x0_out=cpu_x0, m_uncond=mu, guidance=w)
    hs = [(a, row[H1]), (b, row[H2])] if hist else []
    zs = z if zz is not None else fastddpm.noise(7, shape, 300, 3)
    _, scale, _, x0_scale = guided_reference(row, x, mc, mu, w, zs, hs)
    extra = 0.0 if zz is not None else 2 * NORMALS_ATOL * abs(float(row[SIGMA]))
    err = np.abs(got.astype(np.float64) - cpu)
    assert np.all(err <= 2 * STEP_RTOL * scale + extra), float(err.max())
    if hist:
        assert np.all(np.abs(x0 - cpu_x0) <= 2 * STEP_RTOL * x0_scale)
    # bit for bit: the unguided CUDA step of NumPy's float32 combination
    m32 = mu + np.float32(w) * (mc - mu)
    plain, x0_plain = _cuda_step(row, x, m32, zz, None, 1.0, h1, h2, x0=hist, offset=offset)
    np.testing.assert_array_equal(got, plain)
    if hist:
        np.testing.assert_array_equal(x0, x0_plain)
    # in place on m_uncond
    inplace, _ = _cuda_step(row, x, mc, zz, mu, w, h1, h2, offset=offset, in_place_mu=True)
    np.testing.assert_array_equal(inplace, got)


def test_guided_step_arguments_are_refused_before_launch():
    x, m, _, _, _ = history_inputs((2, 16), seed=1)
    row = history_row()
    dx, dm, coef, out = Dev(x), Dev(m), Dev(row), Dev(x)
    with pytest.raises(ValueError, match="guidance needs m_uncond"):
        _C_cuda.fused_step(dx.ptr, dm.ptr, out.ptr, coef.ptr, 0, 2, 16, 0, 5, 0, guidance=2.0)
    with pytest.raises(ValueError, match="guidance must be finite"):
        _C_cuda.fused_step(dx.ptr, dm.ptr, out.ptr, coef.ptr, 0, 2, 16, 0, 5, 0, m_uncond=dm.ptr,
                           guidance=float("nan"))
    with pytest.raises(ValueError, match="m_uncond"):   # a host pointer
        _C_cuda.fused_step(dx.ptr, dm.ptr, out.ptr, coef.ptr, 0, 2, 16, 0, 5, 0, m_uncond=x.ctypes.data, guidance=2.0)
    with pytest.raises(ValueError, match="x0_out overlaps"):
        _C_cuda.fused_step(dx.ptr, dm.ptr, out.ptr, coef.ptr, 0, 2, 16, 0, 5, 0, x0_out=dm.ptr + 4,
                           m_uncond=dm.ptr + 4, guidance=2.0)


@pytest.mark.torch_cuda
def test_backend_step_with_guide_on_torch_tensors():
    import torch
    from fastddpm.coefficients import COEF_WIDTH
    x, mc, _, a, _ = history_inputs((3, 5, 7), seed=4)
    mu = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    table = np.stack([history_row(), history_row(clip=1.0)]).reshape(2, COEF_WIDTH)
    cu = lambda v: torch.from_numpy(v).cuda()  # noqa: E731
    out, plain, x0 = (torch.empty_like(cu(x)) for _ in range(3))
    CUDA_BACKEND.step(cu(x), cu(mc), out, table, 1, 9, 40, 2, None, history=(cu(a), None, x0), guide=(cu(mu), 2.5))
    m32 = mu + np.float32(2.5) * (mc - mu)
    x0p = torch.empty_like(x0)
    CUDA_BACKEND.step(cu(x), cu(m32), plain, table, 1, 9, 40, 2, None, history=(cu(a), None, x0p))
    np.testing.assert_array_equal(out.cpu().numpy(), plain.cpu().numpy())
    np.testing.assert_array_equal(x0.cpu().numpy(), x0p.cpu().numpy())
    with pytest.raises(ValueError, match="guide m_u has shape"):
        CUDA_BACKEND.step(cu(x), cu(mc), out, table, 1, 9, 40, 2, None, guide=(cu(mu[:1]), 2.5))


# -- the conditional forward and guided runs ---------------------------------------------------

@pytest.mark.parametrize("batch,h,w", [(1, 16, 16), (3, 12, 20)])
@pytest.mark.parametrize("kind", list(KINDS))
def test_conditional_forward_matches_the_cpu_engine(kind, batch, h, w):
    cfg, weights = model(kind)
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, cfg.in_channels, h, w)).astype(np.float32)
    t = rng.integers(0, 1000, size=batch)
    ce = class_rows(kind, labels_for(kind, batch, seed=batch))
    gpu = CUDA_BACKEND.make_engine(cfg, weights, batch, h, w, FP32)
    assert gpu.conditional and gpu._engine.class_dim == cfg.time_embed_dim
    got = gpu.forward(x, t, ce)
    want = CPU_BACKEND.make_engine(cfg, weights, batch, h, w).forward(x, t, ce)
    assert rel_err(got, want) <= 1e-4
    # the class slot is refilled by every call: other rows, other outputs; the first rows again
    other = class_rows(kind, labels_for(kind, batch, seed=batch + 1))
    assert rel_err(gpu.forward(x, t, other), want) > 1e-3
    np.testing.assert_array_equal(gpu.forward(x, t, ce), got)


@pytest.mark.torch_cuda
def test_device_forward_takes_class_emb_on_the_device_or_the_host():
    import torch
    cfg, weights = model("table")
    x = np.random.default_rng(0).standard_normal((2, 1, H, W)).astype(np.float32)
    ce = class_rows("table", np.array([3, 10]))
    gpu = CUDA_BACKEND.make_engine(cfg, weights, 2, H, W, FP32)
    host = gpu.forward(x, 77, ce)
    xt = torch.from_numpy(x).cuda()
    np.testing.assert_array_equal(gpu.forward(xt, 77, torch.from_numpy(ce).cuda()).cpu().numpy(), host)
    np.testing.assert_array_equal(gpu.forward(xt, 77, ce).cpu().numpy(), host)
    with pytest.raises(ValueError, match="is required"):
        gpu.forward(xt, 77)
    with pytest.raises(ValueError, match="class_emb must be float32 of shape"):
        gpu.forward(xt, 77, torch.from_numpy(ce[:1]).cuda())


def _guided(eng, schedule, labels, w=GUIDANCE, **kw):
    n = len(labels)
    ce = run_model()[2](np.concatenate([labels, np.full(n, NUM_CLASSES - 1)]))
    return eng.run(schedule, class_emb=ce, guidance=w, **kw)


@pytest.mark.parametrize("name,steps", [("ddim", 10), ("dpm++2m", 8)])
def test_guided_run_matches_the_cpu_engine(name, steps):
    cfg, weights, _ = run_model()
    labels = np.array([4, 7])
    schedule = sampler(name, steps)
    gpu = CUDA_BACKEND.make_engine(cfg, weights, 4, H, W, FP32)
    cpu = CPU_BACKEND.make_engine(cfg, weights, 4, H, W)
    xg, fg = _guided(gpu, schedule, labels, seed=21, first_index=5, keep=[0, 3, steps])
    _, fc = _guided(cpu, schedule, labels, seed=21, first_index=5, keep=[0, 3, steps])
    assert xg.shape == (2, cfg.in_channels, H, W) and fg[0].shape == xg.shape
    np.testing.assert_allclose(fg[0], fc[0], rtol=0, atol=2 * NORMALS_ATOL)   # x_T of the 2 samples
    np.testing.assert_array_equal(fg[steps], xg)
    for k in (3, steps):
        err = float(np.abs(fg[k] - fc[k]).max())
        print(f"{name} guided, position {k}: GPU vs CPU max abs {err:.2e}")
        assert err <= 1e-3
    assert gpu._engine.graph_captured


@pytest.mark.parametrize("name", ["ddim", "dpm++2m"])
def test_guided_runs_are_batch_invariant_and_take_first_index(name):
    cfg, weights, _ = run_model()
    labels = np.array([0, 3, 5, 8, 9])
    schedule = sampler(name, 5)

    def run(lab, first_index=0):
        eng = CUDA_BACKEND.make_engine(cfg, weights, 2 * len(lab), H, W, FP32)
        return _guided(eng, schedule, lab, w=2.5, seed=8, first_index=first_index)[0]

    five = run(labels)
    np.testing.assert_array_equal(run(labels[:3]), five[:3])
    np.testing.assert_array_equal(run(labels[3:], first_index=3), five[3:])


def test_guided_and_unguided_graphs_share_an_engine():
    """One engine runs the four step graphs (guided or not, history or not) in turn; each run is
    what a fresh engine gives."""
    cfg, weights, rows = run_model()
    ce = rows(np.array([2, 6, 10, 10]))
    runs = [(sampler("ddim", 4), None), (sampler("ddim", 4), 2.0), (sampler("dpm++2m", 4), 2.0),
            (sampler("dpm++2m", 4), None), (sampler("ddim", 4), 2.0)]
    eng = CUDA_BACKEND.make_engine(cfg, weights, 4, H, W, FP32)
    for schedule, w in runs:
        x = eng.run(schedule, seed=2, class_emb=ce, guidance=w)[0]
        fresh = CUDA_BACKEND.make_engine(cfg, weights, 4, H, W, FP32)
        np.testing.assert_array_equal(x, fresh.run(schedule, seed=2, class_emb=ce, guidance=w)[0])
        assert x.shape[0] == (4 if w is None else 2)


def test_class_emb_and_guidance_errors():
    eng, uncond, ce, schedule = assert_class_emb_refusals(
        lambda cfg, weights, batch: CUDA_BACKEND.make_engine(cfg, weights, batch, H, W, FP32))
    eng._engine.set_schedule(schedule.table, schedule.timesteps)
    with pytest.raises(ValueError, match="guidance needs a class-conditional plan"):
        uncond._engine.run(0, 0, [], None, 0, 0, None, 2.0)
    with pytest.raises(ValueError, match="guidance must be finite"):
        eng._engine.run(0, 0, [], None, 0, 0, ce, float("inf"))
    # the engine still works after the refusals
    assert eng.run(schedule, seed=0, class_emb=ce, guidance=2.0)[0].shape == (1, 1, H, W)
