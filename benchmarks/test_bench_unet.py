"""The U-Net forward and the whole sampling loop: native C++ engine next to its baselines.

Forward rows (bench-small batch 1 and 16, ddpm-cifar10 batch 1): native (fastddpm._C engine),
native-direct (the same with the Winograd conv path off), torch-eager (the reference U-Net),
torch-compile (torch.compile of the reference), diffusers' UNet2DModel and ONNX Runtime (that
model exported to ONNX, CPU provider, all graph optimisations, 2 intra-op threads; the row skips,
saying why, where onnxruntime is not installed), all with the same weights. Sample rows: one
bench-small image, 1000 DDPM steps, native vs the reference sampler (backend="torch"). The ceiling rows, measured in the same run: sgemm (torch.mm 1024^3) and the
CPU's float32 FMA rate on the engine's ISA path (fastddpm._C._fma_peak_gflops: torch's and NumPy's
BLAS builds take AVX2 kernels on Zen 5, so sgemm is not this machine's FLOP ceiling there).
Every implementation's answer is checked before it is timed.
"""
import os
import tempfile

import numpy as np
import pytest

import fastddpm
from fastddpm.executors.native import CPU_BACKEND, _C
from fastddpm.unet_config import PRESETS, UNetConfig, flops, random_weights

torch = pytest.importorskip("torch")
torch.set_num_threads(2)

FORWARD = [("bench-small", 1), ("bench-small", 16), ("ddpm-cifar10", 1)]
# native-direct: the C++ engine with the Winograd path off (FASTDDPM_WINOGRAD=0), what it pays
IMPLS = ["native", "native-direct", "torch-eager", "torch-compile", "diffusers", "onnxruntime"]
REL_TOL = 1e-4
_cache: dict = {}
_onnx_dir = tempfile.TemporaryDirectory(prefix="fastddpm-bench-onnx-")   # removed at exit


def _record(benchmark, group, kind, impl, model, batch, gflop, baseline="torch-eager"):
    benchmark.group = group
    benchmark.extra_info.update(kind=kind, impl=impl, gflop=gflop, model=model, batch=batch,
                                baseline=baseline)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _setup(model, batch):
    key = (model, batch)
    if key not in _cache:
        cfg = UNetConfig.from_dict(PRESETS[model])
        w = random_weights(cfg, seed=0)
        h, wd = cfg.sample_hw
        x = np.random.default_rng(batch).standard_normal((batch, cfg.in_channels, h, wd)).astype(np.float32)
        from fastddpm.reference import ReferenceUNet
        ref = ReferenceUNet.from_weights(cfg, w).eval()
        with torch.no_grad():
            expected = ref(torch.from_numpy(x), 500).numpy()
        _cache[key] = (cfg, w, x, ref, expected)
    return _cache[key]


def test_fma_peak_ceiling(benchmark):
    """Independent FMA chains on every engine thread, with the engine's ISA: the FLOP ceiling."""
    if _C is None:
        pytest.skip("fastddpm._C is not built")
    isa, threads = _C.isa(), _C.num_threads()
    rates = []
    benchmark.group = "fma peak"
    benchmark.pedantic(lambda: rates.append(_C._fma_peak_gflops(isa, threads, 0.05)), rounds=5, iterations=1)
    assert all(r > 0 for r in rates)
    benchmark.extra_info.update(kind="fma-peak", impl=f"fma {isa} x{threads}", gflops=float(np.median(rates)))


def test_sgemm_ceiling(benchmark):
    """torch.mm of two 1024x1024 float32 matrices on the same threads: the FLOP ceiling."""
    a = torch.randn(1024, 1024)
    b = torch.randn(1024, 1024)
    c = torch.mm(a, b)
    assert torch.allclose(c[:4, :4], (a[:4].double() @ b[:, :4].double()).float(), atol=1e-3)
    _record(benchmark, "sgemm 1024^3", "sgemm", "torch.mm", "-", 1, 2 * 1024**3 / 1e9)
    benchmark(torch.mm, a, b)


def forward_fn(impl, cfg, w, x, ref, batch, monkeypatch):
    """A no-argument callable running one forward of `impl` on x (timestep 500), returning NumPy."""
    h, wd = cfg.sample_hw
    xt = torch.from_numpy(x)
    if impl in ("native", "native-direct"):
        if _C is None:
            pytest.skip("fastddpm._C is not built")
        monkeypatch.setenv("FASTDDPM_WINOGRAD", "0" if impl == "native-direct" else "1")
        eng = CPU_BACKEND.make_engine(cfg, w, batch, h, wd)
        return lambda: eng.forward(x, 500)
    if impl == "onnxruntime":
        pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (requirements-dev.txt pins it)")
        pytest.importorskip("onnx", reason="torch.onnx.export needs the onnx package")
        from _onnx import export_unet, forward, session
        path = os.path.join(_onnx_dir.name, f"{cfg.in_channels}x{h}x{wd}-b{batch}-{id(w)}.onnx")
        if not os.path.exists(path):
            export_unet(cfg, w, path, x.shape)
        sess = session(path)
        return lambda: forward(sess, x, 500.0)
    if impl == "torch-eager":
        module = ref
    elif impl == "torch-compile":
        module = torch.compile(ref)
    else:
        diffusers = pytest.importorskip("diffusers")
        with torch.device("meta"):
            model_d = diffusers.UNet2DModel.from_config(cfg.to_dict())
        model_d.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()}, strict=True, assign=True)
        model_d.eval()
        module = lambda xx, t: model_d(xx, t).sample  # noqa: E731

    def fn():
        with torch.no_grad():
            return module(xt, 500).numpy()
    return fn


def check_answer(impl, got, expected):
    err = _rel(got, expected)
    if not err <= REL_TOL:
        pytest.fail(f"FAIL {impl}: relative L2 error {err:.3g} against the reference U-Net")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model,batch", FORWARD, ids=[f"{m}-b{b}" for m, b in FORWARD])
def test_forward(benchmark, model, batch, impl, monkeypatch):
    cfg, w, x, ref, expected = _setup(model, batch)
    fn = forward_fn(impl, cfg, w, x, ref, batch, monkeypatch)
    check_answer(impl, fn(), expected)
    _record(benchmark, f"unet forward {model} b{batch}", "forward", impl, model, batch,
            flops(cfg, batch) / 1e9)
    benchmark.pedantic(fn, rounds=20 if model == "bench-small" and batch == 1 else 5, iterations=1,
                       warmup_rounds=1)


def check_sample_paths_agree(pipe):
    """native-cpu and the reference sampler agree on a short run with the same noise."""
    a = pipe(1, steps=20, seed=0, backend="native-cpu", output="float")
    b = pipe(1, steps=20, seed=0, backend="torch", output="float")
    diff = float(np.abs(a - b).max())
    if not diff <= 1e-3:
        pytest.fail(f"FAIL: 20-step samples of native-cpu and torch differ by {diff:.3g}")


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_sample_1000_steps(benchmark, impl):
    """fastddpm.sample of one bench-small image, 1000 DDPM steps."""
    pipe = fastddpm.load("bench-small")
    backend = "native-cpu" if impl == "native" else "torch"
    if impl == "native" and _C is None:
        pytest.skip("fastddpm._C is not built")
    check_sample_paths_agree(pipe)
    cfg = pipe.unet_config
    _record(benchmark, "sample bench-small 1 image 1000 steps", "sample", impl, "bench-small", 1,
            1000 * flops(cfg, 1) / 1e9, baseline="reference")
    # one round: the reference takes minutes per run on a busy 2-core machine
    benchmark.pedantic(lambda: pipe(1, steps=1000, seed=0, backend=backend), rounds=1, iterations=1)
