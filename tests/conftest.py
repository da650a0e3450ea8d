import os

import pytest


def _cuda_reason():
    """Why the cuda tests cannot run here, or None if a GPU and the CUDA extension are present."""
    try:
        from fastddpm.backends import reasons
    except Exception as exc:  # noqa: BLE001
        return f"fastddpm does not import: {exc}"
    why = reasons("native-cuda")
    return "; ".join(why) if why else None


def pytest_collection_modifyitems(config, items):
    reason = _cuda_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"no usable GPU: {reason}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


