"""The CUDA fused step next to a device-to-device copy and the reference step on the GPU.

Rows per size: "copy" (torch dst.copy_(src): 2 x 4 bytes per element, the ceiling of a streaming
kernel on this GPU, measured in the same run), "torch-ref" (the same maths in plain torch ops with
z = torch.randn, the baseline) and "native-cuda" (scheduler.step through the public path, Philox
noise made in the kernel, into a preallocated out). The step moves 3 x 4 bytes per element. Each
timed call ends in torch.cuda.synchronize, so a row is launch + kernel + sync, as a caller sees it.
Every answer is checked before it is timed; a wrong answer fails the row.
"""
import numpy as np
import pytest

import fastddpm
from fastddpm.philox import noise as noise_spec
from _gpu import gpu_reason  # benchmarks/ is on sys.path under pytest
from _stepcheck import check_step, expected_step

# the last two: 150 MB and 600 MB of step traffic, past the H200's 60 MB L2 (the bandwidth rows)
SIZES = {"1x1x32x32": (1, 1, 32, 32), "16x3x32x32": (16, 3, 32, 32), "64x3x256x256": (64, 3, 256, 256),
         "256x3x256x256": (256, 3, 256, 256)}


_NO_GPU = gpu_reason()
_NO_NATIVE = "; ".join(fastddpm.backends()["native-cuda"]["reasons"]) or None
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_NO_GPU is not None, reason=f"no usable GPU: {_NO_GPU}")]


def _setup(shape):
    import torch
    sched = fastddpm.DDPMScheduler(clip_sample=True)
    t = 500
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)  # [N, C, H, W]
    m = rng.standard_normal(shape, dtype=np.float32)  # [N, C, H, W] model output
    return sched, t, x, m, torch.from_numpy(x).cuda(), torch.from_numpy(m).cuda()




def _record(benchmark, shape, kind, impl, bytes_per_element):
    import torch
    n = int(np.prod(shape))
    benchmark.group = "cuda step " + "x".join(map(str, shape))
    benchmark.extra_info.update(kind=kind, impl=impl, elements=n, bytes=bytes_per_element * n,
                                baseline="torch-ref", device=torch.cuda.get_device_name(0))


@pytest.mark.parametrize("size", SIZES)
def test_cuda_copy_ceiling(benchmark, size):
    """dst.copy_(src) on the GPU: this device's copy bandwidth, the ceiling for a streaming kernel."""
    import torch
    shape = SIZES[size]
    src = torch.randn(shape, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    assert torch.equal(dst, src)

    def run():
        dst.copy_(src)
        torch.cuda.synchronize()

    benchmark(run)
    _record(benchmark, shape, "copy", "copy", 8)


@pytest.mark.parametrize("size", SIZES)
def test_cuda_reference_step(benchmark, size):
    """The baseline: the same maths in plain torch ops on the GPU, noise from torch.randn."""
    import torch
    from fastddpm.executors.torch_ref import reference_step_randn
    shape = SIZES[size]
    sched, t, x, m, xt, mt = _setup(shape)
    row = sched.coefficients()[sched.row_index(t)]  # COEF_WIDTH float32 coefficients
    z = torch.randn(shape, generator=torch.Generator(device="cuda").manual_seed(0), device="cuda")
    got = reference_step_randn(xt, mt, row, torch.Generator(device="cuda").manual_seed(0))
    check_step(got.cpu().numpy(), expected_step(sched, t, x, m, z.cpu().numpy().astype(np.float64)), "torch-ref (cuda)")
    gen = torch.Generator(device="cuda").manual_seed(0)

    def run():
        reference_step_randn(xt, mt, row, gen)
        torch.cuda.synchronize()

    benchmark(run)
    _record(benchmark, shape, "step", "torch-ref", 12)


@pytest.mark.skipif(_NO_NATIVE is not None, reason=f"native-cuda unavailable: {_NO_NATIVE}")
@pytest.mark.parametrize("size", SIZES)
def test_cuda_fused_step(benchmark, size):
    """scheduler.step(...) on CUDA tensors: in-kernel Philox noise, into a preallocated out."""
    import torch
    shape = SIZES[size]
    sched, t, x, m, xt, mt = _setup(shape)
    out = torch.empty_like(xt)
    # the answer first: in-kernel noise against the spec (first 2 samples), given noise against float64
    sched.step(mt, t, xt, seed=3, out=out, backend="native-cuda")
    k = min(shape[0], 2)
    z = noise_spec(3, (k,) + shape[1:], t).astype(np.float64)
    check_step(out[:k].cpu().numpy(), expected_step(sched, t, x[:k], m[:k], z), "native-cuda (in-kernel noise)")
    zg = np.random.default_rng(2).standard_normal(shape, dtype=np.float32)
    given = sched.step(mt, t, xt, noise=torch.from_numpy(zg).cuda(), backend="native-cuda")
    check_step(given.cpu().numpy(), expected_step(sched, t, x, m, zg.astype(np.float64)), "native-cuda (given noise)")

    def run():
        sched.step(mt, t, xt, seed=3, out=out, backend="native-cuda")
        torch.cuda.synchronize()

    benchmark(run)
    _record(benchmark, shape, "step", "native-cuda", 12)
