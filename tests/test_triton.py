"""Triton model repository: config.pbtxt parsed back with a small parser written here."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from mrkd.export import ExportOptions, engine_metadata, export_onnx, write_triton_repository
from mrkd.runtime.metadata import ModelMetadata, sidecar_path
from export_fixtures import IMAGE_SIZE, small_model

TOKEN = re.compile(r'\s*(?:(\{|\}|\[|\]|:|,)|"([^"]*)"|([A-Za-z0-9_.\-]+))')


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format subset: fields, nested messages, lists; repeated fields become lists."""
    tokens = [m.group(1) or (m.group(2) if m.group(2) is not None else m.group(3))
              for m in TOKEN.finditer(text) if m.group(0).strip()]
    pos = 0

    def value():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "{":
            return message("}")
        if tok == "[":
            items = []
            while tokens[pos] != "]":
                items.append(value())
                if tokens[pos] == ",":
                    pos += 1
            pos += 1
            return items
        try:
            return int(tok)
        except ValueError:
            return tok

    def message(end):
        nonlocal pos
        fields = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            fields.setdefault(key, []).append(value())
        pos += 1
        return {k: v[0] if len(v) == 1 else v for k, v in fields.items()}

    return message(None)


def test_pbtxt_parser_reads_nested_fields():
    parsed = parse_pbtxt('name: "a"\nx [ { d: [ 1, 2 ] r: { s: [ ] } } ]\nq { p: [ 4 ] m: 5 }')
    assert parsed == {"name": "a", "x": [{"d": [1, 2], "r": {"s": []}}], "q": {"p": [4], "m": 5}}


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("triton")
    exported = export_onnx(small_model(), folder / "model.onnx", ExportOptions(uint8_input=True, batch_range=(1, 4, 8)),
                           simplify="never")
    return folder, exported


def test_onnxruntime_config(onnx_model, tmp_path):
    _, exported = onnx_model
    written = write_triton_repository(tmp_path / "repo", exported.path, name="mrkd_cam")
    assert list(written) == ["mrkd_cam"]
    config = parse_pbtxt(written["mrkd_cam"].read_text())
    assert config["name"] == "mrkd_cam" and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 8
    assert config["input"] == [{"name": "input", "data_type": "TYPE_UINT8", "dims": [IMAGE_SIZE, IMAGE_SIZE, 3]}]
    outputs = {o["name"]: o for o in config["output"]}
    assert outputs["anomaly_map"]["dims"] == [1, IMAGE_SIZE, IMAGE_SIZE]
    assert outputs["anomaly_map"]["data_type"] == "TYPE_FP32"
    assert outputs["score"]["dims"] == [1] and outputs["score"]["reshape"] == {"shape": []}
    assert config["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] > 0
    model_file = tmp_path / "repo" / "mrkd_cam" / "1" / "model.onnx"
    assert model_file.read_bytes() == exported.path.read_bytes()
    assert ModelMetadata.load(sidecar_path(model_file)).input_format == "uint8_nhwc_bgr"


def test_only_ascii_numbered_folders_are_versions(tmp_path):
    """A folder named "\u00b2" or "\u0661" beside the versions: str.isdigit() is true of both and int()
    refuses the first (a ValueError traceback from the export) and reads the second as version 1."""
    from mrkd.export.triton import versions
    for name in ("1", "3", "\u00b2", "\u0661", "0", "v2"):
        (tmp_path / name).mkdir()
    assert versions(tmp_path) == [1, 3]


def test_another_model_is_a_new_version_and_the_same_one_keeps_its_own(onnx_model, tmp_path):
    """A second export into the same repository: the same file keeps version 1; another model (here
    the graph with another doc string) becomes version 2 and version 1 stays as it was (a roll back)."""
    import onnx
    _, exported = onnx_model
    folder = tmp_path / "repo" / "mrkd"
    write_triton_repository(tmp_path / "repo", exported.path)
    first = (folder / "1" / "model.onnx").read_bytes()
    write_triton_repository(tmp_path / "repo", exported.path)
    assert sorted(p.name for p in folder.iterdir()) == ["1", "config.pbtxt"]
    graph = onnx.load(str(exported.path))
    graph.doc_string = "another model"
    other = tmp_path / "other" / "model.onnx"
    other.parent.mkdir()
    onnx.save(graph, str(other))
    shutil.copy(sidecar_path(exported.path), sidecar_path(other))
    write_triton_repository(tmp_path / "repo", other)
    assert sorted(p.name for p in folder.iterdir()) == ["1", "2", "config.pbtxt"]
    assert (folder / "1" / "model.onnx").read_bytes() == first == exported.path.read_bytes()
    assert (folder / "2" / "model.onnx").read_bytes() == other.read_bytes() != first
    assert ModelMetadata.load(sidecar_path(folder / "2" / "model.onnx")).input_format == "uint8_nhwc_bgr"


def test_tensorrt_plan_config_when_engine_exists(onnx_model, tmp_path):
    folder, exported = onnx_model
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"serialized engine bytes")   # the config writer only copies the plan
    meta = engine_metadata(exported.metadata, trt_version="10.3.0", gpu_name="Orin", compute_capability="8.7",
                           profile=(1, 2, 4), precision="fp16")
    meta.save(sidecar_path(engine))
    written = write_triton_repository(tmp_path / "repo", exported.path, engine_path=engine)
    plan = parse_pbtxt(written["mrkd_trt"].read_text())
    assert plan["platform"] == "tensorrt_plan" and plan["max_batch_size"] == 4
    assert plan["dynamic_batching"]["preferred_batch_size"] == [2, 4]
    assert (tmp_path / "repo" / "mrkd_trt" / "1" / "model.plan").read_bytes() == b"serialized engine bytes"


def _another_model(exported, folder):
    """The exported graph with another doc string (another file: a new version) and its sidecar."""
    import onnx
    graph = onnx.load(str(exported.path))
    graph.doc_string = "another model"
    other = folder / "model.onnx"
    folder.mkdir()
    onnx.save(graph, str(other))
    shutil.copy(sidecar_path(exported.path), sidecar_path(other))
    return other


def _tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("failing", ["sidecar", "config"])
def test_a_version_that_fails_half_way_is_not_left_for_triton_to_serve(onnx_model, tmp_path, monkeypatch, failing):
    """An error after the model file was copied (a full disk at its sidecar, or at config.pbtxt) left a version
    folder 2 holding model.onnx without its sidecar, or beside a config written for version 1, and Triton
    serves the newest version folder. Now a version folder appears whole or not at all: the repository keeps
    version 1 and its config byte for byte and nothing else (no staging folder either)."""
    import errno
    import mrkd.export.triton as triton
    _, exported = onnx_model
    repo = tmp_path / "repo"
    write_triton_repository(repo, exported.path)
    before = _tree(repo)
    other = _another_model(exported, tmp_path / "other")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "sidecar":
        monkeypatch.setattr(ModelMetadata, "save", full_disk)
    else:
        monkeypatch.setattr(triton, "atomic_write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_triton_repository(repo, other)
    assert _tree(repo) == before
    monkeypatch.undo()
    write_triton_repository(repo, other)
    assert sorted(p.name for p in (repo / "mrkd").iterdir()) == ["1", "2", "config.pbtxt"]
    assert (repo / "mrkd" / "2" / "model.onnx").read_bytes() == other.read_bytes()


def test_a_sigterm_while_a_version_is_renamed_in_waits_for_its_config(onnx_model, tmp_path, monkeypatch):
    """A SIGTERM that arrives as the version folder is renamed into place ends the export only once the
    config that goes with it is written; one that arrives while its files are copied leaves nothing new."""
    import signal
    import mrkd.export.triton as triton
    from mrkd.stopping import Terminated, sigterm_interrupts
    _, exported = onnx_model
    repo = tmp_path / "repo"
    real_copy, real_rename = triton._copy, os.rename

    def copy_then_stop(src, dst):
        real_copy(src, dst)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(triton, "_copy", copy_then_stop)
    with sigterm_interrupts(), pytest.raises(Terminated):
        write_triton_repository(repo, exported.path)
    assert _tree(repo) == {}         # the model folder made for it is gone too
    monkeypatch.undo()

    def rename_then_stop(src, dst):
        os.kill(os.getpid(), signal.SIGTERM)
        real_rename(src, dst)

    monkeypatch.setattr(triton.os, "rename", rename_then_stop)
    with sigterm_interrupts(), pytest.raises(Terminated):
        write_triton_repository(repo, exported.path)
    assert sorted(_tree(repo)) == ["mrkd", "mrkd/1", "mrkd/1/model.onnx", "mrkd/1/model.onnx.json",
                                   "mrkd/config.pbtxt"]
    assert parse_pbtxt((repo / "mrkd" / "config.pbtxt").read_text())["name"] == "mrkd"


def test_a_killed_exports_version_staging_is_named_by_the_next_export(tmp_path):
    """SIGKILL skips the clean-up of a version's staging folder; the next export into the repository names
    it in a warning, leaves it alone (an export may be running now) and writes its version as usual."""
    from mrkd.export.pipeline import export_checkpoint
    checkpoint = tmp_path / "a.ckpt"
    small_model().save(checkpoint)
    leftover = tmp_path / "triton" / "mrkd" / ".export-killed"
    (leftover / "1").mkdir(parents=True)
    (leftover / "1" / "model.onnx").write_bytes(b"half")
    lines = []
    export_checkpoint(checkpoint, tmp_path / "out", ExportOptions(batch_range=(1, 1, 2)), engine=False,
                      triton_dir=tmp_path / "triton", simplify="never", echo=lines.append)
    warned = [line for line in lines if line.startswith("warning:") and str(leftover) in line]
    assert len(warned) == 1 and "killed" in warned[0], lines
    assert (leftover / "1" / "model.onnx").read_bytes() == b"half"
    assert (tmp_path / "triton" / "mrkd" / "1" / "model.onnx").read_bytes() == (tmp_path / "out" / "model.onnx").read_bytes()


def _watch_renames(monkeypatch, repo) -> list:
    """What a polling Triton could meet after each rename: per model folder of ``repo`` (hidden ones
    aside), its entries."""
    import mrkd.export.triton as triton
    real_rename, seen = os.rename, []

    def rename_and_look(src, dst):
        real_rename(src, dst)
        seen.append({folder.name: sorted(p.name for p in folder.iterdir())
                     for folder in repo.iterdir() if folder.is_dir() and not folder.name.startswith(".")})

    monkeypatch.setattr(triton.os, "rename", rename_and_look)
    return seen


def test_a_new_model_folder_appears_with_its_config(onnx_model, tmp_path, monkeypatch):
    """A new model's version 1 was renamed into <repo>/mrkd/ a moment before config.pbtxt was written, so a
    Triton polling the repository could meet the model without its config (and auto-complete one). Now the
    model folder appears in one rename holding both; the next version still comes in beside them."""
    import mrkd.export.triton as triton
    _, exported = onnx_model
    repo = tmp_path / "repo"
    repo.mkdir()
    seen = _watch_renames(monkeypatch, repo)
    real_copy, while_writing = triton._copy, []

    def copy_and_look(src, dst):
        real_copy(src, dst)
        while_writing.append(sorted(p.name for p in repo.iterdir()))

    monkeypatch.setattr(triton, "_copy", copy_and_look)
    write_triton_repository(repo, exported.path)
    assert seen and all(entries == ["1", "config.pbtxt"] for view in seen for entries in view.values()), seen
    # Triton takes every folder of the repository for a model, hidden ones too (a staging folder there fails
    # its start-up): while the model is written, the repository holds nothing new
    assert while_writing == [[]], while_writing
    assert sorted(p.name for p in repo.iterdir()) == ["mrkd"]          # no staging left beside it
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert sorted(p.name for p in (repo / "mrkd" / "1").iterdir()) == ["model.onnx", "model.onnx.json"]
    assert parse_pbtxt((repo / "mrkd" / "config.pbtxt").read_text())["name"] == "mrkd"
    write_triton_repository(repo, _another_model(exported, tmp_path / "other"))
    assert sorted(p.name for p in (repo / "mrkd").iterdir()) == ["1", "2", "config.pbtxt"]


def test_a_new_model_is_staged_in_the_repository_where_its_parent_cannot_take_it(onnx_model, tmp_path,
                                                                                 monkeypatch):
    """A repository whose parent is not writable or on another file system (a mount point) stages the new
    model in the repository itself, for as long as the export writes it; the model still appears whole."""
    import mrkd.export.triton as triton
    _, exported = onnx_model
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.setattr(triton, "_renames_into", lambda beside, repo_dir: False)
    seen = _watch_renames(monkeypatch, repo)
    write_triton_repository(repo, exported.path)
    assert seen and all(entries == ["1", "config.pbtxt"] for view in seen for entries in view.values()), seen
    assert sorted(p.name for p in repo.iterdir()) == ["mrkd"]


@pytest.mark.parametrize("failing", ["sidecar", "config", "rename"])
def test_a_new_model_that_fails_before_its_rename_leaves_no_model_folder(onnx_model, tmp_path, monkeypatch,
                                                                         failing):
    """A full disk at the sidecar or at config.pbtxt, or a failing rename, leaves the repository as it was:
    no model folder, no staging folder."""
    import errno
    import mrkd.export.triton as triton
    _, exported = onnx_model
    repo = tmp_path / "repo"
    repo.mkdir()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "sidecar":
        monkeypatch.setattr(ModelMetadata, "save", full_disk)
    elif failing == "config":
        monkeypatch.setattr(triton, "atomic_write_text", full_disk)
    else:
        monkeypatch.setattr(triton.os, "rename", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_triton_repository(repo, exported.path)
    assert list(repo.iterdir()) == []


def test_a_model_folder_made_meanwhile_is_not_merged_into(onnx_model, tmp_path, monkeypatch):
    """Another export (or a person) that makes <repo>/mrkd/ while this one stages it: one line, and the
    folder made meanwhile keeps what it holds."""
    import mrkd.export.triton as triton
    from mrkd.export.onnx_graph import ExportError
    _, exported = onnx_model
    repo = tmp_path / "repo"
    real_copy = triton._copy

    def copy_while_another_writes(src, dst):
        real_copy(src, dst)
        (repo / "mrkd" / "1").mkdir(parents=True, exist_ok=True)
        (repo / "mrkd" / "1" / "model.onnx").write_bytes(b"the other export's")

    monkeypatch.setattr(triton, "_copy", copy_while_another_writes)
    with pytest.raises(ExportError, match="appeared while this export wrote it"):
        write_triton_repository(repo, exported.path)
    assert _tree(repo) == {"mrkd": None, "mrkd/1": None, "mrkd/1/model.onnx": b"the other export's"}


def test_a_killed_exports_model_staging_is_named_by_the_next_export(tmp_path):
    """SIGKILL skips the clean-up of a new model's staging folder in the repository; the next export names
    it in a warning, leaves it alone (an export may be running now) and writes its model as usual."""
    from mrkd.export.pipeline import export_checkpoint
    checkpoint = tmp_path / "a.ckpt"
    small_model().save(checkpoint)
    leftover = tmp_path / "triton" / ".export-killed"
    (leftover / "mrkd" / "1").mkdir(parents=True)
    (leftover / "mrkd" / "1" / "model.onnx").write_bytes(b"half")
    lines = []
    export_checkpoint(checkpoint, tmp_path / "out", ExportOptions(batch_range=(1, 1, 2)), engine=False,
                      triton_dir=tmp_path / "triton", simplify="never", echo=lines.append)
    warned = [line for line in lines if line.startswith("warning:") and str(leftover) in line]
    assert len(warned) == 1 and "killed" in warned[0], lines
    assert (leftover / "mrkd" / "1" / "model.onnx").read_bytes() == b"half"
    assert sorted(p.name for p in (tmp_path / "triton").iterdir()) == [".export-killed", "mrkd"]
    assert (tmp_path / "triton" / "mrkd" / "config.pbtxt").is_file()
    # beside the repository, where a new model is staged now: named too, once
    beside = tmp_path / ".export-killed-beside"
    (beside / "triton" / "other" / "1").mkdir(parents=True)
    lines.clear()
    export_checkpoint(checkpoint, tmp_path / "out2", ExportOptions(batch_range=(1, 1, 2)), engine=False,
                      triton_dir=tmp_path / "triton", simplify="never", echo=lines.append)
    assert len([line for line in lines if line.startswith("warning:") and str(beside) in line]) == 1, lines


# The child: `mrkd export` as the CLI runs it, held at one moment of its Triton step until the test has sent
# it a real SIGTERM from outside (the marker file says it is there; the go file says the signal was sent).
HELD_EXPORT = '''
import os, sys, time
from pathlib import Path
import mrkd.export.triton as triton
from mrkd.cli import main
moment, repo, marker, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])

def hold():
    marker.touch()
    deadline = time.monotonic() + 60
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.01)

real_copy, real_rename = triton._copy, os.rename

def copy_then_hold(src, dst):
    real_copy(src, dst)
    hold()

def hold_then_rename(src, dst):
    dst = Path(dst)
    if dst == repo / "mrkd" or (dst.parent == repo / "mrkd" and dst.name.isdigit()):
        hold()
    real_rename(src, dst)

if moment == "copy":
    triton._copy = copy_then_hold
else:
    triton.os.rename = hold_then_rename
sys.argv[0] = "mrkd"
main(sys.argv[5:])
'''


@pytest.mark.parametrize("moment", ["copy", "rename"])
def test_sigterm_to_the_export_command_in_its_triton_step(onnx_model, tmp_path, moment):
    """A real SIGTERM to a `mrkd export --triton` process: while the new model's file is copied, no model
    folder is left in the repository (nor a staging folder beside it); as a new version is renamed in, the
    export ends once the config for that version is written. Either way one line, no traceback, exit 143."""
    import signal
    import subprocess
    import sys
    import time
    checkpoint = tmp_path / "a.ckpt"
    small_model().save(checkpoint)
    repo, out = tmp_path / "triton", tmp_path / "out"
    if moment == "rename":              # a model the repository already serves (uint8 input): version 1
        write_triton_repository(repo, onnx_model[1].path)
    before = _tree(repo) if repo.exists() else {}
    marker, go = tmp_path / "held", tmp_path / "go"
    command = [sys.executable, "-c", HELD_EXPORT, moment, str(repo), str(marker), str(go),
               "export", str(checkpoint), "-o", str(out), "--triton", str(repo), "--batch", "1:1:2",
               "--simplify", "never"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), process.communicate(timeout=10)
        process.send_signal(signal.SIGTERM)
        go.touch()
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143 and "Traceback" not in err, err
    said = [line for line in err.splitlines() if line.strip()]
    assert said == [f"export stopped (SIGTERM) after its files were moved into {out}, whole: model.onnx"], err
    assert (out / "model.onnx").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no staging beside it
    if moment == "copy":
        assert _tree(repo) == before == {}
        assert not repo.exists() or list(repo.iterdir()) == []
    else:
        assert sorted(_tree(repo)) == ["mrkd", "mrkd/1", "mrkd/1/model.onnx", "mrkd/1/model.onnx.json",
                                       "mrkd/2", "mrkd/2/model.onnx", "mrkd/2/model.onnx.json", "mrkd/config.pbtxt"]
        assert _tree(repo)["mrkd/1/model.onnx"] == before["mrkd/1/model.onnx"]
        assert b"TYPE_UINT8" in before["mrkd/config.pbtxt"]                       # version 1's config
        assert (repo / "mrkd" / "2" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
        config = parse_pbtxt((repo / "mrkd" / "config.pbtxt").read_text())     # version 2's: float input now
        assert config["name"] == "mrkd" and config["input"][0]["data_type"] == "TYPE_FP32", config


def test_a_new_model_folder_and_a_new_version_are_synced_into_the_repository(onnx_model, tmp_path):
    """Both land by a rename (the model folder into the repository, a version folder into its model folder);
    until that folder is synced, a power cut after the export said it wrote them can leave Triton's repository
    without them. Seen from outside (strace of a real export in a child process): each rename is followed by
    an fsync of the folder it renamed into."""
    import sys
    import onnx
    from test_power_cut_leftovers import folders_synced_after_rename, traced
    _, exported = onnx_model
    other = tmp_path / "other" / "model.onnx"
    other.parent.mkdir()
    graph = onnx.load(str(exported.path))
    graph.doc_string = "another model"
    onnx.save(graph, str(other))
    shutil.copy(sidecar_path(exported.path), sidecar_path(other))
    repo = tmp_path / "repo"
    write = "import sys\nfrom mrkd.export import write_triton_repository\nwrite_triton_repository(sys.argv[1], sys.argv[2])"
    calls = traced([sys.executable, "-c", write, repo, exported.path], tmp_path)
    assert str(repo) in folders_synced_after_rename(calls, repo / "mrkd")
    calls = traced([sys.executable, "-c", write, repo, other], tmp_path)
    assert str(repo / "mrkd") in folders_synced_after_rename(calls, repo / "mrkd" / "2")
