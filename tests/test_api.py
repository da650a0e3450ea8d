"""The public surface: backends(), dispatch errors, array kinds, noise(), info."""
import subprocess
import sys

import numpy as np
import pytest

import fastddpm
from fastddpm import noise as noise_spec_module  # noqa: F401  (the attribute is the function)
from fastddpm.executors import BackendUnavailableError, NAMES
from fastddpm.philox import noise as noise_spec

AVAILABLE = [n for n, e in fastddpm.backends().items() if e["available"] and "cpu" in e.get("devices", [])]


def _sched():
    s = fastddpm.DDPMScheduler()
    s.set_timesteps(10)
    return s


def test_public_names():
    for name in ("sample", "load", "noise", "backends", "DDPMScheduler", "DDIMScheduler", "Pipeline"):
        assert hasattr(fastddpm, name), name
    assert callable(fastddpm.noise)


def test_backends_report_every_backend_with_reasons():
    info = fastddpm.backends()
    assert list(info) == list(NAMES)
    for name, entry in info.items():
        assert isinstance(entry["available"], bool)
        assert entry["available"] == (entry["reasons"] == [])
        if not entry["available"]:
            assert all(isinstance(r, str) and r for r in entry["reasons"]), name
    assert AVAILABLE, "at least one CPU backend must be available"


def test_unknown_backend_is_a_value_error():
    s = _sched()
    x = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        s.step(x, int(s.timesteps[0]), x, backend="fast")


def test_unavailable_backend_lists_its_reasons():
    s = _sched()
    x = np.zeros((1, 1, 4, 4), np.float32)
    # native-cuda never runs NumPy arrays: the refusal must say why, not crash or fall back silently.
    with pytest.raises(BackendUnavailableError, match="native-cuda") as err:
        s.step(x, int(s.timesteps[0]), x, backend="native-cuda")
    assert "cpu" in str(err.value)


@pytest.mark.parametrize("backend", AVAILABLE)
def test_dtype_shape_kind_errors(backend):
    s = _sched()
    t = int(s.timesteps[0])
    x = np.zeros((2, 3, 5, 5), np.float32)
    with pytest.raises(TypeError, match="float32"):
        s.step(x.astype(np.float64), t, x, backend=backend)
    with pytest.raises(TypeError, match="float32"):
        s.step(x, t, x.astype(np.float16), backend=backend)
    with pytest.raises(ValueError, match="shape"):
        s.step(x[:1], t, x, backend=backend)
    with pytest.raises(ValueError, match="shape"):
        s.step(x, t, x, noise=x[:, :2], backend=backend)
    with pytest.raises(ValueError, match="shape"):
        s.step(x, t, x, out=np.zeros((2, 3, 5, 4), np.float32), backend=backend)
    with pytest.raises(ValueError, match="read-only"):
        ro = np.zeros_like(x)
        ro.setflags(write=False)
        s.step(x, t, x, out=ro, backend=backend)
    with pytest.raises(TypeError, match="NumPy array or a torch tensor"):
        s.step(x, t, x.tolist(), backend=backend)
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
        s.step(x, 1000, x, backend=backend)
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
        s.step(x, -1, x, backend=backend)
    with pytest.raises(TypeError, match="timestep must be an integer"):
        s.step(x, "999", x, backend=backend)
    with pytest.raises(ValueError, match="seed"):
        s.step(x, t, x, seed=-1, backend=backend)
    with pytest.raises(ValueError, match="seed"):
        s.step(x, t, x, seed=2**64, backend=backend)
    with pytest.raises(ValueError, match="first_index"):
        s.step(x, t, x, seed=0, first_index=2**32 - 1, backend=backend)


def test_torch_tensor_round_trip_without_copy():
    torch = pytest.importorskip("torch")
    s = _sched()
    t = int(s.timesteps[3])
    x = torch.randn(3, 1, 6, 7)
    m = torch.randn(3, 1, 6, 7)
    expect = s.step(x.numpy(), t, m.numpy(), seed=5)
    got = s.step(x, t, m, seed=5)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), expect)
    out = torch.empty_like(x)
    ret = s.step(x, t, m, seed=5, out=out)
    assert ret is out
    np.testing.assert_array_equal(out.numpy(), expect)
    # in place on the tensor's own memory
    x2 = x.clone()
    ptr = x2.data_ptr()
    s.step(x2, t, m, seed=5, out=x2)
    assert x2.data_ptr() == ptr
    np.testing.assert_array_equal(x2.numpy(), expect)


def test_torch_kind_and_device_mismatch_errors():
    torch = pytest.importorskip("torch")
    s = _sched()
    t = int(s.timesteps[0])
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(TypeError, match="one kind"):
        s.step(x.numpy(), t, x)
    with pytest.raises(TypeError, match="one kind"):
        s.step(x, t, x.numpy())
    with pytest.raises(TypeError, match="float32"):
        s.step(x.double(), t, x)
    # a tensor on another device (meta stands in for cuda on a machine without a GPU)
    with pytest.raises(ValueError, match="is on meta but sample is on cpu"):
        s.step(torch.zeros(1, 1, 4, 4, device="meta"), t, x)


def test_noise_public_function_matches_spec():
    got = fastddpm.noise(7, (3, 2, 5, 3), 17, first_index=4)
    assert got.dtype == np.float32 and got.shape == (3, 2, 5, 3)
    np.testing.assert_allclose(got, noise_spec(7, (3, 2, 5, 3), 17, 4), atol=2e-5, rtol=0)
    initial = fastddpm.noise(7, (2, 4), -1)
    np.testing.assert_allclose(initial, noise_spec(7, (2, 4), 0xFFFFFFFF), atol=2e-5, rtol=0)
    with pytest.raises(ValueError):
        fastddpm.noise(7, (2, 4), -2)
    with pytest.raises(ValueError):
        fastddpm.noise(-7, (2, 4), 0)


def test_info_runs_and_names_every_backend():
    out = subprocess.run([sys.executable, "-m", "fastddpm.info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in NAMES:
        assert name in out.stdout
    assert "build:" in out.stdout


@pytest.mark.parametrize("bad", [1.7, 2.0, True, "3", None])
def test_every_entry_point_validates_a_seed_alike(bad):
    """One seed validator: noise() refuses what sample() refuses (a float is never truncated);
    None means a fresh seed where a sampler takes one, and is refused by noise()."""
    import fastddpm
    with pytest.raises(TypeError, match="seed must be an int"):
        fastddpm.noise(bad, (1, 2), 0)
    if bad is None:
        fastddpm.sample(n=1, steps=1, seed=None)
    else:
        with pytest.raises(TypeError, match="seed must be an int"):
            fastddpm.sample(n=1, steps=1, seed=bad)
    with pytest.raises(TypeError, match="noise step must be an int"):
        fastddpm.noise(1, (1, 2), 1.5)
