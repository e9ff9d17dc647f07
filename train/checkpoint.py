"""Checkpoints: ours (self-contained, atomic, weights_only-loadable) and the official RD4AD/MRKD format.

Our checkpoint is a plain dict of tensors and primitives::

    {"format": "mrkd-checkpoint", "format_version": 1, "config": {...},
     "bottleneck": state_dict, "student": state_dict,
     "teacher": {"kind", "name", "sha256", "state_dict" (absent for named ImageNet weights)},
     "calibration": {...},                          # Calibration.to_dict() ({} uncalibrated)
     "trained_on": {"category", "data_root"}}     # what the model was trained on (absent in old files)

The teacher's weights travel with the checkpoint unless they are a named ImageNet release, which
is fetched again by name and checked against the stored hash — so a random-teacher model reloads
bit-identically on another machine.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Optional

import torch

from mrkd.errors import MrkdError, warning_line
from mrkd.atomic import atomic_write_bytes
from mrkd.runtime.calibration import Calibration
from mrkd.train.model import MRKD, MRKDConfig, build_model
from mrkd.train.teachers import strip_module_prefix, teacher_spec

FORMAT = "mrkd-checkpoint"
FORMAT_VERSION = 1

TRAINED_ON = "trained_on"

# Layers the official code defines but never calls in forward(); their weights are dropped on import.
OFFICIAL_UNUSED = {"bn": ("conv4.", "bn4."), "decoder": ("conv1.",)}


class CheckpointError(MrkdError, ValueError):
    """A checkpoint is missing, unreadable or not of the expected format; the message names the file."""


def checkpoint_dict(model: MRKD) -> dict:
    source = model.teacher_source
    teacher = source.to_dict()
    if source.kind != "imagenet":
        teacher["state_dict"] = {k: v.detach().cpu() for k, v in model.teacher.state_dict().items()}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "bottleneck": {k: v.detach().cpu() for k, v in model.bottleneck.state_dict().items()},
        "student": {k: v.detach().cpu() for k, v in model.student.state_dict().items()},
        "teacher": teacher,
        "calibration": model.calibration.to_dict() if model.calibration is not None else {},
        **({"memory_bank": model.head.memory_bank.bank.detach().cpu()}
           if getattr(model.head, "memory_bank", None) is not None else {}),
    }


def save_checkpoint(model: MRKD, path, extra: Optional[dict] = None) -> None:
    """Write ``model`` (plus ``extra`` entries, e.g. training state) atomically to ``path``."""
    data = checkpoint_dict(model)
    if extra:
        data.update(extra)
    buffer = io.BytesIO()
    torch.save(data, buffer)
    atomic_write_bytes(path, buffer.getvalue())


_TORCH_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def load_failure(exc: Exception) -> str:
    """torch.load's reason in one line, without its advice to load with weights_only=False (which runs
    whatever code the file holds: never done here)."""
    lines = [line.strip() for line in str(exc).splitlines()]
    reason = [line.replace("WeightsUnpickler error:", "").strip() for line in lines
              if line and not line.startswith(_TORCH_ADVICE)]
    text = "; ".join(part for part in reason if part) or "unreadable"
    if "Weights only load failed" in str(exc):
        text = f"it holds what a weights-only load refuses: {text}; mrkd never loads with weights_only=False"
    return f"{type(exc).__name__}: {text}"


def read_checkpoint(path, warn: Optional[Callable[[str], None]] = None) -> dict:
    """``torch.load(weights_only=True)`` with errors that name the file. ``warn``: told (one line) when
    the file is an unfinished training run's snapshot (``unfinished_run``): what uses a model, not what
    resumes one, passes it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if _exported_model(path):
            raise CheckpointError(f"{path}: an exported model, not a training checkpoint (the last.ckpt `mrkd "
                                  f"train` writes); an exported model scores images with `mrkd run {path} "
                                  f"--source FOLDER` (and is calibrated with `mrkd calibrate`)") from exc
        reason = _not_a_checkpoint(path) or f"not a readable PyTorch checkpoint ({load_failure(exc)})"
        raise CheckpointError(f"{path}: {reason}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(data).__name__}")
    note = unfinished_run(data, str(path)) if warn is not None else None
    if note:
        warn(note)
    return data


# What `mrkd export` writes: ONNX, TensorRT engines, OpenVINO IR.
EXPORTED_SUFFIXES = (".onnx", ".engine", ".plan", ".trt", ".xml")


def _not_a_checkpoint(path: Path) -> Optional[str]:
    """Why a file torch cannot load is no checkpoint at all, judged by its first bytes; None when it
    starts like one (torch.save writes a zip archive; old files are a pickle, first byte 0x80). Said
    instead of the unpickler's trip (a KeyError of a byte value, or a 'refused' load of an image)."""
    import zipfile
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return None
    if not head:
        return "the file is empty (0 bytes), not a checkpoint"
    if head.startswith(b"PK\x03\x04"):
        return None if zipfile.is_zipfile(path) else (
            "not a readable PyTorch checkpoint: cut short (a zip archive as torch.save writes, without its end: "
            "saved or copied incompletely)")
    if head[0] == 0x80:
        return None
    return f"not a PyTorch checkpoint (it starts with {head!r}; torch.save writes a zip archive)"


def _exported_model(path: Path) -> bool:
    """Whether a file torch cannot load is an exported model: by its suffix, or an ONNX file by its first
    bytes (a protobuf whose field 1 is the IR version: 0x08; torch's own formats are a zip or a pickle)."""
    if path.suffix.lower() in EXPORTED_SUFFIXES or path.with_name(path.name + ".json").is_file():
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x08 and 1 <= head[1] <= 32


def non_finite_weights(data: dict) -> list:
    """The names of the checkpoint dict's weight tensors holding NaN or infinity (a diverged run's)."""
    parts = {"bottleneck": data.get("bottleneck"), "student": data.get("student"),
             "teacher": (data.get("teacher") or {}).get("state_dict") if isinstance(data.get("teacher"), dict) else None,
             "memory_bank": {"": data.get("memory_bank")}}
    return [f"{part}.{name}" if name else part for part, tensors in parts.items() if isinstance(tensors, dict)
            for name, tensor in tensors.items()
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def checked_config(raw: dict, source: str) -> MRKDConfig:
    """The MRKDConfig of a checkpoint's ``config`` entry; CheckpointError naming ``source`` where MRKDConfig
    refuses a field (a hand-made or damaged file)."""
    try:
        return MRKDConfig.from_dict(raw)
    except (MrkdError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: config field {exc}") from exc


def model_from_dict(data: dict, source: str = "checkpoint") -> MRKD:
    if data.get("format") != FORMAT:
        hint = " (an official RD4AD/MRKD checkpoint? use mrkd.train.from_official)" if "bn" in data else ""
        raise CheckpointError(f"{source}: not an mrkd checkpoint{hint}")
    if int(data.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{source}: checkpoint format {data['format_version']} is newer than this mrkd")
    absent = [k for k in ("config", "teacher", "bottleneck", "student") if not isinstance(data.get(k), dict)]
    if absent:
        raise CheckpointError(f"{source}: incomplete mrkd checkpoint (no {', '.join(absent)} entry)")
    broken = non_finite_weights(data)
    if broken:
        raise CheckpointError(f"{source}: holds weights that are not finite numbers (NaN or infinity: {broken[0]}"
                              f"{f' and {len(broken) - 1} more' if len(broken) > 1 else ''}), as a training "
                              f"run that diverged leaves them; train again with a lower --lr")
    config = checked_config(data["config"], source)
    teacher = data["teacher"]
    teacher_sd = teacher.get("state_dict")
    weights = teacher.get("name") or config.teacher_weights
    try:
        model = build_model(config.backbone, weights if teacher_sd is None else config.teacher_weights,
                            teacher_state_dict=teacher_sd,
                            **{k: v for k, v in config.to_dict().items() if k not in ("backbone", "teacher_weights")})
    except ValueError as exc:   # TeacherWeightsError, or a backbone this mrkd does not know
        raise CheckpointError(f"{source}: {exc}") from exc
    if teacher.get("sha256") and model.teacher_source.sha256 != teacher["sha256"]:
        raise CheckpointError(f"{source}: the teacher weights {weights!r} found here differ from the ones the "
                              f"model was trained with (sha256 {model.teacher_source.sha256[:12]} != "
                              f"{teacher['sha256'][:12]})")
    model.teacher_source.kind = teacher.get("kind", model.teacher_source.kind)
    model.teacher_source.name = teacher.get("name")
    try:
        model.bottleneck.load_state_dict(data["bottleneck"])
        model.student.load_state_dict(data["student"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: student weights do not fit backbone {config.backbone} ({exc})") from exc
    if config.score != "mrkd":       # --score knn|both: the memory bank travels with the checkpoint
        from mrkd.train.memory_bank import MemoryBank
        bank = data.get("memory_bank")
        if not isinstance(bank, torch.Tensor) or bank.dim() != 2:
            raise CheckpointError(f"{source}: config score={config.score!r} but the checkpoint has no memory_bank")
        model.head.set_memory_bank(MemoryBank(bank, pool=config.knn_pool), config.knn_weight)
    model.calibration = Calibration.of(data.get("calibration") or None, f"{source}: calibration")
    model.trained_category = trained_category(data)
    return model.eval()


def load_checkpoint(path, map_location: str = "cpu") -> MRKD:
    """Load one of our checkpoints; returns the model in eval mode."""
    return model_from_dict(read_checkpoint(path), source=str(path)).to(map_location)


def unfinished_run(data: dict, source: str) -> Optional[str]:
    """A warning line when the checkpoint dict is a training run's snapshot that never finished (killed,
    or still running: last.ckpt is also the resume point), so it has no memory bank or threshold from
    the end of the run; None for a finished run or a file that does not say (older runs, exports)."""
    state = data.get("train_state")
    if not isinstance(state, dict) or state.get("finished") is not False:
        return None
    planned = state.get("epochs_planned")
    return warning_line(f"{source} is an unfinished training run (epoch {state.get('epoch')}"
                        f"{f' of {planned}' if planned else ''}): its memory bank and threshold are not the "
                        f"finished model's; resume it (mrkd train with the same settings) before using it")


def plain_images_name(data_root) -> str:
    """What a plain folder or glob of good images is called: the folder's name; for a glob such as
    'good_parts/*.jpg' the last folder before the first wildcard (the pattern itself names no part)."""
    from mrkd.runtime.images import is_glob_pattern
    fixed = []
    for part in Path(str(data_root)).parts:
        if is_glob_pattern(part):
            break
        fixed.append(part)
    return (Path(*fixed).name if fixed else "") or "images"


def trained_on(data_root, category: Optional[str]) -> dict:
    """The checkpoint's record of its training data: the category, or the plain folder's name."""
    return {"category": category or plain_images_name(data_root), "data_root": str(data_root),
            "layout": "mvtec" if category else "folder"}


def trained_category(data: dict) -> Optional[str]:
    """The category (or folder name) a checkpoint dict was trained on; None for files that do not say."""
    record = data.get(TRAINED_ON)
    if isinstance(record, dict) and record.get("category"):
        return str(record["category"])
    identity = (data.get("train_state") or {}).get("identity") or {}
    return identity.get("category") or None


def category_mismatch(model: MRKD, category: Optional[str], source) -> Optional[str]:
    """A one-line warning when ``model`` (from load_checkpoint) was trained on another category than
    ``category``, else None (also when either is unknown)."""
    trained = getattr(model, "trained_category", None)
    if not trained or not category or trained == category:
        return None
    return warning_line(f"{source} was trained on {trained!r} but is used for {category!r} "
                        f"(pass the checkpoint trained on {category!r} if this is not intended)")


def from_official(ckpt_path, teacher_weights: str = "imagenet", backbone: str = "wide_resnet50_2",
                  image_size: int = 256, **config_kwargs) -> MRKD:
    """Import a checkpoint of the official RD4AD/MRKD code (a dict with ``bn`` and ``decoder``).

    ``teacher_weights`` names the teacher the checkpoint was trained against ("imagenet" for the
    official code's torchvision weights, or a state-dict path). Returns the model in eval mode.
    """
    data = read_checkpoint(ckpt_path)
    missing = [k for k in ("bn", "decoder") if k not in data]
    if missing:
        raise CheckpointError(f"{ckpt_path}: not an official RD4AD/MRKD checkpoint (no {', '.join(missing)} entry)")
    teacher_spec(backbone)  # unknown backbone -> clear error before any download
    model = build_model(backbone, teacher_weights, image_size=image_size, **config_kwargs)
    for part, module in (("bn", model.bottleneck), ("decoder", model.student)):
        state = {k: v for k, v in strip_module_prefix(data[part]).items()
                 if not k.startswith(OFFICIAL_UNUSED[part])}
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"{ckpt_path}: '{part}' weights do not fit backbone {backbone} ({exc})") from exc
    return model.eval()
