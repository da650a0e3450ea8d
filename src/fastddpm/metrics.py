"""Sample quality for digit models: a classifier trained on the real digits, and what it says of
generated ones.

    from fastddpm.metrics import evaluate_digits
    report = evaluate_digits(fastddpm.sample(n=100, seed=0))
    print(report.summary())

Representation: every image (real or generated, any size that is a multiple of 8) goes back to
scikit-learn's 8x8 grid with values 0..16 (``data.downscale_to_digits``: block means). Real digits
take the same road as the model's training data (upscaled to 16x16, rounded to uint8 like a
generated image, downscaled), so the classifier never sees a difference that only comes from the
preprocessing.

Measures:
- confident: share of images whose top class probability is >= 0.9;
- coverage: how many of the 10 classes appear (as the top class); evenness: the normalised
  entropy of the class histogram (1 = perfectly even, 0 = one class);
- Fréchet distance (FD) between generated and real digits in the classifier's hidden-layer
  features (FID's formula on a digit classifier), with the real-versus-real FD beside it: real
  images not used as the reference, as many as there are generated ones (FD is biased upward by
  small samples, so the scale must come from the same sample size).

scikit-learn (and SciPy) are needed; no torch.
"""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["DigitClassifier", "digit_classifier", "frechet_distance", "QualityReport", "evaluate_digits",
           "real_digits", "label_accuracy", "CONFIDENCE", "QUALITY_BAR"]

CONFIDENCE = 0.9
# The bar for the bundled model: confident share, classes present, FD / real-vs-real FD.
QUALITY_BAR = {"confident": 0.90, "classes": 10, "fd_ratio": 3.0}
_SPLIT_SEED = 0


def real_digits(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 real digits as the metrics see them: (features [N, 64] in 0..16, labels [N]),
    after the road a generated image takes (upscale to size, uint8, downscale)."""
    from .data import digit_labels, downscale_to_digits, load_digits
    x = load_digits(size)                                                # [N, 1, s, s] in [-1, 1]
    u8 = np.clip((x / 2 + 0.5) * 255, 0, 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    return downscale_to_digits(u8), digit_labels()


class DigitClassifier:
    """An MLP (64 -> 64 ReLU -> 10) trained on 75% of the real digits; ``features`` is its hidden
    layer. L-BFGS with a fairly strong L2 penalty: deterministic, ~2 s, and calibrated enough that
    "confidence >= 0.9" means something (held-out real digits: ~98% accuracy, ~94% confident)."""

    def __init__(self, seed: int = 0, size: int = 16):
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier
        X, y = real_digits(size)
        idx = np.arange(len(y))
        tr, te = train_test_split(idx, test_size=0.25, random_state=seed, stratify=y)
        self.mlp = MLPClassifier(hidden_layer_sizes=(64,), solver="lbfgs", alpha=0.1, max_iter=1000,
                                 random_state=seed)
        self.mlp.fit(X[tr] / 16.0, y[tr])
        self.test_accuracy = float(self.mlp.score(X[te] / 16.0, y[te]))
        # the confident share of real digits it never saw: the scale for the generated share
        self.test_confident = float((self.mlp.predict_proba(X[te] / 16.0).max(1) >= CONFIDENCE).mean())
        self.size = size
        self.X, self.y = X, y

    def _prep(self, images) -> np.ndarray:
        from .data import downscale_to_digits
        a = np.asarray(images)
        if a.ndim == 2 and a.shape[1] == 64:
            return a.astype(np.float64) / 16.0                           # already features 0..16
        return downscale_to_digits(a) / 16.0

    def predict_proba(self, images) -> np.ndarray:
        return self.mlp.predict_proba(self._prep(images))

    def features(self, images) -> np.ndarray:
        """Hidden-layer activations [N, 64] (what the Fréchet distance compares)."""
        x = self._prep(images)
        h = x @ self.mlp.coefs_[0] + self.mlp.intercepts_[0]
        return np.maximum(h, 0.0)


_classifier: dict = {}
_lock = threading.Lock()


def digit_classifier(seed: int = 0) -> DigitClassifier:
    """The classifier for ``seed``, trained once per process (a couple of seconds)."""
    with _lock:
        if seed not in _classifier:
            _classifier[seed] = DigitClassifier(seed)
        return _classifier[seed]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets [N, D]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two feature sets [N>=2, D] with the same D, got {a.shape} and {b.shape}")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr((S1 S2)^(1/2)) = sum of sqrt(eig(S1^(1/2) S2 S1^(1/2))), a symmetric PSD matrix: stable
    # even when a ReLU feature never fires (a singular covariance), unlike sqrtm(S1 @ S2).
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


@dataclass
class QualityReport:
    n: int
    confident: float                   # share with top probability >= CONFIDENCE
    classes_present: int
    class_counts: list
    evenness: float                    # normalised entropy of class_counts
    fd: float                          # generated vs real reference
    fd_real: float                     # real (held out, n of them) vs the same reference
    real_confident: float              # the confident share of held-out real digits, for scale
    classifier_accuracy: float         # on held-out real digits

    @property
    def fd_ratio(self) -> float:
        return self.fd / self.fd_real

    def passes(self, bar: dict = QUALITY_BAR) -> bool:
        return (self.confident >= bar["confident"] and self.classes_present >= bar["classes"]
                and self.fd_ratio <= bar["fd_ratio"])

    def to_dict(self) -> dict:
        return {**asdict(self), "fd_ratio": self.fd_ratio}

    def summary(self) -> str:
        return (f"{self.n} samples: {self.confident:.1%} classified with confidence >= {CONFIDENCE} "
                f"(real digits: {self.real_confident:.1%}); {self.classes_present}/10 classes, "
                f"evenness {self.evenness:.3f}, counts {self.class_counts}; Fréchet distance {self.fd:.2f} "
                f"vs real-vs-real {self.fd_real:.2f} (ratio {self.fd_ratio:.2f}); "
                f"classifier accuracy on held-out real digits {self.classifier_accuracy:.1%}")


def evenness(counts) -> float:
    c = np.asarray(counts, np.float64)
    p = c[c > 0] / c.sum()
    return float(-(p * np.log(p)).sum() / np.log(len(c)))


def max_scored(seed: int = 0) -> int:
    """The most images evaluate_digits scores at once: the size of the held-out real half that the
    real-vs-real Fréchet distance is drawn from."""
    n = len(digit_classifier(seed).y)
    return n - n // 2


def evaluate_digits(images, *, seed: int = 0) -> QualityReport:
    """Score generated digits: uint8 [N, H, W, 1] (``sample()``'s output) or float [N, 1, H, W]
    in [-1, 1]; H, W multiples of 8."""
    clf = digit_classifier(seed)
    proba = clf.predict_proba(images)
    n = len(proba)
    if n < 2:
        raise ValueError("need at least 2 images to score")
    top = proba.argmax(1)
    counts = np.bincount(top, minlength=10)
    # Reference: one half of the real digits; real-vs-real: n digits of the other half.
    perm = np.random.default_rng(_SPLIT_SEED).permutation(len(clf.y))
    half = len(perm) // 2
    ref, other = perm[:half], perm[half:]
    if n > len(other):
        raise ValueError(f"at most {len(other)} images can be scored (the held-out real half)")
    f_ref = clf.features(clf.X[ref])
    fd = frechet_distance(clf.features(images), f_ref)
    fd_real = frechet_distance(clf.features(clf.X[other[:n]]), f_ref)
    return QualityReport(n=n, confident=float((proba.max(1) >= CONFIDENCE).mean()),
                         classes_present=int((counts > 0).sum()), class_counts=counts.tolist(),
                         evenness=evenness(counts), fd=fd, fd_real=fd_real, real_confident=clf.test_confident,
                         classifier_accuracy=clf.test_accuracy)


def label_accuracy(images, labels, *, seed: int = 0) -> dict:
    """For class-conditional samples: the share of images the classifier assigns to their requested
    label with probability >= CONFIDENCE, overall and per requested label ({"overall": float,
    "per_class": {label: float}})."""
    labels = np.asarray(labels)
    proba = digit_classifier(seed).predict_proba(images)
    if len(labels) != len(proba):
        raise ValueError(f"{len(proba)} images but {len(labels)} labels")
    hit = (proba.argmax(1) == labels) & (proba.max(1) >= CONFIDENCE)
    return {"overall": float(hit.mean()),
            "per_class": {int(c): float(hit[labels == c].mean()) for c in np.unique(labels)}}


def main(argv=None) -> int:
    """`python -m fastddpm.metrics [--model digits] [-n 100] [--seed 0]`: sample and score."""
    import argparse
    import json
    import time
    p = argparse.ArgumentParser(prog="python -m fastddpm.metrics", description="Score a digit model's samples.")
    p.add_argument("--model", default="digits")
    p.add_argument("-n", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from .pipeline import sample
    t0 = time.perf_counter()
    imgs = sample(args.model, n=args.n, seed=args.seed, sampler=args.sampler, steps=args.steps, progress=True)
    seconds = time.perf_counter() - t0
    rep = evaluate_digits(imgs)
    if args.json:
        print(json.dumps({**rep.to_dict(), "sample_seconds": seconds, "passes": rep.passes()}, indent=2))
    else:
        print(f"sampled in {seconds:.1f} s; {rep.summary()}; bar {QUALITY_BAR}: "
              f"{'PASS' if rep.passes() else 'FAIL'}")
    return 0 if rep.passes() else 1


if __name__ == "__main__":
    import sys
    sys.exit(main())
