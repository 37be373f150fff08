"""Tokenizers of the packaged models: exact round trips, word-level pieces, Gemma's special pieces."""

import math

import pytest
import torch

from flexprefill_tools import models
from flexprefill_tools.models import tokenizer as gguf_tok

TEXTS = [
    pytest.param("The quick brown fox jumps over the lazy dog.", id="prose"),
    pytest.param("def f(x):\n\treturn {'a': [1, 2.5e-3]}  # comment\n", id="code"),
    pytest.param("Numbers: 3.14159, 1,000,000 and 2024-05-01; -42.", id="numbers"),
    pytest.param("Ünïcödé: 日本語, émoji 🤗🦜, Ελληνικά, ∑∫√ and a NBSP\u00a0here", id="unicode"),
    pytest.param("  leading and trailing spaces  ", id="edge-spaces"),
    pytest.param("multiple\n\n\nnewlines   and    spaces\r\n", id="whitespace-runs"),
    pytest.param("<start_of_turn> and <|im_start|> typed as text", id="special-lookalikes"),
]
SENTENCE = "The committee approved the new budget after a long debate yesterday."


# gemma's first load converts its GGUF (~1 min on 2 cores): its cases carry the slow marker
@pytest.fixture(scope="module", params=["smollm2", pytest.param("gemma3", marks=pytest.mark.slow)])
def tok(request):
    return request.getfixturevalue(request.param)[1]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if "start_of_turn" in text or "im_start" in text:
        # typed special tokens are parsed as special, as in the original tokenizers;
        # decode keeps them unless asked to skip
        assert tok.decode(ids) == text
        return
    assert tok.decode(ids) == text
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_tokens_are_words_not_characters(tok):
    the = tok(" the", add_special_tokens=False)["input_ids"]
    assert len(the) == 1, tok.convert_ids_to_tokens(the)
    n = len(tok(SENTENCE, add_special_tokens=False)["input_ids"])
    # 11 words and a full stop; a character-level tokenizer gives ~70
    assert 11 <= n <= 15, tok.tokenize(SENTENCE)


def test_haystack_is_about_150k_tokens(tok):
    n = len(tok(models.haystack_text(), add_special_tokens=False)["input_ids"])
    assert 130_000 < n < 180_000


@pytest.mark.slow
def test_gemma_sentencepiece_details(gemma3):
    _, tok = gemma3
    # ids of google/gemma-3's tokenizer for this sentence (bos, then one id per word)
    assert tok("The capital of France is Paris.")["input_ids"] == [2, 818, 5279, 529, 7001, 563, 9079, 236761]
    # user-defined pieces are matched whole; digits are split one by one
    assert tok.tokenize("a\n\nb   c") == ["a", "\n\n", "b", "   ", "c"]
    assert tok.tokenize("2024") == ["2", "0", "2", "4"]
    # bytes outside the vocabulary fall back to <0xNN> pieces
    assert tok.tokenize("𓀀") == ["<0xF0>", "<0x93>", "<0x80>", "<0x80>"]
    assert tok.decode(tok("x𓀀y", add_special_tokens=False)["input_ids"]) == "x𓀀y"
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    ids = tok(chat, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [2, 105] and 106 in ids
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (2, 1, 0, 3)


def test_smollm2_chat_template(smollm2):
    _, tok = smollm2
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # transformers reads eos as <|im_start|> from this GGUF; load() sets the GGUF's ids
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")


@pytest.mark.slow
def test_gemma_perplexity_on_prose_is_that_of_a_language_model(gemma3):
    # a tokenizer that differs from the training one makes the loss far larger; measured on
    # these 256 tokens: ppl 26.6 here, 1881 when the same text is cut into single characters
    model, tok = gemma3
    ids = tok(models.haystack_text(max_chars=4000), return_tensors="pt")["input_ids"][:, :256]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert math.exp(loss) < 40


@pytest.mark.slow
def test_rebuilt_tokenizer_from_a_gguf_path_matches_the_cached_one(gemma3):
    # what load() does for a bare .gguf path: detect gemma from metadata and rebuild
    path = models.gguf_path("gemma3-270m")
    meta = gguf_tok.gguf_metadata(path)
    assert gguf_tok.needs_sentencepiece_fix(meta)
    rebuilt = gguf_tok.tokenizer_from_gguf(path, meta)
    text = "Hello   world\n\n\tdef f(x): return 12 # 🤗 <end_of_turn>"
    assert rebuilt(text)["input_ids"] == gemma3[1](text)["input_ids"]
    assert rebuilt.chat_template == gemma3[1].chat_template


def test_smollm2_gguf_keeps_transformers_tokenizer():
    meta = gguf_tok.gguf_metadata(models.gguf_path("smollm2-135m-instruct"), tokenizer=False)
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert not gguf_tok.needs_sentencepiece_fix(meta)
    assert "tokenizer.ggml.tokens" not in meta


@pytest.mark.slow
def test_metadata_reader_agrees_with_gguf_package():
    import gguf  # the tools extra brings it
    path = models.gguf_path("smollm2-135m-instruct")
    ours = gguf_tok.gguf_metadata(path)
    fields = gguf.GGUFReader(str(path)).fields
    for key, field in fields.items():
        if key.startswith("GGUF."):
            continue
        theirs = field.contents()
        if isinstance(theirs, float):
            assert ours[key] == pytest.approx(theirs), key
        else:
            assert ours[key] == theirs, key
    assert len(ours) == len([k for k in fields if not k.startswith("GGUF.")])
