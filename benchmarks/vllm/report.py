"""The JSON report the vLLM benchmarks write: their rows plus the environment stamp."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_report(report: dict, out: str | None) -> None:
    """Adds ``report["stamp"]`` (card, versions, commit; the error text when it cannot be read)
    and writes the report as JSON to ``out`` (nothing written when ``out`` is empty)."""
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
        from flexprefill_tools.stamp import env_stamp

        report["stamp"] = env_stamp()
    except Exception as e:  # noqa: BLE001 - a report without a stamp still carries the numbers
        report["stamp"] = {"error": str(e)}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1))
