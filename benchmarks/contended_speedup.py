"""Does the report's speedup survive a busy machine? The shapes recipe run twice, quiet and with other
processes spinning on this run's CPUs, and the INT8 rows' speedups compared.

    .venv/bin/python -m benchmarks.contended_speedup [--spinners 1] [--val-images 60]

Each run is ``recipes/shapes_s_int8.yaml`` itself (timed at 640, batch 1, 2 threads, 50 rounds) with
``--val-images`` validation images (the mAP is not the point). For every INT8 row it records the
speedup the report states (paired: FP32 and INT8 timed back to back, round by round), the ratio of the
two rows' p50s timed in separate stages (what reports did before), the other processes' CPU share and
whether the row was marked contended. The claim checked: under contention the report either gives
the quiet run's speedup within 10 % or marks the row. Writes ``benchmarks/contended_speedup.md`` and
``.json``; start it on an otherwise idle machine (the quiet run must be quiet).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from nasquant.bench import host_info
from nasquant.io import atomic_path, write_json
from nasquant.pipeline import run_quantize
from nasquant.recipe import load_recipe
from nasquant.report.markdown import host_summary

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "shapes_s_int8.yaml"
#: The claim's tolerance: a contended run's stated speedup within 10 % of the quiet one's.
TOLERANCE = 0.10


def _rows(report: dict) -> dict[str, dict]:
    fp32 = next(r for r in report["rows"] if r["name"] == "ORT FP32")
    rows = {}
    for row in report["rows"]:
        if row["backend"] != "onnxruntime" or row["precision"] != "int8" or row["status"] != "ok":
            continue
        extra = row["extra"]
        rows[row["name"]] = {
            "speedup": row["speedup"],
            "speedup_method": extra.get("speedup_method"),
            "p50_ratio": fp32["p50_ms"] / row["p50_ms"],
            "p50_ms": row["p50_ms"],
            "other_cpu_share": extra.get("other_cpu_share"),
            "paired_other_cpu_share": extra.get("speedup_paired_other_cpu_share"),
            "contended": bool(extra.get("contended")),
        }
    return rows


def _run(folder: Path, val_images: int, spinners: int) -> dict:
    recipe = load_recipe(RECIPE, [f"validation.max_images={val_images}", "engines.enabled=false"])
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(spinners)]
    try:
        report = run_quantize(recipe, output=folder, progress=False, log=lambda line: print(line, flush=True))
    finally:
        for process in busy:
            process.kill()
            process.wait()
    return _rows(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spinners", type=int, default=1, help="busy processes during the second run")
    parser.add_argument("--val-images", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nasquant-contention-") as work:
        quiet = _run(Path(work) / "quiet", args.val_images, 0)
        busy = _run(Path(work) / "busy", args.val_images, args.spinners)
    verdicts = {}
    for name, row in busy.items():
        within = abs(row["speedup"] / quiet[name]["speedup"] - 1) <= TOLERANCE
        verdicts[name] = (
            "holds (within 10 %)" if within else ("holds (marked)" if row["contended"] else "FAILS")
        )
    record = {
        "host": host_info(ort_threads=2),
        "spinners": args.spinners,
        "cpus": len(os.sched_getaffinity(0)),
        "quiet": quiet,
        "busy": busy,
        "verdicts": verdicts,
    }
    write_json(HERE / "contended_speedup.json", record)
    lines = [
        "# The report's speedup on a busy machine",
        "",
        f"Host: {host_summary(record['host'])}. `recipes/shapes_s_int8.yaml` at 640, batch 1, 2 threads, "
        f"{args.val_images} validation images; the busy run had {args.spinners} spinning process(es) on "
        f"this run's {record['cpus']} CPUs. `python -m benchmarks.contended_speedup`.",
        "",
        "| INT8 row | quiet speedup | busy speedup (stated) | busy p50 ratio (separate stages) | busy CPU share (others) | marked ‡ | claim |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in busy.items():
        share = row["paired_other_cpu_share"]
        lines.append(
            f"| {name} | {quiet[name]['speedup']:.2f}× | {row['speedup']:.2f}× | {row['p50_ratio']:.2f}× | "
            f"{'n/a' if share is None else f'{share:.0%}'} | {'yes' if row['contended'] else 'no'} | {verdicts[name]} |"
        )
    lines += [
        "",
        "Stated speedup = the median over rounds of FP32 and INT8 timed back to back (the report's column);",
        "p50 ratio = the two rows' p50s, each timed in its own stage, as reports did before.",
    ]
    with atomic_path(HERE / "contended_speedup.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
