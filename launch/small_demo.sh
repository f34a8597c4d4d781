#!/usr/bin/env bash
# The small built-in workflow on one CPU machine (the README's first command):
#   FlexMix-mini -> public model -> one expert per closed domain, each in its own process that
#   reads only its own domain.
# Every step resumes or reuses finished work, so re-running after an interruption continues.
#   RUNS=runs DOMAINS="math code" bash launch/small_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}
DOMAINS=${DOMAINS:-"math news code creative academic educational"}

python -m flexolmo_jax.data prepare --out="$RUNS/data"
python -m flexolmo_jax.train --config=configs/public.py --workdir="$RUNS/public" \
  --config.data.path="$RUNS/data"
for domain in $DOMAINS; do
  python -m flexolmo_jax.train --config="configs/${domain}_expert.py" \
    --workdir="$RUNS/experts/$domain" --config.data.path="$RUNS/data" \
    --config.expert.public="$RUNS/public"
done
echo "done: public model in $RUNS/public, experts in $RUNS/experts/{${DOMAINS// /,}}"
