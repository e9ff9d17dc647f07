"""The whole export as one library call (what `mrkd export` runs): each step is a function of its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional

from mrkd.errors import warning_line
from mrkd.export.exporter import export_onnx, load_model
from mrkd.export.file_set import (ENGINE_NAME, FP16_NAME, FP32_NAME, INT8_NAME, MODEL_NAMES,  # noqa: F401
                                  leftover_staging, move_into_place, refuse_earlier_set,
                                  staging_folder)
from mrkd.export.fp16 import fp16_fidelity_report, fp16_options
from mrkd.export.int8 import (GOOD_ONLY_NOTE, INT8_TARGET_CHOICES, default_int8_target, held_out_defect_paths,
                              int8_agreement_report, int8_check_paths, int8_image_paths, load_images,
                              load_readable_images, quantize_int8, refuse_unreadable)
from mrkd.export.onnx_graph import ExportError, ExportOptions
from mrkd.export.parity import Comparison, ParityError, parity_report
from mrkd.export.precision_check import check_bf16
from mrkd.export.tensorrt_build import (NO_TENSORRT_HINT, BuildSettings, TensorRTUnavailableError, build_engine,
                                        tensorrt_unavailable_reason)
from mrkd.export.triton import leftover_version_staging, versions, write_triton_repository
from mrkd.runtime.metadata import MetadataError, ModelMetadata, sidecar_path
from mrkd.stopping import stops_deferred



@dataclass
class ExportResult:
    """Files written and reports computed by export_checkpoint."""

    files: Dict[str, Path] = field(default_factory=dict)
    reports: Dict[str, Comparison] = field(default_factory=dict)
    tensorrt_error: Optional[str] = None      # an engine was asked for (--engine, --fp16) and not built
    engine_note: Optional[str] = None         # why no engine was built when none was required
    int8_target: Optional[str] = None         # the INT8 form written ("auto" resolved)
    metadata: Optional[ModelMetadata] = None  # model.onnx's, as written into its sidecar
    in_place: bool = False                    # the new set was moved into the output folder (whole)


def keep_line_calibration(model_path: Path, model) -> None:
    """Refuse (ExportError) to export over ``model_path`` when its sidecar holds a threshold set on the
    line (`mrkd calibrate model.onnx SOURCE`, on the camera's frames) that this export would replace:
    that threshold exists nowhere else. Any other earlier export is rebuilt from its checkpoint."""
    from mrkd.runtime.calibration import Calibration
    sidecar = sidecar_path(model_path)
    if not sidecar.exists():
        return
    try:
        earlier = ModelMetadata.load(sidecar).calibration
    except (MetadataError, OSError, ValueError):
        return       # not readable: nothing in it to keep (the export replaces it, as before)
    new = Calibration.of(model.calibration, "checkpoint calibration")
    if earlier is None or not earlier.source or (new is not None and new.threshold == earlier.threshold):
        return
    raise ExportError(f"{sidecar}: holds a threshold set on the line ({earlier.threshold:.6g} from "
                      f"{earlier.source}) that this export would replace with the checkpoint's "
                      f"({'none' if new is None else f'{new.threshold:.6g}'}); export into another folder "
                      "(-o), or move that model away first")


def export_checkpoint(checkpoint, out_dir, options: Optional[ExportOptions] = None, *, fp16: bool = False,
                      int8_images=None, int8_target: str = "auto", int8_keep_fp32: str = "auto",
                      engine: Optional[bool] = None, triton_dir=None,
                      build: Optional[BuildSettings] = None, check_images=None,
                      simplify: str = "auto", echo: Callable[[str], None] = print, overwrite: bool = False,
                      replace_line_calibration: bool = False, result: Optional[ExportResult] = None) -> ExportResult:
    """Export ``checkpoint`` into ``out_dir``: model.onnx (FP32, parity-checked against PyTorch),
    model_fp16.onnx / model_int8.onnx on request, model.engine, a Triton repository on request.
    ``int8_images``: a folder of good images INT8 quantisation measures activation ranges on
    (asks for model_int8.onnx); ``int8_target`` one of INT8_TARGET_CHOICES ("auto": default_int8_target).
    ``check_images``: good images the FP32 graph at bf16 (OpenVINO, where the CPU has it) is checked on
    against FP32, recorded in the sidecar for --backend auto (default: ``int8_images``; see precision_check).

    ``engine``: True = a TensorRT engine is required (from the FP16/INT8 graph, else the FP32 one);
    False = none; None (default) = required with ``fp16`` (the FP16 graph is made for the engine),
    otherwise built from the INT8 graph where TensorRT and a GPU are here, and where they are not
    the export ends normally with ``engine_note`` saying why no engine was built.

    The files are written and checked in a staging folder inside ``out_dir`` and moved into place together
    at the end (mrkd.export.file_set): an error or a stop before then leaves nothing new in ``out_dir``.
    ``overwrite``: a folder that already holds an exported model is refused (ExportError, before anything
    is done) unless this is set; then the new set replaces it, and the earlier set's files the new one does
    not write (an INT8 graph, an engine) are removed, each named in a line.
    ``replace_line_calibration``: for a caller that rebuilds ``out_dir`` as its own (the demo): export over
    a sidecar whose threshold was set on the line (``keep_line_calibration``), refused by default.
    ``result``: filled as the export goes (``in_place`` says whether the set was moved in, for a caller
    that was stopped); returned.

    Raises ParityError when FP32 parity is worse than 1e-4. When a required engine cannot be built
    (no TensorRT or GPU), every other file is still written and TensorRTUnavailableError is raised last."""
    options = (options or ExportOptions()).validate()
    if fp16 and int8_images:
        raise ExportError("--fp16 and --int8 build different engines: choose one")
    if int8_target not in INT8_TARGET_CHOICES:
        raise ExportError(f"INT8 target {int8_target!r} unknown; choose from {list(INT8_TARGET_CHOICES)}")
    required = bool(fp16) if engine is None else engine
    unavailable = tensorrt_unavailable_reason() if engine is not False else None
    if int8_images and int8_target == "auto":
        int8_target = default_int8_target(engine is not False and (required or unavailable is None))
    if int8_images and int8_target == "cpu" and engine:
        raise ExportError("an engine (--engine) and --int8-target cpu: TensorRT cannot build the cpu INT8 form "
                          "(asymmetric activations); use --int8-target tensorrt or auto")
    # the good images the checks run on: a missing or empty folder is said before anything is written
    good_paths, seen_note = int8_check_paths(int8_images, check_images) if (check_images or int8_images) \
        else ([], None)
    # and an image among them, or among quantisation's, that does not decode is named now, not after model.onnx
    # (each decoded once: without --check-images the checks may run on the quantisation images themselves)
    quantised = int8_image_paths(int8_images) if int8_images else []
    refuse_unreadable(quantised, "--int8-images")
    decoded = set(quantised)
    refuse_unreadable([p for p in good_paths if p not in decoded], "--check-images" if check_images else "--int8-images")
    out_dir = Path(out_dir)
    if not overwrite:
        refuse_earlier_set(out_dir)       # before the checkpoint is read: said at once
    result = result if result is not None else ExportResult()
    model, checkpoint_sha = load_model(checkpoint)
    if not replace_line_calibration:     # the demo, which rebuilds and calibrates its own folder, replaces them
        for name in MODEL_NAMES:     # each graph or engine calibrated on the line where it runs, replaced or removed
            keep_line_calibration(out_dir / name, model)
    # a set: a Triton repository's new models are staged beside it, which may be out_dir itself
    for leftover in sorted(set(leftover_staging(out_dir) + (leftover_version_staging(triton_dir) if triton_dir
                                                            else []))):
        echo(warning_line(f"{leftover} looks like the unfinished files of an export that was killed (or one "
                          f"running now); it is not used: remove it once no export runs"))
    with staging_folder(out_dir) as staging:
        # its lines name the files where they will be once the set is moved into place
        engine_meta = _write_set(model, checkpoint, checkpoint_sha, staging, result, options, fp16=fp16,
                                 int8_images=int8_images, int8_target=int8_target, int8_keep_fp32=int8_keep_fp32,
                                 engine=engine, required=required, unavailable=unavailable, build=build,
                                 check_images=check_images, good_paths=good_paths, seen_note=seen_note,
                                 simplify=simplify, echo=lambda line: echo(line.replace(str(staging), str(out_dir))))
        with stops_deferred():     # Ctrl-C/SIGTERM wait until the whole set is in place and said to be
            for path in move_into_place(staging, out_dir):
                echo(f"removed {path} (the earlier export's; this one does not write it)")
            result.files = {key: out_dir / path.name if path.parent == staging else path
                            for key, path in result.files.items()}
            result.in_place = True
    if triton_dir is not None:
        configs = write_triton_repository(triton_dir, result.files["onnx"], engine_path=result.files.get("engine"),
                                          metadata=result.metadata, engine_metadata=engine_meta)
        result.files.update({f"triton:{name}": path for name, path in configs.items()})
        echo(f"wrote Triton repository {triton_dir} ("
             + ", ".join(f"{name} version {versions(path.parent)[-1]}" for name, path in configs.items()) + ")")
    if result.tensorrt_error:
        raise TensorRTUnavailableError(result.tensorrt_error)
    echo(f"done: {', '.join(str(path) for path in result.files.values())}")
    if result.engine_note:
        echo(result.engine_note)
    return result


def _write_set(model, checkpoint, checkpoint_sha: str, out_dir: Path, result: ExportResult, options: ExportOptions,
               *, fp16, int8_images, int8_target, int8_keep_fp32, engine, required, unavailable, build, check_images,
               good_paths, seen_note, simplify, echo) -> Optional[ModelMetadata]:
    """Write and check the graphs (and engine) of export_checkpoint into ``out_dir`` (its staging folder),
    filling ``result``; returns the engine's metadata (None: no engine)."""
    fp32 = export_onnx(model, out_dir / FP32_NAME, options, checkpoint_sha256=checkpoint_sha, simplify=simplify)
    result.files["onnx"] = fp32.path
    echo(f"wrote {fp32.path} (onnxslim: {_slim_line(fp32.simplify)})")
    # Each step gets the metadata the step before it wrote, not another read of the sidecar. A graph that
    # disagrees with PyTorch, or whose check did not end (Ctrl-C, an error), stays in the staging folder,
    # which is removed: a runtime watching the output folder never sees it.
    result.reports["parity"] = parity_report(model, fp32.path, options, metadata=fp32.metadata)
    echo(result.reports["parity"].format())
    if not result.reports["parity"].passed:
        raise ParityError(f"{checkpoint}: exported graph not kept, FP32 parity failed:\n"
                          + result.reports["parity"].format())

    if check_images or int8_images:
        # bf16 and INT8 are checked on the same good images, with the same note where quantisation saw them
        fp32.metadata, result.reports["bf16"] = check_bf16(fp32.path, fp32.metadata, check_images or int8_images,
                                                           echo, paths=good_paths, notes=[seen_note] * bool(seen_note))
        if result.reports["bf16"] is None:
            del result.reports["bf16"]

    engine_source, engine_meta = None, None
    metadata_of = {fp32.path: fp32.metadata}       # each graph written, with the metadata written for it
    if fp16:
        half = export_onnx(model, out_dir / FP16_NAME, fp16_options(options), checkpoint_sha256=checkpoint_sha,
                           simplify=simplify)
        result.files["onnx_fp16"] = engine_source = half.path
        metadata_of[half.path] = half.metadata
        echo(f"wrote {half.path}")
        result.reports["fp16"] = fp16_fidelity_report(model, half.path, options, metadata=half.metadata)
        echo(result.reports["fp16"].format())
    if int8_images:
        quant = quantize_int8(fp32.path, out_dir / INT8_NAME, int8_images, target=int8_target,
                              keep_fp32=int8_keep_fp32, echo=echo, fp32_metadata=fp32.metadata)
        result.files["onnx_int8"] = quant.path
        result.int8_target = int8_target
        # The cpu form has asymmetric activations, which TensorRT cannot build.
        engine_source = quant.path if int8_target == "tensorrt" else None
        metadata_of[quant.path] = quant.metadata
        echo(f"wrote {quant.path} (INT8 target {int8_target})")
        good = load_images(good_paths, quant.metadata)
        defects, defects_from, unreadable = _defect_check_images(model, quant.metadata)
        for key, spec in [("int8", "onnxruntime")] + [(f"int8:{spec}", spec) for spec in openvino_report_specs()]:
            report = int8_agreement_report(fp32.path, quant.path, good, fp32.metadata.threshold, backend=spec,
                                           int8_metadata=quant.metadata, subset="good")
            report.notes += [seen_note] * bool(seen_note)
            if defects is None:
                report.notes.append(f"{GOOD_ONLY_NOTE}: {defects_from}")
            result.reports[key] = report
            echo(report.format())
            if defects is not None:    # apart: a defect's score moves further than a good one's
                report = int8_agreement_report(fp32.path, quant.path, defects, fp32.metadata.threshold,
                                               backend=spec, int8_metadata=quant.metadata, subset="defect")
                report.notes.append(defects_from + (f"; {len(unreadable)} unreadable left out, e.g. "
                                                    f"{unreadable[0]}" if unreadable else ""))
                result.reports[f"{key}:defects"] = report
                echo(report.format())
    if engine and engine_source is None and not int8_images:
        engine_source = fp32.path         # --engine alone: an FP32 engine

    if engine_source is not None and engine is not False and (required or unavailable is None):
        try:
            engine_meta = build_engine(engine_source, out_dir / ENGINE_NAME, build or BuildSettings(),
                                       options.batch_range, onnx_metadata=metadata_of.get(engine_source))
            result.files["engine"] = out_dir / ENGINE_NAME
            echo(f"wrote {out_dir / ENGINE_NAME}")
        except TensorRTUnavailableError as exc:
            result.tensorrt_error = str(exc)
    elif int8_images and engine is None:
        runs_here = ("the INT8 model runs on CPU runtimes here: mrkd run --backend onnxruntime or openvino"
                     if int8_target == "cpu" else "the tensorrt INT8 form also runs on ONNX Runtime, more slowly than "
                     "the cpu form (--int8-target cpu)")
        result.engine_note = (f"TensorRT engines were not built because {unavailable} ({runs_here}); "
                              f"to build one: {NO_TENSORRT_HINT.split('To build the engine: ', 1)[-1]}"
                              if unavailable else
                              "TensorRT engine not built: the cpu INT8 form is for CPU runtimes (TensorRT "
                              "needs --int8-target tensorrt)")
    result.metadata = fp32.metadata
    return engine_meta


def _defect_check_images(model, metadata):
    """(defect images of the checkpoint's held-out test split as the graph's input, or None; where they
    are from or why there are none, in words; the ones that could not be read)."""
    paths, where = held_out_defect_paths(getattr(model, "trained_on", None))
    images, unreadable = load_readable_images(paths, metadata)
    if images is None and unreadable:
        where = f"none of the {len(unreadable)} defect images in {unreadable[0].parent.parent} could be read"
    return images, where, unreadable


def openvino_report_specs():
    """The OpenVINO backend specs the INT8 graph is also checked on, where OpenVINO is installed:
    fp32, and bf16 on CPUs with native bf16 (what `--backend openvino[:bf16]` would run)."""
    from mrkd.runtime.backends import backend_entry
    if not backend_entry("openvino").available():
        return []
    from mrkd.runtime.backends.openvino_backend import cpu_capabilities
    return ["openvino"] + (["openvino:bf16"] if "BF16" in cpu_capabilities() else [])



def _slim_line(record: Dict) -> str:
    if "nodes_after" not in record:
        return f"{record.get('mode')}, not applied"
    return (f"{'kept' if record['kept'] else 'not kept'}: nodes {record['nodes_before']} -> {record['nodes_after']}, "
            f"CPU {record['latency_before_ms']:.2f} -> {record['latency_after_ms']:.2f} ms")
