#!/usr/bin/env bash
# Regenerate benchmarks/shapes_auto/: the shapes recipe with `skip: auto` (max_map_drop 0.003) — the
# per-layer sensitivity evidence, the search, and the resulting FP32-vs-INT8 report. Run on an idle machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/nasquant.sh" quantize "$root/recipes/shapes_s_int8.yaml" --output "$root/runs/shapes_s_int8_auto" \
  --set quantization.skip=auto --set quantization.max_map_drop=0.003
mkdir -p "$root/benchmarks/shapes_auto"
cp "$root/runs/shapes_s_int8_auto/"{sensitivity.md,sensitivity.json,sensitivity.png,report.md,report.json,recipe.resolved.yaml} \
  "$root/benchmarks/shapes_auto/"
echo "updated $root/benchmarks/shapes_auto"
