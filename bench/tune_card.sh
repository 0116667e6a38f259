#!/usr/bin/env bash
# Issue 23: a card job as the winner of `fitrun tune --gpu CARD`, run as a user runs it, on a bigger card
# (the probes' allocator is capped at CARD's budget). Random-init 8B, the shipped alpaca data, packed, seq 2048.
#
#   OUT=dir bash bench/tune_card.sh CARD SPACE [--set KEY=VALUE ...] [--resume]
#
# Writes $OUT/tune-CARD.log (versions, card, commit, command and the search's output), $OUT/winner-CARD.yaml
# and $OUT/tune-CARD.tar.gz (the search's MLflow store and artifacts: trials, frontier). State stays under
# /tmp/tune-CARD, so a second call on the same machine with --resume continues a search cut by a time limit.
set -u
card=$1 space=$2; shift 2
dir=/tmp/tune-$card
log=$OUT/tune-$card.log
mkdir -p "$dir"
export PYTHONUNBUFFERED=1 FITRUN_PROGRESS=0 RAY_ADDRESS=local HF_HUB_OFFLINE=1
cmd=(python -m runner tune jobs/llama3-8b-lora.yaml "$space" --gpu "$card" --set model.init=random
     --set lora.adapter_dtype=mixed --set training.compile=true --set "output_dir=$dir"
     --set "tracking.tracking_uri=sqlite:///$dir/mlflow.db" --out "$OUT/winner-$card.yaml" "$@")
{
  echo "commit: $(cat .commit 2>/dev/null || git rev-parse HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, transformers, peft, ray; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'ray', ray.__version__)"
  echo "command: ${cmd[*]}"
  start=$(date +%s)
  timeout "${LIMIT:-540}" "${cmd[@]}"
  echo "exit $? after $(( $(date +%s) - start )) s"
} >>"$log" 2>&1
tar -C "$dir" --exclude='checkpoint*' --exclude='*.safetensors' --exclude='*.pt' -czf "$OUT/tune-$card.tar.gz" . 2>/dev/null
tail -40 "$log"
