"""The command line of one benchmark module run on its own (``python -m mrkd.benchmarks.bench_X``):
``--help``, ``--quick``, and the result as JSON on stdout. Before, these modules looked for "--quick"
among their arguments and ran the full benchmark (minutes to hours) on anything else, ``--help`` too."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

QUICK_HELP = ("small sizes, seconds to a minute: checks the benchmark runs; ratios within one run still "
              "compare, absolute numbers do not")


def benchmark_main(doc: str, run: Callable[..., dict], argv: Optional[Sequence[str]] = None,
                   add_options: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> None:
    """Parse ``--quick`` (and the options ``add_options`` adds), call ``run(quick=..., **those)`` and
    print its result. ``doc``: the module's docstring, whose first paragraph is the description."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    if add_options is not None:
        add_options(parser)
    options = vars(parser.parse_args(argv))
    print(json.dumps(run(**options), indent=2))


def run_in_work(run: Callable[[Path], dict], work: Optional[Path], out: Optional[Path]) -> None:
    """``run(folder)`` in ``work`` (a temporary folder when None, removed after), its result printed as JSON
    and, with ``out``, written there atomically: the tail of the ELPV studies' command lines."""
    import tempfile
    with tempfile.TemporaryDirectory() as scratch:
        results = run(work or Path(scratch))
    text = json.dumps(results, indent=1)
    if out:
        from mrkd.atomic import atomic_write_text
        atomic_write_text(out, text)
    print(text)
