import pytest

from flexprefill_tools.evals.scoring import score, string_match_all, string_match_part


def test_right_answer_scores_one():
    assert string_match_all("The special magic number is 1234567.", ["1234567"]) == 1.0


def test_wrong_answer_scores_zero():
    assert string_match_all("The special magic number is 7654321.", ["1234567"]) == 0.0


def test_partial_answer_scores_the_fraction_found():
    assert string_match_all("abc and DEF", ["abc", "def", "ghi", "jkl"]) == 0.5
    assert string_match_part("abc and DEF", ["abc", "zzz"]) == 1.0
    assert string_match_part("nothing", ["abc", "zzz"]) == 0.0


def test_case_insensitive():
    assert score("Answer: VQLQL, qgavc", ["vqlql", "QGAVC", "KFSWR"]) == pytest.approx(2 / 3)


def test_empty_answers_rejected():
    with pytest.raises(ValueError, match="answers"):
        string_match_all("x", [])
    with pytest.raises(ValueError, match="metric"):
        score("x", ["x"], metric="best")
