"""The plan (plan.py): its structure, its errors, and its meaning.

The meaning is checked by interpreting the op list in float64 NumPy (tests/plan_numpy.py) and
comparing with the reference U-Net (itself checked against diffusers): if the plan drops, reorders
or mis-wires an op, the interpreter's output differs. NumPy only in plan.py; torch only here.
"""
import numpy as np
import pytest

from fastddpm.plan import (CONV_MODES, FLOAT_FIELDS, INPUT_SLOT, INT_FIELDS, OP_CODES, OUTPUT_SLOT,
                           PlanError, build_plan)
from fastddpm.unet_config import PRESETS, UNetConfig, UNetConfigError, random_weights, weight_shapes

from plan_numpy import run_plan

torch = pytest.importorskip("torch")
from fastddpm.reference import ReferenceUNet  # noqa: E402

from test_unet_config import CONFIGS  # noqa: E402  (the configs that use every option)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# name, batch: every config option, batch 1 and odd batches
PLAN_CASES = [("bench-small", 2), ("ddpm-cifar10", 1), ("rgb64-heads", 1), ("gray16-noattn", 3),
              ("four-nonsquare", 3), ("odd-width", 1)]


@pytest.mark.parametrize("name,batch", PLAN_CASES, ids=[f"{n}-n{b}" for n, b in PLAN_CASES])
def test_plan_computes_the_reference_unet(name, batch):
    cfg = UNetConfig.from_dict(CONFIGS[name])
    plan = build_plan(cfg, batch)
    w = random_weights(cfg, seed=2)
    rng = np.random.default_rng(batch)
    x = rng.standard_normal(plan.input_shape).astype(np.float32)
    t = rng.integers(0, 1000, size=batch)
    ours = run_plan(plan, w, x, t)
    with torch.no_grad():
        ref = ReferenceUNet.from_weights(cfg, w)(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    # float64 plan vs float32 reference: the error is the reference's own rounding
    assert rel_err(ours, ref) <= 1e-5


def test_every_op_kind_and_conv_mode_is_used():
    kinds, modes = set(), set()
    for name in ("gray16-noattn", "rgb64-heads", "adm-learned", "fourier-gelu"):   # padding 0, 1; RESAMPLE; DIVIDE_BY_T
        for op in build_plan(UNetConfig.from_dict(CONFIGS[name]), 1).ops:
            kinds.add(op.kind)
            if op.kind == "CONV":
                modes.add(op.mode)
    assert kinds == set(OP_CODES)
    assert modes == set(CONV_MODES.values()) - {CONV_MODES["CONV1"]}  # 1x1 runs inside conv2


def test_fusions():
    plan = build_plan(UNetConfig.from_dict(PRESETS["bench-small"]), 1)
    kinds = [op.kind for op in plan.ops]
    # group norm carries the SiLU and writes the padded conv input
    assert any(op.kind == "GROUPNORM" and op.act == "silu" and op.padded_out for op in plan.ops)
    # resnet conv1: bias + time embedding; conv2: residual (same channels) or shortcut rows
    convs = [op for op in plan.ops if op.kind == "CONV"]
    assert sum(op.temb >= 0 for op in convs) == sum(k == "LINEAR" for k in kinds) - 2
    assert any(op.residual >= 0 for op in convs) and any(op.in2 >= 0 and op.w2_idx >= 0 for op in convs)
    # upsample folded into its conv; no separate upsample / concat / SiLU op exists
    assert sum(op.mode == CONV_MODES["UP"] for op in convs) == 2
    # the up-block concat is read in place: norms and pads with two sources
    assert any(op.kind == "GROUPNORM" and op.in2 >= 0 for op in plan.ops)


def test_slots_are_reused_and_never_alias_an_ops_inputs():
    plan = build_plan(UNetConfig.from_dict(PRESETS["ddpm-cifar10"]), 1)
    n_values = sum(1 for op in plan.ops) + 1
    assert len(plan.slot_sizes) < n_values // 4          # liveness reuse is effective
    assert plan.ops[0].kind == "TIME_EMB"
    live_writer = {}
    for i, op in enumerate(plan.ops):
        reads = {s for s in (op.in_, op.in2, op.temb, op.residual) if s >= 0}
        assert op.out not in reads and op.scratch not in reads and op.out != op.scratch
        for s in reads:  # a read slot still holds what its producer wrote
            assert s in live_writer or s == INPUT_SLOT, (i, op.name, s)
        live_writer[op.out] = i
        if op.scratch >= 0:
            live_writer.pop(op.scratch, None)
    assert plan.ops[-1].out == OUTPUT_SLOT and plan.ops[-1].name == "conv_out"
    # every slot is big enough for the largest tensor placed in it (checked again in C++)
    assert plan.slot_sizes[INPUT_SLOT] == 3 * 32 * 32 and plan.slot_sizes[OUTPUT_SLOT] == 3 * 32 * 32


def test_arrays_layout():
    plan = build_plan(UNetConfig.from_dict(PRESETS["bench-small"]), 3)
    a = plan.arrays()
    assert a["ints"].dtype == np.int64 and a["ints"].shape == (len(plan.ops), len(INT_FIELDS))
    assert a["floats"].dtype == np.float64 and a["floats"].shape == (len(plan.ops), len(FLOAT_FIELDS))
    assert a["ints"][0, 0] == OP_CODES["TIME_EMB"]
    assert a["slot_sizes"].tolist() == plan.slot_sizes
    assert plan.weight_names == list(weight_shapes(plan.config))
    assert a["weight_shapes"] == [tuple(s) for s in weight_shapes(plan.config).values()]
    attn = [op for op in plan.ops if op.kind == "ATTENTION"]
    assert plan.weight_names[attn[0].w_idx] == "down_blocks.1.attentions.0.to_q.weight"
    assert plan.weight_names[attn[0].w_idx + 7] == "down_blocks.1.attentions.0.to_out.0.bias"


def test_plan_errors_name_the_field():
    bad_block = dict(PRESETS["bench-small"], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"])
    with pytest.raises(UNetConfigError, match=r"down_block_types\[1\].*CrossAttnDownBlock2D"):
        build_plan(bad_block, 1)
    bad_groups = dict(PRESETS["bench-small"], norm_num_groups=5)
    with pytest.raises(UNetConfigError, match="not divisible by norm_num_groups = 5"):
        build_plan(bad_groups, 1)
    with pytest.raises(ValueError, match="height must be a positive multiple of 4"):
        build_plan(PRESETS["bench-small"], 1, 30, 32)
    with pytest.raises(ValueError, match="batch"):
        build_plan(PRESETS["bench-small"], 0)
    assert issubclass(PlanError, ValueError)
