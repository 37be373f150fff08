"""The packaged SmolLM2 finds the demo's needle with dense SDPA and with FlexPrefill (fp32, CPU)."""

import pytest

import flexprefill
from flexprefill_tools import demo, models
from flexprefill.integrations import transformers as tf

LENGTH = 1536


@pytest.fixture(scope="module")
def needle(smollm2):
    _, tok = smollm2
    return demo.build_needle_prompt(tok, models.haystack_text(max_chars=40_000), LENGTH, depth=0.5, seed=0)


def _greedy(model, tok, ids):
    return demo._answer(model, tok, ids, demo.MAX_NEW_TOKENS, "test", progress=False)[0]


def test_smollm2_finds_the_needle_with_dense_attention(smollm2, needle):
    model, tok = smollm2
    assert LENGTH - 8 <= len(needle["input_ids"]) <= LENGTH
    assert needle["number"] in _greedy(model, tok, needle["input_ids"])


# about 7 s each on 2 CPU cores (the CPU path of FlexPrefill is the fp32 reference)
@pytest.mark.slow
@pytest.mark.parametrize("gamma", [0.9, 0.95])
def test_smollm2_finds_the_needle_with_flexprefill(smollm2, needle, gamma):
    model, tok = smollm2
    # min_seq_len below the prompt length: FlexPrefill really runs on every layer;
    # a small min_budget keeps the pattern sparse at 1.5k tokens (12 blocks of 128)
    cfg = flexprefill.FlexPrefillConfig(block_size=128, gamma=gamma, tau=0.1, min_budget=256, min_seq_len=512)
    flexprefill.patch(model, cfg, collect_stats=True)
    try:
        assert model.config._attn_implementation == "flexprefill"
        answer = _greedy(model, tok, needle["input_ids"])
        record = tf.last_record(model, prefill=True)
        stats = tf.last_stats(model)
    finally:
        flexprefill.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert {r.path for r in record.values()} == {"flexprefill"} and len(record) == model.config.num_hidden_layers
    density = sum(float(s.density.float().mean()) for s in stats.values()) / len(stats)
    assert density < 0.8, density  # measured 0.58 (gamma 0.9), 0.69 (0.95)
    assert needle["number"] in answer, (answer, density)
