"""The CUDA engine (fastddpm._C_cuda.Engine) op by op: the hand-built single-op plans of
test_engine_cpu.py (tests/_plan_cases.py) in each precision, against the float64 NumPy interpreter
of the plan (relative L2 within TOL[dtype]; each test prints its measured error), and a conv's
batch invariance. Every test is marked `cuda`: conftest skips them where no GPU is usable.
"""
import numpy as np
import pytest

from fastddpm.executors.engine_options import cuda_engine_options
from fastddpm.executors.native_cuda import _C_cuda

from _plan_cases import (ATTENTION_SHAPES, attention_case, check_ops, conv_mode_case,
                         groupnorm_concat_shortcut_residual_cases, plan_arrays,
                         time_emb_linear_cases)

# relative L2 error vs the float64 interpreter, per engine precision (the dtype of the GEMMs)
TOL = {"fp32": 1e-4, "tf32": 3e-3, "fp16": 3e-3, "bf16": 2e-2}
DTYPES = ["fp32", "tf32", "bf16", "fp16"]

cuda = pytest.mark.cuda


def _maker(dtype):
    """check_ops' make_engine for a CUDA engine in `dtype` on device 0 (1x1 "pixels")."""
    def make(ints, floats, slot_sizes, weights, batch, in_c, out_c):
        return _C_cuda.Engine(ints, floats, slot_sizes, weights, batch, in_c, out_c, 1, 1, dtype, 0,
                              **cuda_engine_options())
    return make


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_op_time_embedding_and_linear(dtype):
    """No GEMM here (the embedding and the linears run in fp32 whatever the dtype): every dtype
    must give the fp32 answer."""
    for i, case in enumerate(time_emb_linear_cases()):
        err = check_ops(_maker(dtype), *case)
        print(f"time embedding + linear case {i}, {dtype}: rel L2 {err:.2e}")
        assert err <= TOL["fp32"]


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["CONV3", "CONV1", "DOWN1", "DOWN0", "UP"])
def test_cuda_op_conv_modes(dtype, mode):
    err = check_ops(_maker(dtype), *conv_mode_case(mode))
    print(f"conv {mode}, {dtype}: rel L2 {err:.2e}")
    assert err <= TOL[dtype]


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_op_groupnorm_concat_shortcut_residual(dtype):
    for i, case in enumerate(groupnorm_concat_shortcut_residual_cases()):
        err = check_ops(_maker(dtype), *case)
        print(f"groupnorm/concat/shortcut/residual case {i}, {dtype}: rel L2 {err:.2e}")
        assert err <= TOL[dtype]


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,c,h,w", ATTENTION_SHAPES)
def test_cuda_op_attention(dtype, heads, c, h, w):
    err = check_ops(_maker(dtype), *attention_case(heads, c, h, w))
    print(f"attention heads={heads} c={c} {h}x{w}, {dtype}: rel L2 {err:.2e}")
    assert err <= TOL[dtype]


@cuda
def test_cuda_conv_batch_invariance():
    """fp32: a conv case (padded 3x3 conv + bias + time embedding) at batch 3 gives each sample
    the bits it gets alone at batch 1."""
    ops, sizes, weights = conv_mode_case("CONV3")[:3]
    make = _maker("fp32")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, sizes[0], 1, 1)).astype(np.float32)
    t = np.array([3.0, 811.0, 40.0], np.float32)
    args, _, _ = plan_arrays(ops, sizes, weights, 3)
    three = np.asarray(make(*args, 3, sizes[0], sizes[1]).forward(x, t))
    args, _, _ = plan_arrays(ops, sizes, weights, 1)
    one = make(*args, 1, sizes[0], sizes[1])
    for i in range(3):
        np.testing.assert_array_equal(three[i:i + 1], np.asarray(one.forward(x[i:i + 1], t[i:i + 1])))
