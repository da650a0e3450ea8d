"""Pure-PyTorch reference implementations: the oracles the fast backends are checked against
and the "torch-eager" benchmark baseline. Needs torch (the rest of fastddpm does not)."""
from .sampler import reference_sample
from .unet import ReferenceUNet

__all__ = ["ReferenceUNet", "reference_sample"]
