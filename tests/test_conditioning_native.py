"""Class conditioning and classifier-free guidance on the C++ core (fastddpm._C, native-cpu):

- the conditional forward (the class slot, time_embedding.linear_2's residual) for every
  class_embed_type against diffusers' UNet2DModel and the reference U-Net, on every ISA path;
- the guided fused step (step.h step_guided_output) against a float64 NumPy formula on every ISA
  path, with and without the multistep history, given and Philox noise, awkward sizes;
- whole guided runs against a Python loop of reference forwards on [x, x] + the NumPy guidance
  combination + the unguided fused step; batch invariance and first_index of guided runs;
- the errors of a wrong class_emb or guidance.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

import fastddpm
import fastddpm.train
from fastddpm import plan as plan_mod
from fastddpm.coefficients import A_M, C_X0, D_M, H1, H2
from fastddpm.conditioning import check_labels, class_embedding
from fastddpm.executors.native import CPU_BACKEND, _C
from fastddpm.schedulers import scheduler_for
from fastddpm.unet_config import UNetConfig, random_weights

from _stepkit import assert_step_close, history_inputs, history_reference, history_row, using

pytestmark = pytest.mark.skipif(_C is None, reason="fastddpm._C is not built")

torch = pytest.importorskip("torch")
from fastddpm.reference import ReferenceUNet  # noqa: E402

ISAS = CPU_BACKEND.supported_isas() if _C is not None else []


@pytest.fixture(params=ISAS)
def isa(request):
    with using(("native-cpu", request.param)):
        yield request.param


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- models ------------------------------------------------------------------------------------

NUM_CLASSES = 11   # 10 digits + the null class (the last row)
KINDS = {"table": {"num_class_embeds": NUM_CLASSES}, "timestep": {"class_embed_type": "timestep"},
         "identity": {"class_embed_type": "identity"}}


@functools.lru_cache(maxsize=None)
def model(kind: str | None, perturbed: bool = True):
    """(config, weights) of the digits U-Net with this class embedding kind (None: unconditional):
    random_weights with every weight perturbed by 0.05 * randn so that nothing is zero (the forward
    checks), or as they are (the runs: a 10-step DDIM run amplifies a float32 difference of the
    model output by ~1/sqrt(abar) each step, and the perturbed net by some 2x more per step)."""
    cfg = UNetConfig.from_dict({**fastddpm.train.DIGITS_UNET, **(KINDS[kind] if kind else {})})
    w = random_weights(cfg, seed=2)
    if perturbed:
        rng = np.random.default_rng(11)
        w = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in w.items()}
    return cfg, w


def labels_for(kind: str, n: int, seed: int = 0):
    """n labels of the kind as a caller gives them: ints (the null class among them), real
    timesteps-like numbers, or float embeddings [n, D]."""
    rng = np.random.default_rng(seed)
    if kind == "table":
        return np.array([(3 * i + seed) % NUM_CLASSES for i in range(n - 1)] + [NUM_CLASSES - 1], np.int64)[:n]
    if kind == "timestep":
        return np.linspace(2.5, 990.0, n) + seed
    return rng.standard_normal((n, model(kind)[0].time_embed_dim)).astype(np.float32)


def class_rows(kind: str, labels, perturbed: bool = True) -> np.ndarray:
    cfg, w = model(kind, perturbed)
    n = len(labels)
    return class_embedding(cfg, w, check_labels(cfg, labels, n))


@functools.lru_cache(maxsize=None)
def diffusers_model(kind: str):
    diffusers = pytest.importorskip("diffusers")
    cfg, w = model(kind)
    with torch.device("meta"):
        net = diffusers.UNet2DModel.from_config(cfg.to_dict())
    net.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()}, strict=True, assign=True)
    return net.eval()


@functools.lru_cache(maxsize=None)
def reference(kind: str | None, perturbed: bool = True):
    cfg, w = model(kind, perturbed)
    return ReferenceUNet.from_weights(cfg, w)


# -- (a) the conditional forward ---------------------------------------------------------------

FORWARD_CASES = [(1, 16, 16), (3, 16, 16), (3, 12, 20)]   # the last: not square, 3x5 at the bottom


@pytest.mark.parametrize("batch,h,w", FORWARD_CASES, ids=[f"n{b}-{h}x{w}" for b, h, w in FORWARD_CASES])
@pytest.mark.parametrize("kind", list(KINDS))
def test_conditional_forward_matches_diffusers_and_reference(isa, kind, batch, h, w):
    cfg, weights = model(kind)
    eng = CPU_BACKEND.make_engine(cfg, weights, batch, h, w)
    assert eng.conditional and eng._engine.class_dim == cfg.time_embed_dim
    rng = np.random.default_rng(batch + h)
    x = rng.standard_normal((batch, cfg.in_channels, h, w)).astype(np.float32)
    t = rng.integers(0, 1000, size=batch)
    labels = labels_for(kind, batch, seed=batch)
    ce = class_rows(kind, labels)
    out = eng.forward(x, t, ce)
    with torch.no_grad():
        want = diffusers_model(kind)(torch.from_numpy(x), torch.from_numpy(t),
                                     class_labels=torch.from_numpy(np.asarray(labels))).sample.numpy()
        ref = reference(kind)(torch.from_numpy(x), torch.from_numpy(t), class_emb=torch.from_numpy(ce)).numpy()
        uncond = reference(kind)(torch.from_numpy(x), torch.from_numpy(t),
                                 class_emb=torch.zeros(batch, cfg.time_embed_dim)).numpy()
    assert rel_err(out, want) <= 1e-4, (kind, rel_err(out, want))
    assert rel_err(out, ref) <= 2e-5, (kind, rel_err(out, ref))
    assert rel_err(uncond, ref) > 1e-2   # the class embedding matters: the comparison means something
    # rows are independent: each sample alone gives its own row
    one = CPU_BACKEND.make_engine(cfg, weights, 1, h, w).forward(x[-1:], t[-1:], ce[-1:])
    np.testing.assert_array_equal(one, out[-1:])


def test_unconditional_plans_have_no_class_slot():
    cfg, w = model(None)
    eng = CPU_BACKEND.make_engine(cfg, w, 2, 16, 16)
    assert not eng.conditional and eng._engine.class_dim == 0
    assert _C.layout()["class_slot"] == plan_mod.CLASS_SLOT


# -- (b) the guided fused step -----------------------------------------------------------------

def guided_reference(row, x, mc, mu, w, z, hs):
    """float64 (y, bound scale, x0, x0 scale) of the guided step: the step of history_reference with
    m = m_u + w (m_c - m_u), its scale widened by the rounding of that combination (three float32
    operations on terms no larger than |m_u| + |w| (|m_c| + |m_u|), through a_m and d_m)."""
    mc64, mu64 = mc.astype(np.float64), mu.astype(np.float64)
    m = mu64 + w * (mc64 - mu64)
    y, scale, x0, x0_scale = history_reference(row, x, m, z, hs)
    m_scale = np.abs(mu64) + abs(w) * (np.abs(mc64) + np.abs(mu64))
    r = row.astype(np.float64)
    return (y, scale + (abs(r[C_X0] * r[A_M]) + abs(r[D_M])) * m_scale,
            x0, x0_scale + abs(r[A_M]) * m_scale)


GUIDED_SHAPES = [(1, 1), (2, 17), (1, 37), (3, 5, 7, 3), (2, 16384 + 77)]
WEIGHTS = [0.0, 1.0, 2.5, 7.0]


@pytest.mark.parametrize("history", ["none", "h1+h2"])
@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("shape", GUIDED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_guided_step_matches_float64(isa, shape, w, history):
    x, mc, z, a, b = history_inputs(shape, seed=sum(shape) + int(w))
    mu = np.random.default_rng(int(w * 10)).standard_normal(shape).astype(np.float32)
    row = history_row(clip=1.5)
    hs = [(a, row[H1]), (b, row[H2])] if history != "none" else []
    kw = {"h1": a, "h2": b} if hs else {}
    want, scale, x0_want, x0_scale = guided_reference(row, x, mc, mu, w, z, hs)
    out, x0 = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
    _C.fused_step(x, mc, out, row, 0, 5, 0, z, x0_out=x0, m_uncond=mu, guidance=w, **kw)
    assert_step_close(out, want, scale, f"{isa} w={w} {history}")
    assert_step_close(x0, x0_want, x0_scale, f"{isa} w={w} x0_out")
    # the kernel's combination is NumPy's float32 m_u + w (m_c - m_u) to the bit (no FMA on any
    # ISA): the guided step is the unguided step of that model output, bit for bit
    m32 = mu + np.float32(w) * (mc - mu)
    plain, x0_plain = np.empty_like(out), np.empty_like(out)
    _C.fused_step(x, m32, plain, row, 0, 5, 0, z, x0_out=x0_plain, **kw)
    np.testing.assert_array_equal(out, plain)
    np.testing.assert_array_equal(x0, x0_plain)
    # Philox noise made in the kernel = the given-noise path fed with the spec's normals
    seed, step, first = 99, 321, 4
    zs = fastddpm.noise(seed, shape, step, first)
    given, made = np.empty_like(out), np.empty_like(out)
    _C.fused_step(x, mc, given, row, seed, step, first, zs, m_uncond=mu, guidance=w, **kw)
    _C.fused_step(x, mc, made, row, seed, step, first, None, m_uncond=mu, guidance=w, **kw)
    np.testing.assert_array_equal(made, given)
    # in place on m_uncond, and through the backend's step (guide = (m_u, w))
    mu_inout = mu.copy()
    _C.fused_step(x, mc, mu_inout, row, seed, step, first, None, m_uncond=mu_inout, guidance=w, **kw)
    np.testing.assert_array_equal(mu_inout, made)
    table = np.stack([history_row(), row])
    via = np.empty_like(out)
    hist = (a, b, None) if hs else None
    CPU_BACKEND.step(x, mc, via, table, 1, seed, step, first, None, history=hist, guide=(mu, w))
    np.testing.assert_array_equal(via, made)


def test_guided_step_without_m_uncond_is_the_plain_step(isa):
    """The guided overload with m_uncond=None (guidance 1) is the plain step, to the bit."""
    x, m, _, _, _ = history_inputs((2, 131), seed=7)
    row = history_row()
    a, b = np.empty_like(x), np.empty_like(x)
    _C.fused_step(x, m, a, row, 3, 17, 1, None)
    _C.fused_step(x, m, b, row, 3, 17, 1, None, m_uncond=None, guidance=1.0)
    np.testing.assert_array_equal(a, b)


def test_guided_step_errors():
    x, m, z, _, _ = history_inputs((2, 10), seed=1)
    row, out = history_row(), np.empty_like(x)
    with pytest.raises(ValueError, match="guidance needs m_uncond"):
        _C.fused_step(x, m, out, row, 0, 5, 0, None, guidance=2.0)
    with pytest.raises(ValueError, match="m_uncond must have the shape"):
        _C.fused_step(x, m, out, row, 0, 5, 0, None, m_uncond=m[:1], guidance=2.0)
    with pytest.raises(TypeError, match="m_uncond must be a float32"):
        _C.fused_step(x, m, out, row, 0, 5, 0, None, m_uncond=m.astype(np.float64), guidance=2.0)
    with pytest.raises(ValueError, match="guidance must be finite"):
        _C.fused_step(x, m, out, row, 0, 5, 0, None, m_uncond=z, guidance=float("nan"))
    with pytest.raises(ValueError, match="x0_out must not be"):
        _C.fused_step(x, m, out, row, 0, 5, 0, None, x0_out=z, m_uncond=z, guidance=2.0)


# -- (c, d) guided runs ------------------------------------------------------------------------

H = W = 16
GUIDANCE = 3.0


def run_model():
    """The conditional model of the run checks: (config, weights) and its class rows of labels."""
    cfg, w = model("table", perturbed=False)
    return cfg, w, (lambda labels: class_rows("table", labels, perturbed=False))


def sampler(name: str, steps: int):
    return scheduler_for(name, fastddpm.DDPMScheduler().config, steps).schedule()


def python_guided_loop(schedule, ce, w, seed, first_index, n, forward=None):
    """The guided loop built from parts: forwards on [x, x] with the class rows (the reference
    U-Net's, or forward(x2, t)), the NumPy float32 guidance combination, and the unguided fused step
    (with a multistep schedule's x0 ring)."""
    cfg, _, _ = run_model()
    if forward is None:
        net = reference("table", perturbed=False)

        def forward(x2, t):
            with torch.no_grad():
                return net(torch.from_numpy(x2), t, class_emb=torch.from_numpy(ce)).numpy()
    x = fastddpm.noise(seed, (n, cfg.in_channels, H, W), -1, first_index)
    ring = [np.zeros_like(x) for _ in range(3)]
    frames = [x.copy()]
    for s, t in enumerate(schedule.timesteps):
        m = forward(np.concatenate([x, x]), int(t))
        mg = m[n:] + np.float32(w) * (m[:n] - m[n:])
        hist = {}
        if schedule.history:
            hist["x0_out"] = ring[s % 3]
            if s >= 1:
                hist["h1"] = ring[(s - 1) % 3]
            if schedule.history >= 2 and s >= 2:
                hist["h2"] = ring[(s - 2) % 3]
        out = np.empty_like(x)
        _C.fused_step(x, np.ascontiguousarray(mg), out, schedule.table, seed, int(t), first_index, None, s, **hist)
        x = out
        frames.append(x.copy())
    return x, frames


@pytest.mark.parametrize("name,steps", [("ddim", 10), ("dpm++2m", 8)])
def test_guided_run_matches_a_python_loop_of_reference_forwards(name, steps):
    cfg, weights, rows = run_model()
    n = 2
    labels = np.array([4, 7])
    ce = rows(np.concatenate([labels, np.full(n, NUM_CLASSES - 1)]))
    schedule = sampler(name, steps)
    assert schedule.history == (1 if name == "dpm++2m" else 0)
    eng = CPU_BACKEND.make_engine(cfg, weights, 2 * n, H, W)
    x, frames = eng.run(schedule, seed=21, first_index=5, keep=[0, 3, steps], class_emb=ce, guidance=GUIDANCE)
    _, want_frames = python_guided_loop(schedule, ce, GUIDANCE, 21, 5, n)
    assert x.shape == (n, cfg.in_channels, H, W)
    np.testing.assert_array_equal(frames[0], want_frames[0])          # x_T of the n samples
    np.testing.assert_array_equal(frames[steps], x)
    for k in (3, steps):
        err = float(np.abs(frames[k] - want_frames[k]).max())
        assert err <= 1e-3, (name, k, err)
    # guidance changes the samples: w = 0 (the null class alone) and w = 1 differ from w = 3
    x1, _ = eng.run(schedule, seed=21, first_index=5, class_emb=ce, guidance=1.0)
    assert float(np.abs(x1 - x).max()) > 1e-2


@pytest.mark.parametrize("name", ["ddim", "dpm++2m"])
def test_guided_run_is_the_loop_of_its_own_forward_bit_for_bit(name):
    """The engine's loop = its forward on [x, x] + NumPy's float32 m_u + w (m_c - m_u) + the
    unguided fused step (with the x0 ring), to the bit: the guided step's combination is rounded as
    written (step.h step_guided_output), on every ISA path."""
    cfg, weights, rows = run_model()
    ce = rows(np.array([5, 1, 10, 10]))
    schedule = sampler(name, 6)
    eng = CPU_BACKEND.make_engine(cfg, weights, 4, H, W)
    for isa in ISAS:
        with using(("native-cpu", isa)):
            x, frames = eng.run(schedule, seed=3, first_index=2, keep=list(range(7)), class_emb=ce, guidance=2.5)
            _, want = python_guided_loop(schedule, ce, 2.5, 3, 2, 2, forward=lambda x2, t: eng.forward(x2, t, ce))
        for k in range(7):
            np.testing.assert_array_equal(frames[k], want[k], err_msg=f"{isa} position {k}")


def test_unguided_conditional_run_matches_a_python_loop():
    """Without guidance a conditional run makes batch samples, each with its own class row."""
    cfg, weights, rows = run_model()
    ce = rows(np.array([1, 9, 10]))
    schedule = sampler("ddim", 6)
    eng = CPU_BACKEND.make_engine(cfg, weights, 3, H, W)
    x, _ = eng.run(schedule, seed=4, class_emb=ce)
    want = fastddpm.noise(4, x.shape, -1)
    for s, t in enumerate(schedule.timesteps):
        m = eng.forward(want, int(t), ce)
        out = np.empty_like(want)
        _C.fused_step(want, m, out, schedule.table, 4, int(t), 0, None, s)
        want = out
    np.testing.assert_array_equal(x, want)


@pytest.mark.parametrize("name", ["ddim", "dpm++2m"])
def test_guided_runs_are_batch_invariant_and_take_first_index(name):
    cfg, weights, rows = run_model()
    labels = np.array([0, 3, 5, 8, 9])
    null = NUM_CLASSES - 1
    schedule = sampler(name, 5)

    def run(lab, first_index=0):
        n = len(lab)
        ce = rows(np.concatenate([lab, np.full(n, null)]))
        eng = CPU_BACKEND.make_engine(cfg, weights, 2 * n, H, W)
        return eng.run(schedule, seed=8, first_index=first_index, class_emb=ce, guidance=2.5)[0]

    five = run(labels)
    np.testing.assert_array_equal(run(labels[:3]), five[:3])
    np.testing.assert_array_equal(run(labels[3:], first_index=3), five[3:])


def test_guided_run_ring_grows_after_a_smaller_run():
    """The history ring holds the samples of the run: a guided run (n = N/2) then an unguided one
    (n = N) on one engine give what fresh engines give."""
    cfg, weights, rows = run_model()
    schedule = sampler("dpm++2m", 4)
    ce = rows(np.array([2, 6, 10, 10]))
    eng = CPU_BACKEND.make_engine(cfg, weights, 4, H, W)
    guided = eng.run(schedule, seed=2, class_emb=ce, guidance=2.0)[0]
    plain = eng.run(schedule, seed=2, class_emb=ce)[0]
    fresh = CPU_BACKEND.make_engine(cfg, weights, 4, H, W)
    np.testing.assert_array_equal(plain, fresh.run(schedule, seed=2, class_emb=ce)[0])
    np.testing.assert_array_equal(guided, fresh.run(schedule, seed=2, class_emb=ce, guidance=2.0)[0])


# -- (e) errors --------------------------------------------------------------------------------

def assert_class_emb_refusals(make_engine):
    """The refusals every engine shares, through the Engine API (executors/base.py checks first) and
    its native forward; make_engine(cfg, weights, batch) -> Engine. Returns (conditional engine of
    batch 2, unconditional one of batch 2, class rows of the first, a 2-step schedule)."""
    cfg, weights = model("table")
    eng, odd = make_engine(cfg, weights, 2), make_engine(cfg, weights, 3)
    ucfg, uweights = model(None)
    uncond = make_engine(ucfg, uweights, 2)
    assert uncond._engine.class_dim == 0
    x, t = np.zeros((2, 1, H, W), np.float32), np.zeros(2, np.float32)
    ce = class_rows("table", np.array([1, 10]))
    schedule = sampler("ddim", 2)
    with pytest.raises(ValueError, match="class_emb .* is required"):
        eng.forward(x, 5)
    with pytest.raises(ValueError, match="no class embedding"):
        uncond.forward(x, 5, ce)
    with pytest.raises(ValueError, match="shape"):
        eng.forward(x, 5, ce[:1])
    with pytest.raises(ValueError, match="float32"):
        eng.forward(x, 5, ce.astype(np.float64))
    with pytest.raises(ValueError, match="is required"):
        eng.run(schedule, seed=0)
    with pytest.raises(ValueError, match="even engine batch"):
        odd.run(schedule, seed=0, class_emb=class_rows("table", np.array([1, 2, 3])), guidance=2.0)
    with pytest.raises(ValueError, match="class-conditional"):
        uncond.run(schedule, seed=0, guidance=2.0)
    # ... and by the native engine itself
    bad = ce.copy()
    bad[1, 3] = np.inf
    with pytest.raises(ValueError, match="is required"):
        eng._engine.forward(x, t)
    with pytest.raises(ValueError, match="no class embedding"):
        uncond._engine.forward(x, t, ce)
    with pytest.raises(ValueError, match=rf"class_emb must have shape \[2, {cfg.time_embed_dim}\]"):
        eng._engine.forward(x, t, np.zeros((2, cfg.time_embed_dim + 1), np.float32))
    with pytest.raises(TypeError, match="float32"):
        eng._engine.forward(x, t, ce.astype(np.float64))
    with pytest.raises(TypeError, match="float32"):
        eng._engine.forward(x, t, ce.tolist())
    with pytest.raises(ValueError, match="finite"):
        eng._engine.forward(x, t, bad)
    return eng, uncond, ce, schedule


def test_class_emb_and_guidance_errors():
    eng, uncond, ce, schedule = assert_class_emb_refusals(
        lambda cfg, weights, batch: CPU_BACKEND.make_engine(cfg, weights, batch, H, W))
    table, ts = schedule.table, schedule.timesteps
    odd = CPU_BACKEND.make_engine(*model("table"), 3, H, W)
    with pytest.raises(ValueError, match="is required"):
        eng._engine.run(table, ts, 0, 0, [], None, 1, 0)
    with pytest.raises(ValueError, match="even engine batch"):
        odd._engine.run(table, ts, 0, 0, [], None, 1, 0, class_rows("table", np.array([1, 2, 3])), 2.0)
    with pytest.raises(ValueError, match="guidance needs a class-conditional plan"):
        uncond._engine.run(table, ts, 0, 0, [], None, 1, 0, None, 2.0)
    with pytest.raises(ValueError, match="guidance must be finite"):
        eng._engine.run(table, ts, 0, 0, [], None, 1, 0, ce, float("inf"))
    with pytest.raises(TypeError, match="guidance must be None or a float"):
        eng._engine.run(table, ts, 0, 0, [], None, 1, 0, ce, "2")
    with pytest.raises(ValueError, match=r"first_index \+ i must lie"):
        eng._engine.run(table, ts, 0, 2**32 - 1, [], None, 1, 0, ce, None)
    # a guided run of n = 1 may start at the last index; an unguided one of 2 may not
    assert eng._engine.run(table, ts, 0, 2**32 - 1, [], None, 1, 0, ce, 2.0)[0].shape == (1, 1, H, W)
