"""Loaded packaged models: configs, greedy answers, the conversion cache."""

import json

import pytest
import torch

from flexprefill_tools import models
from flexprefill_tools.models import loading


def test_smollm2_config(smollm2):
    model, _ = smollm2
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads) == (9, 3, 64)
    assert c.num_hidden_layers == 30
    assert models.context_length(model) == 8192
    assert c._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training


@pytest.mark.slow
def test_gemma3_config(gemma3):
    model, _ = gemma3
    c = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 1, 256)
    assert c.sliding_window == 512
    assert len(c.layer_types) == 18
    assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert set(c.layer_types) == {"sliding_attention", "full_attention"}
    assert c.max_position_embeddings == 32768 == models.context_length(c)
    # chat turns end at <end_of_turn> as well as <eos>
    assert model.generation_config.eos_token_id == [1, 106]
    assert getattr(c, "quantization_config", None) is None


def _greedy(model, tok, prompt_ids, n):
    with torch.no_grad():
        out = model.generate(**prompt_ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, prompt_ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_smollm2_answers_a_chat_question(smollm2):
    model, tok = smollm2
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert "Paris" in _greedy(model, tok, ids, 10)


@pytest.mark.slow
def test_gemma3_completes_a_few_shot_prompt(gemma3):
    # the packaged Gemma 3 270M is the base (pretrained) model: it continues text rather than
    # following the chat template, so ask in a few-shot completion
    model, tok = gemma3
    prompt = "Q: What is the capital of Germany?\nA: Berlin\nQ: What is the capital of France?\nA:"
    assert "Paris" in _greedy(model, tok, tok(prompt, return_tensors="pt"), 4)


def test_second_load_reads_the_cache(smollm2, capfd):
    folder = models.packages.cache_root() / "smollm2-135m-instruct"
    key_file = folder / loading._KEY_FILE
    before = key_file.stat().st_mtime_ns
    capfd.readouterr()
    model, tok = models.load("smollm2-135m-instruct", dtype=torch.bfloat16, attn_implementation="eager")
    err = capfd.readouterr().err
    assert "loading cached conversion" in err and "converting" not in err
    assert key_file.stat().st_mtime_ns == before
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"


def test_gguf_path_of_a_packaged_model_shares_its_cache(smollm2, capfd):
    capfd.readouterr()
    model, tok = models.load(models.gguf_path("smollm2-135m-instruct"))
    assert "smollm2-135m-instruct" in capfd.readouterr().err
    assert tok.eos_token == "<|im_end|>"


def test_local_hf_folder_loads_directly(smollm2):
    folder = models.packages.cache_root() / "smollm2-135m-instruct"
    model, tok = models.load(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok("Paris")["input_ids"] == smollm2[1]("Paris")["input_ids"]


def test_cache_key_covers_source_and_transformers_version(tmp_path):
    key = loading._cache_key("ab" * 32)
    assert not loading.cache_is_valid(tmp_path, key)
    (tmp_path / loading._KEY_FILE).write_text(json.dumps(key))
    assert loading.cache_is_valid(tmp_path, key)
    assert not loading.cache_is_valid(tmp_path, {**key, "transformers": "0.0.1"})
    assert not loading.cache_is_valid(tmp_path, loading._cache_key("cd" * 32))
    (tmp_path / loading._KEY_FILE).write_text("{not json")
    assert not loading.cache_is_valid(tmp_path, key)


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(TypeError, match="dtype"):
        models.load("smollm2-135m-instruct", dtype="float32")
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"x")
    with pytest.raises(ValueError, match="name_or_path"):
        models.load(not_gguf, cache_dir=tmp_path)


def test_hf_folder_is_what_engines_load(smollm2):
    folder = models.hf_folder("smollm2-135m-instruct")
    assert folder == models.packages.cache_root() / "smollm2-135m-instruct"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert models.hf_folder(folder) == folder
