"""Entries of ``flexprefill.config.MIN_SEQ_LEN_BY_SHAPE`` from measured results.

    python benchmarks/min_seq_len_table.py --kind sm90 RESULTS.json [MORE.json ...]

Reads the rows of the speed benchmark (``results.json`` of ``benchmarks/suite.py``, modes suite
and breakeven), of ``benchmarks/gpu_pass_real_model.py`` (its summed per-model rows) and of
``benchmarks/cpu_attention.py`` (a list of CPU rows).  Per (head dim, query heads per KV head,
input kind) it takes the whole operator's time (search included) and the best dense kernel's
(cuDNN, else flash, else SDPA) at every length, and the break-even: the shortest length from
which the operator was faster at every longer measured length.  A shape's entry is the largest
break-even over its input kinds; a shape with an input kind that never wins gets none (it keeps
the fallback) and is reported.  A later row of the same case replaces an earlier one.  Prints
the entries as Python, ready to paste, and a table of the evidence.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import DENSE_METHODS, break_even_length  # noqa: E402

# the modes whose rows time the whole operator against dense attention on one layer's shape
_MODES = ("suite", "breakeven", "real_model")


def _rows(payload) -> list[dict]:
    """Operator and dense rows in one form: dict(D, G, input, N, method, ms)."""
    if isinstance(payload, list):
        out = []
        # benchmarks/cpu_attention.py: one row per (N, dtype, input) with both times
        for r in payload:
            if r.get("inputs") != "structured" or r.get("dtype") != "float32" or "total_ms" not in r:
                continue
            base = dict(D=r["D"], G=r["Hq"] // r["Hkv"], input="structured", N=r["N"])
            out += [dict(base, method="sdpa", ms=r["sdpa_ms"]), dict(base, method="flexprefill", ms=r["total_ms"])]
        return out
    out = []
    for r in payload.get("rows", []):
        if r.get("mode") not in _MODES or not r.get("ms") or "layer" in r:
            continue
        if r.get("method") not in DENSE_METHODS + ("flexprefill",):
            continue
        out.append(dict(D=r["D"], G=r["Hq"] // r["Hkv"], input=r["input"], N=r["N"], method=r["method"], ms=r["ms"]))
    return out


def table(payloads) -> tuple[dict, list[dict]]:
    """({(D, G): min_seq_len or None}, evidence rows) from loaded result payloads."""
    cases: dict = {}
    for payload in payloads:
        for r in _rows(payload):
            cases.setdefault((r["D"], r["G"], r["input"]), {}).setdefault(r["N"], {})[r["method"]] = r["ms"]
    evidence, by_shape = [], {}
    for (D, G, kind), by_n in sorted(cases.items()):
        lengths = sorted(by_n)
        flex = [by_n[n].get("flexprefill") for n in lengths]
        dense = [next((by_n[n][m] for m in DENSE_METHODS if m in by_n[n]), None) for n in lengths]
        n_be = break_even_length(lengths, flex, dense)
        speedups = [None if f is None or d is None else round(d / f, 2) for f, d in zip(flex, dense)]
        evidence.append(dict(D=D, G=G, input=kind, lengths=lengths, speedup=speedups, break_even=n_be))
        by_shape.setdefault((D, G), []).append(n_be)
    entries = {shape: (None if None in found else max(found)) for shape, found in by_shape.items()}
    return entries, evidence


def _n(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", required=True, help='device kind of the measurements: "sm90" (H100, H200), "cpu", ...')
    p.add_argument("results", nargs="+", help="result JSON files")
    args = p.parse_args(argv)
    entries, evidence = table([json.loads(Path(f).read_text()) for f in args.results])
    if not evidence:
        print("no operator and dense rows in these files", file=sys.stderr)
        return 1
    for e in evidence:
        pts = ", ".join(f"{_n(n)} {s}x" if s else f"{_n(n)} -" for n, s in zip(e["lengths"], e["speedup"]))
        print(f"# D={e['D']} G={e['G']} {e['input']}: {pts} -> break-even {e['break_even']}")
    for (D, G), n in sorted(entries.items()):
        if n is None:
            print(f"# ({args.kind!r}, {D}, {G}): never faster at the longest length of some input; no entry")
        else:
            print(f"    ({args.kind!r}, {D}, {G}): {n},")
    return 0


if __name__ == "__main__":
    sys.exit(main())
