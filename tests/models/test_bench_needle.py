"""The benchmark's whole-model mode asks the same needle as ``flexprefill demo``."""

from flexprefill import benchmarking, cli, models


def test_bench_needle_prompt_is_the_demo_prompt(smollm2):
    _, tok = smollm2
    ids, number = benchmarking.needle_prompt(tok, 1200)
    demo = cli.build_needle_prompt(tok, models.haystack_text(), 1200)
    assert ids == demo["input_ids"] and number == demo["number"]
    assert 1200 - 16 <= len(ids) <= 1200
    text = tok.decode(ids)
    assert text.count(number) == 1, "the number appears once: in the needle, never in the question"
