"""The embedded data set: procedural surfaces with drawn defects and exact masks, in MVTec AD layout.

    <root>/<category>/train/good/000.png
    <root>/<category>/test/good/000.png
    <root>/<category>/test/<defect>/000.png
    <root>/<category>/ground_truth/<defect>/000_mask.png      (0/255, exactly the changed pixels)
    <root>/<category>/mrkd_category.json                      ({"kind": "texture"|"object"})

Normal images are a distribution (random phase, offset, lighting), not one picture. "gray_tiles" is
written as grayscale JPEG with a 1.25:1 aspect, the way factory cameras often deliver images.
Deterministic: the same arguments give byte-identical files. numpy + OpenCV only (no torch), so the
demo and the tests can build it anywhere.
"""

from __future__ import annotations

import json
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from tqdm import tqdm

from mrkd.errors import SettingError
from mrkd.atomic import atomic_write_text

CATEGORIES = ("grain", "weave", "brushed", "wood", "washer", "gray_tiles")
DEFAULT_CATEGORIES = ("grain", "washer")
DEFECT_TYPES = ("scratch", "spot", "crack", "missing", "contamination")
MARKER_FILE = "mrkd_synthetic.json"
CATEGORY_FILE = "mrkd_category.json"

# A render returns (float32 HxWx3 BGR image in 0..255, object mask or None, colour seen through holes).
Render = Callable[[np.random.Generator, int, int], Tuple[np.ndarray, Optional[np.ndarray], Tuple[float, ...]]]


# --- procedural building blocks ---------------------------------------------------------------------

def fractal_noise(rng: np.random.Generator, height: int, width: int, octaves: int = 4,
                  base_cells: int = 3) -> np.ndarray:
    """Zero-mean, unit-std value noise: random grids of doubling resolution, bicubically upsampled
    and summed with halving amplitudes."""
    total = np.zeros((height, width), np.float32)
    for octave in range(octaves):
        cells = base_cells * 2 ** octave
        grid = rng.standard_normal((cells + 1, int(cells * width / height) + 1)).astype(np.float32)
        total += cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC) * 0.5 ** octave
    return (total - total.mean()) / (total.std() + 1e-6)


def _lighting(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A gentle brightness gradient and gain, different for every image."""
    y, x = np.mgrid[0:1:complex(0, height), 0:1:complex(0, width)].astype(np.float32)
    gx, gy = rng.uniform(-0.12, 0.12, size=2)
    return (rng.uniform(0.9, 1.1) * (1 + gx * (x - 0.5) + gy * (y - 0.5))).astype(np.float32)


def _colorize(value: np.ndarray, dark: Sequence[float], bright: Sequence[float]) -> np.ndarray:
    """Map a 0..1 map to BGR between two colours."""
    dark = np.asarray(dark, np.float32)
    bright = np.asarray(bright, np.float32)
    return dark + np.clip(value, 0, 1)[..., None] * (bright - dark)


def _grid(height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:height, 0:width]
    return y.astype(np.float32), x.astype(np.float32)


# --- surfaces ------------------------------------------------------------------------------------------

def _render_grain(rng, height, width):
    value = 0.5 + 0.17 * fractal_noise(rng, height, width, octaves=5, base_cells=4)
    image = _colorize(value, (55, 85, 120), (150, 185, 215)) * _lighting(rng, height, width)[..., None]
    return image, None, (20.0, 20.0, 25.0)


def _render_weave(rng, height, width):
    scale = min(height, width) / 128
    period = rng.uniform(11, 13) * scale
    y, x = _grid(height, width)
    oy, ox = rng.uniform(0, period, size=2)
    across = 0.5 + 0.5 * np.cos(2 * np.pi * (y + oy) / period)   # horizontal threads
    along = 0.5 + 0.5 * np.cos(2 * np.pi * (x + ox) / period)    # vertical threads
    over = (np.floor((x + ox) / period) + np.floor((y + oy) / period)) % 2 == 0
    value = np.where(over, across, along) * 0.6 + 0.25
    value += 0.04 * fractal_noise(rng, height, width, octaves=3, base_cells=8)
    image = _colorize(value, (70, 45, 30), (210, 170, 130)) * _lighting(rng, height, width)[..., None]
    return image, None, (15.0, 15.0, 15.0)


def _render_brushed(rng, height, width):
    streak_length = max(3, int(width * 0.4)) | 1
    streaks = cv2.blur(rng.standard_normal((height, width)).astype(np.float32), (streak_length, 1))
    streaks /= streaks.std() + 1e-6
    value = 0.58 + 0.07 * streaks + 0.04 * fractal_noise(rng, height, width, octaves=2, base_cells=2)
    image = _colorize(value, (40, 40, 45), (250, 248, 245)) * _lighting(rng, height, width)[..., None]
    return image, None, (30.0, 25.0, 20.0)


def _render_wood(rng, height, width):
    scale = min(height, width) / 128
    y, x = _grid(height, width)
    cx = -rng.uniform(0.4, 1.5) * width
    cy = rng.uniform(-0.5, 1.5) * height
    radius = np.sqrt((x - cx) ** 2 + (2.0 * (y - cy)) ** 2)
    radius += 5 * scale * fractal_noise(rng, height, width, octaves=3, base_cells=2)
    period = rng.uniform(9, 12) * scale
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * radius / period + rng.uniform(0, 2 * np.pi))
    value = 0.35 + 0.4 * rings ** 2 + 0.04 * fractal_noise(rng, height, width, octaves=4, base_cells=8)
    image = _colorize(value, (20, 55, 100), (110, 170, 225)) * _lighting(rng, height, width)[..., None]
    return image, None, (15.0, 15.0, 15.0)


def _render_washer(rng, height, width):
    size = min(height, width)
    y, x = _grid(height, width)
    cy = height / 2 + rng.uniform(-0.03, 0.03) * size
    cx = width / 2 + rng.uniform(-0.03, 0.03) * size
    distance = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    outer, inner = 0.36 * size, 0.15 * size
    ring = (distance <= outer) & (distance >= inner)
    radial = (distance - inner) / (outer - inner)
    shade = 0.75 + 0.2 * np.cos(np.pi * radial) * rng.uniform(0.8, 1.2)
    angle = np.arctan2(y - cy, x - cx)
    shade += 0.06 * np.cos(angle - rng.uniform(0, 2 * np.pi))   # light from a random side
    shade += 0.03 * fractal_noise(rng, height, width, octaves=4, base_cells=6)
    metal = _colorize(shade, (0, 0, 0), (200, 205, 210))
    background = np.float32(18) + 2 * rng.standard_normal((height, width, 1)).astype(np.float32)
    image = np.where(ring[..., None], metal, background)
    return image, ring, (18.0, 18.0, 18.0)


def _render_gray_tiles(rng, height, width):
    scale = min(height, width) / 128
    period = rng.uniform(30, 34) * scale
    y, x = _grid(height, width)
    oy, ox = rng.uniform(0, period, size=2)
    grout_half = 1.2 * scale
    in_grout = (np.minimum((y + oy) % period, period - (y + oy) % period) < grout_half) | \
               (np.minimum((x + ox) % period, period - (x + ox) % period) < grout_half)
    tile = 0.66 + 0.05 * fractal_noise(rng, height, width, octaves=4, base_cells=6)
    value = np.where(in_grout, 0.3, tile) * _lighting(rng, height, width)
    gray = np.clip(value * 255, 0, 255).astype(np.float32)
    return np.repeat(gray[..., None], 3, axis=2), None, (30.0, 30.0, 30.0)


@dataclass(frozen=True)
class _Spec:
    render: Render
    kind: str = "texture"
    grayscale: bool = False
    aspect: float = 1.0          # width / height
    extension: str = ".png"


_SPECS: Dict[str, _Spec] = {
    "grain": _Spec(_render_grain),
    "weave": _Spec(_render_weave),
    "brushed": _Spec(_render_brushed),
    "wood": _Spec(_render_wood),
    "washer": _Spec(_render_washer, kind="object"),
    "gray_tiles": _Spec(_render_gray_tiles, grayscale=True, aspect=1.25, extension=".jpg"),
}


# --- defects -------------------------------------------------------------------------------------------

def _defect_centre(rng, height, width, allowed: Optional[np.ndarray]) -> Tuple[int, int]:
    if allowed is not None:
        ys, xs = np.nonzero(allowed)
        pick = rng.integers(len(ys))
        return int(ys[pick]), int(xs[pick])
    return int(rng.uniform(0.15, 0.85) * height), int(rng.uniform(0.15, 0.85) * width)


def _blob(rng, shape, centre, radius) -> np.ndarray:
    """An irregular filled polygon around centre (x, y order for OpenCV), as a bool mask."""
    count = int(rng.integers(8, 13))
    angles = np.sort(rng.uniform(0, 2 * np.pi, count))
    radii = radius * rng.uniform(0.65, 1.3, count)
    points = np.stack([centre[1] + radii * np.cos(angles), centre[0] + radii * np.sin(angles)], axis=1)
    canvas = np.zeros(shape, np.uint8)
    cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 1)
    return canvas.astype(bool)


def _polyline(shape, points, thickness) -> np.ndarray:
    canvas = np.zeros(shape, np.uint8)
    cv2.polylines(canvas, [np.round(np.asarray(points)).astype(np.int32)], False, 1, thickness)
    return canvas.astype(bool)


def _contrasting(local_mean: float, distance: float = 100.0) -> float:
    """An intensity far from the local surface: darker on bright surfaces, brighter on dark ones."""
    return local_mean - distance if local_mean > 128 else local_mean + distance


def _draw_defect(kind: str, image: np.ndarray, rng: np.random.Generator, allowed: Optional[np.ndarray],
                 hole_colour: Tuple[float, ...]) -> Tuple[np.ndarray, np.ndarray]:
    """Return (defective float image, drawn region). The region may include pixels whose value ends
    up unchanged; the written mask is computed from the final pixels."""
    height, width = image.shape[:2]
    scale = min(height, width) / 128
    shape = (height, width)
    centre = _defect_centre(rng, height, width, allowed)
    out = image.copy()
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(30, 60) * scale
        points = [(centre[1] - 0.5 * length * np.cos(angle), centre[0] - 0.5 * length * np.sin(angle))]
        for _ in range(3):
            angle += rng.uniform(-0.25, 0.25)
            x, y = points[-1]
            points.append((x + length / 3 * np.cos(angle), y + length / 3 * np.sin(angle)))
        region = _polyline(shape, points, max(2, int(round(2 * scale))))
        region = region if allowed is None else region & allowed
        out[region] = 245.0 if image[region].mean() < 140 else 20.0
    elif kind == "spot":
        region = _blob(rng, shape, centre, rng.uniform(5, 10) * scale)
        region = region if allowed is None else region & allowed
        local = image[region].mean()
        out[region] = image[region] * 0.35 if local > 100 else image[region] + 110.0
    elif kind == "crack":
        angle = rng.uniform(0, 2 * np.pi)
        step = 3.0 * scale
        trunk = [(float(centre[1]), float(centre[0]))]
        branches = []
        for _ in range(int(rng.integers(10, 17))):
            angle += rng.uniform(-0.5, 0.5)
            x, y = trunk[-1]
            trunk.append((x + step * np.cos(angle), y + step * np.sin(angle)))
            if rng.random() < 0.25:
                branch_angle = angle + rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.1)
                branch = [trunk[-1]]
                for _ in range(int(rng.integers(3, 7))):
                    branch_angle += rng.uniform(-0.4, 0.4)
                    bx, by = branch[-1]
                    branch.append((bx + step * np.cos(branch_angle), by + step * np.sin(branch_angle)))
                branches.append(branch)
        thickness = max(2, int(round(1.5 * scale)))
        region = _polyline(shape, trunk, thickness)
        for branch in branches:
            region |= _polyline(shape, branch, max(1, thickness - 1))
        region = region if allowed is None else region & allowed
        out[region] = image[region] * 0.2
    elif kind == "missing":
        region = _blob(rng, shape, centre, rng.uniform(7, 13) * scale)
        region = region if allowed is None else region & allowed
        speckle = rng.standard_normal((int(region.sum()), 1)).astype(np.float32) * 3
        out[region] = np.asarray(hole_colour, np.float32) + speckle
    elif kind == "contamination":
        region = _blob(rng, shape, centre, rng.uniform(6, 12) * scale)
        region = region if allowed is None else region & allowed
        hue = np.asarray([(60, 170, 60), (200, 90, 40), (40, 60, 200), (150, 60, 160)][rng.integers(4)],
                         np.float32)
        hue *= _contrasting(float(image[region].mean())) / hue.mean()
        fibres = fractal_noise(rng, height, width, octaves=2, base_cells=16)[region][:, None]
        out[region] = hue + 25 * fibres
    else:
        raise SettingError(f"unknown defect type {kind!r}; expected one of {DEFECT_TYPES}")
    return out, region


# --- images and files ----------------------------------------------------------------------------------

def _to_stored(image: np.ndarray, grayscale: bool) -> np.ndarray:
    pixels = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY) if grayscale else pixels


def _image_rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    # crc32 rather than hash(): Python salts str hashes per process, which would break determinism.
    return np.random.default_rng([seed, zlib.crc32(category.encode()), zlib.crc32(split.encode()), index])


def _image_size(spec: _Spec, image_size: int) -> Tuple[int, int]:
    return image_size, int(round(image_size * spec.aspect))


def render_good(category: str, rng: np.random.Generator, image_size: int = 128) -> np.ndarray:
    """One defect-free image of ``category`` as stored (uint8 BGR, or uint8 gray for grayscale kinds)."""
    spec = _SPECS[category]
    image, _, _ = spec.render(rng, *_image_size(spec, image_size))
    return _to_stored(image, spec.grayscale)


def render_defect(category: str, defect: str, rng: np.random.Generator,
                  image_size: int = 128) -> Tuple[np.ndarray, np.ndarray]:
    """One defective image of ``category`` and its exact mask (bool: the stored pixels that changed)."""
    spec = _SPECS[category]
    height, width = _image_size(spec, image_size)
    image, obj, hole_colour = spec.render(rng, height, width)
    clean = _to_stored(image, spec.grayscale)
    min_area = max(12, int(25 * (min(height, width) / 128) ** 2))
    for _ in range(50):   # a defect clipped to a thin object edge may be too small: draw another
        damaged, _ = _draw_defect(defect, image, rng, obj, hole_colour)
        stored = _to_stored(damaged, spec.grayscale)
        changed = stored != clean
        mask = changed.any(axis=2) if changed.ndim == 3 else changed
        if mask.sum() >= min_area:
            return stored, mask
    raise RuntimeError(f"could not draw a visible {defect!r} defect on {category!r}")


def _encode(image: np.ndarray, extension: str) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, 92] if extension == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, buffer = cv2.imencode(extension, image, params)
    if not ok:
        raise RuntimeError(f"OpenCV cannot encode {extension} images")
    return buffer.tobytes()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _generated(category: str, relative: Path) -> bool:
    """Whether ``relative`` (a path inside the category's folder) is one the generator writes: its
    folders, images, masks and mrkd_category.json (any count of images, for earlier settings)."""
    parts, extension = relative.parts, _SPECS[category].extension
    splits = {("train", "good"), ("test", "good")} | {(s, d) for s in ("test", "ground_truth") for d in DEFECT_TYPES}
    if len(parts) == 1:
        return parts[0] in ("train", "test", "ground_truth", CATEGORY_FILE)
    if len(parts) == 2:
        return parts in splits
    if len(parts) != 3 or parts[:2] not in splits:
        return False
    stem = parts[2][:-len("_mask.png")] if parts[0] == "ground_truth" and parts[2].endswith("_mask.png") else \
        parts[2][:-len(extension)] if parts[0] != "ground_truth" and parts[2].endswith(extension) else ""
    return len(stem) >= 3 and stem.isdigit()


def _foreign(folder: Path, category: str) -> List[Path]:
    """What under ``folder`` the generator did not write (links count as foreign: never followed)."""
    return [path for path in sorted(folder.rglob("*"))
            if path.is_symlink() or not _generated(category, path.relative_to(folder))]


def _prepare_root(root: Path, categories: Sequence[str]) -> None:
    """Remove earlier synthetic output of these categories; refuse (before removing anything) when a
    category's folder holds anything else: files a user put among the generated ones are kept."""
    ours = (root / MARKER_FILE).is_file()
    for category in categories:
        folder = root / category
        if not folder.exists() and not folder.is_symlink():
            continue
        if not ours:
            raise FileExistsError(f"{folder} exists and {root} holds no {MARKER_FILE}: refusing to "
                                  f"overwrite data that the synthetic generator did not write")
        foreign = _foreign(folder, category) if folder.is_dir() and not folder.is_symlink() else [folder]
        if foreign:
            raise FileExistsError(f"{foreign[0]}: not written by the synthetic generator"
                                  f"{f' (and {len(foreign) - 1} more)' if len(foreign) > 1 else ''}; refusing to "
                                  f"regenerate {folder} over it (move it away, or generate into another folder)")
    for category in categories:
        if (root / category).is_dir():
            shutil.rmtree(root / category)


def _category_files(category: str, image_size: int, n_train: int, n_test_good: int, n_test_defect: int,
                    seed: int):
    """(path inside the category's folder, bytes) of every file the generator writes for ``category``,
    drawn one at a time."""
    spec = _SPECS[category]
    for split, count in (("train", n_train), ("test", n_test_good)):
        for index in range(count):
            image = render_good(category, _image_rng(seed, category, split, index), image_size)
            yield Path(split, "good", f"{index:03d}{spec.extension}"), _encode(image, spec.extension)
    for defect in DEFECT_TYPES:
        for index in range(n_test_defect):
            image, mask = render_defect(category, defect, _image_rng(seed, category, defect, index), image_size)
            yield Path("test", defect, f"{index:03d}{spec.extension}"), _encode(image, spec.extension)
            yield Path("ground_truth", defect, f"{index:03d}_mask.png"), _encode(mask.astype(np.uint8) * 255, ".png")
    yield Path(CATEGORY_FILE), (json.dumps({"kind": spec.kind}) + "\n").encode()


def _difference(folder: Path, files) -> Optional[str]:
    """None when ``folder`` holds exactly ``files`` ((relative path, bytes), byte for byte), else what
    differs first, in words."""
    present = {path.relative_to(folder) for path in folder.rglob("*") if path.is_file() or path.is_symlink()}
    for relative, data in files:
        target = folder / relative
        if relative not in present:
            return f"it lacks {relative}"
        if target.is_symlink() or target.read_bytes() != data:
            return f"{relative} differs"
        present.discard(relative)
    if present:
        first = sorted(present)[0]
        return f"it holds {len(present)} file(s) this would not write ({first}{', ...' if len(present) > 1 else ''})"
    return None


def _refuse_existing(root: Path, categories: Sequence[str], settings: dict) -> List[str]:
    """The categories whose folders already hold exactly what these settings write (nothing to do);
    FileExistsError, before anything is written, when a category's folder exists with anything else."""
    unchanged = []
    for category in categories:
        folder = root / category
        if not folder.exists() and not folder.is_symlink():
            continue
        if folder.is_dir() and not folder.is_symlink() and \
                not any(path.is_file() or path.is_symlink() for path in folder.rglob("*")):
            continue        # no file in it to lose
        reason = "it is not a folder" if folder.is_symlink() or not folder.is_dir() else \
            _difference(folder, _category_files(category, **settings))
        if reason is not None:
            raise FileExistsError(f"{folder} already exists and is not what these settings write ({reason}); "
                                  f"refusing to write over it: generate into another folder (mrkd generate "
                                  f"OTHER_FOLDER) or move {folder} away first")
        unchanged.append(category)
    return unchanged


def generate_dataset(root, categories: Optional[Sequence[str]] = None, image_size: int = 128,
                     n_train: int = 40, n_test_good: int = 12, n_test_defect: int = 6, seed: int = 0,
                     progress: bool = True, replace: bool = True) -> dict:
    """Write MVTec-layout categories of procedural surfaces under ``root``; returns a summary dict.

    categories: names from CATEGORIES (default: all). n_test_defect is per defect type. Images are
    image_size pixels high (gray_tiles are 1.25x as wide). Same arguments -> byte-identical files.
    A category whose folder exists: ``replace=True`` (scratch folders of the demo and benchmarks) removes
    what an earlier run of the generator wrote there and refuses when the folder holds anything else;
    ``replace=False`` (`mrkd generate`: never loses a file) leaves a folder that holds byte for byte what
    would be written as it is (``summary["unchanged"]``) and refuses any other.
    """
    categories = list(CATEGORIES if categories is None else categories)
    unknown = [name for name in categories if name not in _SPECS]
    if unknown:
        raise SettingError(f"unknown synthetic categories {unknown}; choose from {list(CATEGORIES)}")
    if image_size < 32:
        raise SettingError(f"image_size must be at least 32, got {image_size}")
    if n_train < 1:
        raise SettingError(f"n_train must be at least 1, got {n_train}")
    if n_test_good < 0 or n_test_defect < 0:
        raise SettingError(f"n_test_good and n_test_defect must be >= 0, got {n_test_good} and {n_test_defect}")
    root = Path(root)
    started = time.perf_counter()
    settings = dict(image_size=image_size, n_train=n_train, n_test_good=n_test_good,
                    n_test_defect=n_test_defect, seed=seed)
    if replace:
        _prepare_root(root, categories)
        unchanged = []
    else:
        unchanged = _refuse_existing(root, categories, settings)
    root.mkdir(parents=True, exist_ok=True)
    recorded = category_names(root)
    recorded += [name for name in categories if name not in recorded]
    atomic_write_text(root / MARKER_FILE, json.dumps({"generator": "mrkd.train.synthetic", **settings,
                                                      "categories": recorded}, indent=2) + "\n")
    summary = {"root": str(root), **settings, "categories": {}, "unchanged": unchanged}
    written = [name for name in categories if name not in unchanged]
    total = len(written) * (n_train + n_test_good + n_test_defect * len(DEFECT_TYPES))
    with tqdm(total=total, desc="synthetic data", unit="img", disable=not progress, leave=False) as bar:
        for category in written:
            spec = _SPECS[category]
            folder = root / category
            for relative, data in _category_files(category, **settings):
                if relative.name == CATEGORY_FILE:
                    atomic_write_text(folder / CATEGORY_FILE, data.decode())
                    continue
                _write(folder / relative, data)
                if relative.parts[0] != "ground_truth":
                    bar.update()
    for category in categories:
        spec = _SPECS[category]
        summary["categories"][category] = {
            "kind": spec.kind, "grayscale": spec.grayscale, "format": spec.extension.lstrip("."),
            "height": image_size, "width": _image_size(spec, image_size)[1], "train": n_train,
            "test_good": n_test_good, "test_defect": {defect: n_test_defect for defect in DEFECT_TYPES}}
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


def category_names(root) -> List[str]:
    """The synthetic categories recorded under ``root`` (empty when root holds no synthetic data)."""
    marker = Path(root) / MARKER_FILE
    if not marker.is_file():
        return []
    return list(json.loads(marker.read_text(encoding="utf-8")).get("categories", []))
