"""The backend interface and registry: one list the CLI and open_backend read, `--backend auto` choosing as
documented (each branch from given facts, and on this machine's own facts), specs and their errors, the
lazy TensorRT boundary, and the interface's device-output contract on CPU backends."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mrkd.runtime.backends import (ENGINE_SUFFIXES, REGISTRY, Backend, BackendError, MachineFacts, backend_choices,
                                   backend_entry, choose_auto_backend, machine_facts, open_backend,
                                   parse_backend_spec, resolve_backend_name, run_precision)
from runtime_fixtures import build_tiny_model, normal_frame

BOTH = frozenset({"onnxruntime", "openvino"})


@pytest.mark.parametrize("path, facts, expected", [
    # An engine runs on TensorRT whatever else is here.
    ("m.engine", MachineFacts(False, "GenuineIntel", BOTH), "tensorrt"),
    ("m.PLAN", MachineFacts(True, "AuthenticAMD", frozenset()), "tensorrt"),
    # .onnx on NVIDIA with ONNX Runtime's TensorRT/CUDA provider: ONNX Runtime (its providers pick the GPU).
    ("m.onnx", MachineFacts(True, "GenuineIntel", BOTH, ort_gpu_providers=True), "onnxruntime"),
    # A GPU whose onnxruntime build has no GPU provider: the CPU rule decides.
    ("m.onnx", MachineFacts(True, "GenuineIntel", BOTH, ort_gpu_providers=False), "openvino"),
    # Intel CPU with OpenVINO installed: OpenVINO.
    ("m.onnx", MachineFacts(False, "GenuineIntel", BOTH), "openvino"),
    ("m.onnx", MachineFacts(False, "GenuineIntel", frozenset({"openvino"})), "openvino"),
    # AMD x86 with OpenVINO: OpenVINO too (measured never slower there).
    ("m.onnx", MachineFacts(False, "AuthenticAMD", BOTH), "openvino"),
    # x86 without OpenVINO, or a CPU that is not x86 (ARM: no vendor_id line): ONNX Runtime.
    ("m.onnx", MachineFacts(False, "GenuineIntel", frozenset({"onnxruntime"})), "onnxruntime"),
    ("m.onnx", MachineFacts(False, "", BOTH), "onnxruntime"),
    ("m.onnx", MachineFacts(False, "CentaurHauls", BOTH), "onnxruntime"),
    # Only OpenVINO installed on an AMD CPU: the one backend here that runs .onnx.
    ("m.onnx", MachineFacts(False, "AuthenticAMD", frozenset({"openvino"})), "openvino"),
    # Nothing installed: ONNX Runtime, whose missing package then fails with the install hint.
    ("m.onnx", MachineFacts(False, "GenuineIntel", frozenset()), "onnxruntime"),
])
def test_auto_chooses_as_documented(path, facts, expected):
    assert choose_auto_backend(path, facts) == expected
    assert resolve_backend_name(path, "auto", facts) == expected


def test_auto_refuses_an_unknown_suffix():
    with pytest.raises(BackendError, match=r"m\.bin: cannot tell the backend from the suffix '\.bin'"):
        choose_auto_backend("m.bin", MachineFacts(False, "GenuineIntel", BOTH))


def test_auto_names_a_sidecar_given_as_the_model():
    # `mrkd run model.onnx.json` (tab completion stops there) is a user mistake with a one-word fix,
    # not a backend choice: the message names the model file and nothing of the Python API
    with pytest.raises(BackendError) as refused:
        choose_auto_backend("exported/model.onnx.json", MachineFacts(False, "GenuineIntel", BOTH))
    assert "sidecar" in str(refused.value) and "(exported/model.onnx)" in str(refused.value)
    assert "backend=" not in str(refused.value)


def _independent_facts():
    """This machine's facts gathered here without the code under test: vendor from lscpu's source file,
    packages from importlib, the GPU from the driver library nvidia-smi would use."""
    vendor = ""
    for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
        if line.startswith("vendor_id"):
            vendor = line.split(":", 1)[1].strip()
            break
    installed = {name for name in ("onnxruntime", "openvino", "tensorrt") if importlib.util.find_spec(name)}
    gpu = subprocess.run(["sh", "-c", "ldconfig -p | grep -q 'libcuda.so' && nvidia-smi -L"],
                         capture_output=True).returncode == 0
    return vendor, installed, gpu


def test_auto_on_this_machines_real_facts(tmp_path):
    vendor, installed, gpu = _independent_facts()
    facts = machine_facts()
    assert facts.cpu_vendor == vendor and set(facts.installed) == installed and facts.nvidia_gpu == gpu
    if gpu and facts.ort_gpu_providers:
        expected = "onnxruntime"
    elif vendor in ("GenuineIntel", "AuthenticAMD") and "openvino" in installed:
        expected = "openvino"
    else:
        expected = "onnxruntime"
    model = build_tiny_model(tmp_path / "m.onnx")
    assert resolve_backend_name(model) == expected
    from mrkd.runtime.detector import Detector
    detector = Detector(model, backend="auto")
    try:
        assert detector.backend.name == expected
    finally:
        detector.close()


def test_auto_with_onnxruntime_providers_named_runs_onnxruntime(tmp_path):
    """--providers are ONNX Runtime's: naming them under auto asks for ONNX Runtime, whose own check then
    refuses an unknown one (auto may otherwise pick OpenVINO, which has no providers to check)."""
    model = build_tiny_model(tmp_path / "m.onnx")
    backend = open_backend(model, "auto", providers=["cpu"])
    try:
        assert backend.name == "onnxruntime"
    finally:
        backend.close()
    with pytest.raises(BackendError, match="bogus"):
        open_backend(model, "auto", providers=["bogus"])


def test_registry_is_the_one_list_of_choices():
    names = [entry.name for entry in REGISTRY]
    assert names == ["onnxruntime", "tensorrt", "openvino"] and len(set(names)) == len(names)
    assert backend_choices() == ("auto", "onnxruntime", "tensorrt", "openvino", "openvino:fp32", "openvino:bf16",
                                 "openvino:auto", "openvino:checked")
    # `mrkd run --backend` offers exactly the registry's specs, and --postprocess the post-processing's list.
    from mrkd.runtime import postprocess
    from mrkd.runtime.cli import run_command
    params = {p.name: p for p in run_command.params}
    assert tuple(params["backend"].type.choices) == backend_choices()
    assert tuple(params["postprocess"].type.choices) == ("auto",) + postprocess.IMPLS
    assert backend_entry("tensorrt").suffixes == ENGINE_SUFFIXES


def test_every_backend_class_implements_the_interface_and_tensorrt_stays_lazy():
    # Importing every backend module (TensorRT's too) must not import tensorrt or pycuda: a laptop has neither.
    code = ("import sys\nfrom mrkd.runtime.backends import REGISTRY, Backend\n"
            "for e in REGISTRY:\n    cls = e.backend_class()\n    assert issubclass(cls, Backend), e\n"
            "    assert 'infer' in vars(cls) and 'describe' in vars(cls), e\n"
            "print(sorted(m for m in ('tensorrt', 'pycuda', 'openvino', 'onnxruntime', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("spec, message", [
    ("openvino:fp64", "backend 'openvino:fp64' unknown; choose from auto, onnxruntime"),
    ("onnxruntime:bf16", "backend 'onnxruntime:bf16' unknown"),
    ("tensorflow", "backend 'tensorflow' unknown"),
    ("", "backend '' unknown"),
])
def test_unknown_specs_are_refused_with_the_choices(spec, message):
    with pytest.raises(BackendError, match=message):
        parse_backend_spec(spec)


def test_specs_and_suffixes(tmp_path):
    assert parse_backend_spec("openvino:bf16") == ("openvino", "bf16")
    assert parse_backend_spec("onnxruntime") == ("onnxruntime", None)
    model = build_tiny_model(tmp_path / "m.onnx")
    with pytest.raises(BackendError, match=r"m\.onnx: the tensorrt backend runs \.engine/\.plan/\.trt files, not \.onnx"):
        open_backend(model, "tensorrt")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not an engine")
    with pytest.raises(BackendError, match=r"m\.engine: the onnxruntime backend runs \.onnx files, not \.engine"):
        open_backend(engine, "onnxruntime")
    with pytest.raises(BackendError, match="model file not found"):
        open_backend(tmp_path / "missing.onnx", "onnxruntime")
    (tmp_path / "folder.onnx").mkdir()          # a model path a deployment script replaced by a folder
    with pytest.raises(BackendError, match=r"folder\.onnx: a folder, not a model file"):
        open_backend(tmp_path / "folder.onnx", "onnxruntime")


@pytest.mark.parametrize("graph, backend, expected", [
    ("fp32", "graph", "fp32"), ("int8", "graph", "int8"), ("fp16", "graph", "fp16"),
    ("fp32", "fp32", "fp32"), ("int8", "fp32", "int8"),
    ("fp32", "bf16", "bf16"), ("fp16", "bf16", "bf16"), ("int8", "bf16", "int8+bf16"), ("fp32", "fp16", "fp16"),
])
def test_run_precision(graph, backend, expected):
    assert run_precision(graph, backend) == expected


def test_cpu_backend_keeps_no_device_outputs(tmp_path):
    model = build_tiny_model(tmp_path / "m.onnx", per_scale=True)
    backend = open_backend(model, "onnxruntime", providers=["cpu"])
    try:
        assert isinstance(backend, Backend) and backend.cuda_context() is None and not backend.has_device_outputs
        assert backend.precision == "graph"
        batch = np.zeros((1, 3, 32, 32), np.float32)
        assert set(backend.infer(batch)) == {"scale0", "scale1", "scale2"}
        with pytest.raises(BackendError, match="keeps no outputs on a GPU"):
            backend.infer(batch, device_outputs=True)
    finally:
        backend.close()


def test_run_refuses_an_unknown_backend_in_one_line(tmp_path):
    from mrkd.cli import main
    model = build_tiny_model(tmp_path / "m.onnx")
    frames = tmp_path / "frames"
    frames.mkdir()
    import cv2
    cv2.imwrite(str(frames / "a.png"), normal_frame(np.random.default_rng(0)))
    result = CliRunner().invoke(main, ["run", str(model), "--source", str(frames), "--backend", "openvino:fp64"])
    assert result.exit_code == 2 and "openvino:bf16" in result.output and "Traceback" not in result.output


INSTALLED_ONNX_BACKENDS = [name for name in ("onnxruntime", "openvino") if backend_entry(name).available()]


@pytest.mark.parametrize("backend", INSTALLED_ONNX_BACKENDS + ["auto"])
@pytest.mark.parametrize("kind", ["empty", "no graph", "cut short", "text"])
def test_a_broken_model_file_is_named_as_such(tmp_path, backend, kind):
    """A 0-byte .onnx (an export or copy cut short) was 'expected one model input, found []' on OpenVINO
    (`mrkd run`/`calibrate` under auto); now every backend says the file is empty or not a valid ONNX
    model, naming it."""
    from mrkd.runtime.detector import Detector
    model = build_tiny_model(tmp_path / "m.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes({"empty": b"", "no graph": b"\x08\x07", "cut short": model.read_bytes()[:200],
                        "text": b"model goes here\n"}[kind])
    with pytest.raises(BackendError) as info:
        open_backend(broken, backend)
    message = str(info.value)
    assert message.startswith(f"{broken}: ") and "expected one model input" not in message
    assert ("the file is empty (0 bytes)" if kind == "empty" else "not a valid ONNX model") in message
    if kind == "empty":   # beside its sidecar too: said before the sidecar is found not to match
        (tmp_path / "broken.onnx.json").write_bytes((tmp_path / "m.onnx.json").read_bytes())
        with pytest.raises(BackendError, match=r"broken\.onnx: the file is empty"):
            Detector(broken, backend=backend)


def _run_on_one_frame(tmp_path, *args):
    from mrkd.cli import main
    import cv2
    model = build_tiny_model(tmp_path / "m.onnx")
    frames = tmp_path / "frames"
    frames.mkdir(exist_ok=True)
    cv2.imwrite(str(frames / "a.png"), normal_frame(np.random.default_rng(0)))
    return CliRunner().invoke(main, ["run", str(model), "--source", str(frames), *args])


def _one_error_line(result) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


@pytest.mark.parametrize("backend", INSTALLED_ONNX_BACKENDS)
def test_more_threads_than_cpus_are_refused_in_one_line(tmp_path, backend):
    """--threads 1024 on a 2-CPU machine: ONNX Runtime started all 1024 and took 7 s a frame (7 ms with
    2), a run that looked hung; OpenVINO capped them without a word. Now refused, naming the CPUs."""
    from mrkd.runtime.backends import usable_cpus
    cpus = usable_cpus()
    line = _one_error_line(_run_on_one_frame(tmp_path, "--backend", backend, "--threads", str(cpus + 1)))
    assert f"threads {cpus + 1}: more than the {cpus} CPUs" in line
    assert _run_on_one_frame(tmp_path, "--backend", backend, "--threads", str(cpus)).exit_code == 0


@pytest.mark.parametrize("backend", [name for name in INSTALLED_ONNX_BACKENDS if name != "onnxruntime"]
                         + ["openvino:bf16", "tensorrt"])
def test_providers_given_to_a_backend_without_them_are_refused(tmp_path, backend):
    """--backend openvino --providers cuda ran OpenVINO on the CPU and said nothing of the providers."""
    if backend == "tensorrt":     # an engine path: the providers are refused before TensorRT is needed
        model = tmp_path / "m.engine"
        model.write_bytes(b"engine")
        with pytest.raises(BackendError, match="execution providers are ONNX Runtime's; the tensorrt backend"):
            open_backend(model, backend, providers=["cuda"])
        return
    line = _one_error_line(_run_on_one_frame(tmp_path, "--backend", backend, "--providers", "cuda"))
    assert "--providers cuda: execution providers are ONNX Runtime's; the openvino backend takes none" in line


def test_provider_lists_are_read_as_people_write_them(tmp_path):
    """'cpu, cuda' was looked up as ' cuda' (so 'tensorrt, cpu' on a GPU machine refused ' cpu'); 'cpu,cpu'
    gave ONNX Runtime's UserWarning and the providers listed twice."""
    ran = _run_on_one_frame(tmp_path, "--backend", "onnxruntime", "--providers", " cpu")
    assert ran.exit_code == 0 and "onnxruntime CPUExecutionProvider (m.onnx)" in ran.output, ran.output
    twice = _one_error_line(_run_on_one_frame(tmp_path, "--backend", "onnxruntime", "--providers",
                                              "cpu, CPUExecutionProvider"))
    assert "execution provider 'CPUExecutionProvider' is named twice" in twice
    assert "an empty name" in _one_error_line(_run_on_one_frame(tmp_path, "--providers", "cpu,,"))
