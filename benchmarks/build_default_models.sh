#!/usr/bin/env bash
# Rebuild the default model shipped in model_repository/ from nothing but this code:
# synthetic chest CT (medssl synth), a FocalMix run on the CPU config (medssl-train) and an
# fp32 export with its parity check (medssl-export). About 20 minutes on 2 CPU cores.
#
#   benchmarks/build_default_models.sh            # writes model_repository/focalmix-nodules/1
#
# The model is trained on synthetic data only: its card says so, and it is not for clinical use.
# (The A&D segmentation model joins here when that trainer lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
WORK=${WORK:-build/default-models}
NAME=focalmix-nodules
export MEDSSL_CACHE=$WORK/cache

rm -rf "$WORK"
"$BIN/medssl" synth chest --cases 40 --unlabeled 60 --matrix 128 --seed 2026 "$WORK/luna16"
"$BIN/medssl-train" focalmix --config focalmix-cpu --data "$WORK/luna16" --labeled 25 --unlabeled 60 \
    --out "$WORK/focalmix" --set optim.steps=1000 --set eval.every=250 --device cpu
rm -rf "model_repository/$NAME"
"$BIN/medssl-export" "$WORK/focalmix" --repository model_repository --name "$NAME" --version 1 \
    --max-batch 8 --intended-use "Demonstration model trained only on synthetic chest CT made by \
medssl synth (25 labeled + 60 unlabeled scans, FocalMix, CPU-sized network). Not for clinical use; \
it shows the pipeline end to end and is no measure of accuracy on real scans."
"$BIN/medssl-export" check model_repository
