"""run_tests.sh itself, run on stand-ins (its setup a no-op, pytest a sleep) in a copy of the script's folder, on a
PATH of a few Essential programs only: what it needs to stop its isolated groups is there on a fresh Debian."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Debian's Essential programs (coreutils) the script and its stand-ins use; procps' pkill is not among them.
BASH = shutil.which("bash")
ESSENTIAL = ("dirname", "mktemp", "cat", "rm", "sleep")
# The stand-in for .venv/bin/python: records its pid (the isolated groups' runs have no -n), then waits as a test
# run would, for SECONDS, with the same pid (exec).
STAND_IN = """#!/bin/bash
case " $* " in *" -n "*) group=main;; *) group=isolated;; esac
echo $$ >> "$(dirname "$0")/../../$group.pids"
exec sleep "${SECONDS_TO_RUN:-60}"
"""


def script_copy(folder: Path) -> dict:
    """run_tests.sh in ``folder`` with a no-op setup and the pytest stand-in; returns the environment to run it."""
    (folder / "scripts").mkdir(parents=True)
    (folder / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(ROOT / "run_tests.sh", folder / "run_tests.sh")
    for path, text in {folder / "scripts" / "setup_env.sh": "#!/bin/bash\nexit 0\n",
                       folder / ".venv" / "bin" / "python": STAND_IN}.items():
        path.write_text(text)
        path.chmod(0o755)
    programs = folder / "bin"
    programs.mkdir()
    for name in ESSENTIAL:
        (programs / name).symlink_to(shutil.which(name))
    return dict(os.environ, PATH=str(programs))


def pids(folder: Path, group: str) -> list:
    path = folder / f"{group}.pids"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def running(pid: int) -> bool:
    """Alive and not a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_for(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_a_terminated_run_stops_its_isolated_group_without_procps(tmp_path):
    """CI cancels a run with SIGTERM to run_tests.sh: the isolated group's pytest, running beside the main group,
    stops with it, and no later group starts. The EXIT trap's pkill (procps, which a fresh Debian lacks and no setup
    installed) could not run there, and that pytest ran on for its full length, orphaned; with procps, the group it
    killed was followed by the next group's pytest before the subshell went (2 of 3 runs), which ran on instead."""
    env = script_copy(tmp_path)
    output = tmp_path / "output.txt"         # a file, not a pipe: a stand-in left running would hold a pipe open
    with open(output, "w") as out:
        run = subprocess.Popen([BASH, str(tmp_path / "run_tests.sh")], env=env, stdout=out, stderr=out)
    try:
        assert wait_for(lambda: pids(tmp_path, "main") and pids(tmp_path, "isolated"), 20), output.read_text()
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=20)
        isolated = pids(tmp_path, "isolated")
        assert wait_for(lambda: not any(running(pid) for pid in isolated), 5), \
            f"the isolated group's pytest {isolated} ran on after run_tests.sh ended: {output.read_text()[-500:]}"
    finally:
        for pid in pids(tmp_path, "main") + pids(tmp_path, "isolated"):
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        if run.poll() is None:
            run.kill()


def test_every_group_passing_exits_0_and_one_failing_exits_1(tmp_path):
    """The trap that stops the groups leaves the script's status alone (a75638c: its pkill, finding nothing, once
    made a clean run exit 1)."""
    env = dict(script_copy(tmp_path), SECONDS_TO_RUN="0")
    done = subprocess.run([BASH, str(tmp_path / "run_tests.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert len(pids(tmp_path, "isolated")) == 4 and len(pids(tmp_path, "main")) == 1
    python = tmp_path / ".venv" / "bin" / "python"
    python.write_text(STAND_IN.replace('exec sleep "${SECONDS_TO_RUN:-60}"', '[ $group = main ] || exit 1'))
    done = subprocess.run([BASH, str(tmp_path / "run_tests.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1, done.stderr
