#!/usr/bin/env bash
# One prepared GPU run (issue 9): SD 1.5 512x512 fp16 batch 1, kiln eager, kiln compiled, kiln --medvram and
# --lowvram (peak device memory) and diffusers eager in one report, on random full-size weights (or a real file:
# WEIGHTS=v1-5-pruned-emaonly.safetensors). Writes $OUT/bench.json.
set -euo pipefail
OUT=${OUT:-.}
python -m kiln.cli bench --device cuda --dtype fp16 --size 512 --steps ${STEPS:-50} --repeat ${REPEAT:-20} --compile --medvram --lowvram \
    ${WEIGHTS:+--weights "$WEIGHTS"} --json "$OUT/bench.json"
