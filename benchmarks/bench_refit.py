"""Refit from false alarms, measured on real images (ELPV solar cells).

    python -m mrkd.benchmarks.bench_refit [--seeds 0 1] [--categories elpv_mono elpv_poly] [--work DIR]

Per category and seed:

1. Train the default model (``--score both``, EfficientNet-Lite0 ImageNet teacher, ``--image-size``
   (default 256 px, the shipped default, where the bank averages each patch over 3 × 3; the tables of
   2026-12-02/03 in RESULTS.md are at 128 px: ``--image-size 128``), 10 epochs,
   the 160 training cells of the validation layout — bench_quality's settings), threshold as shipped
   (the trainer's calibration on its 10 % held-out good cells).
2. Stream the validation cells (validation good cells, the training good cells past the 160 the
   model trained on — never seen by it — and the reserved validation defects, in file name order)
   through it as the "line". The simulated operator is the dataset's label: the first N
   good cells that raised an alarm are marked good (false alarm), the alarmed defective cells are
   marked "defect confirmed" (the refit's check).
3. Refit (mrkd.train.refit.refit_model) for N = 5, 10, 20 (as many false alarms as the line gave):
   reviewed patches into the bank, threshold again on the same held-out good cells.
4. On the untouched TEST split (test good cells, test defects; none seen above): the false-alarm rate
   on good cells at the same catch rate of defective cells, before and after (for both models the
   threshold is the highest score that catches that share of defects: the shipped model's catch rate
   at its shipped threshold), plus each model at its own calibrated threshold and image AUROC.

The refit's time (wall and process CPU seconds) is measured with ``--refit-threads`` torch threads
(default 1: the goal is < 30 s on 2 cores, and on a shared machine a second OpenMP thread only spins);
the machine's load average is recorded with it. Trained checkpoints are kept in ``--work`` and reused by a rerun.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

import numpy as np

REVIEW_COUNTS = (5, 10, 20)
SETTINGS = {"image_size": 256, "epochs": 10, "batch_size": 16, "lr": 0.005, "max_train": 160,
            "backbone": "efficientnet_lite0"}


def _paths(folder: Path) -> List[str]:
    return sorted(str(p) for p in folder.iterdir() if p.suffix.lower() == ".png") if folder.is_dir() else []


def train_shipped(layout_root: Path, category: str, seed: int, work: Path, log=print,
                  image_size: int = SETTINGS["image_size"]):
    """The default model on the validation layout's train/good (cached in ``work``, per input size):
    (model, holdout paths)."""
    import torch

    from mrkd.train.checkpoint import load_checkpoint, read_checkpoint
    from mrkd.train.trainer import TrainConfig, train
    out_dir = work / f"{category}_{image_size}px_seed{seed}"
    last = out_dir / "last.ckpt"
    if last.is_file() and (out_dir / "done").is_file():
        data = read_checkpoint(last)
        return load_checkpoint(last), list(data["train_state"]["holdout"])
    config = TrainConfig(epochs=SETTINGS["epochs"], batch_size=SETTINGS["batch_size"], lr=SETTINGS["lr"],
                         image_size=image_size, seed=seed, eval_every=0, save_every=SETTINGS["epochs"],
                         progress=False)
    started = time.perf_counter()
    torch.set_num_threads(1)
    result = train(layout_root, category, out_dir, config, backbone=SETTINGS["backbone"], teacher_weights="imagenet",
                   resume=False)
    (out_dir / "done").write_text("1")
    log(f"[refit] {category} seed {seed}: trained in {time.perf_counter() - started:.0f} s")
    return result["model"].eval(), list(result["holdout"])


@dataclass
class StudyModel:
    """One cached default model of a validation study (bench_image_score, bench_bank_size) and its
    category's folder in the validation layout, whose test/ holds the validation cells (never the test
    split)."""

    category: str
    seed: int
    model: object
    holdout: List[str]
    folder: Path

    @property
    def good(self) -> List[str]:
        return _paths(self.folder / "test/good")

    @property
    def defect(self) -> List[str]:
        return _paths(self.folder / "test/defect")


def study_models(seeds: Sequence[int], categories: Sequence[str], work=None,
                 image_size: int = SETTINGS["image_size"], log=print) -> Iterator[StudyModel]:
    """The default model per category and seed on the validation layout (trained once, cached in
    ``work``/models as bench_refit's own runs are)."""
    from mrkd.train.elpv import layout_elpv
    work = Path(work or "/tmp/mrkd_bench_refit")
    work.mkdir(parents=True, exist_ok=True)
    root = Path(layout_elpv(work / "elpv_validation", split="validation", max_train=SETTINGS["max_train"]).root)
    for category in categories:
        for seed in seeds:
            model, holdout = train_shipped(root, category, seed, work / "models", log, image_size)
            yield StudyModel(category, seed, model, holdout, root / category)


def study_means(rows: Sequence[Tuple[str, dict]], value=lambda cell: cell) -> dict:
    """Per category, the mean over its (category, results) rows of each result (``value`` reads the number)."""
    means: dict = {}
    for category in dict.fromkeys(category for category, _ in rows):
        mine = [row for c, row in rows if c == category]
        means[category] = {name: float(np.mean([value(row[name]) for row in mine])) for name in mine[0]}
    return means


def add_study_arguments(parser) -> None:
    """The options every validation study over bench_refit's cached models takes (bench_image_score,
    bench_bank_size): seeds, categories, work folder, input size, results file."""
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds")
    parser.add_argument("--categories", nargs="+", default=["elpv_mono", "elpv_poly"], help="ELPV categories")
    parser.add_argument("--work", default="/tmp/mrkd_bench_refit",
                        help="layouts and trained models (shared with bench_refit, reused)")
    parser.add_argument("--image-size", type=int, default=SETTINGS["image_size"],
                        help="input size of the trained models (bench_refit's default: the shipped 256)")
    parser.add_argument("--out", default=None, help="write the results JSON here")


def report_study(results: dict, out=None) -> None:
    """Print a study's means per category; write its results JSON (atomically) when ``out`` is given."""
    from mrkd.atomic import atomic_write_text
    for category, means in results["means"].items():
        print(f"{category}: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
    if out:
        atomic_write_text(out, json.dumps(results, indent=2) + "\n")


def rates_at_catch(good: np.ndarray, defect: np.ndarray, catch: float) -> dict:
    """False-alarm rate on good cells at the highest threshold that catches ``catch`` of the defects."""
    k = max(1, math.ceil(catch * len(defect) - 1e-9))
    threshold = float(np.sort(defect)[::-1][k - 1])
    return {"threshold": threshold, "catch": float((defect >= threshold).mean()),
            "false_alarm_rate": float((good >= threshold).mean())}


def rates_at(good: np.ndarray, defect: np.ndarray, threshold: float) -> dict:
    return {"threshold": float(threshold), "catch": float((defect >= threshold).mean()),
            "false_alarm_rate": float((good >= threshold).mean())}


def auroc(good: np.ndarray, defect: np.ndarray) -> float:
    from mrkd.train.metrics import image_auroc
    labels = np.r_[np.zeros(len(good)), np.ones(len(defect))]
    return float(image_auroc(labels, np.r_[good, defect].astype(np.float64)))


RADIUS_GRID = (0.5, 0.75, 0.9, 0.97, 0.99)          # --tune-radius: the growth's stop (held-out quantile)
KEEP_GRID = (0.0, 0.5, 0.75, 0.9, 1.0)              # --tune-keep: the guard's keep rule (refit's guard_keep)
AUGMENT_GRID = ("none", "flips", "flips+rot90")     # --tune-augment: refit's augmented candidates (AUGMENT_PRESETS)


def line_review(model, line_good: Sequence[str], line_defect: Sequence[str]):
    """The shipped model on the line: (threshold, false alarms, confirmed defects, scores by path)."""
    from mrkd.runtime.calibration import Calibration
    from mrkd.train.calibrate import score_images
    threshold = float(Calibration.threshold_of(model.calibration, "shipped model"))
    line = sorted([(Path(p).name, p, 0) for p in line_good] + [(Path(p).name, p, 1) for p in line_defect])
    line_scores = score_images(model, [p for _, p, _ in line])
    false_alarms = [p for (_, p, label), s in zip(line, line_scores) if label == 0 and s >= threshold]
    confirmed = [p for (_, p, label), s in zip(line, line_scores) if label == 1 and s >= threshold]
    return threshold, false_alarms, confirmed, {p: float(s) for (_, p, _), s in zip(line, line_scores)}


@dataclass
class LineHalves:
    """The line (file name order) cut in two for the tuners: every other cell of each class is the
    review half, judged by the shipped model as line_review does; the rest is the validation half
    nobody reviewed, with the shipped model's scores."""

    threshold: float
    false_alarms: List[str]          # the review half's good cells the shipped model flags
    confirmed: List[str]             # the review half's defects it flags
    val_good: List[str]
    val_defect: List[str]
    good_scores: np.ndarray          # the shipped model's scores of val_good, val_defect
    defect_scores: np.ndarray

    @property
    def catch(self) -> float:
        """The shipped model's catch rate on the validation half's defects."""
        return float((self.defect_scores >= self.threshold).mean())

    def record(self, reviewed: int) -> dict:
        """What both tuners report of the split, before any refit."""
        return {"reviewed": reviewed, "confirmed": len(self.confirmed), "validation_good": len(self.val_good),
                "validation_defect": len(self.val_defect), "validation_catch": self.catch,
                "far_before": rates_at_catch(self.good_scores, self.defect_scores, self.catch)["false_alarm_rate"]}


def line_halves(model, line_good: Sequence[str], line_defect: Sequence[str]) -> LineHalves:
    from mrkd.train.calibrate import score_images
    line = sorted([(Path(p).name, p, 0) for p in line_good] + [(Path(p).name, p, 1) for p in line_defect])
    goods, defects = [c for c in line if c[2] == 0], [c for c in line if c[2] == 1]
    first, second = sorted(goods[0::2] + defects[0::2]), sorted(goods[1::2] + defects[1::2])
    threshold, false_alarms, confirmed, _ = line_review(model, [p for _, p, y in first if y == 0],
                                                        [p for _, p, y in first if y == 1])
    val_good, val_defect = [p for _, p, y in second if y == 0], [p for _, p, y in second if y == 1]
    return LineHalves(threshold, false_alarms, confirmed, val_good, val_defect, score_images(model, val_good),
                      score_images(model, val_defect))


def tune_on_line(model, holdout: Sequence[str], line_good: Sequence[str], line_defect: Sequence[str],
                 n: int = max(REVIEW_COUNTS), log=print, radius_grid=None, keep_grid=None,
                 augment_grid=None) -> dict:
    """Validation for the refit's settings, on the LINE only (no test label is read). The line
    (file name order) is cut in two: its first half is the review period (the first ``n`` false
    alarms there are marked good, its alarmed defects confirmed), its second half the validation
    cells nobody reviewed. Per setting: the second half's false-alarm rate at the shipped model's
    catch rate there (before and after), its catch rate at the refit's own threshold, the confirmed
    defects missed and the reviewed images the refit model still flags; and a refit from the WHOLE
    line's first ``n`` false alarms with all its flagged defects confirmed (what `mrkd refit` would be
    given): the confirmed defects it leaves unflagged (what `mrkd refit` refuses) in
    ``missed_whole_line``, the reviewed images it still flags in ``still_flagged_whole_line``.
    ``radius_grid``: the growth's stop (refit_model's radius_quantile) per setting, the guard as
    default; ``keep_grid``: the guard's keep share (refit_model's guard_keep) per setting, the stop as
    default; ``augment_grid``: refit_model's augmented candidates (AUGMENT_PRESETS names) per setting,
    stop and guard as default."""
    import torch

    from mrkd.train.calibrate import score_images
    from mrkd.train.refit import refit_model
    halves = line_halves(model, line_good, line_defect)
    false_alarms, confirmed, val_good, val_defect = halves.false_alarms, halves.confirmed, halves.val_good, \
        halves.val_defect
    reviewed, catch = false_alarms[:n], halves.catch
    out = {**halves.record(len(reviewed)),
           "far_before_shipped": float((halves.good_scores >= halves.threshold).mean()), "settings": []}
    log(f"[tune]   review half: {len(false_alarms)} false alarms ({len(reviewed)} reviewed), {len(confirmed)} "
        f"confirmed; validation half: {len(val_good)} good, {len(val_defect)} defect, shipped catch {catch:.3f} "
        f"FAR {out['far_before_shipped']:.3f}")
    if not reviewed:
        return out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from mrkd.train.refit import GUARD_KEEP, RADIUS_QUANTILE
        # every grid holds the defaults: refit them once
        settings = list(dict.fromkeys([(q, GUARD_KEEP, "none") for q in radius_grid or ()]
                                      + [(RADIUS_QUANTILE, k, "none") for k in keep_grid or ()]
                                      + [(RADIUS_QUANTILE, GUARD_KEEP, a) for a in augment_grid or ()]))
        _, whole_alarms, whole_confirmed, _ = line_review(model, line_good, line_defect)
        for quantile, keep, augment in settings:
            candidate = copy.deepcopy(model)
            result = refit_model(candidate, reviewed, holdout, confirmed, radius_quantile=quantile, guard_keep=keep,
                                 augment=augment)
            good1, defect1 = score_images(candidate, val_good), score_images(candidate, val_defect)
            row = {"radius_quantile": quantile, "guard_keep": keep, "augment": augment,
                   "added": result.added_patches,
                   "guarded": result.guarded_patches, "missed": len(result.defects_missed),
                   "reviewed_still_flagged": len(result.reviewed_still_flagged),
                   "far_same_catch": rates_at_catch(good1, defect1, catch)["false_alarm_rate"],
                   "own": rates_at(good1, defect1, result.threshold_after), "refit_s": round(result.seconds, 2)}
            whole = refit_model(copy.deepcopy(model), whole_alarms[:n], holdout, whole_confirmed,
                                radius_quantile=quantile, guard_keep=keep, augment=augment)
            row["missed_whole_line"] = len(whole.defects_missed)
            row["still_flagged_whole_line"] = len(whole.reviewed_still_flagged)
            log(f"[tune]   radius q {quantile} keep {keep} augment {augment}: whole line "
                f"({len(whole_alarms[:n])} reviewed, "
                f"{len(whole_confirmed)} confirmed): {row['missed_whole_line']} confirmed defect(s) no longer flagged, "
                f"{row['still_flagged_whole_line']} reviewed still flagged")
            out["settings"].append(row)
            log(f"[tune]   radius q {quantile} keep {keep} augment {augment}: added {row['added']} guarded "
                f"{row['guarded']} missed {row['missed']}/{len(confirmed)} reviewed still flagged "
                f"{row['reviewed_still_flagged']}/{len(reviewed)}; validation FAR at catch {catch:.3f}: "
                f"{out['far_before']:.3f} -> {row['far_same_catch']:.3f}; own catch {row['own']['catch']:.3f} "
                f"FAR {row['own']['false_alarm_rate']:.3f}")
    finally:
        torch.set_num_threads(threads)
    return out


def tune_reweight(model, holdout: Sequence[str], line_good: Sequence[str], line_defect: Sequence[str],
                  n: int = max(REVIEW_COUNTS), log=print) -> dict:
    """Validation for the refit's re-weighting (refit_model(reweight=True)), on the LINE only, split as
    tune_on_line does: refit from the review half (guard as default) with re-weighting, then on the
    validation half the false-alarm rate at the shipped model's catch rate there for every MRKD share
    of the grid (the kNN part of the refit's bank), the share the rule chose from the labels marked."""
    import torch

    from mrkd.train.refit import MRKD_SHARE_GRID, component_maps, refit_model, share_scores
    halves = line_halves(model, line_good, line_defect)
    confirmed, val_good, val_defect = halves.confirmed, halves.val_good, halves.val_defect
    reviewed, catch = halves.false_alarms[:n], halves.catch
    out = {**halves.record(len(reviewed)), "shares": {}}
    if not reviewed:
        return out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        candidate = copy.deepcopy(model)
        result = refit_model(candidate, reviewed, holdout, confirmed, reweight=True)
        share = result.reweight.share
        gm, gk = component_maps(candidate, val_good)
        dm, dk = component_maps(candidate, val_defect)
        gm, dm = gm / (2 * share), dm / (2 * share)                 # back to the parts as trained
        gk, dk = gk / (2 * (1 - share)), dk / (2 * (1 - share))
    finally:
        torch.set_num_threads(threads)
    out.update(chosen=share, reason=result.reweight.reason, refit_s=round(result.seconds, 2),
               labels_auroc={str(r.share): r.auroc for r in result.reweight.table},
               labels_false_alarms={str(r.share): r.false_alarms for r in result.reweight.table},
               labels_scores={str(r.share): {"good": list(r.good_scores), "defect": list(r.defect_scores),
                                             "reviewed": len(reviewed)} for r in result.reweight.table})
    for g in sorted(set(MRKD_SHARE_GRID) | {0.5}):
        good1, defect1 = share_scores(gm, gk, g), share_scores(dm, dk, g)
        out["shares"][str(g)] = {"far_same_catch": rates_at_catch(good1, defect1, catch)["false_alarm_rate"],
                                 "validation_auroc": auroc(good1, defect1)}
    log(f"[tune-w] reviewed {len(reviewed)} confirmed {len(confirmed)}; validation FAR at catch {catch:.3f} before "
        f"{out['far_before']:.3f}; chosen share {share} ({out['reason']}); per share: "
        + ", ".join(f"{k}: {v['far_same_catch']:.3f} (labels AUROC {out['labels_auroc'][k]:.3f}, "
                    f"{out['labels_false_alarms'][k]} label false alarms)"
                    for k, v in out["shares"].items()))
    return out


def run_case(model, holdout: Sequence[str], line_good: Sequence[str], line_defect: Sequence[str],
             test_good: Sequence[str], test_defect: Sequence[str], counts=REVIEW_COUNTS, log=print,
             refit_threads: int = 1, augment: str = "none", every_good: bool = False,
             reweight: bool = False) -> dict:
    """The TEST split's false alarms before and after refits from the line's first N false alarms;
    ``augment``: refit's augmented candidates (a preset of AUGMENT_PRESETS). ``every_good``: past its
    false alarms, the line's other good cells are reviewed too (in file name order), so a large N
    measures a bank grown from every good cell of the line, not what an operator would review.
    ``reweight``: the refits also choose MRKD's share of the map from the labels (refit_model's)."""
    import torch

    from mrkd.train.calibrate import score_images
    from mrkd.train.refit import refit_model
    threshold, false_alarms, confirmed, _ = line_review(model, line_good, line_defect)
    good0, defect0 = score_images(model, list(test_good)), score_images(model, list(test_defect))
    shipped = rates_at(good0, defect0, threshold)
    catch = shipped["catch"]
    before = rates_at_catch(good0, defect0, catch)
    out = {"line_good": len(line_good), "line_defect": len(line_defect), "line_false_alarms": len(false_alarms),
           "line_defects_flagged": len(confirmed), "test_good": len(test_good), "test_defect": len(test_defect),
           "before": {"shipped_threshold": shipped, "at_same_catch": before, "auroc": auroc(good0, defect0),
                      "bank_patches": int(len(model.head.memory_bank.bank))},
           "after": {}}
    flagged = set(false_alarms)
    pool = false_alarms + ([p for p in sorted(line_good, key=lambda p: Path(p).name) if p not in flagged]
                           if every_good else [])
    done_counts = set()
    for n in counts:
        reviewed = pool[:n]
        if not reviewed or len(reviewed) in done_counts:   # the line gave fewer false alarms than n
            continue
        done_counts.add(len(reviewed))
        candidate = copy.deepcopy(model)
        threads = torch.get_num_threads()
        torch.set_num_threads(refit_threads)
        try:
            started, cpu_started = time.perf_counter(), time.process_time()
            result = refit_model(candidate, reviewed, holdout, confirmed, augment=augment, reweight=reweight)
            seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        finally:
            torch.set_num_threads(threads)
        good1, defect1 = score_images(candidate, list(test_good)), score_images(candidate, list(test_defect))
        same = rates_at_catch(good1, defect1, catch)
        row = {"reviewed": len(reviewed), "refit_s": round(seconds, 2), "refit_cpu_s": round(cpu_seconds, 2),
               "load_avg_1min": os.getloadavg()[0],
               "bank_patches": result.bank_after, "added_patches": result.added_patches,
               "guarded_patches": result.guarded_patches,
               "mrkd_share": result.reweight.share if result.reweight else 0.5,
               "confirmed_defects_missed": len(result.defects_missed),
               # reviewed false alarms the refit model still flags at its own threshold
               "reviewed_still_flagged": len(result.reviewed_still_flagged),
               "at_same_catch": same, "own_threshold": rates_at(good1, defect1, result.threshold_after),
               "auroc": auroc(good1, defect1),
               "false_alarm_reduction": (1 - same["false_alarm_rate"] / before["false_alarm_rate"])
               if before["false_alarm_rate"] > 0 else None}
        out["after"][str(n)] = row
        log(f"[refit]   N={len(reviewed)}: FAR at catch {catch:.3f}: {before['false_alarm_rate']:.3f} -> "
            f"{same['false_alarm_rate']:.3f}; own threshold FAR {row['own_threshold']['false_alarm_rate']:.3f} "
            f"catch {row['own_threshold']['catch']:.3f}; AUROC {out['before']['auroc']:.4f} -> {row['auroc']:.4f}; "
            f"bank {out['before']['bank_patches']} -> {result.bank_after}; reviewed still flagged "
            f"{row['reviewed_still_flagged']}; MRKD share {row['mrkd_share']}; refit {seconds:.1f} s")
    return out


def tune_table(runs: Sequence[dict]) -> List[str]:
    """The tuners' summary (markdown, RESULTS.md's form) of tune_on_line's runs: per setting, each
    category's mean validation FAR at the shipped catch before -> after over its models with something
    to review, the models it made worse / better, the whole-line refits `mrkd refit` would refuse (a
    confirmed defect left unflagged) and the reviewed images still flagged (review half; whole line)."""
    runs = [r for r in runs if r.get("settings")]
    categories = list(dict.fromkeys(r["category"] for r in runs))
    def key_of(setting: dict) -> tuple:      # rows from before --tune-augment have no "augment"
        return setting["radius_quantile"], setting["guard_keep"], setting.get("augment", "none")

    keys = list(dict.fromkeys(key_of(s) for r in runs for s in r["settings"]))
    counts = {c: sum(r["category"] == c for r in runs) for c in categories}
    lines = ["| stop (quantile) / guard keep / augment | "
             + " | ".join(f"{c} ({counts[c]} models)" for c in categories)
             + " | models worse / better | whole-line refits refused | reviewed still flagged (half; whole line) |",
             "|---" * (len(categories) + 4) + "|"]
    for key in keys:
        cells, worse, better, refused, still, still_whole = [], 0, 0, 0, 0, 0
        for category in categories:
            before, after = [], []
            for r in runs:
                row = next((s for s in r["settings"] if key_of(s) == key), None)
                if r["category"] != category or row is None:
                    continue
                before.append(r["far_before"])
                after.append(row["far_same_catch"])
                worse += row["far_same_catch"] > r["far_before"] + 1e-12
                better += row["far_same_catch"] < r["far_before"] - 1e-12
                refused += row["missed_whole_line"] > 0
                still += row["reviewed_still_flagged"]
                still_whole += row["still_flagged_whole_line"]
            b, a = float(np.mean(before)), float(np.mean(after))
            change = f"{(a / b - 1) * 100:+.0f} %".replace("-", "\u2212") if b > 0 else "n/a"
            cells.append(f"{b:.3f} -> {a:.3f} ({change})")
        lines.append(f"| {key[0]} / {key[1]} / {key[2]} | " + " | ".join(cells)
                     + f" | {worse} / {better} | {refused} | {still}; {still_whole} |")
    return lines


def _grid(asked, full: Sequence[float]):
    """A tuner's grid: None (not asked: None or False), the full grid (True, or an empty list: the option
    given without values), or the values given."""
    if asked is None or asked is False:
        return None
    if asked is True or len(asked) == 0:
        return tuple(full)
    return tuple(float(v) for v in asked)


def _augment_grid(asked):
    """--tune-augment's settings: as _grid, but preset names (each checked by refit's augment_names)."""
    from mrkd.train.refit import augment_names
    if asked is None or asked is False:
        return None
    grid = AUGMENT_GRID if asked is True or len(asked) == 0 else tuple(asked)
    for name in grid:
        augment_names(name)
    return grid


def run(seeds=(0,), categories=("elpv_mono", "elpv_poly"), work=None, log=print, refit_threads: int = 1,
        tune_reweight_only: bool = False, tune_radius=False,
        tune_keep=False, image_size: int = SETTINGS["image_size"], tune_augment=False, augment: str = "none",
        review_counts: Sequence[int] = REVIEW_COUNTS, every_good: bool = False, reweight: bool = False) -> dict:
    """``review_counts``: the N of the test-split refits (a count past the line's false alarms takes them
    all, so a large one measures what reviewing every false alarm would give). ``tune_radius`` / ``tune_keep`` / ``tune_augment``: True for the whole RADIUS_GRID / KEEP_GRID /
    AUGMENT_GRID, or the values to try. ``augment``: the test-split refits' augmented candidates."""
    from mrkd.train.elpv import layout_elpv
    radius_grid, keep_grid = _grid(tune_radius, RADIUS_GRID), _grid(tune_keep, KEEP_GRID)
    augment_grid = _augment_grid(tune_augment)
    work = Path(work or "/tmp/mrkd_bench_refit")
    work.mkdir(parents=True, exist_ok=True)
    validation = layout_elpv(work / "elpv_validation", split="validation", max_train=SETTINGS["max_train"])
    test = layout_elpv(work / "elpv_test", split="test", max_train=SETTINGS["max_train"])
    # every training cell: those past the 160 the model trains on have never been seen by it
    full = layout_elpv(work / "elpv_validation_all", split="validation")
    results = {"settings": dict(SETTINGS, image_size=image_size, review_counts=list(review_counts),
                                every_good=every_good, reweight=reweight, refit_threads=refit_threads, augment=augment),
               "runs": []}
    for category in categories:
        for seed in seeds:
            model, holdout = train_shipped(Path(validation.root), category, seed, work / "models", log, image_size)
            vroot, troot = Path(validation.root) / category, Path(test.root) / category
            log(f"[refit] {category} seed {seed}")
            used = {Path(p).name for p in _paths(vroot / "train/good")}
            unused = [p for p in _paths(Path(full.root) / category / "train/good") if Path(p).name not in used]
            if tune_reweight_only:     # the line only: the test split is not touched
                case = tune_reweight(model, holdout, _paths(vroot / "test/good") + unused,
                                     _paths(vroot / "test/defect"), log=log)
                results["runs"].append({"category": category, "seed": seed, **case})
                continue
            if radius_grid or keep_grid or augment_grid:     # the line only: the test split is not touched
                case = tune_on_line(model, holdout, _paths(vroot / "test/good") + unused,
                                    _paths(vroot / "test/defect"), log=log,
                                    radius_grid=radius_grid, keep_grid=keep_grid, augment_grid=augment_grid)
                results["runs"].append({"category": category, "seed": seed, **case})
                continue
            case = run_case(model, holdout, _paths(vroot / "test/good") + unused, _paths(vroot / "test/defect"),
                            _paths(troot / "test/good"), _paths(troot / "test/defect"), log=log,
                            refit_threads=refit_threads, augment=augment, counts=review_counts,
                            every_good=every_good, reweight=reweight)
            results["runs"].append({"category": category, "seed": seed, **case})
    return results


def main(argv=None) -> None:
    import argparse

    from mrkd.atomic import atomic_write_text
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    parser.add_argument("--categories", nargs="+", default=["elpv_mono", "elpv_poly"], help="ELPV categories")
    parser.add_argument("--work", default="/tmp/mrkd_bench_refit", help="layouts and trained models (reused)")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    parser.add_argument("--image-size", type=int, default=SETTINGS["image_size"],
                        help="input size of the trained models (256: the shipped default; the bank averages each "
                             "patch over 3x3 from 256 up; 128: the RESULTS.md tables of 2026-12-02/03)")
    parser.add_argument("--refit-threads", type=int, default=1,
                        help="torch threads while the refit is timed (1: on a shared machine two OpenMP threads "
                             "spin against other processes: 22.8 s vs 2.7 s for the same refit under load 7)")
    parser.add_argument("--tune-reweight", action="store_true",
                        help="validation only: the refit's MRKD/kNN re-weighting (every share of MRKD_SHARE_GRID and "
                             "the one the rule chose) on the second half of the line; the test split is not read")
    parser.add_argument("--tune-radius", type=float, nargs="*", default=None, metavar="Q",
                        help="validation only: the growth's stop (quantiles of the held-out good patches' nearest-bank "
                             "distances; no value: RADIUS_GRID) refit from the first half of the line, judged on its "
                             "second half; the test split is not read")
    parser.add_argument("--tune-keep", type=float, nargs="*", default=None, metavar="KEEP",
                        help="validation only: the defect guard's keep rule (no value: KEEP_GRID) refit from the first "
                             "half of the line, judged on its second half, and the confirmed line defects a refit from "
                             "the whole line leaves unflagged; the test split is not read")
    parser.add_argument("--tune-augment", nargs="*", default=None, metavar="PRESET",
                        help="validation only: the refit's augmented candidates (presets of refit's AUGMENT_PRESETS; "
                             "no value: none, flips, flips+rot90) refit from the first half of the line, judged on "
                             "its second half; the test split is not read")
    parser.add_argument("--augment", default="none", metavar="PRESET",
                        help="the test-split refits' augmented candidates (a preset of refit's AUGMENT_PRESETS: none, "
                             "flips, flips+rot90; as mrkd refit --augment)")
    parser.add_argument("--review-counts", type=int, nargs="+", default=list(REVIEW_COUNTS), metavar="N",
                        help="the numbers of line false alarms reviewed for the test-split refits (default 5 10 20, the "
                             "issue's; a count past the line's false alarms takes them all, e.g. 1000 for every one)")
    parser.add_argument("--every-good", action="store_true",
                        help="past the line's false alarms, review its other good cells too (file name order): with a "
                             "large --review-counts, the bank grown from every good cell of the line (a ceiling, not "
                             "what an operator reviews)")
    parser.add_argument("--reweight", action="store_true",
                        help="the test-split refits also choose MRKD's share of the map from the labels (as mrkd "
                             "refit --reweight); choose it on the line first with --tune-reweight")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.review_counts):
        parser.exit(2, "Error: --review-counts takes counts of 1 or more\n")
    try:
        _augment_grid(args.tune_augment)
        _augment_grid([args.augment])
    except ValueError as exc:
        parser.exit(2, f"Error: {exc}\n")
    results = run(tuple(args.seeds), tuple(args.categories), args.work, refit_threads=args.refit_threads,
                  tune_reweight_only=args.tune_reweight, tune_radius=args.tune_radius,
                  tune_keep=args.tune_keep, image_size=args.image_size, tune_augment=args.tune_augment,
                  augment=args.augment, review_counts=tuple(args.review_counts),
                  every_good=args.every_good, reweight=args.reweight)
    text = json.dumps(results, indent=2)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text)
    if any(run_.get("settings") for run_ in results["runs"]):
        print("\n".join(tune_table(results["runs"])))


if __name__ == "__main__":
    main()
