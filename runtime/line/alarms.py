"""Alarm policy: when do anomalous frames become an alarm?

A frame is anomalous when its score reaches the calibrated threshold (score >= threshold, as in
mrkd.train.calibrate). Debounce: an alarm needs ``k`` anomalous frames among the last ``n`` (one
noisy frame is not an alarm). Cooldown: after an alarm, no new one for ``cooldown_s`` seconds of
frame time and ``cooldown_frames`` frames (one defect passing the camera is one alarm, not thirty).
Frame time is a video file's media time; where a frame is stamped with the wall clock (a live camera, a
folder without a rate) the loop gives the monotonic clock instead (``decide``'s ``clock``): a wall clock
set back an hour made every frame "within the cooldown" of the last alarm, and the line silent, for an hour.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, fields
from typing import Optional, Tuple

import numpy as np

from mrkd.errors import MrkdError


class AlarmSettingsError(MrkdError, ValueError):
    """An alarm setting (threshold, debounce, cooldown) is missing or out of range."""


def is_anomalous(score, threshold: float):
    """The one decision rule (runtime, evaluation, export reports): a score that reaches the threshold
    is anomalous, ``score >= threshold``. A bool for a number, a bool array for an array."""
    if isinstance(score, (int, float, np.floating, np.integer)):
        return bool(score >= threshold)
    return np.asarray(score) >= threshold


@dataclass(frozen=True)
class Decision:
    """One frame's verdict under the policy: anomalous (the one rule) and the alarm it raised, if any."""

    anomalous: bool
    alarm: Optional["Alarm"] = None


@dataclass
class Alarm:
    """An alarm raised on frame ``frame_index`` (the k-th anomalous frame of the window)."""

    frame_index: int
    timestamp: float
    score: float
    threshold: float
    anomalous_in_window: int


@dataclass(frozen=True)
class AlarmSettings:
    """One camera's alarm rule: ``threshold`` (None: the model's calibrated one), ``debounce`` (k, n):
    k anomalous frames among the last n, ``cooldown`` seconds of frame time and ``cooldown_frames``
    frames after an alarm without a new one. The one list of these settings: the line file's camera
    fields, ``mrkd run``'s options and ``Camera`` all read it (``ALARM_FIELDS``)."""

    threshold: Optional[float] = None
    debounce: Tuple[int, int] = (1, 1)
    cooldown: float = 5.0
    cooldown_frames: int = 0

    def __post_init__(self):
        k, n = self.debounce
        if not 1 <= k <= n:
            raise AlarmSettingsError(f"debounce K/N needs 1 <= K <= N, got {k}/{n}")
        if not self.cooldown >= 0 or self.cooldown_frames < 0:
            raise AlarmSettingsError("cooldown must be >= 0")

    def policy(self, model_threshold: Optional[float]) -> "AlarmPolicy":
        """The AlarmPolicy of these settings over a model whose calibrated threshold is ``model_threshold``."""
        threshold = self.threshold if self.threshold is not None else model_threshold
        return AlarmPolicy(threshold, self.debounce, self.cooldown, self.cooldown_frames)


ALARM_FIELDS = tuple(f.name for f in fields(AlarmSettings))


def parse_debounce(text: str) -> Tuple[int, int]:
    """"K/N" -> (k, n), e.g. "3/5": three anomalous frames among the last five."""
    try:
        k, n = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise AlarmSettingsError(f"debounce must look like K/N (e.g. 3/5), got {text!r}") from None
    return k, n


class AlarmPolicy:
    """Threshold + k-of-n debounce + cooldown. Feed it every scored frame with ``update``."""

    def __init__(self, threshold: float, debounce: Tuple[int, int] = (1, 1), cooldown_s: float = 0.0,
                 cooldown_frames: int = 0):
        k, n = debounce
        if threshold is None:
            raise AlarmSettingsError("no alarm threshold: the model metadata has none; pass --threshold")
        if not 1 <= k <= n:
            raise AlarmSettingsError(f"debounce K/N needs 1 <= K <= N, got {k}/{n}")
        if cooldown_s < 0 or cooldown_frames < 0:
            raise AlarmSettingsError("cooldown must be >= 0")
        self.threshold = float(threshold)
        self.k, self.n = k, n
        self.cooldown_s = float(cooldown_s)
        self.cooldown_frames = int(cooldown_frames)
        self.window: deque = deque(maxlen=n)
        self._last_alarm: Optional[Tuple[int, float]] = None   # (frame index, its clock)
        self.alarms = 0
        self.suppressed = 0    # frames that met the debounce but fell in a cooldown

    def restart_window(self) -> None:
        """Forget the debounce window's votes (a hot swap: they were cast by the model replaced, so an alarm
        would count frames another model judged and name only the new one). The cooldown stays."""
        self.window.clear()

    def in_cooldown(self, frame_index: int, clock: float) -> bool:
        """True while the last alarm's cooldown (in seconds of ``clock``, and in frames) has not passed."""
        if self._last_alarm is None:
            return False
        last_index, last_time = self._last_alarm
        return clock - last_time < self.cooldown_s or frame_index - last_index < self.cooldown_frames

    def decide(self, frame_index: int, timestamp: float, score: float, clock: Optional[float] = None) -> Decision:
        """Record one frame's score; the frame's decision (anomalous, and the Alarm it raises if any):
        the loop and every output read it from here, nobody applies the rule a second time. ``clock``: the
        seconds the cooldown counts in (the monotonic clock for a frame stamped with the wall clock), else
        the frame's ``timestamp``."""
        clock = timestamp if clock is None else clock
        anomalous = is_anomalous(score, self.threshold)
        self.window.append(anomalous)
        count = sum(self.window)
        if not anomalous or count < self.k:
            return Decision(anomalous)
        if self.in_cooldown(frame_index, clock):
            self.suppressed += 1
            return Decision(anomalous)
        self._last_alarm = (frame_index, clock)
        self.alarms += 1
        return Decision(anomalous, Alarm(frame_index, timestamp, float(score), self.threshold, count))

    def update(self, frame_index: int, timestamp: float, score: float, clock: Optional[float] = None) -> Optional[Alarm]:
        """``decide`` for callers that only need the alarm."""
        return self.decide(frame_index, timestamp, score, clock).alarm
