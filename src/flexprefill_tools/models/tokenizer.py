"""Tokenizers rebuilt from GGUF metadata.

transformers 5.x turns the SentencePiece vocabulary of a Gemma GGUF into a Unigram model
scored with BPE ranks, which cuts words into one- and two-letter pieces. Gemma's real
tokenizer is a SentencePiece BPE model (tokenizer.ggml.model == "llama", no merges in the
file): merges are recovered from the piece scores, user-defined pieces (newline and space
runs, html tags) are matched whole before BPE, control pieces are special tokens, unknown
characters fall back to <0xNN> byte pieces. Tested by round trips and token counts in
tests/models/test_tokenizers.py; the ids of a few words match Gemma 3's published ones.
"""

from __future__ import annotations

import struct
from pathlib import Path

# sentencepiece piece types as stored in tokenizer.ggml.token_type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# the chat template of google/gemma-3-*: the GGUF of the 270M model carries none
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
            10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY, _BOOL = 8, 9, 7


def gguf_metadata(path: str | Path, *, tokenizer: bool = True) -> dict:
    """Key/value metadata of a GGUF file (format v2/v3) as plain Python values.

    A direct read of the header: ``gguf.GGUFReader`` builds one numpy view per array item
    and takes ~40 s on Gemma's 262k-piece vocabulary. With ``tokenizer=False`` the
    tokenizer arrays are skipped.
    """
    import numpy as np

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (bad magic)")
        version, _, n_kv = struct.unpack("<IQQ", f.read(20))
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported (need >= 2)")

        def read(n):
            b = f.read(n)
            if len(b) != n:
                raise ValueError(f"{path}: truncated GGUF header")
            return b

        def string():
            (n,) = struct.unpack("<Q", read(8))
            return read(n).decode("utf-8", errors="replace")

        def value(vtype, keep=True):
            if vtype == _STRING:
                return string()
            if vtype in _SCALARS:
                dt = np.dtype(_SCALARS[vtype])
                v = np.frombuffer(read(dt.itemsize), dt)[0].item()
                return bool(v) if vtype == _BOOL else v
            if vtype == _ARRAY:
                itype, n = struct.unpack("<IQ", read(12))
                if itype in _SCALARS:
                    dt = np.dtype(_SCALARS[itype])
                    if not keep:
                        f.seek(n * dt.itemsize, 1)
                        return None
                    return np.frombuffer(read(n * dt.itemsize), dt).tolist()
                return [value(itype, keep) for _ in range(n)]
            raise ValueError(f"{path}: unknown GGUF value type {vtype}")

        meta = {}
        for _ in range(n_kv):
            key = string()
            (vtype,) = struct.unpack("<I", read(4))
            keep = tokenizer or not (key.startswith("tokenizer.ggml.") and vtype == _ARRAY)
            v = value(vtype, keep)
            if keep:
                meta[key] = v
    return meta


def gguf_architecture(path: str | Path) -> str:
    """``general.architecture`` of a GGUF file, e.g. "llama" or "gemma3"."""
    return gguf_metadata(path, tokenizer=False)["general.architecture"]


def needs_sentencepiece_fix(meta: dict) -> bool:
    """True for GGUFs whose tokenizer transformers builds wrongly (Gemma family)."""
    arch = meta.get("general.architecture", "")
    return (
        arch.startswith("gemma")
        and meta.get("tokenizer.ggml.model") == "llama"
        and "tokenizer.ggml.merges" not in meta
    )


def _bpe_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    # sentencepiece BPE merges the adjacent pair whose joined piece scores highest; HF BPE
    # merges the pair of lowest rank, so rank every split of a normal piece by its score
    rank = {t: (s, i) for i, (t, s, ty) in enumerate(zip(tokens, scores, types)) if ty == _NORMAL}
    merges = []
    for piece, (score, idx) in rank.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in rank and right in rank:
                merges.append((-score, idx, rank[left][1], rank[right][1], left, right))
    merges.sort()
    return [(m[4], m[5]) for m in merges]


def sentencepiece_bpe_tokenizer(meta: dict):
    """A ``PreTrainedTokenizerFast`` equivalent to a GGUF's SentencePiece BPE tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    tokens = list(meta["tokenizer.ggml.tokens"])
    scores = [float(s) for s in meta["tokenizer.ggml.scores"]]
    types = [int(t) for t in meta["tokenizer.ggml.token_type"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate pieces; cannot build a BPE tokenizer")

    def piece(key, default=None):
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(idx)] if idx is not None else default

    unk, bos, eos, pad = piece("unknown", "<unk>"), piece("bos"), piece("eos"), piece("padding")
    backend = Tokenizer(
        BPE(vocab=vocab, merges=_bpe_merges(tokens, scores, types), unk_token=unk,
            fuse_unk=True, byte_fallback=True)
    )
    # gemma's spm normaliser: no NFKC, no dummy prefix, spaces escaped as '▁'
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    backend.normalizer = (
        normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        if prefix else normalizers.Replace(" ", "▁")
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    # user-defined pieces hold raw text ('\n\n', '   ', '<table>'): matched whole before BPE
    # as sentencepiece does; control pieces only come from the chat template
    added = [
        AddedToken(t, special=ty == _CONTROL, normalized=False)
        for t, ty in zip(tokens, types)
        if ty in (_CONTROL, _USER_DEFINED)
    ]
    backend.add_tokens(added)

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    specials = [(t, vocab[t]) for t in {bos, eos} if t is not None and (add_bos or add_eos)]
    if specials:
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=specials
        )

    template = meta.get("tokenizer.chat_template")
    if template is None and meta.get("general.architecture") == "gemma3":
        template = GEMMA3_CHAT_TEMPLATE
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        chat_template=template,
        clean_up_tokenization_spaces=False,
    )
    return tok


def tokenizer_from_gguf(path: str | Path, meta: dict | None = None):
    """The tokenizer of a GGUF file: rebuilt for Gemma, transformers' own otherwise."""
    meta = gguf_metadata(path) if meta is None else meta
    if needs_sentencepiece_fix(meta):
        return sentencepiece_bpe_tokenizer(meta)
    from transformers import AutoTokenizer

    path = Path(path)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # transformers 5.17 takes SmolLM2's eos as <|im_start|> and drops its pad: use the file's ids
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens:
        for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
            idx = meta.get(f"tokenizer.ggml.{key}_token_id")
            if idx is not None and 0 <= int(idx) < len(tokens):
                setattr(tok, f"{role}_token", tokens[int(idx)])
    return tok
