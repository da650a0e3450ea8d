"""One layout for every language: the op codes, plan columns and flags of plan.py, the coefficient
columns of schedulers.py, the noise constants of philox.py and the numba engine's column indices
are what the C++ headers say (exported by both extensions as layout())."""

import pytest

from fastddpm import coefficients, plan
from fastddpm.executors import native_cuda
from fastddpm.executors.native import _C

from fastddpm import philox as noise


def _layouts():
    out = []
    if _C is not None:
        out.append(("_C", _C.layout()))
    if native_cuda._C_cuda is not None:
        out.append(("_C_cuda", native_cuda._C_cuda.layout()))
    if not out:
        pytest.skip("neither compiled extension is built (the numba-only install)")
    return out


def test_python_tables_equal_the_compiled_ones():
    for name, lay in _layouts():
        assert lay["op_codes"] == plan.OP_CODES, name
        assert lay["conv_modes"] == plan.CONV_MODES, name
        assert lay["resample_modes"] == plan.RESAMPLE_MODES, name
        assert lay["time_modes"] == plan.TIME_MODES, name
        assert lay["flags"] == {"silu": plan.FLAG_SILU, "padded_out": plan.FLAG_PADDED_OUT,
                                "flip": plan.FLAG_FLIP, "mish": plan.FLAG_MISH, "gelu": plan.FLAG_GELU,
                                "relu": plan.FLAG_RELU}, name
        assert {k: v for k, v in lay["flags"].items() if v in plan.ACT_FLAGS.values()} == \
            {k: v for k, v in plan.ACT_FLAGS.items() if k}, name
        assert tuple(lay["int_fields"]) == plan.INT_FIELDS, name
        assert tuple(lay["float_fields"]) == plan.FLOAT_FIELDS, name
        assert (lay["input_slot"], lay["output_slot"]) == (plan.INPUT_SLOT, plan.OUTPUT_SLOT), name
        assert tuple(lay["coef_columns"]) == coefficients.COEF_COLUMNS, name
        assert lay["initial_noise_step"] == noise.INITIAL_STEP, name


def test_plan_rows_follow_the_column_names():
    op = plan.Op("CONV", out=3, in_=4, c_in=5, in2=6, c_in2=7, h=8, w=9, c_out=10, w_idx=11, b_idx=12,
                 w2_idx=13, b2_idx=14, temb=15, residual=16, scratch=17, mode=2, groups=18, heads=19,
                 act="silu", flip=True, eps=0.5, scale=0.25, a=2.0, shift=-1.0)
    row = dict(zip(plan.INT_FIELDS, op.int_row()))
    assert row["code"] == plan.OP_CODES["CONV"] and row["flags"] == plan.FLAG_SILU | plan.FLAG_FLIP
    assert all(row[f] == getattr(op, f) for f in plan.INT_FIELDS if f not in ("code", "flags"))
    assert dict(zip(plan.FLOAT_FIELDS, op.float_row())) == {"eps": 0.5, "scale": 0.25, "a": 2.0, "shift": -1.0}


def test_the_numba_engine_reads_the_same_columns():
    ne = pytest.importorskip("fastddpm.executors.numba_engine")
    names = {"I_CODE": "code", "I_OUT": "out", "I_IN": "in_", "I_CIN": "c_in", "I_IN2": "in2", "I_CIN2": "c_in2",
             "I_H": "h", "I_W": "w", "I_COUT": "c_out", "I_WI": "w_idx", "I_BI": "b_idx", "I_W2": "w2_idx",
             "I_B2": "b2_idx", "I_TEMB": "temb", "I_RES": "residual", "I_SCR": "scratch", "I_MODE": "mode",
             "I_GROUPS": "groups", "I_HEADS": "heads", "I_FLAGS": "flags"}
    assert {getattr(ne, k) for k in names} == set(range(len(plan.INT_FIELDS)))
    for const, field in names.items():
        assert getattr(ne, const) == plan.INT_FIELDS.index(field), const
