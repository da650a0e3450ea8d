"""Why the GPU benchmarks cannot run here (None when they can): shared by the CUDA benchmark files."""
import fastddpm


def gpu_reason(backend: str | None = None) -> str | None:
    """None if torch sees a CUDA device (and ``backend``, if given, is available); else the reason."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    if backend is not None:
        why = fastddpm.backends()[backend]["reasons"]
        return "; ".join(why) if why else None
    return None
