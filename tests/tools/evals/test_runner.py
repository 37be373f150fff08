import pytest

from flexprefill_tools.evals.runner import case_key, make_cases, parse_method, split_methods

SHARED = {"block_size": 64, "min_budget": 128, "max_budget": None, "min_seq_len": 0}


def test_parse_methods_short_and_long_forms_agree():
    a = parse_method("flexprefill-g0.95-t0.2", shared=SHARED)
    b = parse_method("flexprefill:gamma=0.95,tau=0.2", shared=SHARED)
    assert a.key() == b.key() and a.label != b.label
    cfg = a.config()
    assert (cfg.gamma, cfg.tau, cfg.block_size, cfg.min_budget, cfg.min_seq_len) == (0.95, 0.2, 64, 128, 0)
    assert parse_method("flexprefill", shared=SHARED).params["gamma"] == 0.9
    assert parse_method("full", shared=SHARED).key() == '{"kind": "full"}'


def test_baseline_methods_carry_their_settings():
    s = parse_method("streaming-w512-k64", shared=SHARED)
    sel = s.selector()
    assert (sel.window, sel.sink) == (512, 64)
    v = parse_method("vs_fixed:vertical=256,slash=512", shared=SHARED)
    assert v.kind == "vertical_slash_fixed" and v.selector().settings() == {"vertical": 256, "slash": 512, "last_q": 64}
    assert parse_method("streaming", shared=SHARED).key() != s.key()


@pytest.mark.parametrize("bad", ["sparse", "flexprefill-x3", "streaming:gamma=0.9", "flexprefill-g1.5"])
def test_bad_methods_rejected(bad):
    with pytest.raises((ValueError, TypeError)):
        parse_method(bad, shared=SHARED)


def test_split_methods_keeps_name_value_lists_together():
    assert split_methods("full,flexprefill:gamma=0.95,tau=0.2,streaming-w256") == [
        "full", "flexprefill:gamma=0.95,tau=0.2", "streaming-w256"
    ]


def test_cases_sample_major_and_keys_unique():
    cases = make_cases(["niah_sweep", "vt"], [512, 1024], 2, seed=10, sweep_depths=[0.0, 1.0])
    assert len(cases) == 2 * 2 * (2 + 1)
    assert [c.seed for c in cases[:6]] == [10] * 6
    m = parse_method("full")
    keys = {case_key("m", c, m) for c in cases}
    assert len(keys) == len(cases)
