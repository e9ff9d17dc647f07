"""Shadow runs: a candidate model scores the frames the live model judged, raising no alarm.

``ShadowScorer`` is a LineObserver: ``on_frame`` hands each judged frame (with the live model's score,
decision and hash) to a bounded queue; a thread of its own scores the frame with the candidate and
keeps the comparison: frames compared, how often the two decisions differ (candidate alarms the live
model did not raise, and the reverse), and the Pearson correlation of the scores (running sums).
When the candidate cannot keep up, the oldest waiting frames are dropped and counted — the live
line never waits for the shadow. ``comparison()`` is what the summary and the health line show;
promote the candidate with the hot swap (move it to the live model's path, SIGHUP or POST /reload).

The comparison is of one pair of models, the candidate and one live model, and starts again whenever
the live model changes: every hot swap of it (given the line's ``ModelSlots``, whose swaps it watches),
a promotion of the candidate, a roll back to a version compared before and a new calibration of the same
file alike (pooled with the old pair's frames they would describe neither: after a roll back the counts
went on from the earlier time that version ran; after a promotion they drifted towards the candidate
agreeing with itself). The candidate itself is fixed for the run. A line whose cameras run several live
models has one current pair per live model. ``comparison()`` is the current pair of the model that judged
last (the page, the health line), ``comparisons()`` every current pair (/metrics), ``history()`` every pair
since the start, oldest first (the summary's ``by_live_model``; a model rolled back to is there twice).

In triggered mode there are no frames: the part runner (runtime/line/parts.py) calls ``offer`` with
each image a part's live model judged, its score and the decision against the camera's threshold,
so ``frames`` counts part images (one per camera per part by default).
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

from mrkd.runtime.ignore_mask import IgnoreMask, masked
from mrkd.runtime.line.alarms import is_anomalous
from mrkd.runtime.metadata import model_file_sha256
from mrkd.runtime.outputs.base import FrameResult, LineObserver, OutputHealth

SHADOW_SCHEMA_VERSION = 3      # 2: live_sha256, one comparison per live model; 3: ``pair``, a new one per swap


@dataclass(frozen=True)
class ShadowComparison:
    candidate: str
    candidate_sha256: str
    threshold: float
    frames: int                      # frames both models scored
    disagreements: int               # decisions that differ
    candidate_only: int              # the candidate would alarm, the live model did not
    live_only: int                   # the live model flagged it, the candidate would not
    score_correlation: Optional[float]
    dropped: int                     # frames the candidate had no time for
    errors: int
    live_sha256: str = ""            # the live model these frames were judged by ("" when not known)
    pair: int = 0                    # which pair of the run, from 1 (0: none yet): each swap starts a new one
    schema_version: int = SHADOW_SCHEMA_VERSION

    @property
    def disagreement_rate(self) -> float:
        return self.disagreements / self.frames if self.frames else 0.0


class _Tally:
    """The comparison with one live model: counts and the running sums of the score correlation."""

    def __init__(self, live_sha256: str = ""):
        self.live_sha256 = live_sha256
        self.frames = self.disagreements = self.candidate_only = self.live_only = self.dropped = self.errors = 0
        self.sums = [0.0] * 5        # x, y, xx, yy, xy (x live, y candidate)

    def add(self, live_score: float, live_decision: bool, score: float, mine: bool) -> None:
        self.frames += 1
        if mine != live_decision:
            self.disagreements += 1
            if mine:
                self.candidate_only += 1
            else:
                self.live_only += 1
        for i, value in enumerate((live_score, score, live_score ** 2, score ** 2, live_score * score)):
            self.sums[i] += value

    def correlation(self) -> Optional[float]:
        n, (sx, sy, sxx, syy, sxy) = self.frames, self.sums
        if n > 1:
            vx, vy = n * sxx - sx * sx, n * syy - sy * sy
            if vx > 0 and vy > 0:
                return (n * sxy - sx * sy) / math.sqrt(vx * vy)
        return None


class ShadowScorer(LineObserver):
    """Scores every judged frame (of ``cameras``, default all) with ``detector`` on its own thread.
    ``slots``: the line's ModelSlots (runtime/line/swap.py); each swap it applies starts a new pair."""

    def __init__(self, detector, cameras=None, queue_size: int = 8, slots=None):
        if detector.threshold is None:
            from mrkd.errors import SettingError
            raise SettingError(f"--shadow {detector.model_path}: the candidate has no calibrated threshold")
        self.detector = detector
        self.cameras = set(cameras) if cameras else None
        self._queue: "queue.Queue" = queue.Queue(maxsize=max(1, queue_size))
        self._lock = threading.Lock()
        self._tallies: Dict[int, _Tally] = {}     # pair number -> its comparison, from 1 in order of first frame
        self._current: Dict[str, int] = {}        # live model sha256 -> the pair it is in now
        self._last_live = ""                        # the live model of the newest frame offered
        self._sha = model_file_sha256(detector.model_path)
        self._thread = threading.Thread(target=self._work, name="shadow", daemon=True)
        self._thread.start()
        if slots is not None:
            slots.watch(self.live_model_swapped)

    def live_model_swapped(self, record) -> None:
        """A swap (a SwapRecord) replaced the live model ``record.old_sha256`` by ``record.new_sha256``:
        the next frame of the new one starts a new pair (frames of the old one still queued end the old
        pair). Called by ModelSlots.apply on the thread that offers the frames, before the first new one."""
        with self._lock:
            self._current.pop(record.old_sha256, None)
            self._current.pop(record.new_sha256, None)
            if self._last_live == record.old_sha256:
                self._last_live = record.new_sha256

    def on_frame(self, result: FrameResult) -> None:
        self.offer(result.camera, result.image, result.score, result.anomalous, result.model_sha256, result.ignore_mask)

    def offer(self, camera: str, image, live_score: float, live_anomalous: bool, live_sha256: str = "",
              mask: Optional[IgnoreMask] = None) -> None:
        """An image the live model ``live_sha256`` judged (``live_score``; ``live_anomalous``: its
        decision) under the ignore ``mask`` (the candidate scores it under the same): queued for the
        candidate, never waiting (the oldest waiting image is dropped and counted)."""
        if self.cameras is not None and camera not in self.cameras:
            return
        with self._lock:
            self._last_live = live_sha256
            pair = self._current.get(live_sha256)
            if pair is None:                  # this live model's first frame, or its first since a swap
                pair = self._current[live_sha256] = len(self._tallies) + 1
                self._tallies[pair] = _Tally(live_sha256)
        item = (image, float(live_score), bool(live_anomalous), pair, mask)
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                self._drop_oldest()

    def _drop_oldest(self) -> bool:
        """Take the oldest waiting image off the queue unscored, counted as dropped in its pair; False when
        none is waiting."""
        try:
            dropped = self._queue.get_nowait()
        except queue.Empty:
            return False
        self._queue.task_done()
        with self._lock:
            self._tallies[dropped[3]].dropped += 1
        return True

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            try:
                self._compare(*item)
            finally:
                self._queue.task_done()

    def _compare(self, image, live_score: float, live_decision: bool, pair: int, mask: Optional[IgnoreMask]) -> None:
        try:
            result = self.detector(image)
            _, score = masked(mask, result.maps[0], float(result.scores[0]), image.shape[:2], self.detector.metadata)
        except Exception:   # noqa: BLE001 - a failing candidate must not touch the line
            with self._lock:
                self._tallies[pair].errors += 1
            return
        mine = bool(is_anomalous(score, self.detector.threshold))
        with self._lock:
            self._tallies[pair].add(live_score, live_decision, score, mine)

    def _comparison(self, pair: int, tally: _Tally) -> ShadowComparison:
        return ShadowComparison(str(self.detector.model_path), self._sha, float(self.detector.threshold),
                                tally.frames, tally.disagreements, tally.candidate_only, tally.live_only,
                                tally.correlation(), tally.dropped, tally.errors, tally.live_sha256, pair)

    def comparison(self) -> ShadowComparison:
        """The current pair of the live model that judged the newest frame offered (all zero before any,
        and after a swap until the new model's first frame)."""
        with self._lock:
            pair = self._current.get(self._last_live, 0)
            return self._comparison(pair, self._tallies.get(pair) or _Tally(self._last_live))

    def comparisons(self) -> List[ShadowComparison]:
        """The current pairs: one per live model judging now (a model swapped out is no longer one)."""
        with self._lock:
            return [self._comparison(pair, self._tallies[pair]) for pair in sorted(self._current.values())]

    def history(self) -> List[ShadowComparison]:
        """Every pair since the start, oldest first."""
        with self._lock:
            return [self._comparison(pair, tally) for pair, tally in self._tallies.items()]

    def health(self) -> OutputHealth:
        c = self.comparison()
        corr = "n/a" if c.score_correlation is None else f"{c.score_correlation:.3f}"
        # the counts are the run's, every pair's (/metrics exposes them as counters: the current pair's went
        # back down at each swap, a reset to Prometheus); the detail is the current pair's
        with self._lock:
            tallies = list(self._tallies.values())
        return OutputHealth(name="shadow", ok=c.errors == 0, state="comparing", sent=sum(t.frames for t in tallies),
                            failed=sum(t.errors for t in tallies), dropped=sum(t.dropped for t in tallies),
                            target=c.candidate,
                            detail=f"decisions differ on {c.disagreements} of {c.frames} frames "
                                   f"({c.candidate_only} candidate-only alarms, {c.live_only} live-only); "
                                   f"score correlation {corr}{self._live_note(c)}")

    def _live_note(self, current: ShadowComparison) -> str:
        """Which live model the numbers are against, once there has been more than one pair (a hot swap)."""
        if current.live_sha256 and current.live_sha256 == current.candidate_sha256:
            return "; the candidate is the live model now (promoted): these frames compare it with itself"
        with self._lock:
            earlier = len(self._tallies) - (current.pair > 0)
        if earlier:
            return f" (against the live model {current.live_sha256[:12]} since it went live; {earlier} earlier " \
                   f"pair(s) in the summary)"
        return ""

    def drain(self, timeout: float = 10.0) -> None:
        """Wait (at most ``timeout``) until every queued frame is scored (tests, the end of a run)."""
        import time
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def on_stop(self, drain_s: float = 5.0) -> None:
        """Score what is queued (within ``drain_s``); what is still waiting then counts as dropped, so the
        summary's frames and dropped add up to every image offered (nothing lost without a count)."""
        self.drain(drain_s)
        while self._drop_oldest():
            pass
        self._queue.put(None)
        self._thread.join(timeout=max(5.0, drain_s))
        self.detector.close()

    def summary(self) -> dict:
        """The current comparison (as ``comparison()``) and, under ``by_live_model``, every pair since the
        start (``history()``)."""
        comparison = self.comparison()
        data = asdict(comparison)
        data["disagreement_rate"] = comparison.disagreement_rate
        data["by_live_model"] = [dict(asdict(c), disagreement_rate=c.disagreement_rate) for c in self.history()]
        # what the candidate runs on: it may be another precision than the live model (an INT8 graph; bf16
        # under --backend auto only where its own check passed), which its disagreements then include
        data["candidate_backend"] = self.detector.backend.name
        data["candidate_precision"] = self.detector.precision
        return data
