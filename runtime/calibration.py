"""The alarm threshold: the ``Calibration`` record and the rules that set it (numpy only, no torch,
no scipy), shared by training (mrkd.train.calibrate), evaluation, export and the runtime.

A part is anomalous when ``score >= threshold``. The threshold comes from scores of good parts:

* "quantile": the ``quantile`` (the share of good parts that should pass) of the good scores;
  with fewer than MIN_SCORES_FOR_QUANTILE scores, "max_margin" (max + 10% of their range) instead;
* "tolerance": mean + k·s, k the one-sided normal tolerance factor for that coverage at
  ``confidence`` (exact, from the noncentral t distribution, computed here by quadrature);
* "f1": the F1-optimal threshold on labelled scores;  "manual": given by hand.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from mrkd.errors import MrkdError, warning_line

DEFAULT_QUANTILE = 0.99
# Measured on the demo's six synthetic categories (Lite0, 128 px, 6 held-out good images each, 72 good
# and 120 defective test images), two hold-out draws: "quantile" (max + 10% here) flagged 10 and 12
# good images and missed no defect; "tolerance" at confidence 0.75 flagged 5 and 2 but missed 0 and 22
# (18 of 20 on `wood`, whose 6 held-out scores spread widely). With so few images neither rule is
# reliable; the default stays with the one that does not miss defects.
DEFAULT_CONFIDENCE = 0.75
DEFAULT_METHOD = "quantile"
THRESHOLD_METHODS = ("tolerance", "quantile")            # the good-score rules one can ask for
RECORDED_METHODS = THRESHOLD_METHODS + ("max_margin", "f1", "manual")
# Below this many good scores a high quantile is only the maximum with noise; use max + margin.
MIN_SCORES_FOR_QUANTILE = 10
# Below this many a standard deviation means little; "tolerance" falls back to max + margin too.
MIN_SCORES_FOR_TOLERANCE = 3
# Margin above the largest good score, as a share of the good scores' range (max - min).
MAX_MARGIN = 0.1

# Help texts of the options every command that calibrates shares (train, calibrate).
QUANTILE_HELP = "Share of good parts the alarm threshold should pass (the coverage), in (0, 1)."
METHOD_HELP = ("'quantile': the quantile of the good scores (max + 10% of their range below 10 images); "
               "'tolerance': mean + k·std, with k chosen so that the threshold passes that share of good "
               "parts with the given confidence (k grows as the good set shrinks: fewer false alarms, but "
               "with few, widely spread scores it misses defects).")
CONFIDENCE_HELP = ("For 'tolerance': how sure the threshold should be to pass that share of good parts, in "
                   "(0, 1) (higher: fewer false alarms, more missed defects; see mrkd.runtime.calibration).")


class CalibrationError(MrkdError, ValueError):
    """Calibration data is missing, malformed or out of range; the message names where and which field."""


# ---------------------------------------------------------------- the record

@dataclass
class Calibration:
    """How the alarm threshold was set. Written by training into the checkpoint and by the export into
    the model metadata; ``to_dict``/``from_dict`` keep the checkpoint's long-standing key names
    (``threshold_method`` for ``method``). Statistics are of the good scores it was set on."""

    threshold: float
    method: str = "manual"
    quantile: Optional[float] = None
    confidence: Optional[float] = None
    tolerance_k: Optional[float] = None
    f1_at_threshold: Optional[float] = None
    n_good: Optional[int] = None
    good_mean: Optional[float] = None
    good_std: Optional[float] = None
    good_min: Optional[float] = None
    good_max: Optional[float] = None
    good_q99: Optional[float] = None
    source: Optional[str] = None               # where the good scores came from (a clip, a camera)
    bad_frames: Optional[int] = None           # frames of that source that could not be scored
    previous_threshold: Optional[float] = None
    # The frame size the good scores were taken at: "WIDTHxHEIGHT" (mrkd calibrate --size) or "native"
    # (frames as the source gave them); None where it was not recorded (training's held-out images).
    frame_size: Optional[str] = None
    # The sha256 of the ignore mask the good scores were taken under (mrkd calibrate --ignore-mask); None:
    # whole images (or not recorded).
    ignore_mask: Optional[str] = None

    _KEY_NAMES = {"method": "threshold_method"}
    _FRACTIONS = ("quantile", "confidence")
    _COUNTS = ("n_good", "bad_frames")

    def to_dict(self) -> Dict[str, Any]:
        """The checkpoint/sidecar form: set fields only, ``method`` stored as ``threshold_method``."""
        return {self._KEY_NAMES.get(f.name, f.name): getattr(self, f.name)
                for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, data: Any, source: str = "calibration") -> "Calibration":
        """Validated: numbers are real finite numbers (not strings, lists or booleans), fractions lie in
        (0, 1), counts are whole and not negative, the method is known. Unknown keys are ignored (older
        files carried a nested ``score_norm``). Errors name ``source`` and the field."""
        if not isinstance(data, dict):
            raise CalibrationError(f"{source}: calibration must be an object, got {type(data).__name__}")
        values = {}
        for f in dataclasses.fields(cls):
            key = cls._KEY_NAMES.get(f.name, f.name)
            if key not in data or data[key] is None:
                continue
            value, where = data[key], f"{source}: field {key}"
            if f.name in ("method", "source"):
                if not isinstance(value, str):
                    raise CalibrationError(f"{where}={value!r} must be a string")
            elif f.name == "ignore_mask":
                if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
                    raise CalibrationError(f"{where}={value!r} must be a sha256 (64 lowercase hex digits)")
            elif f.name == "frame_size":
                if not isinstance(value, str) or frame_size_label(value) is None:
                    raise CalibrationError(f"{where}={value!r} must be 'native' or WIDTHxHEIGHT")
                value = frame_size_label(value)
            elif f.name in cls._COUNTS:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise CalibrationError(f"{where}={value!r} must be a whole number >= 0")
            else:
                value = finite_number(value, where)
                if f.name in cls._FRACTIONS and not 0 < value < 1:
                    raise CalibrationError(f"{where}={value!r} must lie in (0, 1)")
                if f.name in ("good_std", "tolerance_k") and value < 0:
                    raise CalibrationError(f"{where}={value!r} must be >= 0")
                if f.name == "f1_at_threshold" and not 0 <= value <= 1:
                    raise CalibrationError(f"{where}={value!r} must lie in [0, 1]")
            values[f.name] = value
        if "threshold" not in values:
            raise CalibrationError(f"{source}: field threshold is missing")
        if values.get("method", "manual") not in RECORDED_METHODS:
            raise CalibrationError(f"{source}: field threshold_method={values['method']!r} is not one of "
                                   f"{', '.join(RECORDED_METHODS)}")
        low, high = values.get("good_min"), values.get("good_max")
        if low is not None and high is not None and low > high:
            raise CalibrationError(f"{source}: fields good_min={low} > good_max={high}")
        return cls(**values)

    @classmethod
    def of(cls, data: Any, source: str = "calibration") -> Optional["Calibration"]:
        """A model's calibration (its ``model.calibration`` dict, a Calibration, or nothing) as a
        validated Calibration, None when the model is uncalibrated."""
        if isinstance(data, Calibration):
            return data
        return cls.from_dict(data, source) if data else None

    @classmethod
    def threshold_of(cls, data: Any, source: str = "calibration") -> Optional[float]:
        """The threshold of ``Calibration.of(data)``, None when uncalibrated."""
        calibration = cls.of(data, source)
        return None if calibration is None else calibration.threshold

    @property
    def score_norm(self) -> Dict[str, float]:
        """The good-score statistics that are set (good_min, good_mean, ...), for score normalisation."""
        return {k: v for k, v in self.to_dict().items() if k.startswith("good_")}

    def normalized(self, scores) -> np.ndarray:
        """Scores rescaled so that the lowest good score is 0 and the threshold is 1."""
        if self.good_min is None:
            raise CalibrationError("normalised scores need good_min in the calibration")
        span = self.threshold - self.good_min
        scores = np.asarray(scores, dtype=np.float64)
        return (scores - self.good_min) / span if span > 0 else scores - self.good_min


NATIVE_SIZE = "native"


def frame_size_label(size: Any) -> Optional[str]:
    """"native" for None, "WIDTHxHEIGHT" for a (width, height) pair or such a string; None when malformed."""
    if size is None or size == NATIVE_SIZE:
        return NATIVE_SIZE
    if isinstance(size, str):
        parts = size.lower().split("x")
        if len(parts) == 2 and all(p.isascii() and p.isdigit() and int(p) > 0 for p in parts):
            return f"{int(parts[0])}x{int(parts[1])}"
        return None
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
        return f"{size[0]}x{size[1]}"
    return None


def frame_size_mismatch(calibration: Optional["Calibration"], run_size: Any) -> Optional[str]:
    """Why the threshold may not fit frames of ``run_size`` (None: the source's own size), or None.
    Scores change with the frame size (a resized frame is another picture to the model), so a threshold
    set on frames of one size decides differently on frames of another."""
    if calibration is None or calibration.frame_size is None:
        return None
    used = frame_size_label(run_size)
    if used == calibration.frame_size:
        return None
    how = lambda label: "the source's own size" if label == NATIVE_SIZE else label  # noqa: E731
    return (f"the threshold {calibration.threshold:.6g} was calibrated on frames at {how(calibration.frame_size)} "
            f"but this run reads them at {how(used)}: decisions will differ; run with "
            f"{'no --size' if calibration.frame_size == NATIVE_SIZE else '--size ' + calibration.frame_size} "
            f"or calibrate again at this size")


def ignore_mask_mismatch(calibration: Optional["Calibration"], mask_sha256: Optional[str]) -> Optional[str]:
    """Why the threshold may not fit a camera judging under the ignore mask ``mask_sha256`` (None: whole
    images), or None. Only a threshold set under a mask is said: one set on whole images stays safe under
    a mask (masked scores are never higher), it is only less tight."""
    if calibration is None or calibration.ignore_mask is None or calibration.ignore_mask == mask_sha256:
        return None
    set_under = f"under the ignore mask sha256 {calibration.ignore_mask[:12]}"
    judged = (f"under another one (sha256 {mask_sha256[:12]})" if mask_sha256 else
              "whole images: what that mask left out now counts, expect false alarms there")
    return (f"the threshold {calibration.threshold:.6g} was calibrated {set_under}, this camera judges {judged}; "
            f"give it that ignore mask or calibrate again under its own")


def finite_number(value: Any, where: str) -> float:
    """``value`` as a float when it is a real, finite number (int or float, not bool or str)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CalibrationError(f"{where}={value!r} must be a number")
    if not math.isfinite(value):
        raise CalibrationError(f"{where}={value!r} must be finite")
    return float(value)


# ---------------------------------------------------------------- the rules

def check_fraction(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise CalibrationError(f"{name} must lie in (0, 1), got {value!r}")
    return float(value)


def _finite_scores(scores, name: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise CalibrationError(f"calibration needs at least one {name}")
    if not np.isfinite(scores).all():
        raise CalibrationError(f"{name}: {int((~np.isfinite(scores)).sum())} of {scores.size} are not finite")
    return scores


def good_score_stats(good_scores) -> dict:
    """Mean, standard deviation, min, max and 99th percentile of good scores (floats)."""
    scores = _finite_scores(good_scores, "good image score")
    return {"good_mean": float(scores.mean()), "good_std": float(scores.std()),
            "good_min": float(scores.min()), "good_max": float(scores.max()),
            "good_q99": float(np.quantile(scores, 0.99)), "n_good": int(scores.size)}


def threshold_at_quantile(good_scores, q: float = DEFAULT_QUANTILE) -> float:
    """Threshold at quantile ``q`` of defect-free scores (``np.quantile``, linear interpolation)."""
    if not 0.0 <= q <= 1.0:
        raise CalibrationError(f"q must be in [0, 1], got {q}")
    return float(np.quantile(_finite_scores(good_scores, "good image score"), q))


def counts_at_each_threshold(labels: np.ndarray, scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every distinct score t (descending): (t, TP, FP) of the rule ``score >= t``. ``labels`` bool and
    ``scores`` finite, of one size (validated by the caller); the ROC curve and the F1 threshold share it."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # The last index of each run of equal scores closes that threshold's counts.
    last_of_run = np.r_[np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), scores.size - 1]
    tp = np.cumsum(sorted_labels)[last_of_run]
    fp = (last_of_run + 1) - tp
    return sorted_scores[last_of_run], tp, fp


def f1_optimal_threshold(labels, scores) -> Tuple[float, float]:
    """The score threshold (rule ``score >= threshold``) with the highest F1, and that F1.
    Candidates are the distinct scores; on a tie the higher threshold (fewer alarms) wins."""
    labels = np.asarray(labels).ravel()
    if labels.size == 0 or not np.isin(labels, (0, 1)).all():
        raise CalibrationError("labels must be 0 (good) or 1 (defect), and at least one")
    labels = labels.astype(bool)
    scores = _finite_scores(scores, "labelled image score")
    if scores.size != labels.size:
        raise CalibrationError(f"labels has {labels.size} entries but scores has {scores.size}")
    n_pos = int(labels.sum())
    if n_pos == 0:
        raise CalibrationError("F1 needs at least one defective sample")
    thresholds, tp, fp = counts_at_each_threshold(labels, scores)
    f1 = 2 * tp / (2 * tp + fp + (n_pos - tp))
    best = int(np.argmax(f1))   # first maximum = highest threshold (thresholds descend)
    return float(thresholds[best]), float(f1[best])


def _noncentral_t_cdf(t: float, df: int, nc: float) -> float:
    """P(T <= t) for T = (Z + nc) / sqrt(V / df), Z normal, V chi-square(df): the mean over the
    distribution of s = sqrt(V / df) of Phi(t·s - nc), by Simpson's rule in log s (so the steep
    part near s = 0 that decides the far tail at small df is resolved as finely as the bulk)."""
    spread = 1.0 / math.sqrt(2.0 * df)                   # standard deviation of s, roughly
    low, high = max(1e-10, 1.0 - 16 * spread), 1.0 + 16 * spread + 4.0 / df
    u = np.linspace(math.log(low), math.log(high), 4001)
    s = np.exp(u)
    # density of s, times ds/du = s
    log_density = (math.log(2.0) + 0.5 * df * math.log(df / 2.0) - math.lgamma(df / 2.0)
                   + df * u - 0.5 * df * s * s)
    phi = 0.5 * _erfc(-(t * s - nc) / math.sqrt(2.0))
    values = phi * np.exp(log_density)
    h = u[1] - u[0]
    return float(h / 3 * (values[0] + values[-1] + 4 * values[1:-1:2].sum() + 2 * values[2:-1:2].sum()))


_erfc = np.vectorize(math.erfc, otypes=[float])


@functools.lru_cache(maxsize=256)
def tolerance_factor(n: int, coverage: float, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """One-sided normal tolerance factor k: with ``confidence``, mean + k·s of ``n`` normal samples
    (s with ddof=1) lies above the ``coverage`` quantile of their distribution. Exact:
    k = t'_{confidence}(n−1, z_coverage·√n) / √n, the noncentral t quantile found by bisection."""
    if n < 2:
        raise CalibrationError(f"a tolerance bound needs at least 2 scores, got {n}")
    check_fraction(coverage, "coverage")
    check_fraction(confidence, "confidence")
    root_n = math.sqrt(n)
    nc = NormalDist().inv_cdf(coverage) * root_n
    low, high = nc - 1.0, nc + 1.0
    while _noncentral_t_cdf(low, n - 1, nc) > confidence:
        low -= 2 * (high - low)
    while _noncentral_t_cdf(high, n - 1, nc) < confidence:
        high += 2 * (high - low)
    for _ in range(200):
        mid = 0.5 * (low + high)
        if _noncentral_t_cdf(mid, n - 1, nc) < confidence:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * max(1.0, abs(mid)):
            break
    return 0.5 * (low + high) / root_n


def _max_margin(scores: np.ndarray, margin: float) -> float:
    spread = float(scores.max() - scores.min())
    # A single score has no spread: fall back to a share of its magnitude.
    spread = spread if spread > 0 else abs(float(scores.max()))
    return float(scores.max() + margin * spread)


def few_good_images(calibration: "Calibration") -> Optional[str]:
    """Why a threshold set from good scores rests on too few of them to trust (fewer than
    MIN_SCORES_FOR_QUANTILE: the quantile rule gave way to max + margin, and the unseen good parts' tail
    lies above much of such a sample), or None. A manual or labelled (F1) threshold is not judged here."""
    n = calibration.n_good
    if calibration.method in ("manual", "f1") or n is None or n >= MIN_SCORES_FOR_QUANTILE:
        return None
    return (f"the threshold rests on {n} good image(s) ({calibration.method}), fewer than "
            f"{MIN_SCORES_FOR_QUANTILE}: expect false alarms on good parts")


def threshold_from_good_scores(good_scores, quantile: float = DEFAULT_QUANTILE, method: str = DEFAULT_METHOD,
                               min_scores: int = MIN_SCORES_FOR_QUANTILE, margin: float = MAX_MARGIN,
                               confidence: float = DEFAULT_CONFIDENCE) -> Tuple[float, str]:
    """(threshold, method used) from good scores.

    "quantile" (default): the ``quantile`` of the scores (max + margin·(max − min) below
    ``min_scores``). With a handful of good parts this is the tail of a small sample and sits
    below much of the unseen good parts' tail: some good parts raise alarms.
    "tolerance": mean + k·s with k = tolerance_factor(n, quantile, confidence), and never below the
    largest good score. It widens as the good set shrinks (k for 99% coverage at confidence 0.75:
    4.4 for 3 images, 3.2 for 6, 2.7 for 20, 2.5 for 50): fewer false alarms, and with a few widely
    spread scores, missed defects (see DEFAULT_CONFIDENCE)."""
    scores = _finite_scores(good_scores, "good image score")
    if method not in THRESHOLD_METHODS:
        raise CalibrationError(f"threshold method {method!r} unknown; choose from {list(THRESHOLD_METHODS)}")
    check_fraction(quantile, "quantile")
    check_fraction(confidence, "confidence")
    if method == "tolerance" and scores.size >= MIN_SCORES_FOR_TOLERANCE:
        bound = scores.mean() + tolerance_factor(scores.size, quantile, confidence) * scores.std(ddof=1)
        return float(max(bound, scores.max())), "tolerance"
    if method == "quantile" and scores.size >= min_scores:
        return threshold_at_quantile(scores, quantile), "quantile"
    return _max_margin(scores, margin), "max_margin"


def calibration_from_scores(good_scores, quantile: float = DEFAULT_QUANTILE, labels=None, labelled_scores=None,
                            method: str = DEFAULT_METHOD, confidence: float = DEFAULT_CONFIDENCE,
                            **provenance) -> Calibration:
    """The Calibration for given good scores (and, optionally, labelled scores for an F1 threshold).
    ``provenance``: source, bad_frames, previous_threshold."""
    stats = good_score_stats(good_scores)
    threshold, used = threshold_from_good_scores(good_scores, quantile, method, confidence=confidence)
    extra: Dict[str, Any] = {}
    if used == "tolerance":
        extra.update(confidence=float(confidence),
                     tolerance_k=tolerance_factor(stats["n_good"], quantile, confidence))
    if labels is not None:
        threshold, best_f1 = f1_optimal_threshold(labels, labelled_scores)
        used = "f1"
        extra["f1_at_threshold"] = float(best_f1)
    return Calibration(threshold=float(threshold), method=used, quantile=float(quantile), **stats, **extra,
                       **provenance)


# ---------------------------------------------------------------- a recalibration that looks wrong

# A new calibration is suspicious when the median of the new good scores lies more than SHIFT_STDS
# standard deviations of the recorded good scores away from their recorded mean (std floored at
# SHIFT_STD_FLOOR of the mean's magnitude, so one image or identical scores do not make every change
# suspicious), or when the threshold moves by more than a factor SHIFT_FACTOR either way. The typical
# mistake, a folder of defective parts given as "good", moves both: the reported case raised the
# threshold from 49.7 to 103.3 while the recorded good mean was 49.6. A camera's codec shifts good
# scores by far less (the demo's MJPG clip: +8 % of the mean).
SHIFT_STDS = 4.0
SHIFT_STD_FLOOR = 0.02
SHIFT_FACTOR = 2.0
ACCEPT_SHIFT_HELP = ("Write the new threshold even when the new good scores lie far outside the good scores the "
                     f"model recorded (median beyond mean ± {SHIFT_STDS:g} std) or the threshold moves by more "
                     f"than a factor {SHIFT_FACTOR:g}; without it such a calibration is refused (were the images "
                     "really good parts?).")


class CalibrationShiftError(CalibrationError):
    """A recalibration whose good scores do not look like the recorded good scores; not written."""


def calibration_shift(previous: Optional[Calibration], good_scores, new_threshold: float) -> Optional[str]:
    """What looks wrong about replacing ``previous`` by a threshold of ``new_threshold`` set on
    ``good_scores`` (see SHIFT_STDS, SHIFT_FACTOR), or None when nothing does or nothing was recorded."""
    if previous is None:
        return None
    scores = _finite_scores(good_scores, "good image score")
    median = float(np.median(scores))
    reasons = []
    if previous.good_mean is not None and previous.good_std is not None:
        spread = max(previous.good_std, SHIFT_STD_FLOOR * abs(previous.good_mean))
        if spread > 0 and abs(median - previous.good_mean) > SHIFT_STDS * spread:
            reasons.append(f"the new good scores' median {median:.4g} lies {abs(median - previous.good_mean):.4g} from "
                           f"the recorded good mean {previous.good_mean:.4g} (more than {SHIFT_STDS:g} x {spread:.3g}, "
                           f"the recorded std{f' of {previous.n_good} images' if previous.n_good else ''} or "
                           f"{SHIFT_STD_FLOOR:.0%} of the mean)")
    old = previous.threshold
    # A ratio means something only between positive thresholds (scores are distances: >= 0).
    if old > 0 and new_threshold > 0 and max(new_threshold / old, old / new_threshold) > SHIFT_FACTOR:
        reasons.append(f"the threshold would move by a factor {max(new_threshold / old, old / new_threshold):.2f}")
    if not reasons:
        return None
    return (f"threshold {old:.6g} -> {new_threshold:.6g} from {scores.size} image(s) looks wrong: "
            + "; ".join(reasons) + ". Were these good parts? Pass --accept-shift to write it anyway")


def shift_reference(previous: Optional[Calibration], new: Calibration, good_scores) -> Optional[Calibration]:
    """The recorded calibration a new one's good scores can be compared with (check_calibration_shift), or
    None: scores taken under another ignore mask are on another scale. A mask only lowers scores, so only
    good scores above whole images' still say "these are not good parts"; under another mask nothing
    can be compared."""
    if previous is None or previous.ignore_mask == new.ignore_mask:
        return previous
    upward = new.threshold > previous.threshold or (
        previous.good_mean is not None and float(np.median(good_scores)) > previous.good_mean)
    return previous if previous.ignore_mask is None and upward else None


def whole_image_recalibration(previous: Optional[Calibration], where: str) -> Optional[str]:
    """The warning line for calibrating ``where`` on whole images when its threshold was set under an
    ignore mask (the camera that judges under it gets a threshold on another scale), else None."""
    if previous is None or not previous.ignore_mask:
        return None
    return warning_line(f"{where}: its threshold was set under an ignore mask (sha256 {previous.ignore_mask[:12]}); "
                        f"this one is set on whole images (--ignore-mask MASK sets it as a camera with that mask "
                        f"judges)")


def check_calibration_shift(previous: Optional[Calibration], good_scores, new_threshold: float,
                            accept_shift: bool, where: str, warn: Callable[[str], None]) -> None:
    """Refuse (CalibrationShiftError naming ``where``) a suspicious recalibration unless ``accept_shift``;
    with it, ``warn`` the same text and go on."""
    problem = calibration_shift(previous, good_scores, new_threshold)
    if problem is None:
        return
    if not accept_shift:
        raise CalibrationShiftError(f"{where}: {problem} (nothing was written)")
    warn(warning_line(f"{where}: {problem.replace('. Pass --accept-shift to write it anyway', '')}; "
                      "written because of --accept-shift"))
