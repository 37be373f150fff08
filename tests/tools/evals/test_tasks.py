import pytest

from flexprefill_tools.evals import tasks
from flexprefill_tools.evals.tasks import TASKS, encode, generate

TARGET = 1024


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic_with_seed(tokenizer, task):
    a = generate(task, tokenizer, TARGET, seed=3, depth=0.4)
    b = generate(task, tokenizer, TARGET, seed=3, depth=0.4)
    c = generate(task, tokenizer, TARGET, seed=4, depth=0.4)
    assert (a.prompt, a.answers) == (b.prompt, b.answers)
    assert a.answers != c.answers


@pytest.mark.parametrize("target", [512, 1024, 3000])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_prompt_length_within_a_few_tokens(tokenizer, task, target):
    s = generate(task, tokenizer, target, seed=1)
    n = len(encode(tokenizer, s.prompt))
    assert target - 8 <= n <= target, (task, target, n)
    assert s.meta["num_tokens"] == n


def test_prompt_length_without_chat_template(plain_tokenizer):
    s = generate("niah_single_1", plain_tokenizer, 700, seed=0)
    ids = encode(plain_tokenizer, s.prompt)
    assert 692 <= len(ids) <= 700
    assert not s.prompt.startswith("<s>") and "<|user|>" not in s.prompt


def test_chat_template_and_answers_in_prompt(tokenizer):
    for task in TASKS:
        s = generate(task, tokenizer, TARGET, seed=2)
        assert s.prompt.startswith("<s><|user|>\n")
        assert "<|assistant|>\n" in s.prompt
        for a in s.answers:
            assert a in s.prompt, (task, a)


def _token_index(tokenizer, ids, char_idx):
    """First token whose decoded prefix reaches past ``char_idx`` (byte-level BPE decodes prefixes exactly)."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[: mid + 1])) > char_idx:
            hi = mid
        else:
            lo = mid + 1
    return lo


@pytest.mark.parametrize("haystack", ["noise", "essay"])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.35, 0.5, 0.8, 1.0])
def test_needle_at_stated_depth(tokenizer, haystack, depth):
    s = tasks.niah(tokenizer, TARGET, seed=5, haystack=haystack, depth=depth)
    ids = encode(tokenizer, s.prompt)
    assert tokenizer.decode(ids) == s.prompt
    needle = s.meta["needles"][0]
    assert s.answers[0] in needle and s.prompt.count(needle) == 1
    start_c = s.prompt.index("afterwards.\n") + len("afterwards.\n")
    end_c = s.prompt.index("\nWhat are all the special magic")
    t0, t1 = _token_index(tokenizer, ids, start_c), _token_index(tokenizer, ids, end_c)
    t_needle = _token_index(tokenizer, ids, s.prompt.index(needle))
    n_needle = _token_index(tokenizer, ids, s.prompt.index(needle) + len(needle) - 1) + 1 - t_needle
    # depth: haystack tokens before the needle over all haystack tokens
    measured = (t_needle - t0) / (t1 - t0 - n_needle)
    assert t1 - t0 > 0.8 * TARGET
    assert abs(measured - depth) <= 0.05, (measured, depth)
    assert abs(s.meta["depth_actual"][0] - measured) <= 0.01
    if depth == 0.0:
        assert t_needle - t0 <= 1
    if depth == 1.0:
        assert t1 - (t_needle + n_needle) <= 3


def test_multi_needle_variants(tokenizer):
    mk = generate("niah_multikey_1", tokenizer, TARGET, seed=0)
    assert len(mk.meta["needles"]) == 4 and len(mk.answers) == 1
    mv = generate("niah_multivalue", tokenizer, TARGET, seed=0)
    assert len(mv.answers) == 4 and len({n.split(" is:")[0] for n in mv.meta["needles"]}) == 1
    mq = generate("niah_multiquery", tokenizer, TARGET, seed=0)
    assert len(mq.answers) == 4 and len({n.split(" is:")[0] for n in mq.meta["needles"]}) == 4
    u = generate("niah_single_3", tokenizer, TARGET, seed=0)
    assert len(u.answers[0]) == 36 and u.answers[0].count("-") == 4


def test_variable_tracking_chain_in_order(tokenizer):
    s = generate("vt", tokenizer, TARGET, seed=7)
    pos = [s.prompt.index(n) for n in s.meta["needles"]]
    assert pos == sorted(pos)
    value = s.meta["needles"][0].split("= ")[1].rstrip(".")
    assert f"assigned the value {value}" in s.prompt and len(s.answers) == 5


def test_common_words_counts(tokenizer):
    import re
    from collections import Counter

    s = generate("cwe", tokenizer, 2048, seed=0)
    listed = re.findall(r"\d+\. ([a-z]+)", s.prompt.split("most often.\n")[1].split("\nQuestion")[0])
    counts = Counter(listed)
    assert sorted(w for w, _ in counts.most_common(len(s.answers))) == sorted(s.answers)
    assert min(counts[a] for a in s.answers) > max(c for w, c in counts.items() if w not in s.answers)


def test_frequent_words_counts(tokenizer):
    from collections import Counter

    s = generate("fwe", tokenizer, 2048, seed=0)
    text = s.prompt.split("coded words. ")[1].split("\nQuestion")[0]
    counts = Counter(text.split())
    ranked = [w for w, _ in counts.most_common() if w != "...."]
    assert ranked[:3] == s.answers
    assert counts[ranked[2]] > counts[ranked[3]]


def test_too_short_target_rejected(tokenizer):
    with pytest.raises(ValueError, match="too short"):
        generate("niah_single_2", tokenizer, 20, seed=0)
    with pytest.raises(ValueError, match="task="):
        generate("qa", tokenizer, 512, seed=0)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_copy_prefix_ends_with_the_needle_words(tokenizer, depth):
    ruler = generate("niah_single_2", tokenizer, TARGET, seed=6, depth=depth)
    s = generate("niah_single_2_copy", tokenizer, TARGET, seed=6, depth=depth)
    assert s.answers == ruler.answers and len(s.answers) == 1
    number, needle = s.answers[0], s.meta["needles"][0]
    key = needle.split(" for ")[1].split(" is:")[0]
    assert needle == f"One of the special magic numbers for {key} is: #{number}."
    assert s.prompt.count(needle) == 1 and s.prompt.count(number) == 1
    # the prompt ends with the needle's words up to the value; the question names only the key
    assert s.prompt.endswith(f"One of the special magic numbers for {key} is: #")
    assert f"What are all the special magic numbers for {key} mentioned in the provided text?" in s.prompt
    assert abs(s.meta["depth_actual"][0] - depth) <= 0.05
    n = len(encode(tokenizer, s.prompt))
    assert TARGET - 8 <= n <= TARGET
    # multi-key distractors carry the marker too, so it does not single out the answer
    mk = tasks.niah(tokenizer, TARGET, seed=1, haystack="essay", num_keys=4, copy_prefix=True)
    assert all(": #" in x for x in mk.meta["needles"]) and mk.prompt.count(mk.answers[0]) == 1
    with pytest.raises(ValueError, match="copy_prefix"):
        tasks.niah(tokenizer, TARGET, seed=1, num_values=2, copy_prefix=True)
    with pytest.raises(ValueError, match="copy_prefix"):
        tasks.niah(tokenizer, TARGET, seed=1, num_keys=2, num_queries=2, copy_prefix=True)
