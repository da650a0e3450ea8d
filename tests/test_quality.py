"""Sample-quality metrics, and the quality bar for the bundled digits model."""
import os

import numpy as np
import pytest

pytest.importorskip("sklearn")

import fastddpm
from fastddpm.data import load_digits
from fastddpm.metrics import QUALITY_BAR, evaluate_digits, evenness, frechet_distance
from fastddpm.pipeline import _MODELS_DIR


def test_frechet_distance_basics():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 6))
    assert abs(frechet_distance(a, a)) < 1e-8
    shift = np.array([1.0, 2.0, 0, 0, 0, 0])
    assert frechet_distance(a, a + shift) == pytest.approx(5.0, rel=1e-6)
    # a dead feature (zero variance everywhere) is no problem
    z = np.c_[a, np.zeros(500)]
    assert np.isfinite(frechet_distance(z, z + 0.1))
    with pytest.raises(ValueError):
        frechet_distance(a, a[:, :3])


def test_evenness():
    assert evenness([10] * 10) == pytest.approx(1.0)
    assert evenness([100] + [0] * 9) == pytest.approx(0.0)


def test_real_digits_pass_and_noise_fails():
    x = load_digits(16)
    real = x[np.random.default_rng(5).choice(len(x), 100, replace=False)]
    rep = evaluate_digits(real)
    assert rep.classifier_accuracy > 0.95
    assert rep.passes(), rep.summary()
    noise = np.random.default_rng(0).uniform(-1, 1, (100, 1, 16, 16)).astype(np.float32)
    bad = evaluate_digits(noise)
    assert not bad.passes() and bad.fd_ratio > 10, bad.summary()
    blank = np.full((100, 16, 16, 1), 0, np.uint8)
    assert not evaluate_digits(blank).passes()


@pytest.fixture(scope="module")
def bundled_report():
    """What fastddpm.sample() does by default (DDPM, every step), 100 samples of seed 0, scored."""
    assert os.path.isdir(os.path.join(_MODELS_DIR, "digits")), "the bundled digits model is not installed"
    images = fastddpm.sample(n=100, seed=0)
    assert images.shape == (100, 16, 16, 1)
    rep = evaluate_digits(images)
    print(rep.summary())
    return rep


@pytest.mark.slow
def test_bundled_model_covers_every_class_and_matches_real_digits(bundled_report):
    """Two of the bundled model's quality bars: all 10 classes in 100 samples, FD within 3x of
    real-vs-real."""
    assert bundled_report.classes_present == 10, bundled_report.summary()
    assert bundled_report.fd_ratio <= QUALITY_BAR["fd_ratio"], bundled_report.summary()


@pytest.mark.slow
def test_bundled_model_is_confident_enough(bundled_report):
    """Issue 4's third bar: >= 90% of 100 samples classified with confidence >= 0.9."""
    assert bundled_report.confident >= QUALITY_BAR["confident"], bundled_report.summary()
