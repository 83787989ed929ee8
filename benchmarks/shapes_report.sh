#!/usr/bin/env bash
# Regenerate benchmarks/shapes_s_int8/ (the committed FP32-vs-INT8 report of the shared fixture):
# the full quantize pipeline, then its three report files copied here. Run on an idle machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/nasquant.sh" quantize "$root/recipes/shapes_s_int8.yaml" --output "$root/runs/shapes_s_int8"
mkdir -p "$root/benchmarks/shapes_s_int8"
cp "$root/runs/shapes_s_int8/"{report.md,report.json,accuracy_latency.png,recipe.resolved.yaml} "$root/benchmarks/shapes_s_int8/"
echo "updated $root/benchmarks/shapes_s_int8"
