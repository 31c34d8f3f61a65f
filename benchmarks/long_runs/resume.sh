#!/usr/bin/env bash
# Issue 17: continue the two seed-1 reference runs of the published DMM schedule from the
# checkpoints kept in this folder (the machine and runs/ do not persist between sessions).
#   MINUTES=150 bash benchmarks/long_runs/resume.sh      # from anywhere; runs in the background
# Pyro's program on core 1, pyrossm --match-pyro on core 0; logs and results in runs/.
# Afterwards copy the newer checkpoints back here (see README.md) and commit them.
set -euo pipefail
cd "$(dirname "$0")/../.."
MINUTES=${MINUTES:-150}
export PYROSSM_DATA_DIR=${PYROSSM_DATA_DIR:-$(cd .. && pwd)/shared/data}
mkdir -p runs/jsb_match_s1/dmm_backward
[ -f runs/pyro_long_s1.pt ] || cp benchmarks/long_runs/pyro_dmm_s1.pt runs/pyro_long_s1.pt
if ! ls runs/jsb_match_s1/dmm_backward/checkpoint-*.pt > /dev/null 2>&1; then
  cp benchmarks/long_runs/pyrossm_dmm_s1/* runs/jsb_match_s1/dmm_backward/
fi
nohup taskset -c 1 python benchmarks/dmm_vs_pyro.py --runners pyro --epochs 5000 --eval-every 50 \
  --seed 1 --threads 1 --minutes "$MINUTES" --checkpoint runs/pyro_long_s1.pt --resume \
  --output runs/dmm_vs_pyro_long_pyro_s1.json > runs/pyro_long.log 2>&1 &
nohup taskset -c 0 python -m pyrossm.experiments.nonlinear jsb --configs dmm_backward --match-pyro \
  --seed 1 --epochs 5000 --minutes "$MINUTES" --eval-every 50 --threads 1 \
  --checkpoint-dir runs/jsb_match_s1 --resume --output runs/jsb_published_seed1.json \
  > runs/jsb_match_s1.log 2>&1 &
echo "started: tail -f runs/pyro_long.log runs/jsb_match_s1.log"
