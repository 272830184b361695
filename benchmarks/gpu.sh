#!/usr/bin/env bash
# The GPU check, as one prepared script (< 10 minutes): CUDA tests, training step and memory of
# both storage modes at 512 px (SD 1.x and SDXL architectures), serving (adapter overhead,
# resident vs packed vs the float UNet), co-batched fine-tuning (fine-tunes per hour for K = 1,
# 2, 4, 8), and the FLUX.1 transformer at full depth (training step vs a LoRA rank 16 on the
# same W4 base, adapter overhead in generation).
#
#   bash benchmarks/gpu.sh                  # results in benchmarks/results/gpu-<UTC time>/
#   OUT=/path/to/results bash benchmarks/gpu.sh
#
# Run from the repository root on a machine with CUDA torch, diffusers, transformers and
# safetensors installed (no network needed). Every table and JSON goes to "$OUT"; summary.txt
# collects them in one file. Each part has its own time limit (9 min 50 s in all), so one slow
# part cannot eat the rest; a part that fails or times out is logged and the next runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
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

part env 15 "$PY" -c 'import torch, diffusers; print("torch", torch.__version__, "cuda",
torch.version.cuda, torch.cuda.get_device_name(0), "diffusers", diffusers.__version__)'

# Only the files that hold CUDA tests (the API's tests need packages a GPU image may lack),
# the storage modes' exactness tests, and the benchmark scripts' CUDA smoke test.
part tests_cuda 70 "$PY" -m pytest -q -p no:cacheprovider -s tests/core/test_cuda.py \
  tests/core/test_storage.py
part tests_cuda_benchmarks 45 "$PY" -m pytest -q -p no:cacheprovider \
  tests/benchmarks/test_benchmarks.py -k cuda

# SD 1.x UNet architecture, 512 px, batch 1, bf16 autocast with fp32 scales: the baselines
# (full fine-tune, materialising W8) and TuneQDM packed and resident, side by side. Targets:
# resident step <= 0.7 x full; packed step <= 1.0 x materialising; packed peak <= 2 GiB.
part train_512 100 "$PY" benchmarks/train_memory.py --device cuda --latent 64 \
  --batch 1 --warmup 2 --steps 4 --budget 95 --timeout 40 \
  --variants full materialising-w8 tuneqdm-w4-ckpt --storage-mode both \
  --json "$OUT/train_512.json"

# The SDXL UNet architecture at 512 px (latent 64): TuneQDM W4 with checkpointing, both storage
# modes (its full fine-tune needs ~41 GB in fp32 and is left out).
part train_sdxl_512 50 "$PY" benchmarks/train_memory.py --arch sdxl --device cuda --latent 64 \
  --batch 1 --warmup 1 --steps 2 --timeout 22 --variants tuneqdm-w4-ckpt --storage-mode both \
  --json "$OUT/train_sdxl_512.json"

# Adapter overhead (target <= 5 %) and mixed batches on the small UNets, both storage modes.
part serving 50 "$PY" benchmarks/serving.py --device cuda --models tiny-sd1 mid \
  --latent 32 --steps 10 --reps 3 --storage-mode both --json "$OUT/serving.json"

# SD 1.x UNet at 512 px (latent 64), batch 8: resident with an adapter vs the float UNet in
# fp16 (what diffusers' StableDiffusionPipeline(torch_dtype=float16) runs; target >= 0.9).
part serving_sd1_512 60 "$PY" benchmarks/serving.py --device cuda --models sd1 \
  --latent 64 --steps 10 --reps 2 --file-reps 5 --slot-reps 30 --storage-mode both \
  --json "$OUT/serving_sd1_512.json"

# Co-batched fine-tuning at 512 px (latent 64): fine-tunes per hour for K = 1, 2, 4, 8 (target:
# K = 8 gives >= 3x the fine-tunes per hour of K = 1).
part cotrain_512 60 "$PY" benchmarks/cotrain.py --device cuda --latent 64 --ks 1 4 8 \
  --warmup 1 --steps 3 --timeout 18 --json "$OUT/cotrain_512.json"

# The FLUX.1 transformer at full depth (11.9 B parameters, random weights; built on the GPU in
# bf16 and quantized to W4 layer by layer), 512 px (32x32 latent tokens), batch 1, 512 T5
# tokens, bf16 autocast; the text encoders are never built (not resident). TuneQDM W4 with
# checkpointing vs a peft LoRA rank 16 with checkpointing on the same W4 base. Targets: peak
# <= 8 GiB; step <= the LoRA step.
part train_flux_512 95 "$PY" benchmarks/train_memory.py --arch flux --full-depth \
  --device cuda --latent 32 --text-tokens 512 --batch 1 --warmup 1 --steps 3 --timeout 45 \
  --variants tuneqdm-w4-ckpt lora-w4-ckpt --json "$OUT/train_flux_512.json"

# Adapter overhead in generation (target <= 5 %): one FLUX.1 transformer call at 512 px with
# and without a 2-interval adapter routed, full depth, bf16 autocast.
part overhead_flux_512 45 "$PY" benchmarks/dit_overhead.py --arch flux --full-depth \
  --device cuda --latent 32 --text-tokens 512 --reps 5 --json "$OUT/overhead_flux_512.json"

echo "== done; tables in $SUMMARY" | tee -a "$SUMMARY"
