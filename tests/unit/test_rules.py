"""The rule registry: what each rule declares is what the rest of cttrace shows and filters."""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import pytest

import cttrace.rules
from cttrace import correlator as correlator_module
from cttrace.correlator import Correlator, Settings
from cttrace.events import CtEvent, CtKind, CtStatus, Flow, TcpReset, TcpState
from cttrace.rules import (
    RULES,
    UNREPLIED_TCP_STATES,
    WANTED_TCP_STATES,
    Checker,
    Context,
    RuleSpec,
    TrackedEntry,
)
from cttrace.rules.__main__ import with_table
from cttrace.sources.bpf import BpfSettings
from cttrace.sources.ctnetlink import CLOSING_STATES
from tests.unit.fake_identity import FakeIdentity

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = Path(cttrace.rules.__file__).parent


def test_readme_table_is_the_registry() -> None:
    readme = (ROOT / "README.md").read_text()
    assert with_table(readme) == readme, (
        "README's rules table differs from the rule modules: "
        "run `.venv/bin/python -m cttrace.rules --write README.md`")


def test_every_rule_module_is_registered_under_its_own_name() -> None:
    modules = {m.name for m in pkgutil.iter_modules([str(RULES_DIR)]) if not m.name.startswith("_")}
    assert {spec.id.replace("-", "_") for spec in RULES} == modules
    assert len({spec.alert for spec in RULES}) == len(RULES)
    assert all(spec.alert.startswith("Cttrace") for spec in RULES)


#: What the rules package may never import: everything above the correlator's dispatch.
_ABOVE = ("cttrace.correlator", "cttrace.runtime", "cttrace.sinks", "cttrace.cli",
          "cttrace.assemble", "cttrace.agent", "cttrace.watch", "cttrace.demo",
          "cttrace.sources", "cttrace.remediate")


@pytest.mark.parametrize("path", sorted(RULES_DIR.glob("*.py")), ids=lambda p: p.name)
def test_rules_never_import_upwards(path: Path) -> None:
    imported: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.append(node.module)
        elif isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
    assert not [m for m in imported if m.startswith(_ABOVE)]


def test_kernel_state_filters_pass_exactly_what_the_rules_read() -> None:
    # Today's rules read the first reply, ESTABLISHED and the finished states: the FIN
    # handshake's states are dropped in the kernel by both sources.
    assert {TcpState(s).name for s in CLOSING_STATES} == {"FIN_WAIT", "CLOSE_WAIT", "LAST_ACK"}
    assert not CLOSING_STATES & WANTED_TCP_STATES
    defines = BpfSettings().defines()
    wanted_to = sum(1 << s for s in WANTED_TCP_STATES)
    wanted_from = sum(1 << s for s in UNREPLIED_TCP_STATES)
    assert f"#define CTT_WANTED_TO_STATES {wanted_to:#x}U\n" in defines
    assert f"#define CTT_WANTED_FROM_STATES {wanted_from:#x}U\n" in defines


def test_a_setting_no_rule_declares_is_refused() -> None:
    with pytest.raises(ValueError, match="late_afterr"):
        Correlator(Settings(late_afterr=2.0))


class _ResetsOnly(Checker):
    def __init__(self, ctx: Context) -> None:
        self.resets: list[TcpReset] = []
        self.on_reset = lambda ev, now, out: self.resets.append(ev)


def test_a_new_rule_module_is_dispatched_only_the_events_it_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[_ResetsOnly] = []

    def build(ctx: Context) -> Checker:
        made.append(_ResetsOnly(ctx))
        return made[-1]

    spec = RuleSpec(id="resets-only", alert="CttraceResetsOnly", rank=99, fires_when="",
                    needs="", advice="", checker=build)
    monkeypatch.setattr(correlator_module, "RULES", (*RULES, spec))
    corr = Correlator(identity=FakeIdentity())
    orig, reply = Flow("10.0.0.1", 40000, "10.96.0.1", 80), Flow("10.0.0.2", 80, "10.0.0.1", 40000)
    status = int(CtStatus.DST_NAT | CtStatus.CONFIRMED)
    corr.feed(CtEvent(CtKind.NEW, 1.0, 1, orig, reply, int(TcpState.SYN_SENT), status), 1.0)
    rst = TcpReset(ts=1.5, flow=Flow("10.0.0.1", 40000, "10.0.0.2", 80), sent=True)
    corr.feed(rst, 1.5)
    corr.tick(2.0)
    assert made[0].resets == [rst]
    assert corr.stats.events == 2


def test_a_checker_sees_the_live_table(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[TrackedEntry | None] = []

    class Peek(Checker):
        def __init__(self, ctx: Context) -> None:
            self.on_tick = lambda now, out: seen.append(ctx.entry_for_tuple(
                ("10.0.0.1", 40000, "10.96.0.1", 80)))

    spec = RuleSpec(id="peek", alert="CttracePeek", rank=99, fires_when="", needs="",
                    advice="", checker=Peek)
    monkeypatch.setattr(correlator_module, "RULES", (spec,))
    corr = Correlator()
    orig, reply = Flow("10.0.0.1", 40000, "10.96.0.1", 80), Flow("10.0.0.2", 80, "10.0.0.1", 40000)
    corr.feed(CtEvent(CtKind.NEW, 1.0, 7, orig, reply, int(TcpState.SYN_SENT),
                      int(CtStatus.DST_NAT)), 1.0)
    corr.tick(1.0)
    corr.feed(CtEvent(CtKind.DESTROY, 2.0, 7, orig, reply, None, int(CtStatus.DST_NAT)), 2.0)
    corr.tick(2.0)
    assert [e.entry_id if e else None for e in seen] == [7, None]
