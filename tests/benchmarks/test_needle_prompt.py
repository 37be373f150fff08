"""The benchmark's whole-model mode asks the same needle as ``flexprefill demo``."""

import harness

from flexprefill_tools import demo, models


def test_bench_needle_prompt_is_the_demo_prompt(smollm2):
    _, tok = smollm2
    ids, number = harness.needle_prompt(tok, 1200)
    sample = demo.build_needle_prompt(tok, models.haystack_text(), 1200)
    assert ids == sample["input_ids"] and number == sample["number"]
    assert 1200 - 16 <= len(ids) <= 1200
    text = tok.decode(ids)
    assert text.count(number) == 1, "the number appears once: in the needle, never in the question"
