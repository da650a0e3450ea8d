"""The numba U-Net engine's forward next to the reference U-Net (torch-eager), in the same run and
on the same thread count: bench-small, batch 1. The answer is checked before it is timed (relative
L2 <= 1e-4 against the reference); a wrong answer fails the row. The target: numba no slower
than 2x torch-eager.
"""
import numpy as np
import pytest

pytest.importorskip("numba")
pytest.importorskip("scipy")
torch = pytest.importorskip("torch")

from fastddpm.executors.numba_backend import BACKEND as NUMBA  # noqa: E402
from fastddpm.executors.numba_engine import compile_info  # noqa: E402
from fastddpm.reference import ReferenceUNet  # noqa: E402
from fastddpm.unet_config import PRESETS, UNetConfig, flops, random_weights  # noqa: E402

MODEL, BATCH, T = "bench-small", 1, 500
_cache: dict = {}


def _setup():
    if not _cache:
        cfg = UNetConfig.from_dict(PRESETS[MODEL])
        w = random_weights(cfg, seed=0)
        h, wd = cfg.sample_hw
        x = np.random.default_rng(0).standard_normal((BATCH, cfg.in_channels, h, wd)).astype(np.float32)
        ref = ReferenceUNet.from_weights(cfg, w).eval()
        with torch.no_grad():
            expected = ref(torch.from_numpy(x), T).numpy()
        _cache.update(cfg=cfg, w=w, x=x, ref=ref, expected=expected)
    return _cache


@pytest.fixture
def threads(request):
    """Both implementations on the same thread count for the row; the previous counts come back."""
    n = request.param
    prev_torch, prev_numba = torch.get_num_threads(), NUMBA._threads
    torch.set_num_threads(n)
    NUMBA.set_num_threads(n)
    yield n
    torch.set_num_threads(prev_torch)
    NUMBA._threads = prev_numba


@pytest.mark.parametrize("threads", [1, 2], indirect=True, ids=["1thread", "2threads"])
@pytest.mark.parametrize("impl", ["numba", "torch-eager"])
def test_forward(benchmark, impl, threads):
    s = _setup()
    cfg, x = s["cfg"], s["x"]
    if impl == "numba":
        eng = NUMBA.make_engine(cfg, s["w"], BATCH, *cfg.sample_hw)
        fn = lambda: eng.forward(x, T)  # noqa: E731
    else:
        xt = torch.from_numpy(x)

        def fn():
            with torch.no_grad():
                return torch.Tensor.numpy(s["ref"](xt, T))
    got = np.asarray(fn(), np.float64)          # also the first call: compile / cache load
    err = float(np.linalg.norm(got - s["expected"]) / np.linalg.norm(s["expected"]))
    if not err <= 1e-4:
        pytest.fail(f"FAIL {impl}: relative L2 error {err:.3g} against the reference U-Net")
    benchmark.group = f"unet {MODEL} b{BATCH} ({threads} thread{'s' if threads > 1 else ''})"
    benchmark.extra_info.update(kind="unet", impl=impl, model=MODEL, batch=BATCH, threads=threads,
                                gflop=flops(cfg, BATCH) / 1e9, baseline="torch-eager",
                                rel_l2=err, **(compile_info() if impl == "numba" else {}))
    # 2 threads on a shared 2-core machine can take seconds a call (fork-join waits): fewer rounds
    benchmark.pedantic(fn, rounds=10 if threads == 1 else 4, iterations=1, warmup_rounds=1)
