#!/usr/bin/env bash
# The vLLM backend on the GPU machine, after benchmarks/vllm/offline.py receive has kept every chunk.
#   bash benchmarks/vllm/gpu_vllm.sh checks OUT   # install, GPU + vLLM tests, output checks, gather cost (~6-8 min)
#   bash benchmarks/vllm/gpu_vllm.sh speed OUT    # TTFT / prefill throughput against the default backend (~8 min)
set -u
phase=${1:?checks or speed}
out=${2:?output folder}
mkdir -p "$out"
here=$(cd "$(dirname "$0")/../.." && pwd)
cd "$here"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
eval "$(python3 benchmarks/vllm/offline.py install | tee "$out/install.log" | grep '^export ')" || exit 1
[ -n "${PYTHONPATH:-}" ] || { echo "install failed"; cat "$out/install.log"; exit 1; }
python3 -c "import vllm, flexprefill.integrations.vllm.backend as b; print('vllm', vllm.__version__, b.FlexPrefillBackend)" \
  > "$out/import.log" 2>&1; echo "import rc=$?"; tail -n 3 "$out/import.log"
model=$(python3 -c "from flexprefill_tools.models import hf_folder; print(hf_folder('$FLEXPREFILL_GGUF_DIR/smollm2-135m-instruct.gguf'))" 2> "$out/convert.log" | tail -n 1)
echo "model folder: $model"; export FLEXPREFILL_VLLM_MODEL=$model
run() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" > "$out/$name.log" 2>&1; echo "   rc=$? ($name)"; tail -n 15 "$out/$name.log"; }
case "$phase" in
  checks)
    run unit_tests 150 python3 -m pytest tests/integrations/vllm_backend tests/ops/test_paged_kv.py -q -p no:cacheprovider \
      --deselect tests/integrations/vllm_backend/test_vllm_gpu.py
    run check_outputs 420 python3 benchmarks/vllm/check_outputs.py --model "$model" --out "$out/check_outputs.json"
    run gather_cost 120 python3 benchmarks/vllm/gather_cost.py --out "$out/gather_cost.json"
    ;;
  speed)
    run speed 560 python3 benchmarks/vllm/speed.py --model "$model" --out "$out/speed.json"
    ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
