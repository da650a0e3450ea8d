"""Outputs of a fixed set of sample() / Scheduler.step() / noise() calls are bit-identical to the
ones recorded before the engine/loop redesign (tests/golden_cases.py says which calls)."""
import json

import pytest

from golden_cases import HASHES, cases, cpu_model, digest, key, _native

with open(HASHES) as f:
    RECORDED = json.load(f)


@pytest.mark.parametrize("name,portable,fn", cases(), ids=[c[0] for c in cases()])
def test_outputs_unchanged(name, portable, fn):
    if name.endswith(("avx2", "avx512")) and name.rsplit("-", 1)[1] not in _native().supported_isas():
        pytest.skip(f"this CPU cannot run the {name.rsplit('-', 1)[1]} path")
    k = key(name, portable)
    if k not in RECORDED:
        pytest.skip(f"no hash recorded for this CPU ({cpu_model()}): BLAS/torch kernels are chosen per CPU")
    assert digest(*fn()) == RECORDED[k]
