#!/usr/bin/env bash
# The GPU check of issue 6, as one short script: CUDA tests, training memory at 512 px, serving,
# and co-batched fine-tuning (issue 14).
#
#   OUT=/path/to/results bash benchmarks/gpu.sh
#
# Run from the repository root on a machine with CUDA torch, diffusers, transformers and
# safetensors installed (no network needed). Every table and JSON goes to "$OUT"; summary.txt
# collects them in one file. Each part has its own time limit (9 min 15 s in all), so one
# slow part cannot eat the rest; a part that fails or times out is logged and the next runs.
set -uo pipefail
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: the script changes directory next
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

part() {  # part NAME SECONDS COMMAND...: run with a time limit, keep its output, log the outcome
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s, started $(date -u +%H:%M:%S))" | tee -a "$SUMMARY"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  cat "$OUT/$name.txt" >>"$SUMMARY"
  echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$SUMMARY"
}

part env 20 "$PY" -c 'import torch, diffusers; print("torch", torch.__version__, "cuda",
torch.version.cuda, torch.cuda.get_device_name(0), "diffusers", diffusers.__version__)'

# Only the files that hold CUDA tests: the API's tests need packages a GPU image lacks.
part tests_cuda 60 "$PY" -m pytest -q -p no:cacheprovider -s tests/core/test_cuda.py \
  tests/benchmarks/test_benchmarks.py -k cuda

# The issue's comparison at 512 px, batch 1, bf16 autocast, scales in fp32. The variants
# that the targets compare first (tuneqdm-w4-ckpt among them); the other checkpointed ones
# after, in what time is left, with ratios against the first run's baselines.
part train_memory_512 160 "$PY" benchmarks/train_memory.py --device cuda --latent 64 \
  --batch 1 --warmup 2 --steps 5 --budget 145 --timeout 60 \
  --variants full materialising-w8 tuneqdm-w4-ckpt tuneqdm-w8 peqa-w8 tuneqdm-w4 \
  --json "$OUT/train_memory_512.json"

part serving 75 "$PY" benchmarks/serving.py --device cuda --models tiny-sd1 mid \
  --latent 32 --steps 10 --reps 3 --json "$OUT/serving.json"

part train_memory_512_ckpt 90 "$PY" benchmarks/train_memory.py --device cuda --latent 64 \
  --batch 1 --warmup 2 --steps 5 --budget 75 --timeout 45 \
  --variants full-ckpt materialising-w8-ckpt peqa-w8-ckpt tuneqdm-w8-ckpt \
  --reference "$OUT/train_memory_512.json" --json "$OUT/train_memory_512_ckpt.json"

# Co-batched fine-tuning at 512 px (latent 64): fine-tunes per hour for K = 1, 2, 4, 8 (target:
# K = 8 gives >= 3x the fine-tunes per hour of K = 1).
part cotrain_512 150 "$PY" benchmarks/cotrain.py --device cuda --latent 64 --ks 1 2 4 8 \
  --warmup 2 --steps 3 --timeout 34 --json "$OUT/cotrain_512.json"

echo "== done; tables in $SUMMARY" | tee -a "$SUMMARY"
