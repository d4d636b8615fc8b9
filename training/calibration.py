"""Temperature scaling, calibration error and the abstain score, all on logits computed by PyTorch.

Temperature scaling (Guo et al., ICML 2017): one scalar T > 0 divides the logits before the softmax,
fitted on the validation split by minimising the negative log-likelihood; the argmax cannot move.
ECE: 15 equal-width confidence bins, |accuracy - mean confidence| weighted by the bin's share.
Abstain: a score per image, high for images like the training data, with a threshold keeping `KEEP`
of the validation images. Two are measured, both on the calibrated logits: the max softmax probability
(Hendrycks & Gimpel, ICLR 2017) and the energy score (Liu et al., NeurIPS 2020); `choose_score` keeps
the one that better separates the validation images from made-up outliers (uniform noise and the
inverted validation images: nothing the test split measures, nothing downloaded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

ECE_BINS = 15
KEEP = 0.99  # share of validation images the abstain threshold keeps
T_RANGE = (0.05, 20.0)
AbstainScore = Literal["msp", "energy"]
SCORE_CHOICES = ("auto", "msp", "energy")  # export's --abstain-score
OUTLIER_SEED = 1  # not the seed of training/ood.py's noise, which reports on test images
OUTLIER_NOISE = 1000  # at most this many noise images


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = torch.from_numpy(logits.astype(np.float64)) / temperature
    return float(torch.nn.functional.cross_entropy(z, torch.from_numpy(labels.astype(np.int64))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the validation NLL: golden-section search on log T (NLL(T) is unimodal in
    practice, and a 1-D search cannot diverge as LBFGS on T itself can for near-separable data)."""
    lo, hi = np.log(T_RANGE[0]), np.log(T_RANGE[1])
    ratio = (np.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logits, labels, np.exp(a)), nll(logits, labels, np.exp(b))
    for _ in range(60):  # the bracket shrinks to 0.618^60 of log(400): far below float32's resolution
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logits, labels, np.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logits, labels, np.exp(b))
    return float(np.float32(np.exp((lo + hi) / 2)))  # what the graph's float32 constant holds


@dataclass(frozen=True)
class Reliability:
    """Per confidence bin: images, mean confidence and accuracy (NaN in empty bins)."""

    edges: np.ndarray  # (bins + 1,)
    counts: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    @property
    def ece(self) -> float:
        filled = self.counts > 0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float((gaps * self.counts[filled]).sum() / self.counts.sum())

    def to_json(self) -> dict[str, list]:
        def clean(values: np.ndarray) -> list:
            return [None if np.isnan(v) else float(v) for v in values]

        return {
            "edges": self.edges.tolist(),
            "counts": self.counts.tolist(),
            "confidence": clean(self.confidence),
            "accuracy": clean(self.accuracy),
        }


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bins are (lo, hi]; a confidence of exactly 0 cannot occur with a softmax over finite logits.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=confidence, minlength=bins) / counts
        accuracy = np.bincount(which, weights=correct.astype(np.float64), minlength=bins) / counts
    return Reliability(edges, counts, mean_conf, accuracy)


def ece(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    return reliability(probabilities, labels, bins).ece


def msp(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Max softmax probability: high for images like the training data."""
    return softmax(logits, temperature).max(axis=1)


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Negative free energy, T·logsumexp(z / T): high for images like the training data."""
    z = logits.astype(np.float64) / temperature
    top = z.max(axis=1)
    return temperature * (top + np.log(np.exp(z - top[:, None]).sum(axis=1)))


def abstain_scores(logits: np.ndarray, temperature: float, kind: AbstainScore) -> np.ndarray:
    return energy_score(logits, temperature) if kind == "energy" else msp(logits, temperature)


def outliers(images: np.ndarray, seed: int = OUTLIER_SEED) -> np.ndarray:
    """Images unlike the training data, made from nothing but `images`' shape and pixels: uniform
    noise and the images inverted. What `choose_score` compares the two scores on."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(min(OUTLIER_NOISE, len(images)), *images.shape[1:]), dtype=np.uint8)
    return np.concatenate([noise, 255 - images])


@dataclass(frozen=True)
class ScoreChoice:
    kind: AbstainScore
    auroc_msp: float  # validation images against `outliers`; NaN when not measured
    auroc_energy: float

    @property
    def measured(self) -> bool:
        """Whether the AUROCs were measured (not when the score was asked for without outliers)."""
        return not np.isnan(self.auroc_msp)


def choose_score(
    val_logits: np.ndarray, outlier_logits: np.ndarray | None, temperature: float, asked: str = "auto"
) -> ScoreChoice:
    """The abstain score `asked` for, or with "auto" the one with the higher AUROC of the validation
    images against the outliers (a tie keeps the max probability: it needs no second graph output)."""
    if asked not in SCORE_CHOICES:
        raise ValueError(f"abstain score must be one of {SCORE_CHOICES}, got {asked!r}")
    if outlier_logits is None:
        if asked == "auto":
            raise ValueError("choosing the abstain score needs outliers' logits")
        return ScoreChoice(asked, float("nan"), float("nan"))  # type: ignore[arg-type]
    by_kind = {
        kind: auroc(
            abstain_scores(val_logits, temperature, kind), abstain_scores(outlier_logits, temperature, kind)
        )
        for kind in ("msp", "energy")
    }
    kind = asked if asked != "auto" else ("energy" if by_kind["energy"] > by_kind["msp"] else "msp")
    return ScoreChoice(kind, by_kind["msp"], by_kind["energy"])  # type: ignore[arg-type]


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P(score of an in-distribution image > score of an OOD one), ties counted half (Mann-Whitney U)."""
    scores = np.concatenate([in_scores, out_scores])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]  # average ranks of ties
    n_in, n_out = len(in_scores), len(out_scores)
    return float((ranks[:n_in].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out))


def keep_threshold(scores: np.ndarray, keep: float = KEEP) -> float:
    """The largest threshold below which at most 1 - keep of `scores` fall (`score < threshold`
    abstains), stored as a float32 so the server compares the very same number."""
    return float(np.float32(np.quantile(scores.astype(np.float64), 1.0 - keep, method="lower")))


@dataclass(frozen=True)
class Calibration:
    """What export measured and writes into the model's metadata."""

    temperature: float
    ece_before: float  # test split, T = 1
    ece_after: float  # test split, fitted T
    val_nll_before: float
    val_nll_after: float
    threshold: float  # abstain below this score (calibrated)
    kept: float  # share of validation images at or above the threshold
    reliability_before: Reliability
    reliability_after: Reliability
    score: ScoreChoice  # which abstain score, and why

    def metadata(self) -> dict[str, str]:
        facts = {
            "temperature": f"{self.temperature:.9g}",
            "ece_before": f"{self.ece_before:.6f}",
            "ece_after": f"{self.ece_after:.6f}",
            "abstain_score": self.score.kind,
        }
        if self.score.measured:
            facts["abstain_auroc_msp"] = f"{self.score.auroc_msp:.4f}"
            facts["abstain_auroc_energy"] = f"{self.score.auroc_energy:.4f}"
        return facts

    @property
    def score_name(self) -> str:
        return "energy score" if self.score.kind == "energy" else "max probability"

    def summary(self) -> str:
        choice = self.score
        why = (
            f" (validation vs noise and inverted images: AUROC max probability {choice.auroc_msp:.4f}, "
            f"energy {choice.auroc_energy:.4f})"
            if choice.measured
            else ""
        )
        return (
            f"temperature {self.temperature:.4f} (validation NLL {self.val_nll_before:.4f} → "
            f"{self.val_nll_after:.4f}); test ECE {self.ece_before:.4f} → {self.ece_after:.4f}; "
            f"abstain below {self.score_name} {self.threshold:.4f}{why}, keeping {self.kept:.1%} of "
            "validation images"
        )


def calibrate(
    val_logits: np.ndarray,
    val_labels: np.ndarray,
    test_logits: np.ndarray,
    test_labels: np.ndarray,
    fit: bool = True,
    outlier_logits: np.ndarray | None = None,
    score: str = "auto",
) -> Calibration:
    """Fits T on validation (or keeps T = 1 without `fit`), measures ECE on test, chooses the abstain
    score (`choose_score`) and sets its threshold on the validation images' calibrated scores."""
    temperature = fit_temperature(val_logits, val_labels) if fit else 1.0
    choice = choose_score(val_logits, outlier_logits, temperature, score)
    scores = abstain_scores(val_logits, temperature, choice.kind)
    threshold = keep_threshold(scores)
    return Calibration(
        temperature,
        ece(softmax(test_logits), test_labels),
        ece(softmax(test_logits, temperature), test_labels),
        nll(val_logits, val_labels, 1.0),
        nll(val_logits, val_labels, temperature),
        threshold,
        float((scores.astype(np.float32) >= np.float32(threshold)).mean()),
        reliability(softmax(test_logits), test_labels),
        reliability(softmax(test_logits, temperature), test_labels),
        choice,
    )
