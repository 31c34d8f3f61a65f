#!/usr/bin/env bash
# Issue 17: continue the seed-1 reference run of Pyro's DMM program along the published schedule
# from the checkpoint kept in this folder (the machine and runs/ do not persist between sessions).
#   MINUTES=150 bash benchmarks/long_runs/resume.sh      # from anywhere; runs in the background
# On core 1; log and results in runs/. Afterwards copy the newer checkpoint back here (see
# README.md) and commit it.
set -euo pipefail
cd "$(dirname "$0")/../.."
MINUTES=${MINUTES:-150}
export PYROSSM_DATA_DIR=${PYROSSM_DATA_DIR:-$(cd .. && pwd)/shared/data}
mkdir -p runs
[ -f runs/pyro_long_s1.pt ] || cp benchmarks/long_runs/pyro_dmm_s1.pt runs/pyro_long_s1.pt
# the script imports pyrossm from outside the checkout: install it (editable) if it is not
python -P -c "import pyrossm" 2> /dev/null || pip install -q --no-deps -e .
nohup taskset -c 1 python benchmarks/dmm_vs_pyro.py --runners pyro --epochs 5000 --eval-every 50 \
  --seed 1 --threads 1 --minutes "$MINUTES" --checkpoint runs/pyro_long_s1.pt --resume \
  --output runs/dmm_vs_pyro_long_pyro_s1.json > runs/pyro_long.log 2>&1 &
echo "started: tail -f runs/pyro_long.log"
