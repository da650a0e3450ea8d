"""fastddpm: fast DDPM sampling. The public surface is this module's __all__ (see DESIGN.md)."""
from __future__ import annotations

import numpy as _np

from . import philox as _philox
from . import validate as _validate

from .executors import BackendUnavailableError, backends
from .executors import get as _backend
from .schedulers import (CMStochasticIterativeScheduler, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                         EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, SchedulerConfigError)

__version__ = "0.1.0"
__all__ = ["sample", "load", "noise", "backends", "DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
           "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "CMStochasticIterativeScheduler", "Pipeline",
           "BackendUnavailableError", "SchedulerConfigError", "__version__",
           "save_grid", "save_trajectory", "to_pil", "sample_to_disk", "set_num_threads", "get_num_threads"]


def noise(seed: int, shape, step: int, first_index: int = 0) -> _np.ndarray:
    """float32 normals that the sampler adds at noise step ``step`` (the timestep given to
    ``Scheduler.step``; -1 for the initial static x_T) to samples ``first_index ...`` of ``shape``
    (N, ...). The same numbers on every backend (spec: fastddpm/philox.py)."""
    seed, step = _validate.seed(seed), _validate.noise_step(step)
    shape = tuple(int(s) for s in shape)
    native = _backend("native-cpu")
    if not isinstance(native, str) and not native.unavailable():
        return native.noise(seed, shape, step, first_index)
    return _philox.noise(seed, shape, step, first_index)


def set_num_threads(n: int) -> None:
    """Set the process-wide thread budget: at most ``n`` threads (an int >= 1) compute at once
    across every fastddpm call of this process; concurrent calls share it (threads.py)."""
    from . import threads
    threads.set_num_threads(n)


def get_num_threads() -> int:
    """The process-wide thread budget (default: the CPUs this process may use)."""
    from . import threads
    return threads.get_num_threads()


def __getattr__(name):  # the pipeline pulls in more; import it on first use
    if name in ("sample", "load", "Pipeline"):
        from . import pipeline
        return getattr(pipeline, name)
    if name in ("save_grid", "save_trajectory", "to_pil"):   # pictures: Pillow, imported on first use
        from . import images
        return getattr(images, name)
    if name == "sample_to_disk":
        from . import shards
        return shards.sample_to_disk
    raise AttributeError(f"module 'fastddpm' has no attribute {name!r}")
