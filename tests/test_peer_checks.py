"""The checks in tests/peers.py look for exactly what a test's peer will use, so a machine that lacks a
part skips the test loudly instead of failing it somewhere inside the peer.

- GStreamer's RTSP server builds elements of its own around the launch line (RTP session, UDP and TCP
  paths): every element a real server builds while FFmpeg plays it, over UDP and over TCP, is one that
  require_rtsp_server checked (GST_DEBUG names each element as it is made).
- (node-opcua's check, a node that cannot load the client: tests/test_plc_opcua_hostile.py, in the PLC
  tests' own process.)
- Every Python package the tests import is named in setup.py's dev set, not only pulled in by another.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from peers import require_rtsp_server
from rtsp_pipelines import elements

from mrkd.benchmarks.mosquitto import free_port

SERVER = Path(__file__).with_name("rtsp_server.py")
MADE = re.compile(r'creating element "([A-Za-z0-9_-]+)"')
# Reads frames the way the runtime does (OpenCV's FFmpeg backend), over the transport given.
PLAY = ("import cv2, sys\n"
        "cap = cv2.VideoCapture(sys.argv[1], cv2.CAP_FFMPEG)\n"
        "print(sum(cap.read()[0] for _ in range(5)))\n")


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("codec", ["mjpeg", "h264"])
def test_the_rtsp_server_builds_only_elements_that_were_checked(tmp_path, codec, transport):
    python = require_rtsp_server(codec)
    port, log = free_port(), tmp_path / "gst.log"
    env = dict(os.environ, GST_DEBUG="GST_ELEMENT_FACTORY:5", GST_DEBUG_NO_COLOR="1", GST_DEBUG_FILE=str(log))
    server = subprocess.Popen([python, str(SERVER), "--port", str(port), "--codec", codec], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = server.stdout.readline()
        assert ready.startswith("READY"), ready + server.stderr.read()[-500:]
        player_env = dict(os.environ, OPENCV_FFMPEG_CAPTURE_OPTIONS=f"rtsp_transport;{transport}")
        played = subprocess.run([sys.executable, "-c", PLAY, ready.split()[1]], capture_output=True, text=True,
                                timeout=60, env=player_env)
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
    assert played.stdout.strip() == "5", played.stdout + played.stderr[-1000:]
    made = set(MADE.findall(log.read_text(errors="replace")))
    assert {"rtpbin", "udpsrc" if transport == "udp" else "appsrc"} <= made      # the log was read
    assert made <= set(elements(codec)), f"made but never checked: {sorted(made - set(elements(codec)))}"


PLUGIN_FOLDER = ("import gi; gi.require_version('Gst', '1.0'); from gi.repository import Gst; Gst.init(None); "
                 "print(Gst.ElementFactory.find('videotestsrc').get_plugin().get_filename())")


def test_a_machine_without_one_encoder_skips_naming_that_element_and_its_package(tmp_path, monkeypatch):
    """GStreamer's plugins, all but x264's (a fresh machine without gstreamer1.0-plugins-ugly, simulated with a
    plugin folder of links and a registry of its own): the h264 camera's check names x264enc and its package,
    and nothing that is there; the mjpeg camera, which does not use x264enc, is ready."""
    import peers
    python = require_rtsp_server("h264")
    system = Path(subprocess.run([python, "-c", PLUGIN_FOLDER], capture_output=True, text=True,
                                 check=True).stdout.strip()).parent
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    for plugin in system.glob("libgst*.so"):
        if plugin.name != "libgstx264.so":
            (plugins / plugin.name).symlink_to(plugin)
    monkeypatch.setenv("GST_PLUGIN_SYSTEM_PATH_1_0", str(plugins))
    monkeypatch.setenv("GST_REGISTRY_1_0", str(tmp_path / "registry.bin"))
    monkeypatch.setattr(peers, "apt_install", lambda packages: "apt-get left out by this test")
    assert require_rtsp_server("mjpeg") == python
    with pytest.raises(pytest.skip.Exception) as skipped:
        require_rtsp_server("h264")
    reason = str(skipped.value)
    assert "GStreamer element x264enc (gstreamer1.0-plugins-ugly) is missing" in reason, reason
    assert "rtpbin" not in reason and "videotestsrc" not in reason, reason


def test_each_element_comes_from_the_debian_package_named_for_it():
    """ELEMENT_PACKAGES is what gets installed: each element's plugin file belongs (dpkg -S) to the package named
    for it, so a wrong name cannot pass here because the right package happened to be installed already.
    Elements built into GStreamer's library (bin, pipeline) have no plugin file: the library's owner is checked."""
    from rtsp_pipelines import ELEMENT_PACKAGES
    python = require_rtsp_server("h264")
    code = ("import ctypes.util, gi, sys; gi.require_version('Gst', '1.0'); from gi.repository import Gst\n"
            "Gst.init(None)\n"
            "library = '*/' + ctypes.util.find_library('gstreamer-1.0')\n"
            "for name in sys.argv[1:]:\n"
            "    print(name, Gst.ElementFactory.find(name).get_plugin().get_filename() or library)\n")
    found = subprocess.run([python, "-c", code, *ELEMENT_PACKAGES], capture_output=True, text=True, check=True)
    wrong = {}
    for line in found.stdout.splitlines():
        name, path = line.split(" ", 1)
        owner = _debian_package_of(path)
        if owner != ELEMENT_PACKAGES[name]:
            wrong[name] = (path, owner, ELEMENT_PACKAGES[name])
    assert len(found.stdout.splitlines()) == len(ELEMENT_PACKAGES)
    assert not wrong, f"element: (plugin file, its package, the package the table installs): {wrong}"


def _debian_package_of(path: str) -> str:
    """The Debian package that owns ``path`` (/lib is /usr/lib on Debian 12, and dpkg knows /usr/sbin/ip as
    /sbin/ip; "*/libx.so.0" in any folder)."""
    candidates = [path] + (["/usr" + path] if path.startswith("/lib/") else [])
    candidates += [path[len("/usr"):]] if path.startswith(("/usr/bin/", "/usr/sbin/")) else []
    for candidate in candidates:
        done = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        if done.returncode == 0:
            return done.stdout.split(":", 1)[0]
    return "(no package)"


def _provided_by(owner: str) -> set:
    """``owner`` and the package names its control data Provides (NodeSource's nodejs provides npm)."""
    done = subprocess.run(["dpkg-query", "-W", "-f=${Provides}", owner], capture_output=True, text=True)
    return {owner} | {entry.split()[0] for entry in done.stdout.split(",") if entry.strip()}


def _module_constants(path: Path) -> dict:
    """A module's top-level NAME = "text" constants."""
    import ast
    return {target.id: node.value.value for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            for target in node.targets if isinstance(target, ast.Name)}


def _string_constants(path: Path) -> dict:
    """A test module's constants, with those it imports (anywhere in it) from another test module's top level."""
    import ast
    constants = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and path.with_name(f"{node.module}.py").is_file():
            imported = _module_constants(path.with_name(f"{node.module}.py"))
            constants.update({alias.name: imported[alias.name] for alias in node.names if alias.name in imported})
    return {**constants, **_module_constants(path)}


def _required_programs(path: Path) -> set:
    """(program, packages) of each require_program(PROGRAM, [PACKAGE, ...]) call in ``path``."""
    import ast
    constants = _string_constants(path)
    required = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "require_program" and len(node.args) == 2:
            program, packages = node.args
            name = program.value if isinstance(program, ast.Constant) else constants.get(getattr(program, "id", ""))
            assert name, f"{path.name}:{node.lineno}: require_program's program is no constant this test can read"
            required.add((name, tuple(ast.literal_eval(packages))))
    return required


def test_each_required_program_comes_from_the_debian_package_named_for_it():
    """The package require_program installs for a missing program is the one that really ships it (dpkg -S of
    the program found): a wrong or sibling package name passes unnoticed on a machine that has the program
    already, and fails on a fresh one, which installs the wrong package and still lacks the program."""
    from peers import require_program
    required = set().union(*(_required_programs(path) for path in Path(__file__).parent.glob("*.py")
                             if path.name != Path(__file__).name))
    assert len({program for program, _ in required}) >= 15, sorted(required)      # the calls were read
    wrong = {}
    for program, packages in sorted(required):
        found = require_program(program, packages)
        owner = _debian_package_of(found)
        if not _provided_by(owner) & set(packages):
            wrong[program] = (found, owner, packages)
    assert not wrong, f"program: (found at, its Debian package, the packages require_program installs): {wrong}"


# Modules the tests import only where a GPU is there, each guarded by a skip that says so (conftest.py).
GPU_ONLY_MODULES = {"tensorrt", "cupy"}


def _declared_distributions() -> set:
    """Distribution names in setup.py's install_requires and its dev extra (what setup_env.sh dev installs)."""
    import runpy
    import unittest.mock
    root = Path(__file__).resolve().parent.parent
    with unittest.mock.patch("setuptools.setup") as setup, unittest.mock.patch.object(sys, "argv", ["setup.py"]):
        cwd = os.getcwd()
        os.chdir(root)
        try:
            runpy.run_path(str(root / "setup.py"), run_name="__main__")
        finally:
            os.chdir(cwd)
    kwargs = setup.call_args.kwargs
    specs = kwargs["install_requires"] + kwargs["extras_require"]["dev"]
    return {re.split(r"[<>=!;\[ ]", spec, maxsplit=1)[0].lower().replace("_", "-") for spec in specs}


# The code the tests run, besides tests/ (setup.py installs these folders as mrkd.*). The anomalib peer's side
# scripts run in a virtual environment of their own (scripts/setup_anomalib_venv.sh), never in .venv.
CODE_FOLDERS = ("mrkd", "runtime", "train", "export", "benchmarks")
OTHER_VENV = {"anomalib_side.py", "anomalib_quality_side.py"}


def test_every_package_the_tests_import_is_installed_by_the_dev_setup():
    """A package that came along only as another's dependency (pillow with matplotlib, cryptography with
    asyncua) goes when that one stops needing it: the imports of the tests and of the code they run
    (runtime/plc's asyncua, runtime/sources/gige's gi, ...) are named in setup.py."""
    import ast
    import importlib.metadata
    here = Path(__file__).resolve().parent
    own = {path.stem for path in here.glob("*.py")} | {"mrkd"}
    sources = list(here.glob("*.py")) + [path for folder in CODE_FOLDERS
                                         for path in (here.parent / folder).rglob("*.py")
                                         if path.name not in OTHER_VENV]
    imported = {}
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "importorskip" and node.args
                  and isinstance(node.args[0], ast.Constant)):
                names = [node.args[0].value]
            for name in names:
                imported.setdefault(name.split(".")[0], path.name)
    third_party = {m: f for m, f in imported.items()
                   if m not in sys.stdlib_module_names and m not in own and m not in GPU_ONLY_MODULES}
    providers = importlib.metadata.packages_distributions()
    declared = _declared_distributions()
    undeclared = {}
    for module, where in sorted(third_party.items()):
        names = {name.lower().replace("_", "-") for name in providers.get(module, [module])}
        if not names & declared:
            undeclared[module] = (sorted(names), where)
    assert not undeclared, f"imported by tests or the code they run, not in setup.py's dev set: {undeclared}"


def _modules_skipped_without() -> dict:
    """{module: test file} of each pytest.importorskip("module") in the tests."""
    import ast
    skipped = {}
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "importorskip" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                skipped.setdefault(node.args[0].value, path.name)
    return skipped


def test_every_module_a_test_would_skip_without_imports_in_the_dev_setup():
    """pytest.importorskip skips a test when its module does not import. For a module setup.py's dev set installs
    (torch, asyncua, pymodbus, openvino, elpv_dataset, ...) that skip only hides a broken setup: the module's
    tests would all pass as skipped. Each such module imports here (in a child: no library's threads in this
    process); only the GPU-only ones may be missing."""
    import importlib.metadata
    skipped = _modules_skipped_without()
    providers = importlib.metadata.packages_distributions()
    declared = _declared_distributions()
    installed_by_setup = sorted(module for module in skipped
                                if module.split(".")[0] not in sys.stdlib_module_names | GPU_ONLY_MODULES
                                and {name.lower().replace("_", "-") for name in
                                     providers.get(module.split(".")[0], [module.split(".")[0]])} & declared)
    assert len(installed_by_setup) >= 10, installed_by_setup          # the calls were read
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except Exception as exc:\n"
            "        print(f'{name}: {type(exc).__name__}: {exc}'[:300])\n")
    done = subprocess.run([sys.executable, "-c", code, *installed_by_setup], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    failed = {line.split(":", 1)[0]: (skipped[line.split(":", 1)[0]], line) for line in done.stdout.splitlines()}
    assert not failed, f"installed by the dev setup, yet does not import (its tests would skip): {failed}"


def test_every_package_the_opcua_client_scripts_require_is_installed_and_checked():
    """tests/opcua_client/*.js require() npm packages: each is a direct dependency in package.json and in the
    lockfile's root (what npm ci installs; a package there only as another's dependency goes when that one stops
    needing it), and among the modules node_client_ready loads before a test runs them."""
    import ast
    import json
    import re
    here = Path(__file__).resolve().parent
    client_dir = here / "opcua_client"
    # test_plc_opcua's NODE_MODULES, read without importing it (asyncua into this process)
    checked = next(ast.literal_eval(node.value) for node in ast.parse((here / "test_plc_opcua.py").read_text()).body
                   if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "NODE_MODULES")
    scripts = sorted(client_dir.glob("*.js"))
    required = {name for script in scripts
                for name in re.findall(r"""require\(\s*["']([^"'./][^"']*)["']\s*\)""", script.read_text())}
    packages = required - NODE_BUILTINS
    assert len(scripts) >= 10 and "node-opcua-client" in packages, (scripts, required)
    declared = json.loads((client_dir / "package.json").read_text())["dependencies"]
    locked = json.loads((client_dir / "package-lock.json").read_text())["packages"][""]["dependencies"]
    assert packages <= set(declared) and packages <= set(locked) and packages <= set(checked), \
        (sorted(packages), declared, locked, checked)


NODE_BUILTINS = {"fs", "readline", "path", "os", "crypto", "child_process", "util", "events", "net"}


# Programs of Debian's Essential packages (on every Debian, never installed): dash's sh, bash, dpkg's two.
ESSENTIAL_PROGRAMS = {"sh", "bash", "dpkg", "dpkg-query"}


def _programs_run_by_name(tree) -> set:
    """The programs a module runs by a literal name: subprocess.run/Popen/call/check_output([NAME, ...])."""
    import ast
    names = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess"
                and node.func.attr in {"run", "Popen", "call", "check_call", "check_output"} and node.args
                and isinstance(node.args[0], ast.List) and node.args[0].elts
                and isinstance(node.args[0].elts[0], ast.Constant)):
            names.add(node.args[0].elts[0].value)
        elif isinstance(node, ast.Call) and _called_name(node) in HELPER_PROGRAMS:
            names.add(HELPER_PROGRAMS[_called_name(node)])
            if _called_name(node) == "Mosquitto" and any(k.arg == "passwords" for k in node.keywords):
                names.add("mosquitto_passwd")      # writes the broker's password file first
    return names


# The peers' helpers in mrkd.benchmarks that run a program of their own (its name their parameter's default:
# test_the_peer_helpers_run_the_programs_named_here), and what peers.require_gige_simulator requires.
HELPER_PROGRAMS = {"mbpoll": "mbpoll", "Mosquitto": "mosquitto", "FakeGigeCamera": "arv-fake-gv-camera-0.8"}
GIGE_SIMULATOR_PROGRAMS = {"arv-fake-gv-camera-0.8", "ip", "ss"}


def _called_name(call) -> str:
    return getattr(call.func, "id", "") or getattr(call.func, "attr", "")


def _programs_required(tree) -> set:
    """The literal names a module passes to peers.require_program (each installed when missing, else a loud skip),
    and the GigE simulator's programs where it calls peers.require_gige_simulator."""
    import ast
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    required = {node.args[0].value for node in calls if getattr(node.func, "id", "") == "require_program"
                and node.args and isinstance(node.args[0], ast.Constant)}
    if any(_called_name(node) == "require_gige_simulator" for node in calls):
        required |= GIGE_SIMULATOR_PROGRAMS
    return required


def test_the_peer_helpers_run_the_programs_named_here():
    import inspect
    from mrkd.benchmarks import fake_gige, mosquitto, plc_peer
    defaults = {name: inspect.signature(helper).parameters["program"].default for name, helper in
                (("mbpoll", plc_peer.mbpoll), ("Mosquitto", mosquitto.Mosquitto),
                 ("FakeGigeCamera", fake_gige.FakeGigeCamera))}
    assert defaults == HELPER_PROGRAMS
    assert inspect.getsource(mosquitto.Mosquitto.__init__).count('shutil.which("mosquitto_passwd")') == 1


def test_every_program_a_test_runs_by_name_is_required_first():
    """A program run as subprocess.run(["pgrep", ...]), or by a peer helper (plc_peer.mbpoll, Mosquitto,
    FakeGigeCamera), without require_program("pgrep", [package]) in the same file is there by chance: a fresh
    Debian (procps is not in its minimal set) fails inside the test with FileNotFoundError instead of installing
    it or skipping with the package's name."""
    import ast
    unchecked = {}
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        if path.name == "peers.py":          # the installer: apt-get, found with shutil.which before use
            continue
        tree = ast.parse(path.read_text())
        missing = _programs_run_by_name(tree) - _programs_required(tree) - ESSENTIAL_PROGRAMS
        if missing:
            unchecked[path.name] = sorted(missing)
    assert not unchecked, f"run by name but never require_program()-ed: {unchecked}"


def test_a_machine_without_one_decoder_skips_the_video_check_naming_that_element_and_its_package(tmp_path,
                                                                                                  monkeypatch):
    """The annotated-video tests read their AVI back with GStreamer (test_video_off_loop.DECODE): without jpegdec's
    plugin (simulated as above) the check names jpegdec and its package, not avidemux, which is there; and the
    elements checked are exactly those of the pipeline the tests run (filesrc and the caps filter included)."""
    import peers
    import test_video_off_loop
    from rtsp_pipelines import launch_elements
    python = peers.require_gstreamer_elements(test_video_off_loop.DECODE_ELEMENTS)
    assert set(test_video_off_loop.DECODE_ELEMENTS) == {"filesrc", "avidemux", "jpegdec", "videoconvert",
                                                         "capsfilter", "appsink"}
    assert launch_elements(test_video_off_loop.DECODE_PIPELINE) == test_video_off_loop.DECODE_ELEMENTS
    system = Path(subprocess.run([python, "-c", PLUGIN_FOLDER], capture_output=True, text=True,
                                 check=True).stdout.strip()).parent
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    for plugin in system.glob("libgst*.so"):
        if plugin.name != "libgstjpeg.so":
            (plugins / plugin.name).symlink_to(plugin)
    monkeypatch.setenv("GST_PLUGIN_SYSTEM_PATH_1_0", str(plugins))
    monkeypatch.setenv("GST_REGISTRY_1_0", str(tmp_path / "registry.bin"))
    monkeypatch.setattr(peers, "apt_install", lambda packages: "apt-get left out by this test")
    with pytest.raises(pytest.skip.Exception) as skipped:
        peers.require_gstreamer_elements(test_video_off_loop.DECODE_ELEMENTS)
    reason = str(skipped.value)
    assert "GStreamer element jpegdec (gstreamer1.0-plugins-good) is missing" in reason, reason
    assert "avidemux" not in reason, reason
