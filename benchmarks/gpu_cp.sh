#!/usr/bin/env bash
# Context-parallel FlexPrefill on one machine with 2-8 GPUs, one call per phase:
#   bash benchmarks/gpu_cp.sh tests OUT        # the GPU tests of flexprefill.distributed (one GPU, then two over NCCL)
#   bash benchmarks/gpu_cp.sh layer OUT [P]    # one Llama-3.1-8B attention layer at 128k, 512k, 1M on P GPUs (default: all)
#   bash benchmarks/gpu_cp.sh model OUT [P]    # a 4-layer random-weight Llama-3.1-8B-shaped model at 128k, 512k
#   bash benchmarks/gpu_cp.sh max OUT [P]      # the longest length that runs (random inputs, doubling from 1M)
# Each phase writes OUT/<phase>_P<P>/cp_prefill.json (rows as they are measured) and a log.
set -u
phase=${1:?tests, layer, model or max}
out=${2:?output folder}
gpus=${3:-$(python -c "import torch; print(torch.cuda.device_count())")}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
nvidia-smi topo -m > "$out/topo.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.device_count(), torch.cuda.get_device_name(0))"
run() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" > "$out/$name.log" 2>&1; echo "   rc=$? ($name)"; tail -n 25 "$out/$name.log"; }
cp_run() {
  local part=$1 limit=$2; shift 2
  run "${part}_P$gpus" "$limit" torchrun --standalone --nproc-per-node "$gpus" benchmarks/cp_prefill.py \
    --parts "$part" --out "$out/${part}_P$gpus" "$@"
}
case "$phase" in
  tests) run gpu_tests_cp 540 python -m pytest tests/distributed -m gpu -q -x -p no:cacheprovider ;;
  layer) cp_run layer 570 --lengths 128k,512k,1m --inputs synthetic ;;
  model) cp_run model 570 --model-layers 4 --model-lengths 128k,512k ;;
  max)   cp_run max 570 --max-from 1m --max-to 8m ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
