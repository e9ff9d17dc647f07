"""Refit with a position-restricted kNN half, screened on the ELPV validation line (issue 23).

    python -m mrkd.benchmarks.bench_position_refit [--seeds 0 1 2] [--categories elpv_mono elpv_poly]
        [--radii 0 1] [--work DIR] [--out FILE]

On poly, `mrkd refit` (reviewed false alarms' patches grow the whole bank) lowers the scores of subtle
defects elsewhere too, so the false-alarm rate (FAR) at a fixed catch rate does not move
(benchmarks/RESULTS.md, "refit: ..."). A kNN search restricted to the training patches at the SAME grid
position (bench_knn_radius) would let a reviewed image's patches lower scores only where they were taken.
Per shipped model (bench_refit's train_shipped / study_models: 256 px, --score both, cached in ``--work``)
and the line cut as bench_refit.tune_on_line cuts it (line_halves: its review half's first <= 20 false
alarms reviewed as good, its flagged defects confirmed; its validation half nobody reviewed), the
validation half's FAR at the shipped model's catch rate there (bench_refit.rates_at_catch) and image AUROC:

* ``shipped_before`` (a): the shipped model; ``shipped_refit`` (b): refit_model with the shipped settings
  from the review half (what tune_on_line measures), scored through the same maps (checked against
  score_images on the first validation images).
* ``pos{R}_before`` (c): the shipped model's MRKD part (as component_maps gives it) plus a kNN part whose
  distance is to every training patch within R stride-8 grid cells of the query's position (R = 0: the
  same position), no coreset; the kNN part is weighted as fit_memory_bank weights the shipped one:
  1 / the spread (population std) of its image scores on the model's training images, here each scored
  without its own patches (leave one image out: with every patch in the bank its own would give 0).
  The image score is the shipped one: the maximum of the sigma-4 smoothed sum.
* ``pos{R}_after`` (d): the reviewed images' every patch appended at its own position (no growth stop).
* ``pos{R}_guard`` (e): as (d) less the patches the shipped defect guard's rule keeps out, taken per
  position: each confirmed defect's GUARD_TOP patches farthest from the position bank guard, and a
  reviewed patch within GUARD_KEEP x that distance of a guard patch whose position it could be searched
  from (within R) is not appended (refit.guard_mask). ``pos{R}_guard_shipped``: the shipped guard as
  refit_model computes it (defect_patches / guard_mask against the shipped bank, every position).

Each also with the shipped kNN weight (``..@shipped_w`` in the JSON; the tables use the leave-one-out
spread). Reviewed images still flagged: at each variant's own threshold, calibrated on the held-out good
cells as refit_model calibrates. Validation cells only: the test split is never read. Per-model results are
cached in ``--work``/position_refit (``--fresh`` recomputes).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from mrkd.benchmarks.bench_refit import REVIEW_COUNTS, SETTINGS, _paths

RADII = (0, 1)


# ---------------------------------------------------------------- the per-position search

def position_nearest(bank, queries, radius: int, valid=None, exclude=None, chunk: int = 16):
    """Each query patch's L2 distance to its nearest bank patch within ``radius`` grid cells of its own
    position (both directions). ``bank``: K×C×h×w (K images' patch maps; appended images are more rows);
    ``valid``: K×h×w bool, False for a patch left out (default all in); ``queries``: M×C×h×w;
    ``exclude``: M bank image indices a query may not match (its own image; -1: none). Returns M×h×w
    (torch, float32; inf where nothing is in reach). |q|² − 2 q·b + |b|², clamped at 0, as MemoryBank."""
    import torch
    k, channels, h, w = bank.shape
    bank_t = bank.float().permute(2, 3, 0, 1).contiguous()                 # h×w×K×C
    bank_sq = bank_t.pow(2).sum(-1)                                        # h×w×K
    absent = torch.zeros(h, w, k, dtype=torch.bool) if valid is None else ~valid.permute(1, 2, 0)
    out = torch.empty(len(queries), h, w)
    for first in range(0, len(queries), chunk):
        q = queries[first:first + chunk].float().permute(2, 3, 0, 1).contiguous()      # h×w×m×C
        m = q.shape[2]
        q_sq = q.pow(2).sum(-1)
        own = torch.zeros(m, k, dtype=torch.bool)
        if exclude is not None:
            for row, index in enumerate(exclude[first:first + chunk]):
                if int(index) >= 0:
                    own[row, int(index)] = True
        best = torch.full((h, w, m), float("inf"))
        for di in range(-radius, radius + 1):
            qi, bi = slice(max(0, -di), min(h, h - di)), slice(max(0, di), min(h, h + di))
            if qi.start >= qi.stop:
                continue
            for dj in range(-radius, radius + 1):
                qj, bj = slice(max(0, -dj), min(w, w - dj)), slice(max(0, dj), min(w, w + dj))
                if qj.start >= qj.stop:
                    continue
                d2 = q_sq[qi, qj, :, None] - 2.0 * q[qi, qj] @ bank_t[bi, bj].transpose(-1, -2) \
                    + bank_sq[bi, bj, None, :]                             # hs×ws×m×K
                d2 = d2.masked_fill(absent[bi, bj, None, :] | own, float("inf"))
                torch.minimum(best[qi, qj], d2.amin(-1), out=best[qi, qj])
        out[first:first + m] = best.clamp_min(0).sqrt().permute(2, 0, 1)
    return out


def position_guard(train, defects, candidates, radius: int, top: int, keep: float):
    """The shipped defect guard's rule per position: each defect image's ``top`` patches farthest from
    the position bank ``train`` (K×C×h×w) guard; a candidate patch (``candidates``: R×C×h×w) within
    ``keep`` x that patch's distance of a guard patch within ``radius`` cells of its position is kept
    out (refit.guard_mask). Returns R×h×w bool: True = may join."""
    import torch

    from mrkd.train.refit import guard_mask
    r, channels, h, w = candidates.shape
    allowed = torch.ones(r, h, w, dtype=torch.bool)
    if len(defects) == 0 or top <= 0 or keep <= 0 or r == 0:
        return allowed
    distance = position_nearest(train, defects, radius)                   # D×h×w
    for image in range(len(defects)):
        for flat in distance[image].flatten().topk(min(top, h * w)).indices.tolist():
            i, j = divmod(flat, w)
            guard = defects[image, :, i, j][None].float()
            reach = keep * float(distance[image, i, j])
            for a in range(max(0, i - radius), min(h, i + radius + 1)):
                for b in range(max(0, j - radius), min(w, j + radius + 1)):
                    allowed[:, a, b] &= guard_mask(candidates[:, :, a, b].float(), guard, reach)
    return allowed


def shipped_guard(candidates, defects, bank, top: int, keep: float):
    """refit_model's defect guard as it is computed (defect_patches / guard_mask against the shipped
    whole ``bank``), on the candidates' patch maps (R×C×h×w): R×h×w bool, True = may join."""
    import torch

    from mrkd.train.refit import defect_patches, guard_mask, nearest_distance
    r, channels, h, w = candidates.shape
    if len(defects) == 0 or top <= 0 or keep <= 0 or r == 0:
        return torch.ones(r, h, w, dtype=torch.bool)
    rows = defects.float().permute(0, 2, 3, 1).reshape(-1, channels)        # patch_rows' order
    guard = defect_patches(rows, len(defects), bank, top)
    reach = keep * nearest_distance(guard, bank)
    mask = guard_mask(candidates.float().permute(0, 2, 3, 1).reshape(-1, channels), guard, reach)
    return mask.reshape(r, h, w)


# ---------------------------------------------------------------- the model's two halves

class Parts:
    """The images' patch maps (N×C×h×w, as the bank's patches: patch_features at the model's pool) and
    the MRKD part of the "both" map, smoothed (N×H×W, times its weight: component_maps' first half)."""

    def __init__(self, model, paths: Sequence[str], batch_size: int = 8, mrkd: bool = True):
        import torch

        from mrkd.train.calibrate import _as_batches
        from mrkd.train.memory_bank import patch_features
        head, pool = model.head, model.config.knn_pool
        feats, maps = [], []
        model.eval()
        with torch.no_grad():
            for x in _as_batches(list(paths), model, batch_size):
                if mrkd:
                    teacher, student = model(x)
                    # the MRKD scales only: per_scale_maps' first three, each times its weight
                    per_scale = [m if w == 1.0 else m * w for m, w in zip(
                        [_cos(t, s) for t, s in zip(teacher, student)], head.scale_weights)]
                    maps.append(head.blur(head.upsample_sum(per_scale))[:, 0])
                else:
                    teacher = model.teacher_features(x)
                feats.append(patch_features(teacher, pool))
        self.feats = torch.cat(feats) if feats else torch.zeros(0)
        self.mrkd = torch.cat(maps) if maps else None


def _cos(teacher, student):
    from mrkd.train.head import cosine_distance
    return cosine_distance(teacher, student)


def image_scores(head, mrkd, distance, weight: float) -> np.ndarray:
    """The shipped image score of MRKD part (smoothed, N×H×W) + kNN part (unsmoothed distances N×h×w
    times ``weight``, upsampled and smoothed as the head does): the maximum of their sum."""
    import torch
    if len(distance) == 0:
        return np.zeros(0)
    with torch.no_grad():
        knn = head.blur(head.upsample_sum([distance.float() * weight]))[:, 0]
        return (mrkd + knn).flatten(1).amax(1).numpy().astype(np.float64)


def knn_spread_scores(head, distance) -> np.ndarray:
    """The kNN part's image scores as fit_memory_bank measures its spread (max of the smoothed map)."""
    import torch
    with torch.no_grad():
        return head.scores(head.blur(head.upsample_sum([distance.float()]))).numpy()


def whole_bank_distance(feats, bank):
    """The shipped MemoryBank's distance map (N×h×w) from patch maps N×C×h×w (refit.nearest_distance)."""
    from mrkd.train.refit import nearest_distance
    n, channels, h, w = feats.shape
    rows = feats.float().permute(0, 2, 3, 1).reshape(-1, channels)
    return nearest_distance(rows, bank.float()).reshape(n, h, w)


# ---------------------------------------------------------------- one model

def line_of(layout_root: Path, full_root: Path, category: str):
    """bench_refit.run's line: the validation good cells, the training cells past the 160 the model
    trained on (never seen by it), the validation defects."""
    used = {Path(p).name for p in _paths(layout_root / category / "train/good")}
    unused = [p for p in _paths(full_root / category / "train/good") if Path(p).name not in used]
    return _paths(layout_root / category / "test/good") + unused, _paths(layout_root / category / "test/defect")


def measure(model, holdout: Sequence[str], fit_paths: Sequence[str], line_good: Sequence[str],
            line_defect: Sequence[str], radii: Sequence[int] = RADII, n: int = max(REVIEW_COUNTS),
            log=print, check_images: int = 8) -> dict:
    """The variants of the module's notes for one shipped ``model`` (its training images ``fit_paths``,
    its held-out good cells ``holdout``) on the line ``line_good`` + ``line_defect``."""
    import torch

    from mrkd.benchmarks.bench_refit import auroc, line_halves, rates_at_catch
    from mrkd.runtime.calibration import DEFAULT_CONFIDENCE, DEFAULT_METHOD, DEFAULT_QUANTILE, Calibration, \
        calibration_from_scores
    from mrkd.train.calibrate import score_images
    from mrkd.train.memory_bank import score_spread
    from mrkd.train.refit import GUARD_KEEP, GUARD_TOP, refit_model
    started = time.perf_counter()
    head = model.head
    weight = float(head.knn_weight)
    shipped_bank = head.memory_bank.bank.detach().cpu().float()
    halves = line_halves(model, line_good, line_defect)
    reviewed, confirmed, catch = halves.false_alarms[:n], halves.confirmed, halves.catch
    log(f"[pos]   review half: {len(halves.false_alarms)} false alarms ({len(reviewed)} reviewed), {len(confirmed)} "
        f"confirmed; validation half {len(halves.val_good)} good {len(halves.val_defect)} defect, shipped catch "
        f"{catch:.3f} ({time.perf_counter() - started:.0f} s)")
    out = {**halves.record(len(reviewed)), "knn_weight_shipped": weight, "variants": {}, "checks": {}}
    if not reviewed:
        return out
    previous = Calibration.of(model.calibration, "model calibration")
    quantile = previous.quantile if previous and previous.quantile else DEFAULT_QUANTILE
    method = previous.method if previous and previous.method in ("quantile", "tolerance") else DEFAULT_METHOD
    confidence = previous.confidence if previous and previous.confidence else DEFAULT_CONFIDENCE

    def own_threshold(held_scores) -> float:
        return float(calibration_from_scores(held_scores, quantile, method=method, confidence=confidence,
                                             previous_threshold=previous.threshold if previous else None,
                                             source="bench_position_refit").threshold)

    # (b) the shipped refit, exactly as tune_on_line calls it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        candidate = copy.deepcopy(model)
        result = refit_model(candidate, reviewed, holdout, confirmed)
        grown = candidate.head.memory_bank.bank.detach().cpu().float()
        log(f"[pos]   shipped refit: added {result.added_patches} guarded {result.guarded_patches}, still flagged "
            f"{len(result.reviewed_still_flagged)}/{len(reviewed)} ({time.perf_counter() - started:.0f} s)")
        sets = {"good": Parts(model, halves.val_good), "defect": Parts(model, halves.val_defect),
                "held": Parts(model, holdout), "reviewed": Parts(model, reviewed)}
        confirmed_feats = Parts(model, confirmed, mrkd=False).feats
        fit = Parts(model, fit_paths, mrkd=False).feats
        log(f"[pos]   features of {len(fit)} training, {sum(len(s.feats) for s in sets.values())} scored, "
            f"{len(confirmed_feats)} confirmed images ({time.perf_counter() - started:.0f} s)")
        distances: Dict[str, Dict[str, object]] = {}
        weights: Dict[str, float] = {}
        for name, bank in (("shipped_before", shipped_bank), ("shipped_refit", grown)):
            distances[name] = {k: whole_bank_distance(s.feats, bank) for k, s in sets.items()}
            weights[name] = weight
        # the checks: the combination against the models' own scores
        got = image_scores(head, sets["good"].mrkd, distances["shipped_before"]["good"], weight)
        got_d = image_scores(head, sets["defect"].mrkd, distances["shipped_before"]["defect"], weight)
        out["checks"]["shipped_max_abs_diff"] = float(max(np.abs(got - halves.good_scores).max(),
                                                          np.abs(got_d - halves.defect_scores).max()))
        few = halves.val_good[:check_images]
        refit_few = score_images(candidate, few)
        got_refit = image_scores(head, sets["good"].mrkd[:len(few)], distances["shipped_refit"]["good"][:len(few)],
                                 weight)
        out["checks"]["refit_max_abs_diff"] = float(np.abs(got_refit - refit_few).max())
        log(f"[pos]   combination vs the models' scores: shipped max |diff| {out['checks']['shipped_max_abs_diff']:.2e}"
            f", refit {out['checks']['refit_max_abs_diff']:.2e}")
        own = torch.arange(len(fit))
        candidates = sets["reviewed"].feats
        appended = torch.cat([fit, candidates])
        global_allowed = shipped_guard(candidates, confirmed_feats, shipped_bank, GUARD_TOP, GUARD_KEEP)
        for radius in radii:
            loo = position_nearest(fit, fit, radius, exclude=own)
            w_pos = 1.0 / score_spread(torch.from_numpy(knn_spread_scores(head, loo)))
            allowed = position_guard(fit, confirmed_feats, candidates, radius, GUARD_TOP, GUARD_KEEP)
            fit_valid = torch.ones(len(fit), *fit.shape[2:], dtype=torch.bool)
            banks = {"before": (fit, None), "after": (appended, None),
                     "guard": (appended, torch.cat([fit_valid, allowed])),
                     "guard_shipped": (appended, torch.cat([fit_valid, global_allowed]))}
            out.setdefault("guarded_patches", {})[f"pos{radius}_guard"] = int((~allowed).sum())
            out["guarded_patches"]["pos_guard_shipped"] = int((~global_allowed).sum())
            for stage, (bank, valid) in banks.items():
                name = f"pos{radius}_{stage}"
                distances[name] = {k: position_nearest(bank, s.feats, radius, valid) for k, s in sets.items()}
                weights[name] = w_pos
            out.setdefault("knn_weight_position", {})[str(radius)] = w_pos
            log(f"[pos]   radius {radius}: kNN weight {w_pos:.4f} (shipped {weight:.4f}), guard keeps out "
                f"{int((~allowed).sum())} reviewed patches (shipped guard {int((~global_allowed).sum())}) "
                f"({time.perf_counter() - started:.0f} s)")
        for name, maps in distances.items():
            for suffix, w in (("", weights[name]), ("@shipped_w", weight)):
                if suffix and name.startswith("shipped"):
                    continue
                scores = {k: image_scores(head, s.mrkd, maps[k], w) for k, s in sets.items()}
                threshold = own_threshold(scores["held"])
                out["variants"][name + suffix] = {
                    "far_same_catch": rates_at_catch(scores["good"], scores["defect"], catch)["false_alarm_rate"],
                    "validation_auroc": auroc(scores["good"], scores["defect"]),
                    "own_threshold": threshold,
                    "reviewed_flagged": int((scores["reviewed"] >= threshold).sum()),
                    "reviewed_flagged_at_catch": int((scores["reviewed"] >= rates_at_catch(
                        scores["good"], scores["defect"], catch)["threshold"]).sum())}
        out["variants"]["shipped_refit"]["reviewed_still_flagged_refit"] = len(result.reviewed_still_flagged)
    finally:
        torch.set_num_threads(threads)
    out["seconds"] = round(time.perf_counter() - started, 1)
    for name, row in out["variants"].items():
        if "@" not in name:
            log(f"[pos]   {name:>20}: FAR at catch {catch:.3f} {row['far_same_catch']:.3f}, AUROC "
                f"{row['validation_auroc']:.4f}, reviewed flagged {row['reviewed_flagged']}/{len(reviewed)}")
    return out


# ---------------------------------------------------------------- the study

ROWS = ("shipped_before", "shipped_refit") + tuple(f"pos{r}_{s}" for r in (0, 1)
                                                   for s in ("before", "after", "guard", "guard_shipped"))


def run(seeds: Sequence[int] = (0, 1, 2), categories: Sequence[str] = ("elpv_mono", "elpv_poly"), work=None,
        radii: Sequence[int] = RADII, fresh: bool = False, log=print) -> dict:
    from mrkd.benchmarks.bench_refit import study_models
    from mrkd.train.elpv import layout_elpv
    work = Path(work or "/tmp/mrkd_bench_refit")
    full = Path(layout_elpv(work / "elpv_validation_all", split="validation").root)
    cache = work / "position_refit"
    cache.mkdir(parents=True, exist_ok=True)
    results = {"settings": dict(SETTINGS, radii=list(radii), reviewed=max(REVIEW_COUNTS)), "runs": []}
    for study in study_models(seeds, categories, work, log=log):
        path = cache / f"{study.category}_{SETTINGS['image_size']}px_seed{study.seed}_r{'-'.join(map(str, radii))}.json"
        if path.is_file() and not fresh:
            case = json.loads(path.read_text())
            log(f"[pos] {study.category} seed {study.seed}: cached ({path})")
        else:
            log(f"[pos] {study.category} seed {study.seed}")
            held = set(study.holdout)
            fit_paths = [p for p in _paths(study.folder / "train/good") if p not in held]
            line_good, line_defect = line_of(study.folder.parent, full, study.category)
            case = measure(study.model, study.holdout, fit_paths, line_good, line_defect, radii, log=log)
            from mrkd.atomic import atomic_write_text
            atomic_write_text(path, json.dumps(case, indent=1) + "\n")
        results["runs"].append({"category": study.category, "seed": study.seed, **case})
    results["table"] = table(results["runs"]) + [""] + table(results["runs"], "@shipped_w")
    return results


def table(runs: Sequence[dict], weight: str = "") -> List[str]:
    """Markdown: per model the validation FAR at the shipped catch (image AUROC; reviewed images flagged
    at the variant's own threshold) of each variant, then the means per category with the change against
    its 'before'. ``weight``: "" (the position variants' kNN weight from their own leave-one-out spread) or
    "@shipped_w" (the shipped model's kNN weight)."""
    names = [n if n.startswith("shipped") else n + weight for n in ROWS]
    names = [n for n in names if any(n in r.get("variants", {}) for r in runs)]
    lines = [f"kNN weight of the position variants: {'the shipped one' if weight else 'their own spread'}",
             "| model | reviewed | catch | " + " | ".join(names) + " |", "|---" * (len(names) + 3) + "|"]
    for r in runs:
        v = r.get("variants", {})
        lines.append(f"| {r['category']} {r['seed']} | {r['reviewed']} | {r['validation_catch']:.3f} | "
                     + " | ".join(f"{v[n]['far_same_catch']:.3f} ({v[n]['validation_auroc']:.4f}; "
                                  f"{v[n]['reviewed_flagged']} fl)" if n in v else "-" for n in names) + " |")
    for category in dict.fromkeys(r["category"] for r in runs):
        mine = [r for r in runs if r["category"] == category and r.get("variants")]
        if not mine:
            continue
        mean = {n: float(np.mean([r["variants"][n]["far_same_catch"] for r in mine])) for n in names}
        auc = {n: float(np.mean([r["variants"][n]["validation_auroc"] for r in mine])) for n in names}

        def change(n):
            base = "shipped_before" if n.startswith("shipped") else n.split("_")[0] + "_before" + weight
            return f" ({(mean[n] / mean[base] - 1) * 100:+.0f} %)" if mean[base] > 0 and n != base else ""
        lines.append(f"| **{category} mean** ({len(mine)}) | | | "
                     + " | ".join(f"{mean[n]:.3f}{change(n)} (AUROC {auc[n]:.4f})" for n in names) + " |")
    return lines


def main(argv=None) -> None:
    import argparse

    from mrkd.atomic import atomic_write_text
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--categories", nargs="+", default=["elpv_mono", "elpv_poly"],
                        help="ELPV categories (default both)")
    parser.add_argument("--radii", type=int, nargs="+", default=list(RADII),
                        help="position radii in stride-8 grid cells (0: the same position only; default 0 1)")
    parser.add_argument("--work", default="/tmp/mrkd_bench_refit",
                        help="layouts, trained models (shared with bench_refit, reused) and per-model results")
    parser.add_argument("--fresh", action="store_true", help="recompute per-model results cached in --work")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    args = parser.parse_args(argv)
    if any(r < 0 for r in args.radii):
        parser.exit(2, "Error: --radii takes radii of 0 or more\n")
    results = run(tuple(args.seeds), tuple(args.categories), args.work, tuple(args.radii), args.fresh)
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
    print("\n".join(results["table"]))


if __name__ == "__main__":
    main()
