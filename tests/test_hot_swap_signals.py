"""SIGHUP lands between any two steps of the main thread, which runs the frame loop: while that loop
holds the model slots' lock (``note`` after every frame, ``apply`` between rounds) too.

The stress runs in a subprocess (a hung handler cannot be ended from inside): the main thread notes
frames and applies swaps in a loop under ``reload_on_sighup`` while another thread sends it SIGHUPs a
few milliseconds apart; then the same with the start-up hold (``hangups_held``). The ModelSlots are
real; the one model path's file is absent, so every reload the signals start is refused, which the
records show.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

signal = pytest.importorskip("signal")
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")

STRESS = textwrap.dedent("""
    import json, os, signal, sys, threading, time
    from types import SimpleNamespace
    import numpy as np
    from mrkd.runtime.line.swap import ModelSlots, hangups_held, reload_on_sighup

    running = SimpleNamespace(model_path="/nonexistent/model.onnx", model_sha256="a" * 64, close=lambda: None)
    def opener(path):
        raise OSError(f"{path}: no such file")
    slots = ModelSlots({"k": running}, opener, status=lambda text: None)
    image = np.zeros((4, 4, 3), np.uint8)

    def send(count, done):
        for _ in range(count):
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.003)
        done.set()

    # start-up: SIGHUPs while the line is not running yet (busy on locks of its own meanwhile)
    with hangups_held() as held:
        done = threading.Event()
        threading.Thread(target=send, args=(50, done), daemon=True).start()
        busy = threading.Lock()
        while not done.is_set():
            with busy:
                pass
        with reload_on_sighup(slots, held=held):
            done = threading.Event()
            threading.Thread(target=send, args=(300, done), daemon=True).start()
            frames = 0
            while not done.is_set():      # the frame loop: a frame noted, staged swaps applied
                slots.note("k", image, 0.1)
                slots.apply(())
                frames += 1
    slots.wait_idle(30)
    print(json.dumps({"frames": frames, "reasons": sorted({r["reason"] for r in slots.report()}),
                      "outcomes": sorted({r["outcome"] for r in slots.report()})}))
""")


def test_sighups_while_the_loop_holds_the_slots_lock_never_hang_the_run():
    """A SIGHUP's handler took the slots' lock itself: landing while the loop held it (note, apply), it
    waited for that lock forever on the thread that held it. `mrkd run --loop` and 400 SIGHUPs 3 ms apart
    hung (even SIGTERM could not stop it) or died of the signal (rc 129) in 2 of 4 tries; this stress
    hung within seconds. Now every signal is answered by a reload and the loop goes on."""
    try:
        done = subprocess.run([sys.executable, "-c", STRESS], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the loop hung under SIGHUPs: {(exc.stderr or b'')[-2000:]!r}")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["frames"] > 0
    # the signals held at start-up are answered once, then the loop's own: each load finds no file
    assert result["reasons"] == ["SIGHUP", "SIGHUP during start-up"], result
    assert result["outcomes"] == ["refused"], result
