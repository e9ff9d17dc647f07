"""The line file (``mrkd run --line line.toml``): the cameras of one process, each with its own model
and alarm settings. Every error is one line naming the file, the camera and the field.

    schema_version = 1                 # optional
    [defaults]                         # optional: any camera field but name and source
    model = "models/grain.onnx"
    debounce = "2/3"

    [[camera]]
    name = "left"                      # letters, digits, _ - . (a letter or digit first; folder, metrics label)
    source = "rtsp://10.0.0.5/stream"  # any mrkd run source
    model = "models/weave.onnx"        # relative paths are read from the line file's folder
    threshold = 0.42                   # default: the model's calibrated threshold
    debounce = "3/5"                   # or [3, 5]
    cooldown = 2.0                     # seconds of frame time
    cooldown_frames = 0
    size = "640x480"                   # or [640, 480]
    fps = 10                           # free run only: refused with a trigger (one image per trigger)
    loop = false                       # restart files and folders at their end
    trigger = "software"               # free (default) / software / hardware: judge parts on trigger
    features = {ExposureTime = 5000, PixelFormat = "Mono8"}   # gige:// cameras: GenICam settings
    ignore_mask = "masks/left.png"     # white where its images are not judged (a date code); the frames' size

    [part]                             # optional, triggered lines: which cameras make a part
    cameras = ["left", "right"]        # default: every camera
    images = 1                         # images per camera per part
    queue = 4                          # triggers that may wait; past it a trigger is refused (missed)
    timeout = 2.0                      # seconds a camera may take per image

    [recipes]                          # optional: recipe number -> model (0 is each camera's model)
    1 = "models/variant_b.onnx"
    [recipes.2]                        # or a table: the model and ignore masks of this recipe's own
    model = "models/variant_c.onnx"
    ignore_mask = {left = "masks/c_left.png"}   # per camera; a camera not named keeps its ignore_mask

    [inference]                        # optional: how the models run (the command line's options win)
    backend = "openvino:bf16"          # as --backend: auto, onnxruntime, tensorrt, openvino[:fp32|bf16|auto|checked]
    threads = 2                        # as --threads (0: the library's default)
    providers = ["cuda", "cpu"]        # as --providers (ONNX Runtime's execution providers)
    postprocess = "auto"               # as --postprocess

    [plc]                              # optional, triggered lines: PLC servers (runtime/plc, docs/PLC.md)
    modbus = "127.0.0.1:5020"          # Modbus TCP handshake (mrkd run --modbus)
    modbus_allow = "10.0.0.5"          # the PLC's address (or networks); beyond 127.0.0.1 this or:
    # modbus_certificate = "modbus.crt"  # Modbus/TCP Security: TLS, with modbus_private_key and
    # modbus_trust = "trusted-plcs"      # the folder of client certificates admitted (as opcua_trust)
    # modbus_write_roles = "operator"    # optional: only these certificate roles may write (trigger)
    results_buffer = 8                 # results held until the PLC acknowledges them
    opcua = "opc.tcp://127.0.0.1:4840" # OPC UA VisionSystem (mrkd run --opcua)
    opcua_user = "operator"            # may call its methods, with the password in
    opcua_password_env = "MRKD_OPCUA_PASSWORD"   # this environment variable
    opcua_certificate = "server.der"   # with opcua_private_key: Basic256Sha256 Sign&Encrypt only
    opcua_private_key = "server.pem"
    opcua_trust = "trusted-clients"    # optional: client certificates, or CAs with their CRLs, allowed
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from mrkd.deps import require
from mrkd.runtime.line.alarms import ALARM_FIELDS, parse_debounce
from mrkd.runtime.line.loop import LINE_SCHEMA_VERSION, Camera, Line, LineError, check_cameras
from mrkd.runtime.line.trigger import PartSettings
from mrkd.runtime.sources import NETWORK_SCHEMES, SourceError, SourceOptions


def _toml():
    """The TOML reader, imported only when a line file is read: every `mrkd run` imports this module
    (MAX_DEBOUNCE_WINDOW), and before Python 3.11 the reader is tomli, which a Jetson install by hand
    (pip install --no-deps) may lack; a run without --line does not need it, one with it says so in one line."""
    if sys.version_info >= (3, 11):
        return require("tomllib", "a line file (--line) needs the TOML reader of Python's standard library")
    return require("tomli", "a line file (--line) needs a TOML reader before Python 3.11")


CAMERA_FIELDS = ("name", "source", "model", *ALARM_FIELDS, "size", "fps", "loop", "trigger", "features", "ignore_mask")
TOP_LEVEL = ("schema_version", "defaults", "camera", "part", "recipes", "inference", "plc")
INFERENCE_FIELDS = ("backend", "threads", "providers", "postprocess")   # Line fields of the [inference] table
PART_FIELDS = ("cameras", "images", "queue", "timeout", "early", "max_delay")


# The longest debounce window (N of K/N): the window's frames are held per camera, and an N past what a
# deque can index (--debounce 1/99999999999999999999) ended in an OverflowError traceback at the start.
MAX_DEBOUNCE_WINDOW = 100_000


class LineFileError(LineError):
    """A line file that cannot be read; the message names the file and the field."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _field(where: str, name: str, value: Any, folder: Path) -> Any:
    """One camera field, checked and converted (raises LineFileError naming ``where.name``)."""
    def bad(expected: str) -> LineFileError:
        return LineFileError(f"{where}.{name}: expected {expected}, got {value!r}")

    if name in ("name", "source", "model"):
        if name == "source" and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return str(value)       # a camera index
        if not isinstance(value, str) or not value.strip():
            raise bad("a non-empty string")
        if name == "name":
            return value
        return _resolve(value, folder)
    if name == "threshold":
        if not _number(value):
            raise bad("a number")
        return float(value)
    if name == "debounce":
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                              for v in value):
            k, n = value
        elif isinstance(value, str):
            try:
                k, n = parse_debounce(value)
            except ValueError:
                raise bad('"K/N" (e.g. "3/5") or [K, N]') from None
        else:
            raise bad('"K/N" (e.g. "3/5") or [K, N]')
        if not 1 <= k <= n <= MAX_DEBOUNCE_WINDOW:
            raise LineFileError(f"{where}.{name}: needs 1 <= K <= N <= {MAX_DEBOUNCE_WINDOW}, got {k}/{n}")
        return (k, n)
    if name == "cooldown":
        if not _number(value) or value < 0:
            raise bad("seconds >= 0")
        return float(value)
    if name == "cooldown_frames":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad("a whole number >= 0")
        return value
    if name == "size":
        try:
            if isinstance(value, list) and len(value) == 2:
                size = tuple(value)
            elif isinstance(value, str):
                size = SourceOptions.parse_size(value)
            else:
                raise bad('"WIDTHxHEIGHT" or [WIDTH, HEIGHT]')
            return SourceOptions(size=size).validate().size
        except SourceError as exc:
            raise LineFileError(f"{where}.{name}: {exc}") from None
    if name == "fps":
        if not _number(value) or not 0 < value <= SourceOptions.MAX_FPS:
            raise bad(f"frames per second in (0, {SourceOptions.MAX_FPS:g}]")
        return float(value)
    if name == "loop":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if name == "trigger":
        if value not in ("free", "software", "hardware"):
            raise bad('"free", "software" or "hardware"')
        return value
    if name == "ignore_mask":
        if not isinstance(value, str) or not value.strip():
            raise bad("the path of a mask image (white where the camera's images are not judged)")
        return _in_folder(value, folder)
    if name == "features":
        if not isinstance(value, dict):
            raise bad("a table of GenICam features, e.g. {ExposureTime = 5000}")
        for feature, setting in value.items():
            if isinstance(setting, bool):
                setting = str(setting).lower()
            if not isinstance(setting, (str, int, float)) or (isinstance(setting, float) and not math.isfinite(setting)):
                raise LineFileError(f"{where}.features.{feature}: expected a number, text or true/false, got {setting!r}")
        return tuple((str(k), str(v).lower() if isinstance(v, bool) else str(v)) for k, v in value.items())
    raise LineFileError(f"{where}.{name}: unknown field (known: {', '.join(CAMERA_FIELDS)})")


def _in_folder(text: str, folder: Path) -> str:
    """A file's path as given, a relative one read from the line file's folder."""
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else folder / path)


def _resolve(text: str, folder: Path) -> str:
    """A relative path is read from the line file's folder; URIs and camera indices stay as they are."""
    if (text.isascii() and text.isdigit()) or "://" in text or text.lower().startswith(NETWORK_SCHEMES):
        return text
    return _in_folder(text, folder)


def _check_model_file(where: str, model: str) -> None:
    # a folder was reported as "file not found" although it is there: name what was found instead
    if Path(model).is_dir():
        raise LineFileError(f"{where}: {model} is a folder; name the model file in it (e.g. model.onnx)")
    if not Path(model).is_file():
        raise LineFileError(f"{where}: model file not found: {model}")


def _camera_settings(where: str, table: Any, folder: Path, allowed) -> Dict[str, Any]:
    if not isinstance(table, dict):
        raise LineFileError(f"{where}: expected a table of camera fields, got {table!r}")
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise LineFileError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(allowed)})")
    return {name: _field(where, name, value, folder) for name, value in table.items()}


def parse_line(text: str, path: str = "line.toml", folder: Optional[Path] = None,
               defaults: Optional[Dict[str, Any]] = None, **line_options) -> Line:
    """A Line from line-file text. ``defaults``: camera fields used where neither the camera nor the
    file's [defaults] set them (the command line's options). ``line_options``: Line fields
    (backend, postprocess, providers, threads); those given (not None) win over the file's [inference]."""
    folder = Path(folder) if folder is not None else Path(path).resolve().parent
    toml = _toml()
    try:
        data = toml.loads(text)
    except toml.TOMLDecodeError as exc:
        raise LineFileError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - set(TOP_LEVEL))
    if unknown:
        raise LineFileError(f"{path}: unknown top-level key {unknown[0]!r} (known: {', '.join(TOP_LEVEL)}; "
                            f"cameras are [[camera]] tables)")
    version = data.get("schema_version", LINE_SCHEMA_VERSION)
    # type checked too: true and 1.0 equal 1 to Python, so they passed as version 1
    if type(version) is not int or version != LINE_SCHEMA_VERSION:
        raise LineFileError(f"{path}: schema_version {version!r} is not supported (this mrkd reads "
                            f"{LINE_SCHEMA_VERSION})")
    line_options = {**_inference_settings(path, data),
                    **{name: value for name, value in line_options.items() if value is not None}}
    file_defaults = _camera_settings(f"{path}: defaults", data.get("defaults", {}), folder,
                                     [f for f in CAMERA_FIELDS if f not in ("name", "source")])
    tables = data.get("camera")
    if not isinstance(tables, list) or not tables:
        raise LineFileError(f"{path}: no cameras (add [[camera]] tables with name and source)")
    cameras = []
    for index, table in enumerate(tables):
        label = table.get("name") if isinstance(table, dict) and isinstance(table.get("name"), str) else None
        where = f"{path}: camera[{index}]" + (f" ({label!r})" if label else "")
        settings = {**(defaults or {}), **file_defaults, **_camera_settings(where, table, folder, CAMERA_FIELDS)}
        for required in ("name", "source", "model"):
            if required not in settings or settings[required] is None:
                hint = " (or give MODEL on the command line, or model in [defaults])" if required == "model" else ""
                raise LineFileError(f"{where}.{required}: missing{hint}")
        _check_model_file(f"{where}.model", settings["model"])
        cameras.append(Camera(**settings))
    try:
        check_cameras(cameras)
    except LineError as exc:
        raise LineFileError(f"{path}: {exc}") from None
    if "plc" in data:        # checked here, read by the CLI with load_plc_settings
        _plc_settings(path, data, folder)
    if "part" in data or "recipes" in data:
        line_options = dict(line_options, part=_part_settings(path, data, folder, cameras, line_options.get("part")))
    return Line(tuple(cameras), **line_options)


def _recipe_masks(where: str, number: int, table: dict, folder: Path, cameras: Dict[str, Camera]):
    """A [recipes.N] table's ignore masks as (number, camera, path), each read now (as a camera's own
    ignore_mask is): a mistake is one line naming the field before anything opens."""
    from mrkd.runtime.ignore_mask import IgnoreMaskError, load_ignore_mask
    unknown = sorted(set(table) - {"model", "ignore_mask"})
    if unknown:
        raise LineFileError(f"{where}.{unknown[0]}: unknown field (known: model, ignore_mask)")
    given = table.get("ignore_mask", {})
    if not isinstance(given, dict):
        raise LineFileError(f"{where}.ignore_mask: expected a table of camera = \"mask image\", e.g. "
                            f"{{left = \"masks/b_left.png\"}}, got {given!r}")
    masks = []
    for name, value in given.items():
        field = f"{where}.ignore_mask.{name}"
        if name not in cameras:
            raise LineFileError(f"{field}: not a camera of this line (cameras: {', '.join(cameras)})")
        if not isinstance(value, str) or not value.strip():
            raise LineFileError(f"{field}: expected the path of a mask image (white where the camera's images are "
                                f"not judged), got {value!r}")
        mask_path = _in_folder(value, folder)
        try:
            mask = load_ignore_mask(mask_path)
        except IgnoreMaskError as exc:
            raise LineFileError(f"{field}: {exc}") from None
        size = cameras[name].size
        why = size and mask.resize_misfit(size, "the camera's frames are resized to")
        if why:
            raise LineFileError(f"{field}: {why}")
        masks.append((number, name, mask_path))
    return masks


def _part_settings(path: str, data: dict, folder: Path, line_cameras, base: Optional[PartSettings]) -> PartSettings:
    """[part] and [recipes] as PartSettings (over ``base``, the command line's); errors name the field."""
    names = [camera.name for camera in line_cameras]
    table, recipes = data.get("part", {}), data.get("recipes", {})
    if not isinstance(table, dict):
        raise LineFileError(f"{path}: part: expected a table ([part])")
    unknown = sorted(set(table) - set(PART_FIELDS))
    if unknown:
        raise LineFileError(f"{path}: part.{unknown[0]}: unknown field (known: {', '.join(PART_FIELDS)})")
    if not isinstance(recipes, dict):
        raise LineFileError(f"{path}: recipes: expected a table of NUMBER = \"model file\"")
    parsed, masks = [], []
    cameras = {camera.name: camera for camera in line_cameras}
    for key, entry in recipes.items():
        where = f"{path}: recipes.{key}"
        model = entry.get("model") if isinstance(entry, dict) else entry
        if not (str(key).isascii() and str(key).isdigit()) or not isinstance(model, str) or not model.strip():
            raise LineFileError(f"{where}: expected a recipe number = \"model file\" (or a table with model and "
                                f"ignore_mask), got {entry!r}")
        if isinstance(entry, dict):
            masks += _recipe_masks(where, int(key), entry, folder, cameras)
        model = _resolve(model, folder)
        _check_model_file(where, model)
        parsed.append((int(key), model))
    settings = dict(dataclasses.asdict(base or PartSettings()), recipes=tuple(sorted(parsed)),
                    recipe_masks=tuple(sorted(masks)))
    for name, value in table.items():
        if name == "cameras" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise LineFileError(f"{path}: part.cameras: expected a list of camera names, got {value!r}")
        if name in ("images", "queue") and (not isinstance(value, int) or isinstance(value, bool)):
            raise LineFileError(f"{path}: part.{name}: expected a whole number, got {value!r}")
        if name in ("timeout", "early", "max_delay") and not _number(value):
            raise LineFileError(f"{path}: part.{name}: expected seconds, got {value!r}")
        settings[name] = tuple(value) if name == "cameras" else value
    settings["cameras"] = tuple(settings["cameras"])
    try:
        return PartSettings(**settings).check(names)
    except ValueError as exc:
        raise LineFileError(f"{path}: {exc}") from None


def _inference_settings(path: str, data: dict) -> Dict[str, Any]:
    """[inference] as Line fields; errors name the field and what it takes."""
    from mrkd.runtime.backends import backend_choices, canonical_backend_spec
    from mrkd.runtime.postprocess import IMPLS
    table = data.get("inference", {})
    if not isinstance(table, dict):
        raise LineFileError(f"{path}: inference: expected a table ([inference])")
    unknown = sorted(set(table) - set(INFERENCE_FIELDS))
    if unknown:
        raise LineFileError(f"{path}: inference.{unknown[0]}: unknown field (known: {', '.join(INFERENCE_FIELDS)})")
    settings: Dict[str, Any] = {}
    for name, value in table.items():
        if name == "backend":           # openvino:f32 is openvino:fp32
            value = canonical_backend_spec(value)
        choices = {"backend": backend_choices(), "postprocess": ("auto",) + tuple(IMPLS)}.get(name)
        if choices is not None and value not in choices:
            raise LineFileError(f"{path}: inference.{name}: expected one of {', '.join(choices)}, got {value!r}")
        if name == "threads" and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1024):
            raise LineFileError(f"{path}: inference.threads: expected a whole number from 0 to 1024, got {value!r}")
        if name == "providers":
            names = value.split(",") if isinstance(value, str) else value
            if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
                raise LineFileError(f"{path}: inference.providers: expected provider names (\"cuda,cpu\" or "
                                    f"[\"cuda\", \"cpu\"]), got {value!r}")
            value = tuple(n.strip() for n in names)
        settings[name] = value
    return settings


def _plc_settings(path: str, data: dict, folder: Path):
    from mrkd.runtime.plc import PlcError
    from mrkd.runtime.plc.servers import PlcSettings
    table = data["plc"]
    if isinstance(table, dict):       # certificate files are read from the line file's folder, as models are
        paths = ("opcua_certificate", "opcua_private_key", "opcua_trust", "modbus_certificate",
                 "modbus_private_key", "modbus_trust")
        table = {k: _resolve(v, folder) if k in paths and isinstance(v, str) and v.strip() else v
                 for k, v in table.items()}
    try:
        return PlcSettings.from_table(table, f"{path}: plc.")
    except PlcError as exc:
        raise LineFileError(str(exc)) from None


MAX_LINE_FILE_BYTES = 1 << 20


def read_line_text(path: Path) -> str:
    """The line file's text: a regular file of at most 1 MiB (a FIFO or a device hung or filled the
    memory), UTF-8, a leading byte-order mark (Windows editors) dropped."""
    try:
        if not path.is_file():
            raise LineFileError(f"{path}: not a regular file (a line file is a TOML text file)")
        if path.stat().st_size > MAX_LINE_FILE_BYTES:
            raise LineFileError(f"{path}: {path.stat().st_size} bytes; a line file is a TOML text file of at most "
                                f"{MAX_LINE_FILE_BYTES} bytes")
        return path.read_text(encoding="utf-8").removeprefix("\ufeff")
    except (OSError, UnicodeDecodeError) as exc:
        raise LineFileError(f"{path}: cannot read the line file ({exc})") from None


def load_plc_settings(path):
    """The line file's ``[plc]`` table as PlcSettings (None when it has none); errors as load_line's."""
    path = Path(path)
    toml = _toml()
    try:
        data = toml.loads(read_line_text(path))
    except toml.TOMLDecodeError as exc:
        raise LineFileError(f"{path}: cannot read the line file ({exc})") from None
    return _plc_settings(str(path), data, path.resolve().parent) if "plc" in data else None


def load_line(path, defaults: Optional[Dict[str, Any]] = None, **line_options) -> Line:
    """Read a line file (see the module docstring); LineFileError names the file and the field."""
    path = Path(path)
    return parse_line(read_line_text(path), str(path), path.resolve().parent, defaults, **line_options)

