"""The numba U-Net engine (fastddpm/executors/numba_engine.py) against the torch reference U-Net:
whole forwards on bench-small and small configs covering every option, short DDPM/DDIM loops
against the reference sampler with the same seed, batch invariance, errors, compile-time report."""
import numpy as np
import pytest

pytest.importorskip("numba")
pytest.importorskip("scipy")      # numba's np.dot (the conv GEMMs) needs SciPy's BLAS
torch = pytest.importorskip("torch")

import fastddpm  # noqa: E402
from fastddpm.executors.numba_backend import BACKEND as NUMBA  # noqa: E402
from fastddpm.executors.numba_engine import compile_info  # noqa: E402
from fastddpm.pipeline import Pipeline  # noqa: E402
from fastddpm.reference import ReferenceUNet  # noqa: E402
from fastddpm.unet_config import PRESETS, UNetConfig, random_weights  # noqa: E402

@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread():
    """The reference runs on one thread here: on a shared 2-core machine a 2-thread torch forward
    can take seconds (fork-join waits), and the engine defaults to one thread too."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


_BASE = dict(norm_num_groups=4, layers_per_block=1)
# (config, batch, height, width): together every block type, 1/3/4 channels, 16x16 and 32x32,
# odd batches, downsample_padding 0 and 1, one and several heads, center_input_sample,
# flip_sin_to_cos both ways, mid_block_scale_factor != 1, no mid attention, a custom time width.
CONFIGS = {
    "bench-small": (PRESETS["bench-small"], 1, 32, 32),
    "rgb-16-heads": (dict(_BASE, sample_size=16, in_channels=3, out_channels=3, block_out_channels=[16, 32],
                          down_block_types=["AttnDownBlock2D", "DownBlock2D"],
                          up_block_types=["UpBlock2D", "AttnUpBlock2D"], attention_head_dim=8,
                          downsample_padding=1, center_input_sample=True, flip_sin_to_cos=True,
                          mid_block_scale_factor=2.0, freq_shift=0), 3, 16, 16),
    "rgba-32-pad0": (dict(_BASE, sample_size=32, in_channels=4, out_channels=4, block_out_channels=[8, 16, 16],
                          down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
                          up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], layers_per_block=2,
                          attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False,
                          freq_shift=1, attn_norm_num_groups=2), 1, 32, 32),
    "gray-16-noattn": (dict(_BASE, sample_size=16, in_channels=1, out_channels=2, block_out_channels=[8, 16],
                            down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                            up_block_types=["AttnUpBlock2D", "UpBlock2D"], attention_head_dim=4,
                            add_attention=False, time_embedding_dim=24, norm_eps=1e-6), 5, 16, 16),
}


def _rel_l2(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_reference(name):
    d, batch, h, w = CONFIGS[name]
    cfg = UNetConfig.from_dict(d)
    weights = random_weights(cfg, seed=3)
    engine = NUMBA.make_engine(cfg, weights, batch, h, w)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((batch, cfg.in_channels, h, w), dtype=np.float32)     # [N, C, H, W]
    t = rng.integers(0, 1000, size=batch)                                           # one per sample
    got = engine.forward(x, t)
    ref = ReferenceUNet.from_weights(cfg, weights).eval()
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    assert got.shape == (batch, cfg.out_channels, h, w) and got.dtype == np.float32
    err = _rel_l2(got, want)
    assert err <= 1e-4, f"{name}: relative L2 error {err:.3g}"
    # a second call through the same buffers (liveness-reused slots) gives the same answer
    assert np.array_equal(engine.forward(x, t), got)


def test_batch_invariance_forward_and_loop():
    d, _, h, w = CONFIGS["rgb-16-heads"]
    pipe = Pipeline(UNetConfig.from_dict(d), random_weights(UNetConfig.from_dict(d), seed=1),
                    fastddpm.DDPMScheduler(), name="t")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 3, h, w), dtype=np.float32)
    big = pipe.unet(x, 321, backend="numba")
    small = pipe.unet(x[:2].copy(), 321, backend="numba")
    assert np.array_equal(big[:2], small)
    # whole loops: the first k images of n are the images of k (same seed), bit for bit
    a = pipe(3, steps=4, seed=11, backend="numba", output="float")
    b = pipe(1, steps=4, seed=11, backend="numba", output="float")
    assert np.array_equal(a[:1], b)


# Max abs difference on [-1, 1] between the numba loop and the torch reference sampler, measured
# (bench-small, seed 5, reference on 1 and on 2 torch threads): DDPM 25 steps 1.6e-6 / 1.9e-6,
# DDIM 10 steps eta 0 1.4e-4 / 1.5e-4, DDIM eta 0.7 8.2e-6 / 7.9e-6.
# DDIM with eta 0 amplifies float32 rounding the most (x0 = (x - sqrt(1-abar) eps) / sqrt(abar) at
# small abar, no noise to dilute it). The bound is ~3x the worst measured.
BOUND = 5e-4

@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", 25, 0.0), ("ddim", 10, 0.0), ("ddim", 10, 0.7)])
def test_loop_matches_reference_sampler(sampler, steps, eta):
    """engine.run (U-Net + numba fused step + Philox noise) against the torch reference sampler
    with the same seed (see BOUND)."""
    pipe = fastddpm.load("bench-small")
    kw = dict(steps=steps, sampler=sampler, eta=eta, seed=5, output="float", trajectory=[0, steps // 2, -1])
    got = pipe(2, backend="numba", **kw)
    want = pipe(2, backend="torch", **kw)
    assert got.trajectory_steps == want.trajectory_steps == [0, steps // 2, steps]
    # x_T: the same Philox stream; numba's Box-Muller matches the spec's normals to float rounding
    np.testing.assert_allclose(got.trajectory[0], want.trajectory[0], rtol=0, atol=1e-6)
    err = float(np.max(np.abs(got.images - want.images)))
    print(f"{sampler} {steps} steps eta={eta}: max abs diff {err:.3g}")
    assert err <= BOUND
    assert np.max(np.abs(got.trajectory - want.trajectory)) <= BOUND


def test_bad_input_is_refused():
    pipe = fastddpm.load("bench-small")
    eng = NUMBA.make_engine(pipe.unet_config, pipe.weights, 2, 32, 32)
    with pytest.raises(ValueError, match="shape"):
        eng.forward(np.zeros((1, 1, 32, 32), np.float32), 3)
    with pytest.raises(TypeError, match="float32"):
        eng.forward(np.zeros((2, 1, 32, 32), np.float64), 3)
    with pytest.raises(ValueError, match="timestep"):
        eng.forward(np.zeros((2, 1, 32, 32), np.float32), np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="trajectory step"):
        eng.run(pipe.scheduler_for("ddpm", 2).schedule(), seed=0, keep=[3])
    bad = dict(pipe.weights)
    bad.pop("conv_in.weight")
    with pytest.raises(Exception, match="conv_in.weight"):
        NUMBA.make_engine(pipe.unet_config, bad, 1, 32, 32)


def test_compile_time_is_reported():
    pipe = fastddpm.load("bench-small")
    pipe.unet(np.zeros((1, 1, 32, 32), np.float32), 1, backend="numba")
    info = compile_info()
    assert isinstance(info["unet_compile_seconds"], float) and info["unet_compile_seconds"] > 0
    assert info["unet_compile_source"] in ("compiled", "disk cache")
    assert fastddpm.backends()["numba"]["unet_compile_seconds"] == info["unet_compile_seconds"]

