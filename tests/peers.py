"""Real peers for integration tests: find a Debian program, install it when we can, skip loudly when not.

CI runs as root with apt: the first test that needs a missing program runs ``apt-get update`` once
and installs the package. Elsewhere (no root, no apt, no network) the test is skipped with a reason
that says exactly what to install.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import pytest

_LOCK = Path("/tmp/mrkd-tests-apt.lock")
_UPDATED = Path("/tmp/mrkd-tests-apt.updated")


def _can_apt() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None


def apt_install(packages: Sequence[str]) -> Optional[str]:
    """Install Debian packages (``apt-get update`` once per machine boot); returns an error text or None."""
    if not _can_apt():
        return "not root with apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    with open(_LOCK, "w") as lock:           # pytest-xdist or two sessions: one apt at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _UPDATED.exists():
            update = subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=600)
            if update.returncode != 0:
                return f"apt-get update failed: {update.stderr.strip()[-300:]}"
            _UPDATED.touch()
        done = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *packages], env=env,
                              capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            return f"apt-get install {' '.join(packages)} failed: {done.stderr.strip()[-300:]}"
    return None


def require(check: Callable[[], bool], packages: Sequence[str], what: str) -> None:
    """Skip the calling test, loudly, unless ``check()`` holds (after installing ``packages`` if needed)."""
    if check():
        return
    error = apt_install(packages)
    if check():
        return
    message = (f"SKIPPED, NOT TESTED: {what} is missing and could not be installed ({error or 'still missing'}); "
               f"install Debian's {' '.join(packages)} to run this test")
    print(message, file=sys.stderr)
    pytest.skip(message)


def require_program(program: str, packages: Sequence[str]) -> str:
    """Path of ``program`` (e.g. mosquitto), installing ``packages`` when it is missing."""
    require(lambda: shutil.which(program) is not None or Path(program).exists(), packages, program)
    return shutil.which(program) or program


ARAVIS_PACKAGES = ("gir1.2-aravis-0.8",)
ARAVIS_IMPORT = "import gi; gi.require_version('Aravis', '0.8'); from gi.repository import Aravis"


def aravis_importable() -> bool:
    """Aravis' GObject data (apt) and PyGObject (setup.py's dev extra) in this Python, checked in a child
    process: GObject's threads then never start in the process that asks."""
    return subprocess.run([sys.executable, "-c", ARAVIS_IMPORT], capture_output=True, timeout=60).returncode == 0


def require_aravis_bindings() -> None:
    """Aravis 0.8 importable through PyGObject (Debian's GObject data, installed when missing)."""
    require(aravis_importable, ARAVIS_PACKAGES, "Aravis 0.8 through PyGObject (gi.repository.Aravis)")


def require_gige_simulator() -> None:
    """Everything a GigE Vision run against Aravis' simulator needs (benchmarks/fake_gige.py): Aravis
    through PyGObject, the simulator, and iproute2's ip (loopback addresses) and ss (its UDP port)."""
    require_aravis_bindings()
    require_program("arv-fake-gv-camera-0.8", ["aravis-tools"])
    require_program("ip", ["iproute2"])
    require_program("ss", ["iproute2"])


DEBIAN_PYTHON = "/usr/bin/python3"


def debian_python_has(module_check: str) -> bool:
    """Does Debian's own Python run ``module_check`` (code) without error? (python3-gi lives there,
    not in the project's venv.)"""
    if not Path(DEBIAN_PYTHON).exists():
        return False
    return subprocess.run([DEBIAN_PYTHON, "-c", module_check], capture_output=True, timeout=60).returncode == 0


def rtsp_check(gst_elements: Sequence[str]) -> str:
    """Code for Debian's Python: the RTSP server bindings import and every element in ``gst_elements`` exists."""
    return ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
            "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
            f"missing = [n for n in {tuple(gst_elements)!r} if not Gst.ElementFactory.find(n)]; "
            "assert not missing, missing")


RTSP_PACKAGES = ("python3-gi", "gir1.2-gst-rtsp-server-1.0")


def require_rtsp_server(codec: str = "mjpeg") -> str:
    """Debian's Python with GStreamer's RTSP server bindings and exactly the elements that tests/rtsp_server.py
    builds for ``codec`` (tests/rtsp_pipelines.py; h264 needs x264enc from gstreamer1.0-plugins-ugly);
    returns that interpreter's path."""
    from rtsp_pipelines import elements, packages
    needed = elements(codec)
    require(lambda: debian_python_has(rtsp_check(needed)), RTSP_PACKAGES + packages(codec),
            f"GStreamer's RTSP server (python3-gi) with {', '.join(needed)}")
    return DEBIAN_PYTHON
