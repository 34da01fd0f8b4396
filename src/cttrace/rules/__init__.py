"""The rules: one module each in this package, found by looking, never listed by hand.

Every public module here (a name without a leading underscore) is a rule and holds
its :class:`RuleSpec` as ``RULE``. Adding a rule is adding a module (and its test):
the correlator's dispatch, ``--rule``, the alert names, the metric series, the
kernel-side state filters and the README's table all read :data:`RULES`.

This package sits below the correlator: it imports the event model, findings and
the identity questions, never the correlator, runtime, sinks or command line.
"""

from __future__ import annotations

import importlib
import pkgutil

from cttrace.events import TcpState
from cttrace.rules._spec import (
    FINISHED_STATES,
    FIRST_REPLY_STATES,
    IDENTITY_GRACE,
    MAX_ENTRIES,
    Checker,
    Context,
    RuleSpec,
    Setting,
    Settings,
    TrackedEntry,
)

__all__ = [
    "FINISHED_STATES", "FIRST_REPLY_STATES", "IDENTITY_GRACE", "MAX_ENTRIES", "RULES",
    "UNREPLIED_TCP_STATES",
    "WANTED_TCP_STATES", "Checker", "Context", "RuleSpec", "Setting", "Settings",
    "TrackedEntry", "by_id", "ids", "readme_table", "settings_of", "unknown_settings",
]


def _discover() -> tuple[RuleSpec, ...]:
    specs = []
    for module in pkgutil.iter_modules(__path__):
        if module.name.startswith("_"):
            continue
        spec = importlib.import_module(f"{__name__}.{module.name}").RULE
        assert isinstance(spec, RuleSpec), f"{module.name}.RULE is not a RuleSpec"
        specs.append(spec)
    return tuple(sorted(specs, key=lambda s: (s.rank, s.id)))


#: Every rule, in the order a person reads them.
RULES: tuple[RuleSpec, ...] = _discover()

_BY_ID = {spec.id: spec for spec in RULES}


def ids() -> tuple[str, ...]:
    """What ``--rule`` accepts."""
    return tuple(_BY_ID)


def by_id(rule: str) -> RuleSpec:
    """The spec of ``rule``; KeyError for an id no module declares."""
    return _BY_ID[rule]


def settings_of() -> tuple[Setting, ...]:
    """Every setting some rule declares, once each, in rule order."""
    seen: dict[str, Setting] = {}
    for spec in RULES:
        for setting in spec.settings:
            seen.setdefault(setting.name, setting)
    return tuple(seen.values())


def unknown_settings(settings: Settings) -> list[str]:
    known = {s.name for s in settings_of()}
    return sorted(name for name in settings.values if name not in known)


#: States of an entry that has not seen a reply (tcp_conntrack: SYN_SENT, SYN_SENT2 on
#: a simultaneous open; NONE before the first packet is classified). Leaving one of
#: these is the first reply: the kernel-side filters always pass it.
UNREPLIED_TCP_STATES = frozenset({int(TcpState.NONE), int(TcpState.SYN_SENT),
                                  int(TcpState.SYN_SENT2)})

#: The states whose UPDATE some rule reads: the kernel-side filters drop UPDATEs into
#: any other state (FIN_WAIT, CLOSE_WAIT, LAST_ACK today) before they are queued.
WANTED_TCP_STATES = frozenset().union(*(spec.tcp_states for spec in RULES))


def readme_table() -> str:
    """The README's "What it catches" table (``python -m cttrace.rules --write README.md``)."""
    rows = ["| rule | fires when | needs |", "|---|---|---|"]
    rows += [f"| `{spec.id}` | {spec.fires_when} | {spec.needs} |" for spec in RULES]
    return "\n".join(rows) + "\n"
