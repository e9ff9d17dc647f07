"""A SIGHUP that comes while `mrkd run` finishes (after its last part of --max-parts) is answered in the
log: the run is stopping, so the model is not reloaded; one after the summary, while the detectors close,
is ignored (it ended the process with -1, killed by the signal's default action). Before, such a request got no answer at all: a
version it staged was never swapped in nor said (nothing in the log or the summary's model_swaps), and
one that came once the line's handler was gone was kept by the start-up hold without a word.

`mrkd run --trigger software --trigger-every` runs as a subprocess; a prelude holds it at one step of
its end (as test_hot_swap's start-up test holds its start) so that the signal lands there every time.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from test_hot_swap import _deployment, _reap, _wait_for, install

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")

# run_parts returned (the line's SIGHUP handler still in place) / the summary being made (the line's
# handler gone): held there for 3 s, said on stderr
HOLDS = {
    "parts_over": ("import mrkd.runtime.cli as cli\nreal = cli.run_parts\n"
                   "def held(*args, **kwargs):\n    summary = real(*args, **kwargs)\n"
                   "    print('run held', file=sys.stderr, flush=True)\n    time.sleep(3)\n    return summary\n"
                   "cli.run_parts = held\n"),
    "summary": ("from mrkd.runtime.line.swap import ModelSlots\nreal = ModelSlots.report\n"
                "def held(self):\n    print('run held', file=sys.stderr, flush=True)\n    time.sleep(3)\n"
                "    return real(self)\n"
                "ModelSlots.report = held\n"),
    # the summary written and both handlers gone: the detectors closing (then the exit)
    "closing": ("from mrkd.runtime.detector import Detector\nreal = Detector.close\n"
                "def held(self):\n    print('run held', file=sys.stderr, flush=True)\n    time.sleep(3)\n"
                "    return real(self)\n"
                "Detector.close = held\n"),
}


@pytest.mark.parametrize("where", sorted(HOLDS))
def test_a_sighup_as_the_run_finishes_is_said_not_acted_on(tmp_path, where):
    folder, live, sha_a, sha_b = _deployment(tmp_path, seed=7, new_threshold=0.2)
    stderr_path = tmp_path / "stderr.txt"
    code = ("import sys, time\n" + HOLDS[where] +
            "from mrkd.cli import main\nsys.argv[0] = 'mrkd'\nmain(sys.argv[1:])")
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", code, "run", str(live), "--source", str(folder), "--loop",
                                 "--trigger", "software", "--trigger-every", "0.05", "--max-parts", "5",
                                 "--status-every", "0"], stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        _wait_for(lambda: "run held" in stderr_path.read_text() or proc.poll() is not None, 60, "the run's end")
        install(tmp_path / "v2.onnx", live)
        proc.send_signal(signal.SIGHUP)
        out, _ = proc.communicate(timeout=60)
    finally:
        _reap(proc)
    log = stderr_path.read_text()
    assert proc.returncode == 0, log[-2000:]
    summary = json.loads(out[out.index("{"):])
    assert summary["parts"] == 5
    said = [line for line in log.splitlines() if "SIGHUP" in line]
    if where == "closing":      # after the summary: ignored (before, its default action killed the process)
        assert said == [] and summary["model_swaps"] == [], log[-2000:]
        return
    assert len(said) == 1, log[-2000:]
    if where == "parts_over":      # loaded and checked, but no part came to take it
        assert said[0].startswith("model reload (SIGHUP) of ") and ": not applied (" in said[0], said
        assert "the model is not reloaded" in said[0]
        assert [(s["reason"], s["outcome"], s["old_sha256"], s["new_sha256"]) for s in summary["model_swaps"]] == [
            ("SIGHUP", "not applied", sha_a, sha_b)], summary["model_swaps"]
    else:
        assert said == ["SIGHUP: the run is stopping; the model is not reloaded"], said
        assert summary["model_swaps"] == []
