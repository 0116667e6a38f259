#!/usr/bin/env bash
# Issue 12: `fitrun tune` with the quantization dimension under a 16 GiB and a 24 GiB ceiling, the two
# searches side by side on a 2-GPU host (one GPU and one local Ray cluster each), through
# bench/tune_24gb.py (which runs `runner.tune.driver.run_tune` and writes the report). Random-init 8B,
# 4,000 ShareGPT conversations written by bench/data_cache.py, the Llama-3 tokenizer from $TOKENIZER.
#
#   OUT=bench/results TOKENIZER=path/to/llama3-tokenizer bash bench/tune_quant.sh [--resume]
#
# Each search keeps its state under /tmp/tune-quant-<GiB>; run again with --resume to continue one that
# hit a time limit (the device allows 10 minutes a command).
set -u
RESUME=${1:-}
LIMIT=${LIMIT:-550}
DAY=$(date +%F)
export PYTHONPATH=$PWD:$PWD/bench:${PYTHONPATH:-} PYTHONUNBUFFERED=1 FITRUN_PROGRESS=0 RAY_ADDRESS=local
[ -f /tmp/conv.jsonl ] || python -c "from pathlib import Path; from data_cache import write_conversations; \
write_conversations(Path('/tmp/conv.jsonl'), 4000)"

search() {  # gpu ceiling space [extra --space-set ...]
  local gpu=$1 gib=$2 space=$3; shift 3
  local dir=/tmp/tune-quant-$gib sets=()
  for s in "$@"; do sets+=(--space-set "$s"); done
  mkdir -p $dir
  CUDA_VISIBLE_DEVICES=$gpu timeout $LIMIT python bench/tune_24gb.py --job jobs/llama3-8b-lora.yaml \
    --space $space --no-seed $RESUME --winner $OUT/tune-quant-${gib}gb-winner-$DAY.yaml \
    --out $OUT/tune-quant-${gib}gb-$DAY.md \
    --set lora.adapter_dtype=mixed --set training.compile=true --set data.path=/tmp/conv.jsonl \
    --set data.format=sharegpt --set data.val_fraction=0.05 --set tokenizer.name_or_path=$TOKENIZER \
    --set output_dir=$dir --set tracking.tracking_uri=sqlite:///$dir/mlflow.db "${sets[@]}" \
    >>$OUT/tune-quant-${gib}gb.log 2>&1
  echo "search under $gib GiB: exit $?"
}

search 0 16 search_spaces/fit-16gb-quant.yaml quality_steps=8 &
search 1 24 search_spaces/fit-24gb-quant.yaml quality_steps=8 'lora_r=[16]' 'gradient_accumulation_steps=[16,8]' &
wait
