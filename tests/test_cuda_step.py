"""The CUDA fused step and noise (native-cuda) against the spec: philox.py's uint32 stream bit for bit,
its normals to float32 rounding, and the step against the float64 formula of the scheduler's row.

Every test but the first needs a GPU and is marked `cuda` (conftest skips them, with the reason,
where native-cuda is unavailable).
"""
import numpy as np
import pytest

import fastddpm
from fastddpm.coefficients import COEF_WIDTH, H1, H2, SIGMA
from fastddpm.philox import INITIAL_STEP, philox_uint32 as philox_spec
from fastddpm.philox import noise as noise_spec

from _stepkit import X0_ALONE_NOISE, history_inputs, history_reference, history_row, x0_out_alone_case

# (N, C, H, W): per-sample sizes off the float4 path (35, 867, 1), on it (48, 12288) and batch 1.
SHAPES = [(1, 1, 5, 7), (3, 3, 17, 17), (5, 1, 1, 1), (2, 3, 4, 4), (1, 3, 64, 64), (4, 1, 3, 3)]
EPS32 = 2.0**-24
NORMALS_ATOL = 2e-5  # in-kernel normals against the float64 spec (DESIGN: "to float rounding")


def test_native_cuda_imports_and_explains_itself():
    """Runs everywhere: the module imports, and where it cannot run it says why."""
    from fastddpm.executors.native_cuda import CUDA_BACKEND
    assert CUDA_BACKEND.name == "native-cuda" and CUDA_BACKEND.devices == ("cuda",)
    why = CUDA_BACKEND.unavailable()
    entry = fastddpm.backends()["native-cuda"]
    assert entry["reasons"] == why and entry["available"] is (not why)
    if why:
        assert all(isinstance(r, str) and len(r) > 20 for r in why), why
        assert any(k in " ".join(why) for k in ("_C_cuda", "driver", "device", "torch", "CUDA")), why
        assert "does not run on cpu arrays" in " ".join(CUDA_BACKEND.supports("cpu"))


@pytest.fixture
def torch():
    import torch
    return torch


@pytest.fixture
def be():
    from fastddpm.executors.native_cuda import CUDA_BACKEND
    return CUDA_BACKEND


def _schedulers():
    """(name, scheduler, step options) covering clip on/off, sigma = 0 and sigma > 0, every prediction type."""
    ddpm = fastddpm.DDPMScheduler(clip_sample=True)
    ddpm_large = fastddpm.DDPMScheduler(clip_sample=False, variance_type="fixed_large", prediction_type="v_prediction")
    ddim = fastddpm.DDIMScheduler(clip_sample=False)
    ddim.set_timesteps(50)
    ddim_sample = fastddpm.DDIMScheduler(clip_sample=True, clip_sample_range=0.5, prediction_type="sample")
    ddim_sample.set_timesteps(20)
    return [("ddpm-clip", ddpm, {}), ("ddpm-large-v", ddpm_large, {}), ("ddim-eta0", ddim, {"eta": 0.0}),
            ("ddim-eta1", ddim, {"eta": 1.0}), ("ddim-sample-clip", ddim_sample, {"eta": 0.5})]


SCHEDULERS = _schedulers()


def _timesteps(sched):
    ts = [int(t) for t in sched.timesteps]
    return [ts[0], ts[len(ts) // 2], ts[-1]]  # the noisiest, a middle one, the last (sigma = 0 in DDPM)


def _expected(sched, t, x, m, z, noise_err=0.0, **opts):
    """float64 formula of the fused step with the float64 row, and its float32 error bound.

    The bound is a few float32 roundings of every term's magnitude (inputs exact, the row rounded to
    float32, ~5 roundings in the kernel) plus |sigma| * noise_err, the error of in-kernel normals
    (2e-5, the spec's tolerance; 0 for given noise).
    """
    return _formula(sched.coefficients_float64(**opts)[sched.row_index(t)], x, m, z, noise_err)


def _formula(row, x, m, z, noise_err=0.0):
    x64, m64, z64 = (np.asarray(a, dtype=np.float64) for a in (x, m, z))
    x0 = row[0] * x64 + row[1] * m64
    if row[6] > 0:
        x0 = np.clip(x0, -row[6], row[6])
    want = row[2] * x0 + row[3] * x64 + row[4] * m64 + row[5] * z64
    scale = (abs(row[2]) * (np.abs(row[0] * x64) + np.abs(row[1] * m64)) + np.abs(row[3] * x64)
             + np.abs(row[4] * m64) + np.abs(row[5] * z64))
    return want, 8 * EPS32 * scale + noise_err * abs(row[5]) + 1e-7


def _assert_close(got, want, tol, what):
    err = np.abs(np.asarray(got, dtype=np.float64) - want)
    bad = ~(err <= tol)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {err.size} elements out of bound, "
                           f"worst error {float(np.max(err)):.3g} (bound there {float(tol.flat[np.argmax(err - tol)]):.3g})")


def _inputs(torch, shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32) * 1.5  # [N, C, H, W]
    m = rng.standard_normal(shape, dtype=np.float32)        # [N, C, H, W] model output
    return x, m, torch.from_numpy(x).cuda(), torch.from_numpy(m).cuda()


def _step(sched, m, t, x, opts, **kw):
    return sched.step(m, t, x, backend="native-cuda", **opts, **kw)


def _offset_copy(torch, a: np.ndarray, offset=1):
    """A contiguous CUDA tensor holding a whose data starts `offset` floats into its buffer (not 16-byte aligned)."""
    buf = torch.zeros(a.size + offset, dtype=torch.float32, device="cuda")  # [n + offset]
    view = buf[offset:].view(a.shape)
    view.copy_(torch.from_numpy(a))
    assert view.is_contiguous() and view.storage_offset() == offset
    return view


# -- noise ------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.torch_cuda
@pytest.mark.parametrize("batch,per_sample,step,first_index,seed", [
    (1, 1, 0, 0, 0), (3, 5, 17, 0, 1), (2, 35, 999, 7, 2**64 - 1), (4, 4096, INITIAL_STEP, 0, 12345),
    (3, 867, 500, 2**32 - 3, 2**40 + 3), (1, 50_001, 1, 0, 7)])
def test_philox_stream_matches_spec_exactly(be, batch, per_sample, step, first_index, seed):
    got = be.philox_uint32(seed, batch, per_sample, step, first_index)
    want = philox_spec(seed, batch, per_sample, step, first_index)  # [batch, ceil(per_sample/4)*4]
    assert got.dtype == np.uint32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.cuda
@pytest.mark.torch_cuda
@pytest.mark.parametrize("shape,step,first_index,seed", [
    ((1, 1, 5, 7), 3, 0, 0), ((3, 3, 17, 17), 999, 2, 99), ((2, 4, 16, 16), -1, 0, 2**63 + 5),
    ((5, 1), 0, 11, 1), ((2, 3, 128, 128), 123, 0, 42)])
def test_normals_match_spec(torch, be, shape, step, first_index, seed):
    got = be.noise(seed, shape, step, first_index)  # [N, ...] float32 on the GPU
    assert got.is_cuda and got.dtype == torch.float32 and tuple(got.shape) == shape
    want = noise_spec(seed, shape, step, first_index, dtype=np.float64)
    np.testing.assert_allclose(got.cpu().numpy(), want, atol=NORMALS_ATOL, rtol=0)


@pytest.mark.cuda
@pytest.mark.torch_cuda
def test_normals_tails_are_accurate(be):
    """Over 4M normals the extreme uniforms (u near 0 and 1) occur: accurate logf keeps them within 2e-5."""
    shape = (4, 1 << 20)
    got = be.noise(5, shape, 17).cpu().numpy()
    want = noise_spec(5, shape, 17, dtype=np.float64)
    assert np.abs(want).max() > 5.0  # the tail was reached (5.17 here; some u0 are 1 - 2**-24)
    np.testing.assert_allclose(got, want, atol=NORMALS_ATOL, rtol=0)


@pytest.mark.cuda
@pytest.mark.torch_cuda
def test_normals_match_cpu_backend(be):
    shape = (3, 3, 17, 17)
    np.testing.assert_allclose(be.noise(8, shape, 40).cpu().numpy(), fastddpm.noise(8, shape, 40), atol=2 * NORMALS_ATOL, rtol=0)


# -- the step ---------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.torch_cuda
@pytest.mark.parametrize("name,sched,opts", SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_step_in_kernel_noise_matches_float64(torch, name, sched, opts, shape):
    x, m, xt, mt = _inputs(torch, shape)
    for t in _timesteps(sched):
        got = _step(sched, mt, t, xt, opts, seed=21, first_index=3)  # [N, C, H, W] on the GPU
        assert got.is_cuda and got.dtype == torch.float32 and tuple(got.shape) == shape
        z = noise_spec(21, shape, t, 3, dtype=np.float64)
        want, tol = _expected(sched, t, x, m, z, NORMALS_ATOL, **opts)
        _assert_close(got.cpu().numpy(), want, tol, f"{name} t={t}")


@pytest.mark.cuda
@pytest.mark.torch_cuda
@pytest.mark.parametrize("name,sched,opts", SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
@pytest.mark.parametrize("shape", [(1, 1, 5, 7), (3, 3, 17, 17), (2, 3, 4, 4)], ids=lambda s: "x".join(map(str, s)))
def test_step_given_noise_matches_float64(torch, name, sched, opts, shape):
    x, m, xt, mt = _inputs(torch, shape, seed=1)
    z = np.random.default_rng(2).standard_normal(shape, dtype=np.float32)  # [N, C, H, W]
    for t in _timesteps(sched):
        got = _step(sched, mt, t, xt, opts, noise=torch.from_numpy(z).cuda())
        want, tol = _expected(sched, t, x, m, z, **opts)
        _assert_close(got.cpu().numpy(), want, tol, f"{name} t={t} given noise")


@pytest.mark.cuda
@pytest.mark.torch_cuda
@pytest.mark.parametrize("shape", [(3, 3, 17, 17), (2, 3, 8, 8)], ids=lambda s: "x".join(map(str, s)))
def test_step_matches_native_cpu(torch, shape):
    """Both compiled backends against each other: same spec, float32 each, so within twice the bound."""
    name, sched, opts = SCHEDULERS[0]
    x, m, xt, mt = _inputs(torch, shape, seed=3)
    t = _timesteps(sched)[1]
    got = _step(sched, mt, t, xt, opts, seed=9).cpu().numpy()
    cpu = sched.step(m, t, x, seed=9, backend="native-cpu")
    _, tol = _expected(sched, t, x, m, noise_spec(9, shape, t, dtype=np.float64), NORMALS_ATOL)
    _assert_close(got, cpu.astype(np.float64), 2 * tol, "cuda vs native-cpu")


@pytest.mark.cuda
@pytest.mark.torch_cuda
@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (3, 3, 17, 17), (1, 1, 5, 7)], ids=lambda s: "x".join(map(str, s)))
def test_misaligned_storage_offset_gives_the_same_answer(torch, shape):
    """storage_offset 1: x, m, out and noise start 4 bytes past a 16-byte boundary -> the scalar path,
    which computes every element exactly as the float4 path does."""
    _, sched, opts = SCHEDULERS[0]
    x, m, xt, mt = _inputs(torch, shape, seed=4)
    t = _timesteps(sched)[0]
    aligned = _step(sched, mt, t, xt, opts, seed=2)
    xo, mo = _offset_copy(torch, x), _offset_copy(torch, m)
    out = _offset_copy(torch, np.zeros(shape, np.float32))
    res = _step(sched, mo, t, xo, opts, seed=2, out=out)
    assert res is out and out.data_ptr() % 16 == 4
    torch.testing.assert_close(out, aligned, rtol=0, atol=0)
    z = np.random.default_rng(5).standard_normal(shape, dtype=np.float32)
    got = _step(sched, mo, t, xo, opts, noise=_offset_copy(torch, z))
    torch.testing.assert_close(got, _step(sched, mt, t, xt, opts, noise=torch.from_numpy(z).cuda()), rtol=0, atol=0)
    want, tol = _expected(sched, t, x, m, noise_spec(2, shape, t, dtype=np.float64), NORMALS_ATOL)
    _assert_close(out.cpu().numpy(), want, tol, "misaligned")


@pytest.mark.cuda
@pytest.mark.torch_cuda
def test_step_in_place_and_into_out(torch):
    _, sched, opts = SCHEDULERS[0]
    shape = (3, 3, 17, 17)
    x, m, xt, mt = _inputs(torch, shape, seed=6)
    t = _timesteps(sched)[1]
    fresh = _step(sched, mt, t, xt, opts, seed=4)
    out = torch.empty_like(xt)
    assert _step(sched, mt, t, xt, opts, seed=4, out=out) is out
    torch.testing.assert_close(out, fresh, rtol=0, atol=0)
    x_in_place = xt.clone()
    assert _step(sched, mt, t, x_in_place, opts, seed=4, out=x_in_place) is x_in_place
    torch.testing.assert_close(x_in_place, fresh, rtol=0, atol=0)
    strided = torch.empty((shape[0], shape[1], shape[2], shape[3] * 2), device="cuda")[..., ::2]  # not contiguous
    assert _step(sched, mt, t, xt, opts, seed=4, out=strided) is strided
    torch.testing.assert_close(strided, fresh, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.torch_cuda
def test_batch_split_gives_the_same_samples(torch):
    """Sample i's noise depends on (seed, first_index + i, t) only: two halves equal the whole."""
    _, sched, opts = SCHEDULERS[0]
    shape = (4, 3, 9, 9)
    x, m, xt, mt = _inputs(torch, shape, seed=7)
    t = _timesteps(sched)[0]
    whole = _step(sched, mt, t, xt, opts, seed=11)
    a = _step(sched, mt[:2].contiguous(), t, xt[:2].contiguous(), opts, seed=11)
    b = _step(sched, mt[2:].contiguous(), t, xt[2:].contiguous(), opts, seed=11, first_index=2)
    torch.testing.assert_close(torch.cat([a, b]), whole, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.torch_cuda
def test_nan_propagates_through_clip(torch):
    _, sched, opts = SCHEDULERS[0]
    assert sched.config["clip_sample"]
    shape = (1, 1, 5, 7)
    x, m, _, _ = _inputs(torch, shape, seed=8)
    x[0, 0, 2, 3] = np.nan
    m[0, 0, 4, 6] = np.nan
    got = _step(sched, torch.from_numpy(m).cuda(), _timesteps(sched)[1], torch.from_numpy(x).cuda(), opts, seed=1)
    nan = torch.isnan(got).cpu().numpy()
    assert nan[0, 0, 2, 3] and nan[0, 0, 4, 6] and nan.sum() == 2


@pytest.mark.cuda
@pytest.mark.torch_cuda
def test_empty_batch(torch):
    _, sched, opts = SCHEDULERS[0]
    xt = torch.empty((0, 3, 8, 8), device="cuda")
    got = _step(sched, xt, _timesteps(sched)[0], xt, opts, seed=1)
    assert tuple(got.shape) == (0, 3, 8, 8)


@pytest.mark.cuda
@pytest.mark.torch_cuda
def test_cuda_graph_replay(torch):
    """The step captured once into a CUDA graph (out= given) replays on new contents of x and m."""
    _, sched, opts = SCHEDULERS[0]
    shape = (2, 3, 16, 16)
    t = _timesteps(sched)[1]
    x, m, xt, mt = _inputs(torch, shape, seed=9)
    out = torch.empty_like(xt)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream (uploads the table), as torch asks
        _step(sched, mt, t, xt, opts, seed=13, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _step(sched, mt, t, xt, opts, seed=13, out=out)
    for k in range(3):
        x2, m2, _, _ = _inputs(torch, shape, seed=20 + k)
        xt.copy_(torch.from_numpy(x2))
        mt.copy_(torch.from_numpy(m2))
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, _step(sched, mt, t, xt, opts, seed=13), rtol=0, atol=0)
        want, tol = _expected(sched, t, x2, m2, noise_spec(13, shape, t, dtype=np.float64), NORMALS_ATOL)
        _assert_close(out.cpu().numpy(), want, tol, f"replay {k}")


@pytest.mark.cuda
@pytest.mark.torch_cuda
def test_cuda_graph_reads_the_coefficient_row_at_replay(torch):
    """_C_cuda level: the captured kernel reads its row from device memory when it runs, so new row
    contents take effect without re-capturing."""
    from fastddpm import _C_cuda
    shape = (2, 37)
    x, m, xt, mt = _inputs(torch, shape, seed=10)
    out = torch.empty_like(xt)
    row = torch.tensor([1.0, 0.5, 2.0] + [0.0] * (COEF_WIDTH - 3), device="cuda")  # [COEF_WIDTH] coefficients
    stream = torch.cuda.Stream()

    def launch():
        _C_cuda.fused_step(xt.data_ptr(), mt.data_ptr(), out.data_ptr(), row.data_ptr(), 0, 2, 37, 0, 5, 0,
                           torch.cuda.current_stream().cuda_stream, xt.device.index)

    with torch.cuda.stream(stream):
        launch()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    rows = ([1.0, 0.5, 2.0], [0.0, 1.0, 1.0, 3.0, 0.0, 0.0, 0.25])
    for coef in (r + [0.0] * (COEF_WIDTH - len(r)) for r in rows):
        row.copy_(torch.tensor(coef))
        graph.replay()
        torch.cuda.synchronize()
        want, tol = _formula(np.array(coef), x, m, np.zeros_like(x))
        _assert_close(out.cpu().numpy(), want, tol, f"row {coef}")


@pytest.mark.cuda
@pytest.mark.torch_cuda
def test_bindings_refuse_bad_arguments(torch):
    """The C++ side checks again: bad pointers and sizes are Python errors, never a dead CUDA context."""
    from fastddpm import _C_cuda
    x = torch.zeros((2, 8), device="cuda")
    row = torch.zeros(COEF_WIDTH, device="cuda")
    host = torch.zeros((2, 8))
    args = dict(noise=0, batch=2, per_sample=8, seed=0, noise_step=0, first_index=0)
    with pytest.raises(ValueError, match="host memory"):
        _C_cuda.fused_step(host.data_ptr(), x.data_ptr(), x.data_ptr(), row.data_ptr(), **args)
    with pytest.raises(ValueError, match="null"):
        _C_cuda.fused_step(0, x.data_ptr(), x.data_ptr(), row.data_ptr(), **args)
    with pytest.raises(ValueError, match="aligned"):
        _C_cuda.fused_step(x.data_ptr() + 2, x.data_ptr(), x.data_ptr(), row.data_ptr(), **args)
    with pytest.raises(ValueError, match="overlap"):
        _C_cuda.fused_step(x.data_ptr(), x.data_ptr(), x.data_ptr() + 4, row.data_ptr(), **{**args, "per_sample": 7})
    with pytest.raises(ValueError, match="2\\*\\*32"):
        _C_cuda.fused_step(x.data_ptr(), x.data_ptr(), x.data_ptr(), row.data_ptr(), **{**args, "first_index": 2**32 - 1})
    with pytest.raises(ValueError, match="noise step"):
        _C_cuda.normals(x.data_ptr(), 2, 8, 0, 2**32)
    # the context survived every refusal
    torch.cuda.synchronize()
    assert float(torch.ones(3, device="cuda").sum()) == 3.0


@pytest.mark.cuda
@pytest.mark.torch_cuda
def test_upload_download_free_round_trip():
    from fastddpm import _C_cuda
    table = np.arange(3 * COEF_WIDTH, dtype=np.float32).reshape(3, COEF_WIDTH)  # [S, COEF_WIDTH]
    ptr = _C_cuda.upload(table)
    try:
        back = np.frombuffer(_C_cuda.download(ptr, table.nbytes), dtype=np.float32).reshape(3, COEF_WIDTH)
        np.testing.assert_array_equal(back, table)
    finally:
        _C_cuda.free(ptr)
    with pytest.raises(ValueError, match="contiguous"):
        _C_cuda.upload(table[:, ::2])


@pytest.mark.cuda
@pytest.mark.torch_cuda
def test_describe_names_the_gpu(torch, be):
    info = be.describe()
    assert len(info["devices"]) == torch.cuda.device_count()
    assert torch.cuda.get_device_name(0) in info["devices"][0]


# -- the step with the multistep history (h1, h2, x0_out) -------------------------------------------
#
# y = c_x0 x0 + d_x x + d_m m + h1 H1 + h2 H2 + sigma z, x0 = clip(a_x x + a_m m) (step.h); x0_out
# receives x0. Against the float64 formula with this file's bound, and against native-cpu's step.

HISTORY_CASES = ["h1", "h1+h2", "x0_out"]   # x0_out: the first step of a multistep run (no H yet)


def _history_formula(row, x, m, z, h1, h2, noise_err=0.0):
    """float64 (y, its bound, x0, its bound) of the step with history (h1 / h2: None = no term),
    with this file's bound: a few float32 roundings of every term, plus |sigma| * noise_err."""
    hs = [(h, w) for h, w in ((h1, row[H1]), (h2, row[H2])) if h is not None]
    y, scale, x0, x0_scale = history_reference(row, x, m, z, hs)
    return y, 8 * EPS32 * scale + noise_err * abs(float(row[SIGMA])) + 1e-7, x0, 4 * EPS32 * x0_scale + 1e-7


def _cuda_history_step(torch, row, x, m, h1, h2, noise=None, seed=0, noise_step=5, first_index=0, out=None,
                       x0_out=None):
    """dispatch.fused_step on CUDA tensors with history (h1, h2, x0_out); returns (y, x0) as NumPy."""
    from fastddpm.dispatch import fused_step
    cuda = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a)).cuda()  # noqa: E731
    x0 = torch.full(x.shape, float("nan"), device="cuda") if x0_out is None else x0_out
    y = fused_step(cuda(x), cuda(m), row.reshape(1, COEF_WIDTH), 0, noise_step, cuda(noise), seed, first_index,
                   backend="native-cuda", out=out, history=(cuda(h1), cuda(h2), x0))
    return y.cpu().numpy(), x0.cpu().numpy()


@pytest.mark.cuda
@pytest.mark.torch_cuda
@pytest.mark.parametrize("history", HISTORY_CASES)
@pytest.mark.parametrize("clip", [0.0, 1.0], ids=["noclip", "clip"])
@pytest.mark.parametrize("shape", [(1, 1, 5, 7), (3, 3, 17, 17), (2, 3, 4, 4), (1, 3, 64, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_step_with_history_matches_float64_and_native_cpu(torch, shape, clip, history):
    """Scalar (35, 867 per sample) and float4 (48, 12288) paths, given and Philox noise."""
    from fastddpm.dispatch import fused_step
    x, m, z, a, b = history_inputs(shape, seed=sum(shape) + len(history) + int(clip))
    row = history_row(clip=clip)
    h1 = a if history != "x0_out" else None
    h2 = b if history == "h1+h2" else None
    # given noise
    got, x0 = _cuda_history_step(torch, row, x, m, h1, h2, noise=z)
    want, tol, x0_want, x0_tol = _history_formula(row, x, m, z, h1, h2)
    _assert_close(got, want, tol, f"{history} given noise")
    _assert_close(x0, x0_want, x0_tol, f"{history} x0_out")
    if clip:  # clipped elements are the clip value exactly
        far = np.abs(row[0] * x.astype(np.float64) + row[1] * m.astype(np.float64)) > clip * (1 + 1e-4)
        assert far.any()
        np.testing.assert_array_equal(np.abs(x0[far]), np.float32(clip))
    # Philox noise made in the kernel
    seed, step, first = 1234, 77, 5
    got_p, x0_p = _cuda_history_step(torch, row, x, m, h1, h2, seed=seed, noise_step=step, first_index=first)
    zs = noise_spec(seed, shape, step, first, dtype=np.float64)
    want_p, tol_p, _, _ = _history_formula(row, x, m, zs, h1, h2, NORMALS_ATOL)
    _assert_close(got_p, want_p, tol_p, f"{history} philox noise")
    np.testing.assert_array_equal(x0_p, x0)   # x0 does not depend on the noise
    # native-cpu with the same inputs: the same spec in float32, so within twice the bound
    cpu_x0 = np.full(shape, np.nan, np.float32)
    cpu = fused_step(x, m, row.reshape(1, COEF_WIDTH), 0, step, None, seed, first, backend="native-cpu",
                     history=(h1, h2, cpu_x0))
    _assert_close(got_p, cpu.astype(np.float64), 2 * tol_p, f"{history} cuda vs native-cpu")
    _assert_close(x0_p, cpu_x0.astype(np.float64), 2 * x0_tol, f"{history} x0 cuda vs native-cpu")


@pytest.mark.cuda
@pytest.mark.torch_cuda
@pytest.mark.parametrize("noise", X0_ALONE_NOISE)
def test_x0_out_alone_leaves_the_step_bit_identical(torch, noise):
    """The history kernel without history terms gives the single-step kernel's bits."""
    from fastddpm.dispatch import fused_step
    x, m, zz, row = x0_out_alone_case(noise)
    hist, _ = _cuda_history_step(torch, row, x, m, None, None, noise=zz, seed=9, noise_step=40, first_index=2)
    cuda = lambda a: None if a is None else torch.from_numpy(a).cuda()  # noqa: E731
    plain = fused_step(cuda(x), cuda(m), row.reshape(1, COEF_WIDTH), 0, 40, cuda(zz), 9, 2, backend="native-cuda")
    np.testing.assert_array_equal(hist, plain.cpu().numpy())


@pytest.mark.cuda
@pytest.mark.torch_cuda
def test_history_misaligned_batch_split_and_in_place(torch):
    """storage offset 1 (the scalar path) = the float4 path bit for bit; sample i of a batch = the
    same sample alone at first_index + i; out may be x."""
    from fastddpm import _C_cuda
    shape = (3, 3, 4, 4)
    x, m, _, a, b = history_inputs(shape, seed=8)
    row = history_row(clip=1.0)
    coef = torch.from_numpy(row).cuda()
    dev = torch.cuda.current_device()

    def launch(xs, ms, out, h1, h2, x0, first):
        _C_cuda.fused_step(xs.data_ptr(), ms.data_ptr(), out.data_ptr(), coef.data_ptr(), 0, xs.shape[0],
                           xs[0].numel(), 17, 300, first, torch.cuda.current_stream().cuda_stream, dev,
                           h1=h1.data_ptr(), h2=h2.data_ptr(), x0_out=x0.data_ptr())
        torch.cuda.synchronize()

    t = {k: torch.from_numpy(v).cuda() for k, v in dict(x=x, m=m, a=a, b=b).items()}
    out, x0 = torch.empty_like(t["x"]), torch.empty_like(t["x"])
    launch(t["x"], t["m"], out, t["a"], t["b"], x0, 4)
    want, tol, x0_want, x0_tol = _history_formula(row, x, m, noise_spec(17, shape, 300, 4, dtype=np.float64), a, b,
                                                  NORMALS_ATOL)
    _assert_close(out.cpu().numpy(), want, tol, "history float4 path")
    _assert_close(x0.cpu().numpy(), x0_want, x0_tol, "history float4 path x0")
    off = {k: _offset_copy(torch, v) for k, v in dict(x=x, m=m, a=a, b=b).items()}
    out_o, x0_o = (_offset_copy(torch, np.zeros(shape, np.float32)) for _ in range(2))
    launch(off["x"], off["m"], out_o, off["a"], off["b"], x0_o, 4)
    torch.testing.assert_close(out_o, out, rtol=0, atol=0)
    torch.testing.assert_close(x0_o, x0, rtol=0, atol=0)
    for i in range(3):
        one, x0_one = torch.empty_like(t["x"][i:i + 1]), torch.empty_like(t["x"][i:i + 1])
        launch(t["x"][i:i + 1], t["m"][i:i + 1], one, t["a"][i:i + 1], t["b"][i:i + 1], x0_one, 4 + i)
        torch.testing.assert_close(one[0], out[i], rtol=0, atol=0)
        torch.testing.assert_close(x0_one[0], x0[i], rtol=0, atol=0)
    xi, x0_i = t["x"].clone(), torch.empty_like(t["x"])
    launch(xi, t["m"], xi, t["a"], t["b"], x0_i, 4)
    torch.testing.assert_close(xi, out, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.torch_cuda
def test_history_arguments_are_refused_before_launch(torch):
    from fastddpm import _C_cuda
    x, h, x0 = (torch.zeros((2, 8), device="cuda") for _ in range(3))
    row = torch.zeros(COEF_WIDTH, device="cuda")
    host = torch.zeros((2, 8))
    args = dict(noise=0, batch=2, per_sample=8, seed=0, noise_step=0, first_index=0)
    ptrs = (x.data_ptr(), x.data_ptr(), x.data_ptr(), row.data_ptr())
    with pytest.raises(ValueError, match="host memory"):
        _C_cuda.fused_step(*ptrs, **args, h1=host.data_ptr())
    with pytest.raises(ValueError, match="aligned"):
        _C_cuda.fused_step(*ptrs, **args, h2=h.data_ptr() + 2)
    for other in (x, h):
        with pytest.raises(ValueError, match="x0_out overlaps"):
            _C_cuda.fused_step(*ptrs, **args, h1=h.data_ptr(), x0_out=other.data_ptr())
    with pytest.raises(ValueError, match="x0_out overlaps"):
        _C_cuda.fused_step(*ptrs, **args, x0_out=x.data_ptr() + 4)
    with pytest.raises(ValueError, match="partially overlaps"):
        _C_cuda.fused_step(*ptrs, **{**args, "per_sample": 7}, h1=x.data_ptr() + 4)
    _C_cuda.fused_step(*ptrs, **args, h1=h.data_ptr(), h2=h.data_ptr(), x0_out=x0.data_ptr())   # a good call works
    torch.cuda.synchronize()
    from fastddpm.dispatch import fused_step
    table = np.zeros((1, COEF_WIDTH), np.float32)
    with pytest.raises(ValueError, match="h2 without h1"):
        fused_step(x, x, table, 0, 1, None, 0, backend="native-cuda", history=(None, h, x0))
    with pytest.raises(ValueError, match="shape"):
        fused_step(x, x, table, 0, 1, None, 0, backend="native-cuda", history=(h[:1], None, x0))
    with pytest.raises(TypeError, match="float32"):
        fused_step(x, x, table, 0, 1, None, 0, backend="native-cuda", history=(h.double(), None, x0))
    # an x0_out that shares memory with an input, or is strided, goes through a temporary: same values
    strided = torch.zeros((2, 16), device="cuda")[:, ::2]
    a = torch.randn((2, 8), device="cuda")
    y1 = fused_step(a, a, np.ones((1, COEF_WIDTH), np.float32), 0, 1, None, 0, backend="native-cuda",
                    history=(h, None, strided))
    y2 = fused_step(a, a, np.ones((1, COEF_WIDTH), np.float32), 0, 1, None, 0, backend="native-cuda",
                    history=(h, None, x0))
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(strided, x0, rtol=0, atol=0)
    assert float(torch.ones(3, device="cuda").sum()) == 3.0   # the context survived every refusal


@pytest.mark.cuda
@pytest.mark.torch_cuda
def test_multistep_scheduler_steps_match_native_cpu(torch):
    """DPM-Solver++ 3M SDE stepped through Scheduler.step (stateful: it keeps the x0 history as CUDA
    tensors) on native-cuda and on native-cpu with the same inputs: every step within 2e-5 (each is
    within 1e-5 of diffusers' float64 step, tests/test_dpm_solver.py)."""
    from fastddpm.schedulers import scheduler_for
    cfg = {**fastddpm.DDPMScheduler().config, "algorithm_type": "sde-dpmsolver++"}
    gpu, cpu = (scheduler_for("dpm++3m", cfg, 10) for _ in range(2))
    assert gpu.history == 2
    rng = np.random.default_rng(0)
    shape = (2, 3, 8, 8)
    for t in (int(t) for t in gpu.timesteps):
        x, m, z = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
        got = gpu.step(torch.from_numpy(m).cuda(), t, torch.from_numpy(x).cuda(), noise=torch.from_numpy(z).cuda(),
                       backend="native-cuda")
        want = cpu.step(m, t, x, noise=z, backend="native-cpu")
        assert got.is_cuda
        np.testing.assert_allclose(got.cpu().numpy(), want, rtol=0, atol=2e-5, err_msg=f"t={t}")
