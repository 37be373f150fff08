"""The ``flexprefill`` command: help, the needle prompt, and the demo end to end on a tiny random model."""

import json
import os
import shutil
import subprocess

import pytest
import torch

import transformers

from flexprefill_tools import cli, demo

HAYSTACK = " ".join(
    f"Essay {i} says that startups grow when founders talk to users and write code every day." for i in range(400)
)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|user|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _tokenizer(chat: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([HAYSTACK, demo.HEAD, demo.NEEDLE, demo.QUESTION, demo.ANSWER_PREFIX, "0123456789"], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def chat_tokenizer():
    return _tokenizer(chat=True)


def _tiny_llama(vocab: int):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=vocab,
        max_position_embeddings=2048,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--model", "--length", "--gamma", "--tau", "--block-size", "--device", "--dtype", "--depth",
                "--seed", "--min-seq-len", "--out"):
        assert opt in text


@pytest.mark.skipif(shutil.which("flexprefill") is None, reason="console script not installed")
def test_console_script_help():
    res = subprocess.run(["flexprefill", "demo", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--block-size" in res.stdout


@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "plain"])
@pytest.mark.parametrize("length,depth", [(600, 0.5), (700, 0.0), (500, 1.0)])
def test_needle_prompt_fits_length_and_holds_the_needle(chat, length, depth):
    tok = _tokenizer(chat)
    s = demo.build_needle_prompt(tok, HAYSTACK, length, depth=depth, seed=3)
    n = len(s["input_ids"])
    assert length - 16 <= n <= length
    assert len(s["number"]) == 7 and s["number"].isdigit()
    number, key = demo.needle_key(3)
    assert s["number"] == number and "-" in key
    # the needle once, the key's question before and after the essays, the answer prefix last
    needle = f"The special magic number for {key} is #{number}."
    assert s["prompt"].count(needle) == 1 and s["prompt"].count(number) == 1
    assert 0 <= s["prompt"].find(demo.HEAD.format(key=key)) < s["prompt"].find(needle)
    assert s["prompt"].find(needle) < s["prompt"].rfind(demo.QUESTION.format(key=key))
    assert s["prompt"].endswith(demo.ANSWER_PREFIX.format(key=key))
    assert number not in demo.QUESTION.format(key=key) + demo.ANSWER_PREFIX.format(key=key)
    assert abs(s["depth"] - depth) < 0.1
    assert (s["prompt"].startswith("<s><|user|>") if chat else not s["prompt"].startswith("<s>"))
    # same seed, same number; another seed, another number
    assert demo.build_needle_prompt(tok, HAYSTACK, length, depth=depth, seed=3)["number"] == s["number"]
    assert demo.build_needle_prompt(tok, HAYSTACK, length, depth=depth, seed=4)["number"] != s["number"]


def test_demo_end_to_end_on_tiny_model(tmp_path, capsys, chat_tokenizer):
    model = _tiny_llama(len(chat_tokenizer))
    out_dir = tmp_path / "demo"
    args = cli.build_parser().parse_args(
        ["demo", "--length", "320", "--block-size", "32", "--device", "cpu", "--max-new-tokens", "3",
         "--plot-heads", "3", "--out", str(out_dir), "--no-progress", "--seed", "7"]
    )
    report = demo.run_demo(args, model=model, tokenizer=chat_tokenizer, haystack=HAYSTACK)
    text = capsys.readouterr().out
    for field in ("prompt", "dense SDPA", "FlexPrefill", "found needle:", "prefill", "speed-up", "density per layer",
                  "mean density", "plot"):
        assert field in text
    png = out_dir / "block_masks.png"
    assert png.is_file() and png.stat().st_size > 1000
    assert report["plot"] == str(png)
    saved = json.loads((out_dir / "demo.json").read_text())
    assert saved["prompt_tokens"] == report["prompt_tokens"] and 300 <= report["prompt_tokens"] <= 320
    # FlexPrefill really ran on every layer of the prompt (min_seq_len defaults below the length)
    assert report["config"]["min_seq_len"] <= report["prompt_tokens"]
    assert sorted(report["density_per_layer"]) == [0, 1]
    assert all(0 < d <= 1 for d in report["density_per_layer"].values())
    assert report["dense_layers"] == {}
    assert report["dense"]["prefill_s"] > 0 and report["flexprefill"]["prefill_s"] > 0
    for key in ("dense", "flexprefill"):
        assert report[key]["found"] == (report["magic_number"] in report[key]["answer"])
    # the model is given back as it came
    assert model.config._attn_implementation == "sdpa"


def test_demo_dense_above_runs_dense_layers(tmp_path, capsys, chat_tokenizer):
    """--dense-above under every layer's density: each layer runs dense, and the report says so."""
    model = _tiny_llama(len(chat_tokenizer))
    args = cli.build_parser().parse_args(
        ["demo", "--length", "320", "--block-size", "32", "--device", "cpu", "--max-new-tokens", "2",
         "--out", str(tmp_path / "demo"), "--no-progress", "--dense-above", "0.01"]
    )
    report = demo.run_demo(args, model=model, tokenizer=chat_tokenizer, haystack=HAYSTACK)
    text = capsys.readouterr().out
    assert report["config"]["dense_above"] == 0.01
    assert report["density_per_layer"] == {}
    assert report["dense_layers"] == {0: "dense_above", 1: "dense_above"}
    assert "dense_above" in text


def test_plot_block_masks_from_selection(tmp_path):
    import flexprefill
    from flexprefill_tools.plotting import plot_block_masks

    torch.manual_seed(0)
    q, k = torch.randn(1, 256, 4, 64), torch.randn(1, 256, 2, 64)
    sel = flexprefill.select_blocks(q, k, config=flexprefill.FlexPrefillConfig(block_size=32, min_budget=32))
    path = plot_block_masks(sel, None, str(tmp_path / "sub" / "sel.png"))
    assert os.path.getsize(path) > 1000
    with pytest.raises(ValueError, match="titles"):
        plot_block_masks(sel, ["only one"], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="square"):
        plot_block_masks([torch.ones(3, 4, dtype=torch.bool)], None, str(tmp_path / "y.png"))


@pytest.mark.parametrize("command,word", [("eval", "--tasks"), ("tp-check", "--check-positions")])
def test_delegated_subcommands_reach_their_modules(command, word, capsys):
    from flexprefill_tools.cli import main

    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert word in capsys.readouterr().out


def test_inspect_end_to_end_on_tiny_model(tmp_path, capsys, chat_tokenizer):
    from flexprefill_tools.inspector import run_inspect

    model = _tiny_llama(len(chat_tokenizer))
    out_dir = tmp_path / "inspect"
    args = cli.build_parser().parse_args(
        ["inspect", "--length", "300", "--block-size", "32", "--device", "cpu", "--layers", "1", "--heads", "3",
         "--out", str(out_dir), "--no-progress"]
    )
    report = run_inspect(args, model=model, tokenizer=chat_tokenizer, text=HAYSTACK * 3)
    text = capsys.readouterr().out
    assert "layer  mean density" in text and "pictures" in text
    assert report["tokens"] == 300 and sorted(report["layers"]) == ["0", "1"]
    for heads in report["layers"].values():
        assert len(heads) == 4
        for h in heads:
            assert 0 < h["density"] <= 1 and h["blocks"] > 0 and h["pattern"] in ("query_aware", "vertical_slash")
            assert (h["pattern"] == "query_aware") == (h["js_distance"] < 0.1)
    for name in ("patterns.png", "layer_1.png"):
        png = out_dir / name
        assert png.is_file() and png.stat().st_size > 1000
    assert not (out_dir / "layer_0.png").exists()
    assert json.loads((out_dir / "inspect.json").read_text())["tokens"] == 300
    assert model.config._attn_implementation == "sdpa"  # given back as it came
    with pytest.raises(SystemExit, match="not FlexPrefill layers"):
        run_inspect(cli.build_parser().parse_args(["inspect", "--layers", "7", "--device", "cpu", "--length", "300",
                                                   "--block-size", "32", "--out", str(out_dir), "--no-progress"]),
                    model=model, tokenizer=chat_tokenizer, text=HAYSTACK * 3)
