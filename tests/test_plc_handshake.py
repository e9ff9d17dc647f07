"""The PLC handshake state machine on its own (runtime/plc/handshake.py), against a TriggerTarget
written in the test: every transition, every refused trigger, the results buffer and its overrun."""

from __future__ import annotations

import math
import threading
from fractions import Fraction

import pytest

from plc_fixtures import QueueTarget

from mrkd.runtime.outputs.base import Verdict
from mrkd.runtime.plc.handshake import (ERROR_UNKNOWN, Handshake, HandshakeError, ResultCode, error_codes,
                                        per_mille, plc_part_id)


def handshake(queue=1, capacity=8):
    target = QueueTarget(queue=queue)
    plc = Handshake(target, capacity=capacity)
    target.observers.append(plc)
    return target, plc


def pulse_trigger(plc):
    receipt = plc.set_trigger(True)
    plc.set_trigger(False)
    return receipt


def test_idle_image():
    _, plc = handshake()
    image = plc.image()
    assert image.online and not image.trigger_ready        # Trigger Enable is 0
    assert not (image.trigger_ack or image.busy or image.results_valid or image.part_ok or image.part_ng)
    assert not (image.overrun or image.missed_trigger or image.error) and image.result is None
    plc.set_trigger_enable(True)
    assert plc.image().trigger_ready


def test_trigger_ack_follows_the_trigger_level_and_busy_the_line():
    target, plc = handshake()
    plc.set_trigger_enable(True)
    plc.set_part_id(4711)
    receipt = plc.set_trigger(True)
    assert receipt.accepted and target.calls == [("4711", 0)]
    image = plc.image()
    assert image.trigger_ack and image.busy and not image.trigger_ready and not image.results_valid
    assert plc.set_trigger(True) is None and len(target.calls) == 1      # a held level is no new edge
    plc.set_trigger(False)
    image = plc.image()
    assert not image.trigger_ack and image.busy and not image.trigger_ready   # queue of 1 is full
    target.judge(Verdict.NG, score=0.25)
    image = plc.image()
    assert image.trigger_ready and not image.busy and image.results_valid and image.part_ng and not image.part_ok
    result = image.result
    assert (result.result_code, result.inspection_id, result.part_id, result.per_mille) == (ResultCode.NG, 1, 4711, 2500)
    assert result.processing_ms == 12 and image.parts_judged == 1 and image.parts_ng == 1


def test_trigger_without_enable_is_refused_counted_and_never_reaches_the_line():
    target, plc = handshake()
    assert plc.set_trigger(True) is None
    image = plc.image()
    assert image.missed_trigger and image.missed_triggers == 1 and not image.trigger_ack
    assert target.calls == []
    plc.set_trigger(False)
    plc.set_trigger_enable(True)
    assert pulse_trigger(plc).accepted
    assert plc.image().missed_triggers == 1                           # sticky flag, count unchanged


def test_trigger_while_busy_is_refused_by_the_line_and_counted_once():
    target, plc = handshake(queue=1)
    plc.set_trigger_enable(True)
    assert pulse_trigger(plc).accepted
    assert not plc.image().trigger_ready
    receipt = pulse_trigger(plc)                                    # the line is busy: not Trigger Ready
    assert receipt is not None and not receipt.accepted and receipt.reason == "queue full"
    image = plc.image()
    assert image.missed_trigger and image.missed_triggers == 1 and not image.trigger_ack
    target.judge()
    assert plc.image().results_waiting == 1                          # only the accepted part has a result


def test_offline():
    target, plc = handshake()
    plc.set_trigger_enable(True)
    plc.set_offline(True)
    assert not target.online and not plc.image().online and not plc.image().trigger_ready
    receipt = pulse_trigger(plc)      # the offline line refuses it: counted once, reported to every output
    assert not receipt.accepted and receipt.reason == "offline" and plc.image().missed_triggers == 1
    assert target.pending == [] and plc.image().missed_trigger
    plc.set_offline(False)
    assert target.online and plc.image().trigger_ready and pulse_trigger(plc).accepted


def test_results_buffer_in_order_and_ack_presents_the_next():
    target, plc = handshake(queue=10)
    plc.set_trigger_enable(True)
    for part in range(3):
        plc.set_part_id(100 + part)
        pulse_trigger(plc)
    verdicts = [Verdict.OK, Verdict.NG, Verdict.OK]
    for verdict in verdicts:
        target.judge(verdict, score=0.3 if verdict == Verdict.NG else 0.02)
    seen = []
    while plc.image().results_valid:
        image = plc.image()
        seen.append((image.result.inspection_id, image.result.part_id, image.part_ok, image.part_ng,
                     image.results_waiting))
        assert plc.image().result == image.result                      # stays until acknowledged
        plc.set_results_ack(True)
        plc.set_results_ack(True)                                      # held: no second edge
        plc.set_results_ack(False)
    assert seen == [(1, 100, True, False, 3), (2, 101, False, True, 2), (3, 102, True, False, 1)]
    plc.set_results_ack(True)                                          # nothing presented: no effect
    assert plc.image().result is None and plc.image().parts_judged == 3


def test_overrun_keeps_what_the_plc_reads_and_drops_the_newest():
    target, plc = handshake(queue=100, capacity=8)
    plc.set_trigger_enable(True)
    for part in range(11):
        plc.set_part_id(part)
        pulse_trigger(plc)
    for _ in range(8):
        target.judge()
    before = plc.image()
    assert before.results_waiting == 8 and not before.overrun and before.result.part_id == 0
    for _ in range(3):
        target.judge()
    after = plc.image()
    assert after.result == before.result and after.results_waiting == 8
    assert after.overrun and after.results_dropped == 3 and after.parts_judged == 11
    ids = []
    while plc.image().results_valid:
        ids.append(plc.image().result.part_id)
        plc.set_results_ack(True)
        plc.set_results_ack(False)
    assert ids == list(range(8))                                     # the dropped ones are the newest three
    assert plc.image().overrun                                         # sticky until Clear Error
    plc.set_clear_error(True)
    assert not plc.image().overrun and plc.image().results_dropped == 3


def test_error_part_sets_error_until_clear_error():
    target, plc = handshake(queue=5)
    plc.set_trigger_enable(True)
    pulse_trigger(plc)
    pulse_trigger(plc)
    target.judge(Verdict.ERROR, error_code=1)
    image = plc.image()
    assert image.error and image.error_code == 1 and image.result.result_code == ResultCode.ERROR
    assert not image.part_ok and not image.part_ng and math.isnan(image.result.score) and image.result.per_mille == 0
    target.judge(Verdict.ERROR, error_code=0)
    assert plc.image().error_code == ERROR_UNKNOWN
    plc.set_clear_error(True)
    assert not plc.image().error and plc.image().error_code == 0
    plc.set_clear_error(True)
    plc.set_clear_error(False)
    assert plc.image().results_waiting == 2                            # Clear Error leaves the results


def test_recipe_applies_from_the_next_trigger_and_unknown_is_refused():
    target, plc = handshake(queue=5)
    plc.set_trigger_enable(True)
    pulse_trigger(plc)
    plc.set_recipe(2)
    assert plc.image().active_recipe == 2
    pulse_trigger(plc)
    with pytest.raises(HandshakeError, match="recipe 7"):
        plc.set_recipe(7)
    pulse_trigger(plc)
    assert [recipe for _, recipe in target.calls] == [0, 2, 2]
    with pytest.raises(HandshakeError):
        plc.set_part_id(70000)


def test_stopped_line_refuses():
    target, plc = handshake()
    plc.set_trigger_enable(True)
    plc.on_stop()
    assert not plc.image().online and pulse_trigger(plc) is None and target.calls == []


def test_ack_and_trigger_ack_survive_a_trigger_that_falls_before_the_answer():
    """The trigger level goes back to 0 while the line answers (another thread): no Trigger Ack stuck at 1."""
    target, plc = handshake()
    plc.set_trigger_enable(True)
    original = target.trigger

    def slow_trigger(*args):
        plc.set_trigger(False)
        return original(*args)

    target.trigger = slow_trigger
    assert plc.set_trigger(True).accepted
    assert not plc.image().trigger_ack


def test_per_mille_and_part_id_against_exact_arithmetic():
    for score, threshold in [(0.05, 0.1), (0.1, 0.1), (0.123456, 0.1), (1e9, 0.1), (0.0004, 0.8), (2.5, 3.0)]:
        exact = Fraction(score) * 1000 / Fraction(threshold)
        expected = min(65535, int(exact + Fraction(1, 2)))     # half up; no .5 ties among these
        assert per_mille(score, threshold) == expected, (score, threshold)
    assert per_mille(math.nan, 0.1) == 0 and per_mille(-1.0, 0.1) == 0 and per_mille(1.0, 0.0) == 65535
    assert [plc_part_id(t) for t in ("17", "65535", "65536", "P-17", "", " 3 ")] == [17, 65535, 0, 0, 0, 3]


def test_error_codes_are_the_part_runner_codes():
    from mrkd.runtime.line.parts import ERROR_CODES
    codes = error_codes()
    assert {code for code in codes if code not in (0, ERROR_UNKNOWN)} == set(ERROR_CODES.values())
    assert len(set(ERROR_CODES.values())) == len(ERROR_CODES)


def test_images_never_mix_two_results_under_concurrent_parts_and_acks():
    target, plc = handshake(queue=10_000, capacity=8)
    plc.set_trigger_enable(True)
    for part in range(600):
        plc.set_part_id(part)
        pulse_trigger(plc)
    stop = threading.Event()
    problems = []

    def reader():
        last = 0
        while not stop.is_set():
            image = plc.image()
            if image.results_valid != (image.result is not None) or image.results_waiting > 8:
                problems.append(image)
            if image.result is not None:
                r = image.result
                if r.part_id != r.inspection_id - 1 or (image.part_ok, image.part_ng) != (r.result_code == 1, r.result_code == 2):
                    problems.append(image)
                if r.inspection_id < last:
                    problems.append(("backwards", last, r.inspection_id))
                last = r.inspection_id

    def acker():
        while not stop.is_set():
            plc.set_results_ack(True)
            plc.set_results_ack(False)

    threads = [threading.Thread(target=reader), threading.Thread(target=acker)]
    for thread in threads:
        thread.start()
    for i in range(600):
        target.judge(Verdict.NG if i % 3 == 0 else Verdict.OK, score=0.3 if i % 3 == 0 else 0.01)
    stop.set()
    for thread in threads:
        thread.join()
    assert problems == []
    image = plc.image()
    assert image.parts_judged == 600 and image.parts_ng == 200
    assert image.results_dropped + image.results_waiting <= 600
