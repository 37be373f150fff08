"""RULER's scoring: the fraction of expected strings found in the prediction (case-insensitive)."""

from __future__ import annotations

__all__ = ["string_match_all", "string_match_part", "score"]


def string_match_all(prediction: str, answers: list[str]) -> float:
    """Fraction of ``answers`` that occur in ``prediction`` (RULER's metric for the synthetic tasks)."""
    if not answers:
        raise ValueError("answers is empty: a case needs at least one expected string")
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def string_match_part(prediction: str, answers: list[str]) -> float:
    """1.0 if any of ``answers`` occurs in ``prediction`` (RULER's metric for QA), else 0.0."""
    if not answers:
        raise ValueError("answers is empty: a case needs at least one expected string")
    pred = prediction.lower()
    return float(any(a.lower() in pred for a in answers))


def score(prediction: str, answers: list[str], *, metric: str = "all") -> float:
    """Score one prediction with ``metric`` "all" (string_match_all) or "part" (string_match_part)."""
    if metric == "all":
        return string_match_all(prediction, answers)
    if metric == "part":
        return string_match_part(prediction, answers)
    raise ValueError(f"metric={metric!r} is not supported; accepted: 'all', 'part'")
