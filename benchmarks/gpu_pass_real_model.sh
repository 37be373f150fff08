#!/usr/bin/env bash
# The real-model GPU pass (benchmarks/gpu_pass_real_model.py) on a machine with no network and no
# model packages: the GGUF travels in parts, one per call, and is joined and checked there.
#
# Here, once (needs the Qwen part packages or a copy of the GGUF, network for the two wheels):
#   bash benchmarks/gpu_pass_real_model.sh split [GGUF]
#     .gguf_chunks/: the GGUF in 48 MiB parts, their manifest and SHA-256
#     .whl/: gguf and needlehaystack wheels (the GPU image has neither), installed with --no-deps there
#   It prints the carry list of every call. 48 MiB: each call's working tree is at most 64 MiB,
#   and the tracked files (about 12 MB) travel with every call.
# There, one call per part, carrying .gguf_chunks/<part> and .gguf_chunks/<name>.{manifest.json,sha256}:
#   bash benchmarks/gpu_pass_real_model.sh receive
#     copies the carried parts to /root/m, checks each against the manifest, lists the missing ones
# There, the last call, carrying the last part, the manifest, the sha256 and .whl:
#   bash benchmarks/gpu_pass_real_model.sh run "$OUT" [arguments of gpu_pass_real_model.py]
#     receives, joins and verifies the GGUF, installs the wheels, runs the pass (OUT/real_model.json,
#     OUT/evals/results.jsonl, OUT/evals_summary.md, OUT/log.txt)
# The calls must follow each other while the machine is warm (/root/m is lost when it goes back).
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
name=qwen2.5-coder-0.5b-instruct
file=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
chunks=.gguf_chunks
store=${FLEXPREFILL_PARTS_DIR:-/root/m}
site=${FLEXPREFILL_SITE:-/tmp/site}
py=${PYTHON:-python}
command -v "$py" >/dev/null || py=python3

receive() {
  mkdir -p "$store"
  for f in "$chunks/$name".gguf.part* "$chunks/$name".manifest.json "$chunks/$name".sha256; do
    [ -f "$f" ] && cp "$f" "$store/"
  done
  "$py" scripts/gguf_chunks.py check "$store" "$name"
}

case "${1:-}" in
  split)
    src_arg=()
    [ -n "${2:-}" ] && src_arg=(--source "$2")
    PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} "$py" scripts/gguf_chunks.py split "$name" "$chunks" --chunk-mb 48 "${src_arg[@]}" || exit 1
    mkdir -p .whl
    ls .whl/gguf-*.whl >/dev/null 2>&1 || "$py" -m pip download -q --no-deps gguf==0.19.0 -d .whl || exit 1
    ls .whl/needlehaystack-*.whl >/dev/null 2>&1 || "$py" -m pip download -q --no-deps needlehaystack==0.1.0 -d .whl || exit 1
    for d in "$chunks" .whl; do
      git check-ignore -q "$d" || echo "warning: $d is not ignored by git: it would travel with every call"
    done
    parts=("$chunks/$name".gguf.part*)
    last=$((${#parts[@]} - 1))
    echo "carry, one call each (command: bash benchmarks/gpu_pass_real_model.sh receive):"
    for i in "${!parts[@]}"; do
      [ "$i" -lt "$last" ] && echo "  [\"${parts[$i]}\", \"$chunks/$name.manifest.json\", \"$chunks/$name.sha256\"]"
    done
    echo "the last call (command: bash benchmarks/gpu_pass_real_model.sh run \$OUT):"
    echo "  [\"${parts[$last]}\", \"$chunks/$name.manifest.json\", \"$chunks/$name.sha256\", \".whl\"]"
    ;;
  receive)
    receive
    rc=$?
    [ $rc -eq 1 ] && exit 1
    exit 0
    ;;
  run)
    out=${2:?output folder}
    shift 2
    mkdir -p "$out"
    receive || { echo "parts are missing or corrupt: receive them first"; exit 1; }
    mkdir -p "$store/gguf"
    if [ ! -f "$store/gguf/$file" ]; then
      "$py" scripts/gguf_chunks.py join "$store" "$name" "$store/gguf/$file" || exit 1
    fi
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
    export PYTHONPATH="$here/src:$site" FLEXPREFILL_GGUF_DIR="$store/gguf" FLEXPREFILL_CACHE="${FLEXPREFILL_CACHE:-/root/.cache/flexprefill}" \
      HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    set -o pipefail
    "$py" benchmarks/gpu_pass_real_model.py --out "$out" "$@" 2>&1 | tee "$out/log.txt"
    ;;
  *)
    echo "usage: $0 split | receive | run OUT [args]"; exit 2 ;;
esac
