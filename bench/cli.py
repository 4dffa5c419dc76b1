"""``python -m bench``: run the sections, write JSON under bench/results/, render BENCHMARKS.md."""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import time
import traceback
from datetime import datetime, timezone
from typing import Optional

from bench.common import REPO, RESULTS, Settings, log, machine_info, setup_environment, versions, write_json
from bench.sections import SECTIONS

MERGED = RESULTS / "merged.json"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1-2 repetitions, the first 30 s of the long file; numbers not for reading")
    parser.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                        help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="CTranslate2 intra-op threads for every path (default: the cores this process may use)")
    parser.add_argument("--render-only", action="store_true", help="re-render BENCHMARKS.md from bench/results/merged.json")
    parser.add_argument("--no-render", action="store_true", help="write the JSON only")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from bench import report

    if args.render_only:
        if not MERGED.is_file():
            print(f"No results yet ({MERGED.relative_to(REPO)} is missing): run python -m bench first.", file=sys.stderr)
            return 2
        report.render_file(MERGED, REPO / "BENCHMARKS.md")
        return 0
    setup_environment()
    from bench.common import ensure_experiment

    ensure_experiment()
    threads = args.cpu_threads or len(os.sched_getaffinity(0))
    # CTranslate2 reads OMP_NUM_THREADS when cpu_threads is 0: this pins every path to the same
    # thread count even where our cpu_threads setting does not reach (see the single section).
    os.environ["OMP_NUM_THREADS"] = str(threads)
    settings = Settings.for_mode(args.quick, threads)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{settings.mode}"
    command = "python -m bench" + ("" if argv is None and len(sys.argv) <= 1 else " " + shlex.join(argv if argv is not None else sys.argv[1:]))
    run = {"run_id": run_id, "mode": settings.mode, "command": command, "settings": settings.__dict__,
           "machine": machine_info(), "versions": versions(), "sections": {}}
    out_path = RESULTS / f"{run_id}.json"
    failed = []
    for name in args.only or SECTIONS:
        log("=== section %s (%s) ===", name, settings.mode)
        started = time.perf_counter()
        try:
            result = importlib.import_module(f"bench.sections.{name}").run(settings)
        except Exception as exc:  # one broken section must not lose the others' figures
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
            failed.append(name)
        result["section_seconds"] = round(time.perf_counter() - started, 1)
        result["run_id"] = run_id
        result["mode"] = settings.mode
        run["sections"][name] = result
        write_json(out_path, run)  # after every section: an interrupted run keeps what it measured
        log("section %s done in %.0f s", name, result["section_seconds"])
    run["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json(out_path, run)
    report.merge(MERGED, run)
    log("results: %s", out_path.relative_to(REPO))
    if not args.no_render:
        report.render_file(MERGED, REPO / "BENCHMARKS.md")
        log("rendered BENCHMARKS.md")
    print(report.console_summary(run))
    return 1 if failed else 0
