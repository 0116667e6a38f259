#!/usr/bin/env bash
# Issue 25's peers on the lent GPU, one device command: the `l4-vs-peers` arms named (globs as in
# bench/suites.py), with the bitsandbytes and Unsloth bundles unpacked beside .device's site (both carried in
# .device/: bnb.tar.xz, uns.tar.xz from bench/make_unsloth_bundle.sh). The harness's lines and report come back
# under $OUT. Carry [".device", ".commit"]; `git rev-parse --short HEAD > .commit` first.
#   LIMIT=540 bash bench/peers.sh seed-recipe-l4 l4-job local-model 'unsloth-16bit-mb4-*' 'unsloth-16bit-mb2-*'
set -x
source .device/activate
mkdir -p /tmp/bnb /tmp/uns && tar -C /tmp/bnb -xJf .device/bnb.tar.xz && tar -C /tmp/uns -xJf .device/uns.tar.xz
export PYTHONPATH=.:bench:/tmp/bnb:$PYTHONPATH HF_HUB_OFFLINE=1 FITRUN_COMMIT=$(cat .commit) TOKENIZERS_PARALLELISM=false \
  PYTHONUNBUFFERED=1 FITRUN_PROGRESS=0 RAY_ADDRESS=local FITRUN_UNSLOTH_PATH=/tmp/uns
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout "${LIMIT:-540}" python bench/harness.py run l4-vs-peers --only "$@" 2>&1 | grep -v -i warn | tail -"${TAILN:-40}"
cp bench/results/l4-vs-peers.jsonl "$OUT/" 2>/dev/null
python bench/harness.py report l4-vs-peers > "$OUT/report.md" 2>&1; tail -20 "$OUT/report.md"
