#!/usr/bin/env bash
# Tensor-parallel prefill on a machine with 2 GPUs (issue 6), one call:
#   bash benchmarks/gpu_tp.sh gemma OUT [PARTS]   # Gemma 3 270M (needle, 32k) and the example script
#   bash benchmarks/gpu_tp.sh llama OUT           # random-weight Llama-3.1-8B layer shapes, 8 layers, 128k
#   bash benchmarks/gpu_tp.sh needles OUT [PARTS] # Gemma at needle depths 0.1 and 0.9 (another key)
# PARTS: a folder with gemma3-270m.gguf.partNN + gemma3-270m.sha256 (scripts/gguf_chunks.py
# split), joined into $FLEXPREFILL_GGUF_DIR when the model packages are not installed.
# Runs: flexprefill tp-check on Gemma 3 270M (K/V head repeated to 2, 32k needle prompt) and on a
# random-weight model with Llama-3.1-8B's layer shapes (8 layers, 128k tokens), each checked
# against one GPU; the example script.
set -u
phase=${1:?gemma or llama}
out=${2:?output folder}
parts=${3:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export FLEXPREFILL_GGUF_DIR=${FLEXPREFILL_GGUF_DIR:-/root/m} FLEXPREFILL_CACHE=${FLEXPREFILL_CACHE:-/root/cache}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
run() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" > "$out/$name.log" 2>&1; echo "   rc=$? ($name)"; tail -n 20 "$out/$name.log"; }
if [ -n "$parts" ]; then
  mkdir -p "$FLEXPREFILL_GGUF_DIR"
  python scripts/gguf_chunks.py join "$parts" gemma3-270m "$FLEXPREFILL_GGUF_DIR/gemma-3-270m-q4_k_m.gguf" || exit 1
fi
nvidia-smi topo -m > "$out/topo.txt" 2>&1; cat "$out/topo.txt"
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__, torch.cuda.device_count())"
case "$phase" in
  gemma)
run tp_gemma 300 torchrun --standalone --nproc-per-node 2 -m flexprefill_tools tp-check --model gemma3-270m --out "$out/tp_gemma"
run example 150 torchrun --standalone --nproc-per-node 2 examples/tp_prefill.py
    ;;
  needles)
    # the needle at other depths and keys (the checkpoint converted by the gemma phase is reused)
    for d in 0.1 0.9; do
      run tp_gemma_depth$d 200 torchrun --standalone --nproc-per-node 2 -m flexprefill_tools tp-check --model gemma3-270m \
        --depth $d --seed 1 --repeats 1 --out "$out/tp_gemma_depth$d"
    done
    ;;
  llama)
run tp_llama 540 torchrun --standalone --nproc-per-node 2 -m flexprefill_tools tp-check --model random:llama3.1-8b --layers 8 \
  --repeats 2 --out "$out/tp_llama"
    ;;
esac
