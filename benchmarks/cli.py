"""``mrkd bench``: run the benchmarks, print a table, write JSON + markdown + PNG.

Each benchmark is a module ``mrkd.benchmarks.bench_<name>`` with ``run(quick) -> dict``; ratios are
always against a baseline measured in the same process on the same machine.
"""

from __future__ import annotations

import importlib
import inspect
import time
from pathlib import Path
from typing import Dict, List, Sequence

import click

from mrkd.errors import SettingError
from mrkd.options import IntegerRange
from mrkd.stopping import stops_in_one_line

BENCHES = {
    "model": "model throughput/latency per backend vs the official-style pipeline (+ GFLOP/image)",
    "postprocess": "cpp_ext CPU/CUDA vs scipy vs PyTorch ops, batch 1-32, 256/512 px",
    "end_to_end": "a video file through the runtime (decode, pre, model, post, alarm) vs the baseline",
    "aupro": "metrics.aupro vs the official pandas loop",
    "augment": "ILM patch-swap images/s per core at 256 px",
    "teachers": "GFLOP and CPU latency per teacher (efficientnet_lite0, resnet18, wide_resnet50_2)",
    "train": "training images/s with the feature cache, fast teacher and allocator vs today's trainer (Lite0, 256 px)",
    "cameras": "4 cameras on one Lite0 model: one process with cross-camera batching vs unbatched vs 4 processes",
    "line_outputs": "frames/s of mrkd run with MQTT, metrics and the operator page on (page open) vs off",
    "parts": "trigger-to-verdict p50/p99 of 200 software-triggered parts from the simulated GigE camera "
             "(Lite0, 256 px, CPU) vs the model's own latency; parts/s",
    "plc": "PLC trigger -> Results Valid over Modbus TCP (a simulated PLC scanning every 10 ms) and StartSingleJob "
           "-> ResultReady over OPC UA, 500 parts each, vs each part's own trigger -> verdict; what the handshake "
           "adds (goal p99 < 5 ms)",
    "backends": "ms/frame of the Detector at batch 1 on the CPU: ONNX Runtime FP32 vs OpenVINO fp32 / bf16 / INT8 "
                "graph (alternated; decision agreement vs FP32); Lite0 256 px by default",
    "score_cost": "ONNX Runtime latency and graph size of --score both (bank at the trainer's cap) vs --score mrkd",
    "memory_bank": "fitting the --score both memory bank before issue 24 vs now, same ELPV images (700 at 256 px), "
                   "seconds per step, coverage, coreset kernels; load average printed",
    "anomalib": "peer benchmark, opt-in: anomalib 2.7 ReverseDistillation/PatchCore (OpenVINOInferencer, "
                "TorchInferencer) vs mrkd's Detector and mrkd run, same CPU, images, size and threads, alternated "
                "(needs scripts/setup_anomalib_venv.sh)",
    "anomalib_quality": "peer quality row, opt-in: anomalib 2.7 PatchCore on our Lite0 ImageNet features (weights mapped "
                        "into timm, features checked against ours) vs mrkd's --score both, image AUROC on the ELPV "
                        "test split, 3 seeds (tens of minutes; needs scripts/setup_anomalib_venv.sh)",
    "quality": "image AUROC on real ELPV solar cells: MRKD (ImageNet / random Lite0 teacher) vs a kNN "
               "patch-distance baseline, 3 seeds (minutes; --quick: a subset)",
}


OPT_IN = ("anomalib", "anomalib_quality")       # run only when named with --only: they need an environment of their own


RESULT_FILES = ("results.json", "RESULTS.md", "speedups.png")


def earlier_results(out_dir: Path) -> List[Path]:
    """The files of an earlier ``mrkd bench`` in ``out_dir``."""
    return [out_dir / name for name in RESULT_FILES if (out_dir / name).exists()]


def claim_out_dir(out_dir: Path) -> None:
    """Refuse, before anything is measured, an ``--out`` that holds an earlier run's results or that
    cannot become a writable folder (a second run used to replace the first one's files, and a bad
    folder was only found after minutes of measuring); then create it."""
    import os
    earlier = earlier_results(out_dir)
    if earlier:
        raise SettingError(f"{out_dir}: holds earlier benchmark results ({', '.join(p.name for p in earlier)}); "
                           "results are never written over one another: name a new folder (--out)")
    out_dir.mkdir(parents=True, exist_ok=True)      # OSError (a file in the path, no permission): one line
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise SettingError(f"{out_dir}: this folder is not writable; name another one (--out)")


def check_options(names: Sequence[str], options: Dict[str, object]) -> None:
    """Every option given must be valid and used by at least one chosen benchmark; checked before
    anything is measured (a bad --backbone used to fail one benchmark minutes into the run, and an
    option no chosen benchmark takes was silently ignored)."""
    if options.get("backbone") is not None:
        from mrkd.train.teachers import teacher_spec
        teacher_spec(options["backbone"])           # SettingError naming the backbones there are
    if options.get("image_size") is not None and options["image_size"] % 32:
        raise SettingError(f"--image-size must be a multiple of 32 (as for training), got {options['image_size']}")
    for option, value in options.items():
        if value is None:
            continue
        takers = [name for name in names if option in run_parameters(name)]
        if not takers:
            raise SettingError(f"--{option.replace('_', '-')} is used by none of the chosen benchmarks "
                               f"({', '.join(names)}); the ones that take it: "
                               f"{', '.join(n for n in BENCHES if option in run_parameters(n))}")


def run_parameters(name: str) -> Sequence[str]:
    module = importlib.import_module(f"mrkd.benchmarks.bench_{name}")
    return list(inspect.signature(module.run).parameters)


def run_benches(names, quick: bool, options: dict) -> dict:
    from mrkd.benchmarks.timing import machine_description

    results = {"machine": machine_description()}
    for name in names:
        click.echo(f"[bench] {name} ...", err=True)
        started = time.perf_counter()
        try:
            module = importlib.import_module(f"mrkd.benchmarks.bench_{name}")
            accepted = inspect.signature(module.run).parameters
            kwargs = {k: v for k, v in options.items() if k in accepted and v is not None}
            results[name] = module.run(quick=quick, **kwargs)
        except Exception as exc:  # one failing bench must not hide the others' numbers
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results[name]["wall_s"] = round(time.perf_counter() - started, 2)
    return results


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--only", "only", multiple=True, type=click.Choice(list(BENCHES)),
              help="Run only these benchmarks (repeatable). Default: all of them except the opt-in peer benchmarks (anomalib, anomalib_quality).")
@click.option("--quick", is_flag=True,
              help="Seconds-long smoke mode with tiny sizes (what CI runs); numbers are not meaningful. "
                   "--backbone and --image-size still apply when given.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench_out"),
              show_default=True, help="Folder for results.json, RESULTS.md and speedups.png; a folder with "
                                      "an earlier run's results is refused.")
@click.option("--backbone", default=None, help="Backbone for the model and end-to-end benchmarks "
              "(default wide_resnet50_2, the paper's teacher, which the official code's path runs; resnet18 in --quick).")
@click.option("--image-size", type=IntegerRange(32, 4096), default=None,
              help="Input size in pixels, a multiple of 32 (default 256; 64 in --quick).")
@click.option("--threads", type=IntegerRange(1, 1024), default=None,
              help="CPU threads for PyTorch and ONNX Runtime (default 2).")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A trained checkpoint for the model and end-to-end benchmarks (INT8 agreement is then "
                   "measured at its calibrated threshold); default: a random-weight model of --backbone.")
def bench_command(only, quick, out_dir, backbone, image_size, threads, checkpoint):
    """Measure every stage and backend of mrkd against the official MRKD pipeline."""
    from mrkd.benchmarks.report import markdown, write_all

    names = list(dict.fromkeys(only)) or [name for name in BENCHES if name not in OPT_IN]
    options = {"backbone": backbone, "image_size": image_size, "threads": threads, "checkpoint": checkpoint}
    check_options(names, options)
    claim_out_dir(out_dir)
    with stops_in_one_line(lambda by: f"bench stopped ({by}); no results written to {out_dir}"):
        results = run_benches(names, quick, options)
    click.echo(markdown(results))
    claim_out_dir(out_dir)      # again: another run may have written there while this one measured
    paths, skipped = write_all(results, out_dir)
    click.echo("Wrote " + ", ".join(str(p) for p in paths.values()))
    for line in skipped:
        click.echo(line, err=True)
    failed = [n for n in names if "error" in results[n]]
    if failed:
        raise click.ClickException("benchmark(s) failed: " + ", ".join(f"{n}: {results[n]['error']}" for n in failed))


bench_command.help = (bench_command.help or "") + "\n\nBenchmarks:\n\n" + "\n\n".join(
    f"{name}: {text}" for name, text in BENCHES.items())
