"""Pure-PyTorch reference implementations: the oracles the fast backends are checked against
and the "torch-eager" benchmark baseline. Needs torch (the rest of fastddpm does not)."""
from .unet import ReferenceUNet

__all__ = ["ReferenceUNet"]
