"""The U-Net options of the families people download (ADM-style resnets), on every engine.

diffusers' UNet2DModel run in float64 is the oracle (its float32 forward differs from float64 by
about as much as ours does, so float32 diffusers would blur the comparison); the plan's float64
NumPy interpreter (tests/plan_numpy.py) checks the plan itself against it (to the ~1e-7 of
diffusers' float32 time embedding).

Covered: score-SDE's NCSN++ skip blocks (FIR resampling, image pyramids, min(C/4, 32) groups),
``time_embedding_type="learned"`` (a table row per integer timestep) and "fourier"
(score-SDE's Gaussian Fourier projection of ln t, the output divided by t),
``resnet_time_scale_shift="scale_shift"`` (time_emb_proj gives [scale, shift]; the
engines fold them into norm2's affine), ``act_fn`` silu / swish / mish / gelu / relu, both
together with a class-embedding table (the ADM shape), on the C++ engine (every ISA path), the
numba engine, the reference U-Net and the CUDA engine (where a GPU is present); that the options
change the output (the comparison means something); and the checks of the plan that the C++ core
makes for the new fields.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

import fastddpm.train
from fastddpm import plan as plan_mod
from fastddpm.conditioning import check_labels, class_embedding
from fastddpm.executors import get as get_backend
from fastddpm.executors.native import CPU_BACKEND, _C
from fastddpm.plan import build_plan
from fastddpm.unet_config import UNetConfig, UNetConfigError, random_weights, weight_shapes

from _stepkit import using
from plan_numpy import run_plan

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# Each case: config changes on the digits U-Net (16x16, 3 levels, attention in the middle level).
CASES = {
    "scale_shift": {"resnet_time_scale_shift": "scale_shift"},
    "swish": {"act_fn": "swish"},
    "mish": {"act_fn": "mish"},
    "gelu": {"act_fn": "gelu"},
    "relu": {"act_fn": "relu"},
    "scale_shift-mish": {"resnet_time_scale_shift": "scale_shift", "act_fn": "mish"},
    "learned-time": {"time_embedding_type": "learned", "num_train_timesteps": 1000},
    "fourier-time": {"time_embedding_type": "fourier", "resnet_time_scale_shift": "scale_shift"},
    "resnet-resample": {"down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D", "DownBlock2D"],
                        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"],
                        "downsample_type": "resnet", "upsample_type": "resnet"},
    "adm-classes": {"resnet_time_scale_shift": "scale_shift", "num_class_embeds": 7,
                    "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D"],
                    "up_block_types": ["ResnetUpsampleBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"],
                    "downsample_type": "resnet", "upsample_type": "resnet"},
    # score-SDE's NCSN++ shape (google/ncsnpp-*): skip blocks only, norm_num_groups null
    # (min(C/4, 32) groups), FIR resampling resnets, the input / output image pyramids, sqrt 2 scales
    "ncsnpp": {"in_channels": 3, "out_channels": 3, "block_out_channels": [32, 32, 64], "norm_num_groups": None,
               "down_block_types": ["SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D"],
               "up_block_types": ["SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"],
               "time_embedding_type": "fourier", "mid_block_scale_factor": 2 ** 0.5, "flip_sin_to_cos": True},
    # skip blocks beside plain ones: the skip blocks' own group counts whatever norm_num_groups says,
    # a pyramid that starts in the middle of the up path, the positional time embedding
    "skip-mixed": {"in_channels": 3, "out_channels": 3, "act_fn": "gelu",
                   "down_block_types": ["SkipDownBlock2D", "SkipDownBlock2D", "DownBlock2D"],
                   "up_block_types": ["UpBlock2D", "SkipUpBlock2D", "SkipUpBlock2D"]},
}
TOL = 1e-5   # max |ours - float64 diffusers| / max |float64 diffusers|


@functools.lru_cache(maxsize=None)
def model(case: str):
    """(config, weights): random_weights perturbed by 0.05 randn, so that no weight is zero (a
    zero-initialised time_emb_proj would hide the scale and shift)."""
    cfg = UNetConfig.from_dict({**fastddpm.train.DIGITS_UNET, **CASES[case]})
    rng = np.random.default_rng(5)
    w = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in random_weights(cfg, 3).items()}
    if cfg.time_embedding_type == "fourier":   # GaussianFourierProjection's own init: 16 N(0, 1)
        w["time_proj.weight"] = (16 * rng.standard_normal(w["time_proj.weight"].shape)).astype(np.float32)
    return cfg, w


@functools.lru_cache(maxsize=None)
def diffusers_model(case: str):
    cfg, w = model(case)
    net = diffusers.UNet2DModel.from_config(cfg.to_dict())
    net.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()}, strict=True)
    return net.double().eval()


def inputs(case: str, batch: int, h: int = 16, w: int = 16):
    cfg, _ = model(case)
    rng = np.random.default_rng(batch + h)
    x = rng.standard_normal((batch, cfg.in_channels, h, w)).astype(np.float32)
    t = rng.integers(0, 1000, size=batch)
    if cfg.time_embedding_type == "fourier":   # noise levels sigma > 0 (ln t), float32 values
        t = rng.uniform(0.01, 50.0, size=batch).astype(np.float32).astype(np.float64)
    labels = rng.integers(0, cfg.num_class_embeds, size=batch) if cfg.num_class_embeds else None
    return x, t, labels


@functools.lru_cache(maxsize=None)
def oracle(case: str, batch: int, h: int = 16, w: int = 16) -> np.ndarray:
    x, t, labels = inputs(case, batch, h, w)
    with torch.no_grad():
        out = diffusers_model(case)(torch.from_numpy(x).double(), torch.from_numpy(t),
                                    class_labels=None if labels is None else torch.from_numpy(labels))
    return out.sample.numpy()


def scaled_err(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def class_rows(case: str, labels):
    cfg, w = model(case)
    if labels is None:
        return None
    return class_embedding(cfg, w, check_labels(cfg, labels, len(labels)))


def test_config_round_trips_and_weight_shapes_match_diffusers():
    for case in CASES:
        cfg, _ = model(case)
        net = diffusers_model(case)
        assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == weight_shapes(cfg), case
        assert UNetConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("case", list(CASES))
def test_plan_float64_interpreter_matches_diffusers(case):
    cfg, w = model(case)
    x, t, labels = inputs(case, 2)
    plan = build_plan(cfg, 2, 16, 16)
    if cfg.resnet_time_scale_shift == "scale_shift":   # the fusion this test is about is in the plan
        assert any(op.kind == "GROUPNORM" and op.temb >= 0 for op in plan.ops)
        assert not any(op.kind == "CONV" and op.temb >= 0 for op in plan.ops)
    got = run_plan(plan, {k: v.astype(np.float64) for k, v in w.items()}, x.astype(np.float64), t,
                   class_emb=class_rows(case, labels))
    # not ~1e-12: diffusers computes the sinusoidal time embedding in float32 even in a float64
    # model (get_timestep_embedding), which moves its output by a few 1e-7
    assert scaled_err(got, oracle(case, 2)) <= 2e-6


@pytest.mark.parametrize("case", list(CASES))
def test_reference_unet_matches_diffusers(case):
    from fastddpm.reference import ReferenceUNet
    cfg, w = model(case)
    x, t, labels = inputs(case, 2)
    ref = ReferenceUNet.from_weights(cfg, w)
    with torch.no_grad():
        ce = class_rows(case, labels)
        got = ref(torch.from_numpy(x), torch.from_numpy(t),
                  class_emb=None if ce is None else torch.from_numpy(ce)).numpy()
    assert scaled_err(got, oracle(case, 2)) <= TOL


ISAS = CPU_BACKEND.supported_isas() if _C is not None else []
SHAPES = [(1, 16, 16), (3, 12, 20)]   # the second: not square, 3x5 at the bottom


@pytest.mark.skipif(_C is None, reason="fastddpm._C is not built")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("batch,h,w", SHAPES, ids=[f"n{b}-{h}x{w}" for b, h, w in SHAPES])
@pytest.mark.parametrize("case", list(CASES))
def test_native_cpu_forward_matches_diffusers(case, batch, h, w, isa):
    cfg, weights = model(case)
    x, t, labels = inputs(case, batch, h, w)
    with using(("native-cpu", isa)):
        eng = CPU_BACKEND.make_engine(cfg, weights, batch, h, w)
        got = eng.forward(x, t, class_rows(case, labels))
        assert scaled_err(got, oracle(case, batch, h, w)) <= TOL, (case, isa)
        # a sample alone gives its own row, bit for bit
        one = CPU_BACKEND.make_engine(cfg, weights, 1, h, w).forward(
            x[-1:], t[-1:], None if labels is None else class_rows(case, labels[-1:]))
        np.testing.assert_array_equal(one, got[-1:])


@pytest.mark.parametrize("case", list(CASES))
def test_numba_forward_matches_diffusers(case):
    pytest.importorskip("numba")
    be = get_backend("numba")
    cfg, weights = model(case)
    x, t, labels = inputs(case, 3, 12, 20)
    got = be.make_engine(cfg, weights, 3, 12, 20).forward(x, t, class_rows(case, labels))
    assert scaled_err(got, oracle(case, 3, 12, 20)) <= TOL, case


@pytest.mark.parametrize("case", ["scale_shift", "mish", "gelu", "relu"])
def test_the_options_change_the_output(case):
    """Against the digits U-Net with the same weights where shapes agree (SiLU, default time
    embedding): a model whose option were ignored would agree with it."""
    base_cfg = UNetConfig.from_dict(fastddpm.train.DIGITS_UNET)
    cfg, w = model(case)
    if cfg.resnet_time_scale_shift == "scale_shift":   # the base has half the time_emb_proj rows
        w = {k: (v[: v.shape[0] // 2] if "time_emb_proj" in k else v) for k, v in w.items()}
    w = {**random_weights(base_cfg, 3), **w}           # and a mid-attention norm the scale_shift model lacks
    x, t, _ = inputs(case, 2)
    base = run_plan(build_plan(base_cfg, 2, 16, 16), {k: v.astype(np.float64) for k, v in w.items()},
                    x.astype(np.float64), t)
    assert scaled_err(base, oracle(case, 2)) > 1e-2


def test_learned_time_embedding_refuses_fractional_or_out_of_range_timesteps():
    cfg, weights = model("learned-time")
    x, _, _ = inputs("learned-time", 2)
    engines = {"numba": get_backend("numba")} if not isinstance(get_backend("numba"), str) else {}
    if _C is not None:
        engines["native-cpu"] = CPU_BACKEND
    assert engines
    for name, be in engines.items():
        eng = be.make_engine(cfg, weights, 2, 16, 16)
        for bad in ([3.5, 4.0], [-1.0, 2.0], [999.0, 1000.0]):
            with pytest.raises(ValueError, match="integer timesteps"):
                eng.forward(x, np.array(bad))
        eng.forward(x, np.array([0.0, 999.0]))      # the table's first and last rows
    with pytest.raises(UNetConfigError, match="num_train_timesteps"):
        UNetConfig.from_dict({**fastddpm.train.DIGITS_UNET, "time_embedding_type": "learned"})
    with pytest.raises(UNetConfigError, match="class_embed_type 'timestep' with time_embedding_type 'learned'"):
        UNetConfig.from_dict({**fastddpm.train.DIGITS_UNET, "time_embedding_type": "learned",
                              "num_train_timesteps": 1000, "class_embed_type": "timestep"})


def test_fourier_time_embedding_refuses_timesteps_that_are_not_positive():
    cfg, weights = model("fourier-time")
    x, t, _ = inputs("fourier-time", 2)
    engines = [CPU_BACKEND] if _C is not None else []
    if not isinstance(get_backend("numba"), str):
        engines.append(get_backend("numba"))
    assert engines
    for be in engines:
        eng = be.make_engine(cfg, weights, 2, 16, 16)
        for bad in ([0.0, 1.0], [2.0, -0.5]):
            with pytest.raises(ValueError, match="> 0"):
                eng.forward(x, np.array(bad))
        assert np.isfinite(eng.forward(x, t)).all()


def _plan_rows(case: str):
    cfg, w = model(case)
    plan = build_plan(cfg, 1, 16, 16)
    return plan, plan.arrays(), [w[n] for n in plan.weight_names]


@pytest.mark.skipif(_C is None, reason="fastddpm._C is not built")
def test_the_core_refuses_bad_activation_flags_and_short_scale_shift_rows():
    plan, arrays, weights = _plan_rows("scale_shift")
    k = next(i for i, op in enumerate(plan.ops) if op.kind == "GROUPNORM" and op.temb >= 0)
    f = plan_mod.INT_FIELDS.index("flags")

    def build(ints, sizes=None):
        _C.Engine(ints, arrays["floats"], arrays["slot_sizes"] if sizes is None else sizes,
                  list(zip(plan.weight_names, weights)), 1, 1, 1, 16, 16)

    build(arrays["ints"])                     # as planned: accepted
    two = arrays["ints"].copy()
    two[k, f] |= plan_mod.FLAG_MISH          # SiLU and Mish at once
    with pytest.raises(ValueError, match="two activations"):
        build(two)
    unknown = arrays["ints"].copy()
    unknown[k, f] |= 64
    with pytest.raises(ValueError, match="unknown flag"):
        build(unknown)
    short = arrays["ints"].copy()                  # rows from a (new) slot of C floats, not 2C
    short[k, plan_mod.INT_FIELDS.index("temb")] = len(arrays["slot_sizes"])
    sizes = np.append(arrays["slot_sizes"], plan.ops[k].c_in + plan.ops[k].c_in2)
    with pytest.raises(ValueError, match="scale_shift rows"):
        build(short, sizes)


@pytest.mark.skipif(_C is None, reason="fastddpm._C is not built")
def test_the_core_refuses_bad_resampling():
    plan, arrays, weights = _plan_rows("resnet-resample")
    ints = arrays["ints"]
    col = {f: plan_mod.INT_FIELDS.index(f) for f in ("mode", "h", "w")}
    k = next(i for i, op in enumerate(plan.ops) if op.kind == "RESAMPLE")
    g = next(i for i, op in enumerate(plan.ops) if op.kind == "GROUPNORM" and op.mode == plan_mod.RESAMPLE_MODES["POOL"])

    def build(change):
        bad = ints.copy()
        change(bad)
        _C.Engine(bad, arrays["floats"], arrays["slot_sizes"], list(zip(plan.weight_names, weights)), 1, 1, 1, 16, 16)

    with pytest.raises(ValueError, match="unknown resample mode"):
        build(lambda a: a.__setitem__((k, col["mode"]), 5))
    with pytest.raises(ValueError, match="unknown resample mode"):
        build(lambda a: a.__setitem__((g, col["mode"]), plan_mod.RESAMPLE_MODES["NEAREST"]))
    flags = plan_mod.INT_FIELDS.index("flags")
    with pytest.raises(ValueError, match="padded output"):   # pooled norm output written unpadded
        build(lambda a: a.__setitem__((g, flags), a[g, flags] & ~plan_mod.FLAG_PADDED_OUT))


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_forward_matches_diffusers(case):
    from fastddpm.executors import EngineOptions
    from fastddpm.executors.native_cuda import CUDA_BACKEND
    cfg, weights = model(case)
    x, t, labels = inputs(case, 3, 12, 20)
    eng = CUDA_BACKEND.make_engine(cfg, weights, 3, 12, 20, EngineOptions(dtype="fp32"))
    got = eng.forward(x, t, class_rows(case, labels))
    assert scaled_err(got, oracle(case, 3, 12, 20)) <= TOL, case


def test_skip_block_rules_are_refused_by_name():
    """What diffusers' forward would trip over (or build wrong) with the skip blocks: refused when the config is read."""
    base = {**fastddpm.train.DIGITS_UNET, **CASES["ncsnpp"]}
    bad = {
        "norm_num_groups null is supported with the score-SDE skip blocks only":
            dict(down_block_types=["DownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D"]),
        "after a non-skip block": dict(norm_num_groups=8, block_out_channels=[32, 32, 64],
                                       down_block_types=["DownBlock2D", "SkipDownBlock2D", "SkipDownBlock2D"]),
        "must be the last ones": dict(norm_num_groups=8, up_block_types=["SkipUpBlock2D", "UpBlock2D", "SkipUpBlock2D"]),
        "in_channels must be 3": dict(in_channels=1),
        "out_channels must be 3": dict(out_channels=1),
        "center_input_sample": dict(center_input_sample=True),
        "attention norm has 32 groups": dict(block_out_channels=[32, 48, 64]),
    }
    for message, change in bad.items():
        with pytest.raises(UNetConfigError, match=message):
            UNetConfig.from_dict({**base, **change})
    # a skip block that does not downsample (the last) may follow plain blocks, and plain up blocks may
    # precede the skip ones: both run in diffusers, both accepted
    UNetConfig.from_dict({**base, "norm_num_groups": 8, "down_block_types": ["DownBlock2D", "DownBlock2D", "SkipDownBlock2D"]})


def test_skip_blocks_use_fir_resampling_and_the_pyramids():
    """The plan of the NCSN++ case has what the diffusers match depends on (so a later plan change
    that drops one would show here, not only as a tolerance miss)."""
    plan = build_plan(model("ncsnpp")[0], 1, 16, 16)
    modes = [op.mode for op in plan.ops if op.kind == "RESAMPLE"]
    R = plan_mod.RESAMPLE_MODES
    # per resampling level (2 each way): the FIR resnet's norm1 output and input, and the pyramid
    assert modes.count(R["FIR_DOWN"]) == 2 * 3 and modes.count(R["FIR_UP"]) == 2 * 3
    assert sum(op.kind == "CONV" and op.name.endswith("skip_conv") for op in plan.ops) == 4
    assert next(op for op in plan.ops if op.name == "conv_out").residual >= 0            # + the output pyramid
