#!/usr/bin/env bash
# One GPU pass of every check and benchmark, in two halves that each fit a 10-minute call.
#   bash benchmarks/gpu_pass.sh tests OUT    # every GPU test (~450 s on a fresh H200: a call of its own)
#   bash benchmarks/gpu_pass.sh checks OUT   # operator GPU tests, benchmark suite
#   bash benchmarks/gpu_pass.sh models OUT   # break-even, whole-model prefill, demo, evals
# Shorter phases for a tight device budget (each well under 10 minutes):
#   selection OUT (selection GPU tests, pattern-search profile), layer OUT (Llama layer 8k-128k + GQA),
#   kvloads OUT (kernel tests, pointer vs descriptor K/V loads at 128k, GQA sharing),
#   window OUT (sliding-window kernel against masked SDPA and FlexAttention),
#   ncu OUT (Nsight Compute sections of the sparse kernel at 5% density and of cuDNN),
#   varlen OUT, whole OUT (whole-model prefill and both demos), evals OUT (both models),
#   wspaths OUT, wsvarlen OUT (the warp-specialised kernel on windowed and varlen calls: GPU
#   tests and A/B against the Triton kernel), pool OUT (what the cached search graph keeps),
#   captured OUT (whole-model prefill and the suite on captured Q/K/V of both packaged models)
#   diagfirst OUT (kernel efficiency with the diagonal block first vs last, kernel GPU tests)
#   probe OUT (per-tile kernel cost by config and tile count; search profile of the small-head shapes)
#   graph OUT (whole search graphed vs tail-only vs eager; every kernel of the 32k search)
#   search OUT (radix vs sort threshold of the query-aware ranking, graphs to 1024 blocks)
#   verify OUT (operator memory with int16/int32 tables, dense_above on random inputs)
#   exactness OUT (the GPU halves of the kernel/operator/varlen checks and of the softcap tests,
#   then what a soft cap costs the kernel and the operator at 32k)
# Needs: flexprefill importable (PYTHONPATH=src or installed), the packaged GGUFs (named
# as in their packages) in $FLEXPREFILL_GGUF_DIR when the model packages are not installed.
set -u
phase=${1:?checks or models}
out=${2:?output folder}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
run() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" > "$out/$name.log" 2>&1; echo "   rc=$? ($name)"; tail -n 25 "$out/$name.log"; }
case "$phase" in
  tests)
    run gpu_tests 590 python -m pytest tests -q -m gpu -p no:cacheprovider
    ;;
  checks)
    run operator_tests 150 python -m pytest tests/test_gpu_checks_operator.py -q -m gpu -p no:cacheprovider
    run bench_suite 330 python benchmarks/suite.py --out "$out/bench" --lengths 8k,16k,32k,64k,128k,256k --max-minutes 4
    ;;
  models)
    run bench_models 200 python benchmarks/suite.py --mode breakeven,model --out "$out/bench_models" --max-minutes 3
    run demo_gemma 90 python -m flexprefill_tools demo --model gemma3-270m --device cuda --out "$out/demo_gemma"
    run demo_smollm2 50 python -m flexprefill_tools demo --model smollm2-135m-instruct --device cuda --out "$out/demo_smollm2"
    run evals 200 python -m flexprefill_tools eval --model gemma3-270m --lengths 4k,8k,16k,32k \
      --tasks niah_sweep,niah_multikey_1,vt,cwe --depths 0,0.25,0.5,0.75,1 --samples 1 \
      --methods full,flexprefill-g0.9,flexprefill-g0.95,streaming,vertical_slash_fixed --out "$out/evals" --max-minutes 2.8
    ;;
  exactness)
    run exact_tests 300 python -m pytest tests/ops/test_gpu_checks_kernel.py tests/test_gpu_checks_operator.py \
      tests/test_gpu_checks_varlen.py tests/test_softcap.py tests/search/test_search_softcap.py -q -m gpu -p no:cacheprovider -rs
    run compare_softcap 150 env OUT="$out" python benchmarks/compare_softcap.py 32768
    ;;
  selection)
    run gpu_tests 150 python -m pytest tests/test_selection.py tests/test_varlen.py -q -m gpu -p no:cacheprovider
    run search_parts 120 bash -c "OUT='$out' python benchmarks/profile_search_parts.py 131072 && OUT='$out' python benchmarks/profile_search_parts.py 32768"
    run profile_selection 120 env OUT="$out" python benchmarks/profile_selection.py 8192,32768,131072
    ;;
  layer)
    run bench_layer 200 python benchmarks/suite.py --mode suite,gqa --quick --shapes llama3.1-8b \
      --inputs synthetic,random --lengths 8k,32k,128k --random-max-len 32768 --out "$out/bench_layer" --max-minutes 2.5
    ;;
  kvloads)
    run gpu_tests 150 python -m pytest tests/ops tests/test_varlen.py -q -m gpu -p no:cacheprovider
    run kv_loads 260 env OUT="$out" python benchmarks/compare_kv_loads.py 131072 230
    run bench_gqa 90 python benchmarks/suite.py --mode gqa --out "$out/bench_gqa" --max-minutes 1.2
    ;;
  window)
    run window_tests 120 python -m pytest tests/ops/test_sliding_window.py tests/integrations -q -m gpu -p no:cacheprovider
    run bench_window 200 python benchmarks/suite.py --mode window --out "$out/bench_window" --max-minutes 2.5
    ;;
  ncu)
    # Nsight Compute on the low-density d128 case (the kernel-efficiency miss) and cuDNN dense
    if command -v ncu >/dev/null; then
      sec="--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats --section SchedulerStats"
      run ncu_sparse 200 ncu $sec --kernel-name regex:sparse_attention --launch-skip 2 --launch-count 1 --csv --page details \
        python benchmarks/ncu_kernel.py 128 65536 0.05
      run ncu_dense 150 ncu $sec --kernel-name regex:"cudnn|fmha|sm90" --launch-skip 2 --launch-count 1 --csv --page details \
        python benchmarks/ncu_kernel.py 128 65536 --dense
    else
      echo "no ncu on this machine"; ls /usr/local/cuda*/bin 2>/dev/null | head
    fi
    ;;
  verify)
    # what the last CPU-only changes need on a GPU: all GPU tests (int16 block tables, fused
    # assembly, windowed kernel), the operator's memory with int16 and int32 tables, and
    # dense_above on the near-dense random inputs (with and without it, same run)
    # (every GPU test: phase tests, a call of its own)
    run operator_memory 90 env OUT="$out" python benchmarks/operator_memory.py 9/3/64:262144,32/8/128:131072
    run dense_above_off 100 python benchmarks/suite.py --mode suite --shapes llama3.1-8b,smollm2-135m \
      --inputs random --lengths 32k,128k --methods cudnn,flexprefill --out "$out/dense_above_off" --max-minutes 1.3
    run dense_above_on 100 python benchmarks/suite.py --mode suite --shapes llama3.1-8b,smollm2-135m \
      --inputs random --lengths 32k,128k --methods cudnn,flexprefill --dense-above 0.75 --out "$out/dense_above_on" --max-minutes 1.3
    ;;
  diagfirst)
    # the diagonal block before the others (default) against after them: kernel efficiency
    # at 128k, same run; then every GPU test
    run switch_diag_first 300 env OUT="$out" python benchmarks/compare_kernel_switch.py FLEXPREFILL_DIAG_FIRST 131072
    run gpu_tests 250 python -m pytest tests/ops -q -m gpu -p no:cacheprovider
    ;;
  probe)
    # per-tile cost of the sparse kernel (configs, registers) and the pattern
    # search of the small-head shapes (SmolLM2 9/3/64, Gemma 3 4/1/256) at 32k and 128k
    run probe_tiles 330 env OUT="$out" python benchmarks/probe_tiles.py 131072
    run profile_selection_small 120 env OUT="$out" python benchmarks/profile_selection.py 32768,131072 9/3/64,4/1/256 0.1
    ;;
  search)
    # the query-aware threshold by radix selection against the sort, graphed to 1024 blocks
    # or not (search and operator against cuDNN, three shapes, 32k-128k), HBM bandwidth
    run gpu_tests_search 150 python -m pytest tests/test_selection.py tests/test_varlen.py tests/ops/test_varlen_kernels.py -q -p no:cacheprovider -m gpu
    run gpu_tests_radix 100 python -m pytest tests/test_selection.py -q -p no:cacheprovider -k radix
    run compare_search 330 env OUT="$out" python benchmarks/compare_search.py 32768,65536,131072
    ;;
  graph)
    # the whole search in one CUDA graph (indirect q/k addresses) against the tail-only graph
    # and eager; every kernel of the 32k search and the graph's head-chunk size
    run gpu_tests 150 python -m pytest tests/test_selection.py tests/test_varlen.py -q -m gpu -p no:cacheprovider
    run compare_search 240 env OUT="$out" python benchmarks/compare_search.py 32768,131072
    run search_kernels 120 env OUT="$out" python benchmarks/search_kernels.py 32768 9/3/64,4/1/256,32/8/128
    ;;
  suite2)
    # on a machine with 2 GPUs: GPU 0 the search with one pass (block statistics) against two and
    # the selection GPU tests; GPU 1 the whole suite (Llama + SmolLM2, then Gemma)
    ( CUDA_VISIBLE_DEVICES=0 COMPARE_SEARCH_VARIANTS=two_pass,default,block_stats \
        run compare_search 330 env OUT="$out" python benchmarks/compare_search.py 32768,65536,131072
      CUDA_VISIBLE_DEVICES=0 run gpu_tests_search 200 python -m pytest tests/test_selection.py tests/test_varlen.py tests/ops -q -m gpu -p no:cacheprovider ) &
    ( CUDA_VISIBLE_DEVICES=1 run bench_suite 330 python benchmarks/suite.py --out "$out/suite" \
        --lengths 8k,16k,32k,64k,128k,256k --max-minutes 4.3
      CUDA_VISIBLE_DEVICES=1 run bench_gemma 200 python benchmarks/suite.py --mode suite --shapes gemma3-270m \
        --out "$out/gemma_run" --max-minutes 2 ) &
    wait
    ;;
  varlen)
    run varlen_tests 150 python -m pytest tests/test_gpu_checks_varlen.py tests/test_varlen.py -q -m gpu -p no:cacheprovider
    run varlen_speed 150 env OUT="$out" python benchmarks/varlen_speed.py
    ;;
  wspaths)
    # the warp-specialised Gluon kernel on varlen and windowed calls: its GPU tests, then
    # windowed calls with it (default) and with the Triton kernel (varlen A/B: phase wsvarlen)
    run ws_tests 240 python -m pytest -q -m gpu -p no:cacheprovider tests/ops/test_varlen_kernels.py \
      tests/ops/test_sliding_window.py tests/test_sliding_window_api.py tests/ops/test_sparse_attention.py
    run compare_window 200 env OUT="$out" python benchmarks/compare_window_kernels.py
    ;;
  pool)
    # the search graph's memory, seeded pool vs not, default and 2^20-element head chunks
    run search_pool 330 env OUT="$out/pool" python benchmarks/search_pool.py 32768,131072
    ;;
  captured)
    run captured 540 python benchmarks/suite.py --mode model,suite --shapes smollm2-135m,gemma3-270m \
      --inputs synthetic,captured --lengths 8k,16k,32k --out "$out/captured" --max-minutes 5.8
    ;;
  wsvarlen)
    run varlen_ws_tests 150 python -m pytest tests/test_gpu_checks_varlen.py -q -m gpu -p no:cacheprovider
    run varlen_triton_tests 150 env FLEXPREFILL_HOPPER_KERNEL=0 python -m pytest tests/test_gpu_checks_varlen.py -q -m gpu -p no:cacheprovider
    run varlen_ws 150 env OUT="$out/varlen_ws" python benchmarks/varlen_speed.py
    run varlen_triton 150 env OUT="$out/varlen_triton" FLEXPREFILL_HOPPER_KERNEL=0 python benchmarks/varlen_speed.py
    ;;
  whole)
    run bench_models 150 python benchmarks/suite.py --mode model --out "$out/bench_models" --max-minutes 2
    run demo_gemma 90 python -m flexprefill_tools demo --model gemma3-270m --device cuda --out "$out/demo_gemma"
    run demo_smollm2 50 python -m flexprefill_tools demo --model smollm2-135m-instruct --device cuda --out "$out/demo_smollm2"
    run inspect_smollm2 60 python -m flexprefill_tools inspect --model smollm2-135m-instruct --device cuda --length 8192 --no-progress --out "$out/inspect_smollm2"
    ;;
  evals)
    run evals_gemma 220 python -m flexprefill_tools eval --model gemma3-270m --lengths 8k,16k,32k \
      --tasks niah_sweep,niah_multikey_1,vt,cwe --depths 0.1,0.5,0.9 --samples 1 \
      --methods full,flexprefill-g0.9,flexprefill-g0.95,streaming,vertical_slash_fixed --out "$out/evals" --max-minutes 2.8
    run evals_smollm2 100 python -m flexprefill_tools eval --model smollm2-135m-instruct --lengths 4k,8k \
      --tasks niah_sweep,niah_multikey_1,vt,cwe --depths 0.1,0.5,0.9 --samples 1 \
      --methods full,flexprefill-g0.9,flexprefill-g0.95,streaming,vertical_slash_fixed --out "$out/evals" --max-minutes 1.3
    ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
