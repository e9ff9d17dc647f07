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
from typing import Callable, List, Optional, Sequence, Union

import pytest

_LOCK = Path("/tmp/mrkd-tests-apt.lock")
# set once apt-get update ran this boot; scripts/apt_need.sh (the setup) writes and reads it too
_UPDATED = Path(os.environ.get("MRKD_APT_UPDATED", "/tmp/mrkd-tests-apt.updated"))


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
        install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:      # lists from earlier this boot gone stale (scripts/apt_need.sh does the same)
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=600)
            done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            return f"apt-get install {' '.join(packages)} failed: {done.stderr.strip()[-300:]}"
    return None


def require(check: Callable[[], bool], packages: Sequence[str], what: Union[str, Callable[[], str]]) -> None:
    """Skip the calling test, loudly, unless ``check()`` holds (after installing ``packages`` if needed);
    ``what`` names the missing thing (a callable: asked after the last check, to name exactly what it found)."""
    if check():
        return
    error = apt_install(packages)
    if check():
        return
    what = what() if callable(what) else what
    message = (f"SKIPPED, NOT TESTED: {what} is missing and could not be installed ({error or 'still missing'}); "
               f"install Debian's {' '.join(packages)} to run this test")
    print(message, file=sys.stderr)
    pytest.skip(message)


def require_program(program: str, packages: Sequence[str]) -> str:
    """Path of ``program`` (e.g. mosquitto), installing ``packages`` when it is missing."""
    require(lambda: shutil.which(program) is not None or Path(program).exists(), packages, program)
    return shutil.which(program) or program


LIBFAKETIME_PLACES = ("/usr/lib/x86_64-linux-gnu/faketime", "/usr/lib/aarch64-linux-gnu/faketime", "/usr/lib/faketime")


def libfaketime() -> Optional[str]:
    """The multi-threaded libfaketime (Debian's libfaketime) to preload, or None."""
    return next((str(Path(place) / "libfaketimeMT.so.1") for place in LIBFAKETIME_PLACES
                 if (Path(place) / "libfaketimeMT.so.1").is_file()), None)


def require_libfaketime() -> str:
    """The path of libfaketime's multi-threaded library (installing Debian's faketime when missing): an
    LD_PRELOAD that moves a real process's wall clock (``FAKETIME``), and with
    ``FAKETIME_TIMESTAMP_FILE`` and ``FAKETIME_NO_CACHE=1`` moves it mid-run."""
    require(lambda: libfaketime() is not None, ["faketime", "libfaketime"], "libfaketime (libfaketimeMT.so.1)")
    return libfaketime()


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


def require_loopback_address(address: str) -> None:
    """``address`` on ``lo`` for a simulator (added when missing, which needs CAP_NET_ADMIN): skip loudly
    where it cannot be added, as the GigE tests do when their simulator cannot start."""
    from mrkd.benchmarks.fake_gige import add_loopback_address
    error = add_loopback_address(address)
    if error:
        message = f"SKIPPED, NOT TESTED: cannot give the GigE simulator its loopback address: {error}"
        print(message, file=sys.stderr)
        pytest.skip(message)


DEBIAN_PYTHON = "/usr/bin/python3"


def gstreamer_check(gst_elements: Sequence[str], typelibs: Sequence[str] = ("Gst",)) -> str:
    """Code for Debian's Python (python3-gi lives there, not in the venv): fails unless each of ``typelibs``
    imports, then prints each of ``gst_elements`` that GStreamer cannot make, one a line."""
    versions = "".join(f"gi.require_version({name!r}, '1.0'); " for name in typelibs)
    return (f"import gi; {versions}from gi.repository import {', '.join(typelibs)}; Gst.init(None); "
            f"print('\\n'.join(n for n in {tuple(gst_elements)!r} if not Gst.ElementFactory.find(n)))")


GSTREAMER_PACKAGES = ("python3-gi", "gir1.2-gstreamer-1.0")
RTSP_PACKAGES = ("python3-gi", "gir1.2-gst-rtsp-server-1.0")


def missing_gstreamer_parts(gst_elements: Sequence[str], typelibs: Sequence[str] = ("Gst",),
                            packages: Sequence[str] = GSTREAMER_PACKAGES) -> List[str]:
    """What Debian's Python lacks to make ``gst_elements`` (through ``typelibs``, from ``packages``), each part
    named with its Debian package; [] when nothing is missing. (A skip then says which element is missing, not
    only which ones were looked for.)"""
    from rtsp_pipelines import ELEMENT_PACKAGES
    if not Path(DEBIAN_PYTHON).exists():
        return [f"{DEBIAN_PYTHON} (python3)"]
    done = subprocess.run([DEBIAN_PYTHON, "-c", gstreamer_check(gst_elements, typelibs)], capture_output=True,
                          text=True, timeout=60)
    if done.returncode != 0:
        error = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return [f"GStreamer's Python bindings {', '.join(typelibs)} ({', '.join(packages)}: {error})"]
    return [f"GStreamer element {name} ({ELEMENT_PACKAGES[name]})" for name in done.stdout.split()]


def _require_gstreamer(gst_elements: Sequence[str], typelibs: Sequence[str], packages: Sequence[str],
                       what: str) -> str:
    from rtsp_pipelines import ELEMENT_PACKAGES
    missing: List[str] = []

    def complete() -> bool:
        missing[:] = missing_gstreamer_parts(gst_elements, typelibs, packages)
        return not missing

    element_packages = tuple(sorted({ELEMENT_PACKAGES[name] for name in gst_elements}))
    require(complete, tuple(packages) + element_packages, lambda: f"{what}'s {', '.join(missing)}")
    return DEBIAN_PYTHON


def require_gstreamer_elements(gst_elements: Sequence[str]) -> str:
    """Debian's Python with GStreamer's bindings and exactly ``gst_elements`` (each one's package from
    tests/rtsp_pipelines.py's ELEMENT_PACKAGES, installed when missing); returns that interpreter's path."""
    return _require_gstreamer(gst_elements, ("Gst",), GSTREAMER_PACKAGES, "the GStreamer pipeline")


def require_rtsp_server(codec: str = "mjpeg") -> str:
    """Debian's Python with GStreamer's RTSP server bindings and exactly the elements that tests/rtsp_server.py
    builds for ``codec`` (tests/rtsp_pipelines.py; h264 needs x264enc from gstreamer1.0-plugins-ugly);
    returns that interpreter's path."""
    from rtsp_pipelines import elements
    _require_gstreamer(elements(codec), ("Gst", "GstRtspServer"), RTSP_PACKAGES, f"the {codec} RTSP test camera")
    require_opencv_ffmpeg()          # the runtime's side of every RTSP test
    return DEBIAN_PYTHON


def require_opencv_ffmpeg() -> None:
    """OpenCV's FFmpeg backend, which reads rtsp:// and network streams in the runtime (pip's
    opencv-python-headless has it built in; a distribution's OpenCV may not)."""
    import cv2
    if not cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG):
        message = ("SKIPPED, NOT TESTED: this OpenCV has no FFmpeg backend (cv2.CAP_FFMPEG); "
                   "install PyPI's opencv-python-headless (scripts/setup_env.sh)")
        print(message, file=sys.stderr)
        pytest.skip(message)


_NODE_LOADED: set = set()           # (node, folder, modules) seen loading: asked once a session


def _node_loads(node: str, folder: Path, modules: Sequence[str]) -> Optional[str]:
    """None when ``node`` can require() every one of ``modules`` from ``folder``, else why not (one line)."""
    key = (node, str(folder), tuple(modules))
    if key in _NODE_LOADED:
        return None
    code = "".join(f"require({name!r});" for name in modules)
    done = subprocess.run([node, "-e", code], cwd=folder, capture_output=True, text=True, timeout=120)
    if done.returncode == 0:
        _NODE_LOADED.add(key)
        return None
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    errors = [line.strip() for line in done.stderr.splitlines() if "Error" in line] or [done.stderr.strip()[-200:]]
    return f"Node.js {version or '(version unknown)'}: {errors[0][:300]}"


def dev_setup_node() -> Optional[str]:
    """The Node.js that setup.py's dev extra brings with playwright (its driver runs on a node of its own, newer
    than Debian 12's 18); None where there is none."""
    import importlib.util
    spec = importlib.util.find_spec("playwright")
    if spec is None or not spec.submodule_search_locations:
        return None
    node = Path(list(spec.submodule_search_locations)[0]) / "driver" / "node"
    return str(node) if node.is_file() and os.access(node, os.X_OK) else None


def require_node_client(folder: Path, modules: Sequence[str]) -> str:
    """Debian's node and npm (installed when missing), ``npm ci`` of ``folder``'s lockfile when any of
    ``modules`` is not there, then the first node that really loads each of them: Debian's, else the dev
    setup's (dev_setup_node); that node's path. The lockfile's node-opcua needs Node.js 20.19 or newer (it
    require()s ES modules) and Debian 12's nodejs is 18, which installs but cannot load it; where no node can,
    the test skips loudly instead of failing in the client's stack trace."""
    node = require_program("node", ["nodejs"])
    npm = require_program("npm", ["npm"])
    if not all((folder / "node_modules" / name / "package.json").is_file() for name in modules):
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=folder, capture_output=True,
                              text=True, timeout=600)
        if done.returncode != 0:
            message = f"SKIPPED, NOT TESTED: npm ci in {folder} failed: {done.stderr.strip()[-500:]}"
            print(message, file=sys.stderr)
            pytest.skip(message)
    errors = []
    for candidate in dict.fromkeys(n for n in (node, dev_setup_node()) if n):
        error = _node_loads(candidate, folder, modules)
        if error is None:
            return candidate
        errors.append(f"{candidate} ({error})")
    message = (f"SKIPPED, NOT TESTED: {', '.join(modules)} (npm ci in {folder}) cannot be loaded by "
               f"{' nor by '.join(errors)}; install Node.js 20.19 or newer")
    print(message, file=sys.stderr)
    pytest.skip(message)
