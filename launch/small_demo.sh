#!/usr/bin/env bash
# The small built-in workflow on one CPU machine (the README's first command):
#   FlexMix-mini -> public model -> one expert and one dense fine-tune per closed domain, each in
#   its own process that reads only its own domain -> ablation experts -> merge -> router tuning
#   -> FlexOlmo vs the baselines, ablations and opt-out, with bootstrap intervals -> routing plot
#   -> $RUNS/results/results.{md,json}.
# Every step resumes or reuses finished work, so re-running after an interruption continues.
# Extra arguments go to flexolmo_jax.reproduce, e.g.
#   RUNS=runs bash launch/small_demo.sh --domains=math,code --expert_steps=100
#   RUNS=runs_medium bash launch/small_demo.sh --scale=medium   # the larger tier, 3 seeds, ~2 h
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}
python -m flexolmo_jax.reproduce --workdir="$RUNS" "$@"
