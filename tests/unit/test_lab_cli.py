"""`cttrace lab` at its edge: help that teaches, and one-line errors instead of tracebacks."""

from __future__ import annotations

import os
import shutil

import pytest
from typer.testing import CliRunner

from cttrace.lab.cli import app
from cttrace.lab.preconditions import LabError, require_tools
from cttrace.lab.scenarios import SCENARIOS

runner = CliRunner()


def test_help_names_the_scenarios_and_how_to_attach_a_tracer() -> None:
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    assert "ctl-<instance>" in top.output
    run_help = runner.invoke(app, ["run", "--help"], terminal_width=200)
    assert run_help.exit_code == 0
    assert all(name in run_help.output for name in SCENARIOS)
    assert "--ready-file" in run_help.output and "--keep" in run_help.output


def test_list_shows_every_scenario_without_root() -> None:
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    assert all(name in result.output for name in SCENARIOS)


@pytest.mark.parametrize(("args", "message"), [
    (["run", "wrong-pod"], "unknown scenario 'wrong-pod': choose one of recycled-ip"),
    (["run", "dead-pod", "--brnf"], "--brnf applies only to the bridge-no-brnf scenario"),
    (["run", "recycled-ip", "--instance", "AB"], "1-6 lowercase letters or digits"),
    (["down"], "--instance <id> or --all"),
])
def test_mistakes_are_one_line_errors(monkeypatch: pytest.MonkeyPatch, args: list[str],
                                      message: str) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.output.startswith("cttrace lab: error: ")
    assert message in result.output
    assert "Traceback" not in result.output


def test_without_root_the_lab_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = runner.invoke(app, ["run", "recycled-ip"])
    assert result.exit_code == 2
    assert "cttrace lab needs root" in result.output


def test_missing_binaries_name_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = ("conntrack", "sysctl")
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool in missing else f"/bin/{tool}")
    with pytest.raises(LabError) as err:
        require_tools()
    assert str(err.value) == (
        "the lab needs `conntrack`, `sysctl` on PATH: install them with "
        "`apt-get install conntrack procps`"
    )
