"""The CUDA U-Net engine (fastddpm._C_cuda.Engine via NativeCudaBackend.make_engine) and Sampler.

Tests marked `cuda` need a GPU (conftest skips them with the reason where native-cuda cannot run):
- the forward against the reference U-Net on the GPU: fp32 rel. L2 <= 1e-4, tf32 <= 3e-3,
  bf16 / fp16 <= 2x the error of torch's own forward in that dtype against fp32;
- whole DDPM / DDIM loops against the C++ CPU engine with the same seed (the drift is printed);
- the captured graph replayed with new seeds, trajectories, callbacks, out-of-memory handling.
The rest runs anywhere: the module imports, dtype validation, and a clean refusal without a GPU.
"""
import numpy as np
import pytest

import fastddpm
from fastddpm.executors import native_cuda
from fastddpm.executors import EngineOptions
from fastddpm.executors.native_cuda import CUDA_BACKEND, _C_cuda

DTYPES = CUDA_BACKEND.dtypes
check_dtype = CUDA_BACKEND.check_dtype


def Sampler(model, batch, **kw):
    """A Pipeline.sampler on the CUDA engine."""
    return fastddpm.load(model).sampler(batch, backend="native-cuda", **kw)
from fastddpm.unet_config import PRESETS, UNetConfig, random_weights

cuda = pytest.mark.cuda
torch_cuda = pytest.mark.torch_cuda  # also needs a CUDA build of torch (conftest gates the rest on the engine alone)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _model(name="bench-small"):
    cfg = UNetConfig.from_dict(PRESETS[name])
    return cfg, random_weights(cfg, seed=0)


# ------------------------------------------------------------------ anywhere

def test_module_imports_and_exposes_the_engine():
    assert hasattr(native_cuda, "NativeCudaEngine")
    assert callable(CUDA_BACKEND.make_engine)
    if _C_cuda is not None:
        assert hasattr(_C_cuda, "Engine")


@pytest.mark.parametrize("dtype", DTYPES)
def test_check_dtype_accepts_the_four(dtype):
    assert check_dtype(dtype) == dtype
    if _C_cuda is not None:
        assert _C_cuda.check_dtype(dtype) == dtype


def test_check_dtype_default_is_tf32():
    assert check_dtype(None) == "tf32"


@pytest.mark.parametrize("bad", ["float32", "FP32", "int8", "", 32, True, b"fp32"])
def test_check_dtype_refuses(bad):
    with pytest.raises(ValueError, match="dtype must be one of"):
        check_dtype(bad)
    if _C_cuda is not None and isinstance(bad, str):
        with pytest.raises(ValueError, match="dtype must be one of"):
            _C_cuda.check_dtype(bad)


def test_make_engine_refuses_a_bad_dtype_before_anything_else():
    cfg, w = _model()
    with pytest.raises(ValueError, match="dtype must be one of"):
        CUDA_BACKEND.make_engine(cfg, w, 1, 32, 32, EngineOptions(dtype="double"))


@pytest.mark.skipif(bool(_C_cuda is not None and _C_cuda.device_count()[0] > 0), reason="a GPU is present")
def test_make_engine_without_a_gpu_says_why():
    cfg, w = _model()
    reasons = CUDA_BACKEND.engine_unavailable()
    assert reasons and all(isinstance(r, str) and r for r in reasons)
    with pytest.raises(RuntimeError, match="the CUDA engine cannot run here") as info:
        CUDA_BACKEND.make_engine(cfg, w, 1, 32, 32)
    assert reasons[0] in str(info.value)
    with pytest.raises(fastddpm.BackendUnavailableError, match="native-cuda"):
        Sampler("bench-small", 1, steps=2)


def test_native_cuda_takes_multistep_solvers():
    """The CUDA step and engine read two previous x0 predictions (DPM-Solver++ 2M / 3M); the
    bindings take them (the run's history, the step's h1 / h2 / x0_out pointers)."""
    assert CUDA_BACKEND.max_history == 2
    assert native_cuda.NativeCudaEngine.history == 2
    if _C_cuda is not None:
        assert "history" in _C_cuda.Engine.run.__doc__
        assert all(k in _C_cuda.fused_step.__doc__ for k in ("h1", "h2", "x0_out"))


@pytest.mark.skipif(bool(_C_cuda is not None and _C_cuda.device_count()[0] > 0), reason="a GPU is present")
def test_multistep_sampler_without_a_gpu_names_the_gpu_not_the_history():
    with pytest.raises(fastddpm.BackendUnavailableError, match="native-cuda") as info:
        fastddpm.load("bench-small").sampler(1, sampler="dpm++2m", backend="native-cuda")
    assert "previous predictions" not in str(info.value)


# ------------------------------------------------------------------ GPU

def _reference(cfg, w, device="cpu", dtype=None):
    import torch
    from fastddpm.reference import ReferenceUNet
    ref = ReferenceUNet.from_weights(cfg, w).eval().to(device)
    return ref if dtype is None else ref.to(dtype)


def _inputs(cfg, n, h, w, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cfg.in_channels, h, w)).astype(np.float32)
    t = rng.integers(0, 1000, size=n).astype(np.float32)
    return x, t


def _torch_forward(ref, x, t, dtype=None):
    import torch
    device = next(ref.parameters()).device
    with torch.no_grad():
        xt = torch.from_numpy(x).to(device)
        tt = torch.from_numpy(t).to(device)
        if dtype is not None:
            xt = xt.to(dtype)
        return ref(xt, tt).float().cpu().numpy()


@cuda
@pytest.mark.parametrize("name,batch", [("bench-small", 1), ("bench-small", 3), ("ddpm-cifar10", 2)])
@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("tf32", 3e-3)])
def test_forward_matches_the_reference(name, batch, dtype, tol):
    """Against the torch reference in fp32 on the CPU (no CUDA torch needed)."""
    cfg, w = _model(name)
    h, wd = cfg.sample_hw or (32, 32)
    x, t = _inputs(cfg, batch, h, wd)
    want = _torch_forward(_reference(cfg, w), x, t)
    eng = CUDA_BACKEND.make_engine(cfg, w, batch, h, wd, EngineOptions(dtype=dtype))
    got = eng.forward(x, t)
    err = rel_err(got, want)
    print(f"{name} b{batch} {dtype}: rel L2 {err:.2e}")
    assert err <= tol


@cuda
@torch_cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_forward_low_precision_within_twice_torch(dtype):
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg, w = _model("bench-small")
    h, wd = cfg.sample_hw or (32, 32)
    x, t = _inputs(cfg, 2, h, wd)
    exact = _torch_forward(_reference(cfg, w), x, t)
    tdt = torch.bfloat16 if dtype == "bf16" else torch.float16
    torch_err = rel_err(_torch_forward(_reference(cfg, w, device="cuda", dtype=tdt), x, t, tdt), exact)
    eng = CUDA_BACKEND.make_engine(cfg, w, 2, h, wd, EngineOptions(dtype=dtype))
    err = rel_err(eng.forward(x, t), exact)
    print(f"{dtype}: engine rel L2 {err:.2e}, torch {torch_err:.2e}")
    assert err <= 2 * torch_err


@cuda
@torch_cuda
def test_forward_on_torch_tensors_matches_numpy():
    import torch
    cfg, w = _model()
    x, t = _inputs(cfg, 2, 32, 32)
    eng = CUDA_BACKEND.make_engine(cfg, w, 2, 32, 32, EngineOptions(dtype="fp32"))
    a = eng.forward(x, t)
    xt = torch.from_numpy(x).cuda()
    b = eng.forward(xt, t)
    assert b.is_cuda
    np.testing.assert_array_equal(b.cpu().numpy(), a)
    np.testing.assert_array_equal(eng.forward(xt, torch.from_numpy(t).cuda()).cpu().numpy(), a)  # t on the device
    np.testing.assert_array_equal(eng.forward(xt, torch.tensor(5, device="cuda")).cpu().numpy(),  # a scalar, int
                                  eng.forward(x, 5.0))
    with pytest.raises(ValueError, match="shape"):
        eng.forward(xt, torch.zeros(3, device="cuda"))


@cuda
@pytest.mark.parametrize("sampler,steps", [("ddpm", 30), ("ddim", 20)])
def test_whole_run_against_the_cpu_engine(sampler, steps):
    from fastddpm.executors.native import CPU_BACKEND, _C
    if _C is None:
        pytest.skip("fastddpm._C is not built")
    pipe = fastddpm.load("bench-small")
    sched = pipe.scheduler_for(sampler, steps)
    h, w = pipe.image_size
    cpu = CPU_BACKEND.make_engine(pipe.unet_config, pipe.weights, 2, h, w)
    gpu = CUDA_BACKEND.make_engine(pipe.unet_config, pipe.weights, 2, h, w, EngineOptions(dtype="fp32"))
    xc, _ = cpu.run(sched.schedule(), seed=7)
    xg, _ = gpu.run(sched.schedule(), seed=7)
    err, mx = rel_err(xg, xc), float(np.abs(xg - xc).max())
    print(f"{sampler} {steps} steps fp32: GPU vs CPU rel L2 {err:.2e}, max abs {mx:.2e}")
    assert err < 1e-3


@cuda
def test_sampler_replays_the_graph_with_new_seeds():
    s = Sampler("bench-small", 2, sampler="ddim", steps=10, dtype="fp32")
    a1 = s(seed=1)
    assert s.engine._engine.graph_captured
    a2 = s(seed=2)
    a1_again = s(seed=1)
    assert not np.array_equal(a1, a2)
    np.testing.assert_array_equal(a1, a1_again)   # replay is deterministic
    fresh = CUDA_BACKEND.make_engine(s.pipeline.unet_config, s.pipeline.weights, 2, *s.pipeline.image_size,
                                     EngineOptions(dtype="fp32"))
    x, _ = fresh.run(s.schedule, seed=2)
    np.testing.assert_array_equal(x, a2)
    # first_index: sample 1 of first_index=0 is sample 0 of first_index=1
    b = s(seed=1, first_index=1)
    np.testing.assert_allclose(b[0], a1[1], rtol=0, atol=1e-5)


@cuda
def test_out_of_memory_is_a_memory_error_and_others_keep_working():
    cfg, w = _model("ddpm-cifar10")
    eng = CUDA_BACKEND.make_engine(cfg, w, 1, 32, 32, EngineOptions(dtype="fp32"))
    x, t = _inputs(cfg, 1, 32, 32)
    before = eng.forward(x, t)
    with pytest.raises(MemoryError, match="CUDA out of memory"):
        CUDA_BACKEND.make_engine(cfg, w, 60000, 32, 32, EngineOptions(dtype="fp32"))   # ~ TBs of activations
    np.testing.assert_array_equal(eng.forward(x, t), before)


@cuda
def test_bad_shapes_are_value_errors():
    cfg, w = _model()
    eng = CUDA_BACKEND.make_engine(cfg, w, 2, 32, 32)
    with pytest.raises(ValueError):
        eng.forward(np.zeros((1, cfg.in_channels, 32, 32), np.float32), 0)
    with pytest.raises(ValueError):
        eng.forward(np.zeros((2, cfg.in_channels, 32, 32), np.float32), [1, 2, 3])
    with pytest.raises(ValueError, match="first_index"):
        eng.run(fastddpm.load("bench-small").scheduler_for("ddim", 5).schedule(), seed=0, first_index=2**32 - 1)


@cuda
def test_tf32_falls_back_or_runs():
    cfg, w = _model()
    eng = CUDA_BACKEND.make_engine(cfg, w, 1, 32, 32)
    major = _C_cuda.device_info(0)["capability"][0]
    assert eng.dtype == ("tf32" if major >= 8 else "fp32")


@cuda
@pytest.mark.parametrize("name", ["bench-small", "ddpm-cifar10"])
def test_forward_is_batch_invariant_and_repeatable(name):
    """Sample i of a batch-3 forward is bit for bit the batch-1 forward of that sample; two
    successive forwards of a large-batch engine are identical."""
    cfg, w = _model(name)
    x, t = _inputs(cfg, 3, 32, 32)
    eng3 = CUDA_BACKEND.make_engine(cfg, w, 3, 32, 32, EngineOptions(dtype="fp32"))
    eng1 = CUDA_BACKEND.make_engine(cfg, w, 1, 32, 32, EngineOptions(dtype="fp32"))
    full = eng3.forward(x, t)
    for i in range(3):
        np.testing.assert_array_equal(eng1.forward(x[i:i + 1], t[i:i + 1]), full[i:i + 1])
    big = 64
    xb, tb = _inputs(cfg, big, 32, 32, seed=5)
    engb = CUDA_BACKEND.make_engine(cfg, w, big, 32, 32, EngineOptions(dtype="tf32"))
    np.testing.assert_array_equal(engb.forward(xb, tb), engb.forward(xb, tb))


@cuda
@torch_cuda
def test_forward_on_two_streams_is_ordered():
    """Two caller streams share one engine's buffers: each call waits for the last use, so both
    results are right although neither stream waits for the other. (Without the ordering this
    fails only when the two streams' kernels happen to overlap; five rounds make that likely.)"""
    import torch
    cfg, w = _model()
    eng = CUDA_BACKEND.make_engine(cfg, w, 2, 32, 32, EngineOptions(dtype="fp32"))
    xa, ta = _inputs(cfg, 2, 32, 32, seed=1)
    xb, tb = _inputs(cfg, 2, 32, 32, seed=2)
    want_a, want_b = eng.forward(xa, ta), eng.forward(xb, tb)
    sa, sb = torch.cuda.Stream(), torch.cuda.Stream()
    ga, gb = torch.from_numpy(xa).cuda(), torch.from_numpy(xb).cuda()
    torch.cuda.synchronize()
    for _ in range(5):
        with torch.cuda.stream(sa):
            oa = eng.forward(ga, ta)
        with torch.cuda.stream(sb):
            ob = eng.forward(gb, tb)
        torch.cuda.synchronize()
        np.testing.assert_array_equal(oa.cpu().numpy(), want_a)
        np.testing.assert_array_equal(ob.cpu().numpy(), want_b)


@cuda
@torch_cuda
def test_forward_captured_in_a_torch_cuda_graph():
    """forward on torch tensors inside torch.cuda.graph: the capture ends cleanly (the engine's own
    stream is not pulled into it) and replays give the forward of the input buffer's new contents."""
    import torch
    cfg, w = _model()
    eng = CUDA_BACKEND.make_engine(cfg, w, 1, 32, 32, EngineOptions(dtype="fp32"))
    x1, t = _inputs(cfg, 1, 32, 32, seed=1)
    x2, _ = _inputs(cfg, 1, 32, 32, seed=2)
    static_x = torch.from_numpy(x1).cuda()
    static_t = torch.from_numpy(t).cuda()   # the timestep as a device tensor: a host one cannot be captured
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eng.forward(static_x, static_t)  # warm-up off the default stream, as torch asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = eng.forward(static_x, static_t)
        with pytest.raises(ValueError, match="pass the timestep as a CUDA tensor"):
            eng.forward(static_x, t)
    for x, tv in ((x2, 17.0), (x1, float(t[0]))):
        static_x.copy_(torch.from_numpy(x))
        static_t.fill_(tv)
        graph.replay()
        torch.cuda.synchronize()
        np.testing.assert_array_equal(static_out.cpu().numpy(), eng.forward(x, np.float32(tv)))


@cuda
def test_ctrl_c_without_a_callback_stops_the_loop_early(sigint_handled):
    """No callback: the loop still reports at chunk boundaries, so a SIGINT stops it long before
    its end (the interrupt comes at a tenth of the measured full run)."""
    import _thread
    import threading
    import time
    s = Sampler("bench-small", 1, sampler="ddpm", steps=1000, dtype="fp32")
    t0 = time.perf_counter()
    s(seed=0)
    full = time.perf_counter() - t0
    timer = threading.Timer(full / 10, _thread.interrupt_main)
    t0 = time.perf_counter()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        s(seed=1)
    stopped = time.perf_counter() - t0
    timer.join()
    print(f"full run {full:.3f} s, interrupted after {stopped:.3f} s")
    assert stopped < full / 2
    np.testing.assert_array_equal(s(seed=0), s(seed=0))


@cuda
def test_build_has_tensor_core_code_for_this_gpu():
    """The precision check reads what was compiled: with this GPU among the build's archs, the
    GEMM was compiled for its compute capability and tf32 / bf16 engines run as asked."""
    cfg, w = _model()
    major, minor = _C_cuda.device_info(0)["capability"]
    arch = _C_cuda.gemm_compiled_arch("bf16", 0)
    print(f"device sm_{major}{minor}, bf16 GEMM compiled from compute_{arch}")
    assert arch >= 70
    if major >= 8 and arch >= 80:
        assert CUDA_BACKEND.make_engine(cfg, w, 1, 32, 32, EngineOptions(dtype="bf16")).dtype == "bf16"
    elif major >= 8:
        with pytest.raises(ValueError, match="needs sm_80"):
            CUDA_BACKEND.make_engine(cfg, w, 1, 32, 32, EngineOptions(dtype="bf16"))


@cuda
def test_split_k_off_agrees_and_is_batch_invariant(monkeypatch):
    """FASTDDPM_CUDA_SPLITK=0 (one pass per GEMM, no workspace) gives the same forward to fp32
    rounding, and is batch invariant bit for bit too; a bad value is refused."""
    cfg, w = _model()
    x, t = _inputs(cfg, 3, 32, 32)
    split = CUDA_BACKEND.make_engine(cfg, w, 3, 32, 32, EngineOptions(dtype="fp32"))
    monkeypatch.setenv("FASTDDPM_CUDA_SPLITK", "0")
    whole = CUDA_BACKEND.make_engine(cfg, w, 3, 32, 32, EngineOptions(dtype="fp32"))
    one = CUDA_BACKEND.make_engine(cfg, w, 1, 32, 32, EngineOptions(dtype="fp32"))
    a, b = split.forward(x, t), whole.forward(x, t)
    err = rel_err(a, b)
    print(f"split K vs one pass: rel L2 {err:.2e}; workspace {split._engine.device_bytes - whole._engine.device_bytes} bytes")
    assert err < 1e-5
    assert split._engine.device_bytes > whole._engine.device_bytes   # some layer did split (a workspace)
    np.testing.assert_array_equal(one.forward(x[1:2], t[1:2]), b[1:2])
    monkeypatch.setenv("FASTDDPM_CUDA_SPLITK", "yes")
    with pytest.raises(ValueError, match="FASTDDPM_CUDA_SPLITK must be 0 or 1"):
        CUDA_BACKEND.make_engine(cfg, w, 1, 32, 32)


@cuda
def test_per_op_profiling():
    """set_profiling: each host forward and each step of run adds every op's GPU time; off stops it."""
    cfg, w = _model()
    eng = CUDA_BACKEND.make_engine(cfg, w, 1, 32, 32, EngineOptions(dtype="fp32"))
    x, t = _inputs(cfg, 1, 32, 32)
    want = eng.forward(x, t)
    n_ops = len(eng.plan.ops)
    assert eng._engine.op_seconds == [0.0] * n_ops
    eng._engine.set_profiling(True)
    np.testing.assert_array_equal(eng.forward(x, t), want)   # profiling changes no result
    one = np.array(eng._engine.op_seconds)
    assert one.shape == (n_ops,) and (one >= 0).all() and one.sum() > 0
    sched = fastddpm.load("bench-small").scheduler_for("ddim", 3)
    x_prof, _ = eng.run(sched.schedule(), seed=4)   # steps run op by op
    after_run = np.array(eng._engine.op_seconds)
    assert (after_run >= one).all() and after_run.sum() > one.sum()
    eng._engine.set_profiling(False)
    x_graph, _ = eng.run(sched.schedule(), seed=4)  # the graph again
    np.testing.assert_array_equal(x_graph, x_prof)
    np.testing.assert_array_equal(np.array(eng._engine.op_seconds), after_run)


# ------------------------------------------------------------------ GPU: multistep solvers (history ring)

def _dpm3m_sde(steps=10):
    from fastddpm.schedulers import scheduler_for
    return scheduler_for("dpm++3m", {**fastddpm.DDPMScheduler().config, "algorithm_type": "sde-dpmsolver++"},
                         steps).schedule()


@cuda
def test_multistep_run_against_the_cpu_engine():
    """DPM-Solver++ 3M SDE (each step reads the two previous x0 predictions from the engine's ring)
    on bench-small, fp32, against the C++ CPU engine with the same seed: the result and every kept
    frame within rel. L2 1e-3; first_index shifts the samples (batch invariance)."""
    from fastddpm.executors.native import CPU_BACKEND, _C
    if _C is None:
        pytest.skip("fastddpm._C is not built")
    pipe = fastddpm.load("bench-small")
    schedule = _dpm3m_sde(10)
    assert schedule.history == 2
    h, w = pipe.image_size
    cpu = CPU_BACKEND.make_engine(pipe.unet_config, pipe.weights, 2, h, w)
    gpu = CUDA_BACKEND.make_engine(pipe.unet_config, pipe.weights, 2, h, w, EngineOptions(dtype="fp32"))
    keep = [0, 1, 2, 3, 6, 10]
    xc, fc = cpu.run(schedule, seed=7, keep=keep)
    xg, fg = gpu.run(schedule, seed=7, keep=keep)
    assert sorted(fg) == keep
    np.testing.assert_array_equal(fg[10], xg)
    np.testing.assert_allclose(fg[0], fc[0], rtol=0, atol=4e-5)   # x_T: the GPU's normals vs the CPU's
    for k in keep[1:]:
        err = rel_err(fg[k], fc[k])
        print(f"dpm++3m-sde fp32 after {k} steps: GPU vs CPU rel L2 {err:.2e}, "
              f"max abs {float(np.abs(fg[k] - fc[k]).max()):.2e}")
        assert err < 1e-3, k
    assert rel_err(xg, xc) < 1e-3
    # first_index: sample 1 of first_index 0 is sample 0 of first_index 1
    b, _ = gpu.run(schedule, seed=7, first_index=1)
    np.testing.assert_allclose(b[0], xg[1], rtol=0, atol=1e-5)
    c, _ = cpu.run(schedule, seed=7, first_index=1)
    assert rel_err(b, c) < 1e-3


@cuda
def test_multistep_graph_replays_and_rewrites_the_ring():
    """The multistep graph replayed run after run gives the same bits for the same seed: the ring
    is rewritten from step 0 by every run, whatever the last run (another seed, a cancelled one)
    left in it. The single-step graph of the same engine is untouched, and the profiling path (op
    by op, no graph) gives the graph's bits."""
    pipe = fastddpm.load("bench-small")
    s = pipe.sampler(2, sampler="dpm++3m", steps=10, dtype="fp32", backend="native-cuda")
    assert isinstance(s.engine, native_cuda.NativeCudaEngine) and s.schedule.history == 2
    a1 = s(seed=1)
    assert s.engine._engine.graph_captured
    np.testing.assert_array_equal(s(seed=1), a1)
    a2 = s(seed=2)
    assert not np.array_equal(a1, a2)
    np.testing.assert_array_equal(s(seed=1), a1)
    b = s(seed=1, first_index=1)
    np.testing.assert_allclose(b[0], a1[1], rtol=0, atol=1e-5)
    # a cancelled run leaves the ring half written: the next run is unaffected
    h, w = pipe.image_size
    eng = CUDA_BACKEND.make_engine(pipe.unet_config, pipe.weights, 2, h, w,
                                   EngineOptions(dtype="fp32", callback_every=2))
    want, _ = eng.run(s.schedule, seed=1)
    np.testing.assert_array_equal(want, a1)   # a fresh engine: the same bits

    def stop(k):
        if k == 4:
            raise KeyError("stop")
    with pytest.raises(KeyError):
        eng.run(s.schedule, seed=5, callback=stop)
    np.testing.assert_array_equal(eng.run(s.schedule, seed=1)[0], a1)
    # the single-step graph on the same engine, before and after: a fresh engine's bits
    ddim = pipe.scheduler_for("ddim", 10).schedule()
    x_ddim, _ = s.engine.run(ddim, seed=3)
    fresh = CUDA_BACKEND.make_engine(pipe.unet_config, pipe.weights, 2, h, w, EngineOptions(dtype="fp32"))
    np.testing.assert_array_equal(fresh.run(ddim, seed=3)[0], x_ddim)
    np.testing.assert_array_equal(s(seed=1), a1)
    np.testing.assert_array_equal(s.engine.run(ddim, seed=3)[0], x_ddim)
    # op by op (profiling) = the graph
    s.engine._engine.set_profiling(True)
    try:
        np.testing.assert_array_equal(s(seed=1), a1)
    finally:
        s.engine._engine.set_profiling(False)


@cuda
def test_multistep_sampler_on_native_cuda():
    """Pipeline.sampler(sampler="dpm++2m", backend="native-cuda"): the CUDA engine runs it (default
    dtype and steps); in fp32 it agrees with the C++ engine, and a history-1 schedule (2M) too."""
    pipe = fastddpm.load("bench-small")
    s = pipe.sampler(1, sampler="dpm++2m", backend="native-cuda")
    assert isinstance(s.engine, native_cuda.NativeCudaEngine) and s.schedule.history == 1
    x = s(seed=0)
    assert x.shape == s.shape and x.dtype == np.float32 and np.isfinite(x).all()
    np.testing.assert_array_equal(s(seed=0), x)
    got = pipe(2, sampler="dpm++2m", steps=8, seed=4, backend="native-cuda", dtype="fp32", output="float")
    want = pipe(2, sampler="dpm++2m", steps=8, seed=4, backend="native-cpu", output="float")
    err = rel_err(got, want)
    print(f"dpm++2m 8 steps fp32 via Pipeline: GPU vs CPU rel L2 {err:.2e}")
    assert err < 1e-3
