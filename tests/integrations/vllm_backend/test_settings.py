"""Settings of the vLLM backend from FLEXPREFILL_VLLM_CONFIG and additional_config (no vLLM needed)."""

import json

import pytest

import flexprefill as fp
from flexprefill.integrations.vllm.settings import ENV_VAR, layer_index, load_settings


def test_defaults_are_the_library_defaults():
    s = load_settings(None, environ={})
    assert s.config == fp.FlexPrefillConfig() and s.layers is None and s.enabled and dict(s.options) == {}
    assert s.layer_enabled(0) and s.layer_enabled(None)


def test_environment_variable_sets_config_layers_and_options():
    env = {ENV_VAR: json.dumps({"gamma": 0.95, "tau": 0.0, "min_seq_len": 16384, "layers": [0, 2],
                                "options": {"search_graphs": False}})}
    s = load_settings(None, environ=env)
    assert (s.config.gamma, s.config.tau, s.config.min_seq_len) == (0.95, 0.0, 16384)
    assert s.layers == frozenset({0, 2}) and s.layer_enabled(2) and not s.layer_enabled(1)
    assert not s.layer_enabled(None)
    assert dict(s.options) == {"search_graphs": False}


def test_additional_config_overrides_the_environment_key_by_key():
    env = {ENV_VAR: json.dumps({"gamma": 0.95, "min_seq_len": 1000, "options": {"search_graphs": False}})}
    s = load_settings({"flexprefill": {"gamma": 0.8, "options": {"tma": False}}, "other": 1}, environ=env)
    assert s.config.gamma == 0.8 and s.config.min_seq_len == 1000
    assert dict(s.options) == {"search_graphs": False, "tma": False}
    # a JSON string, as a command line may give it
    assert load_settings({"flexprefill": '{"tau": 0.2}'}, environ={}).config.tau == 0.2


def test_enabled_false():
    assert not load_settings({"flexprefill": {"enabled": False}}, environ={}).enabled


@pytest.mark.parametrize("raw, match", [
    ({"gama": 0.9}, r"unknown key\(s\) \['gama'\]"),
    ({"gamma": 1.5}, "gamma=1.5 must be in"),
    ({"layers": "0,1"}, "layers='0,1' must be a list"),
    ({"layers": [0, -1]}, "layer indices are ints >= 0"),
    ({"options": {"graphs": False}}, r"unknown option\(s\) \['graphs'\]"),
    ({"options": {"tma": "no"}}, "tma='no' must be True or False"),
    ({"enabled": 1}, "enabled=1 must be true or false"),
])
def test_bad_settings_name_the_source_and_the_key(raw, match):
    with pytest.raises(ValueError, match=match) as e:
        load_settings({"flexprefill": raw}, environ={})
    assert "additional_config['flexprefill']" in str(e.value)
    with pytest.raises(ValueError, match=ENV_VAR):
        load_settings(None, environ={ENV_VAR: json.dumps(raw)})


def test_environment_variable_that_is_not_json():
    with pytest.raises(ValueError, match=f"{ENV_VAR}=.*not valid JSON"):
        load_settings(None, environ={ENV_VAR: "gamma=0.9"})


def test_layer_index_of_vllm_layer_names():
    assert layer_index("model.layers.3.self_attn.attn") == 3
    assert layer_index("model.layers.12.attn") == 12
    assert layer_index("lm_head") is None
    assert layer_index("model.encoder.layers.0.sub.1") is None


def test_pyproject_declares_the_vllm_plugin_and_extra():
    import importlib
    import tomllib
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).resolve().parents[3] / "pyproject.toml").read_text())["project"]
    target = meta["entry-points"]["vllm.general_plugins"]["flexprefill"]
    module, func = target.split(":")
    assert callable(getattr(importlib.import_module(module), func))
    assert any(r.startswith("vllm") for r in meta["optional-dependencies"]["vllm"])


def test_importing_the_plugin_package_does_not_import_vllm():
    import subprocess
    import sys

    code = ("import sys, flexprefill, flexprefill.integrations.vllm, flexprefill.integrations.vllm.attention, "
            "flexprefill.integrations.vllm.settings; print('vllm' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False"
