#!/usr/bin/env bash
# Rebuild the A&D organ segmenter shipped in model_repository/ad-organs from nothing but this
# code: the synthetic multi-organ phantom (medssl synth organs, CT domain A), an A&D run in the
# class-imbalanced SSL setting on the CPU profile (medssl-train ad --setting imbssl), and an
# fp32 export with its parity check (medssl-export). About 15 minutes on 2 idle CPU cores.
#
#   benchmarks/build_ad_model.sh            # writes model_repository/ad-organs/1
#
# Trained on synthetic data only: its card says so, and it is not for clinical use.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
WORK=${WORK:-build/ad-model}
NAME=ad-organs
export MEDSSL_CACHE=$WORK/cache

rm -rf "$WORK"
"$BIN/medssl" synth organs --cases 20 --test 4 --domain A --seed 3000 "$WORK/organs/A"
"$BIN/medssl-train" ad --setting imbssl --profile cpu --data "$WORK/organs" --out "$WORK/ad" \
    --set optim.steps=${STEPS:-300} --set eval.every=250 --set data.workers=0 --device cpu
rm -rf "model_repository/$NAME"
"$BIN/medssl-export" "$WORK/ad" --repository model_repository --name "$NAME" --version 1 \
    --max-batch 8 --intended-use "Demonstration model trained only on the synthetic abdominal phantom \
made by medssl synth organs (A&D, class-imbalanced SSL setting, 20% labeled, CPU-sized network). Not for \
clinical use; it shows the segmentation pipeline end to end and is no measure of accuracy on real scans."
"$BIN/medssl-export" check model_repository
