"""``cttrace explain``: the story of one conntrack entry, told as a timeline.

In an incident a person has a finding line (from ``watch -o json`` or the
agent's log) and needs to see what happened in order: the entry was created
with a DNAT to X, the pod holding X went away, X was handed to another pod,
the first reply came from that pod, cttrace decided. Findings carry the
target IP's ownership history, so the finding alone is enough.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from cttrace.addr import endpoint
from cttrace.errors import UserError


@dataclass(frozen=True, slots=True)
class Step:
    ts: str  # RFC 3339, as in the finding
    what: str  # short label
    text: str

    def to_json(self) -> dict[str, str]:
        return {"ts": self.ts, "what": self.what, "text": self.text}


def _ref(obj: Any) -> str | None:
    if isinstance(obj, dict) and "namespace" in obj and "name" in obj:
        return f"{obj['namespace']}/{obj['name']}"
    return None


def _parse_ts(ts: str) -> _dt.datetime:
    return _dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))


def timeline(finding: dict[str, Any]) -> list[Step]:
    """The ordered steps behind one finding line."""
    try:
        orig, target = finding["orig"], finding["target"]
        tuple_text = f"{endpoint(orig['src'], orig['sport'])} -> " \
            f"{endpoint(orig['dst'], orig['dport'])}"
        target_text = endpoint(target['ip'], target['port'])
        rule, severity, decided = finding["rule"], finding["severity"], finding["ts"]
    except (KeyError, TypeError) as err:
        raise UserError(f"not a cttrace finding (missing {err})") from None
    client = _ref(finding.get("client")) or f"client {orig['src']}"
    service = _ref(finding.get("service"))
    vip_text = endpoint(orig['dst'], orig['dport'])
    vip = f"Service {service} ({vip_text})" if service else vip_text
    steps: list[Step] = []
    if finding.get("created"):
        steps.append(Step(finding["created"], "created",
                          f"{client} {tuple_text}: conntrack entry created, {vip} DNATed to "
                          f"{target_text}"))
    for own in finding.get("target_history") or []:
        pod = _ref(own.get("pod")) or "?"
        steps.append(Step(own["since"], "owner", f"pod {pod} holds {target['ip']}"))
        if own.get("until"):
            steps.append(Step(own["until"], "gone", f"pod {pod} no longer holds {target['ip']}"))
    if finding.get("replied"):
        who = _ref(finding.get("new_owner"))
        steps.append(Step(finding["replied"], "reply",
                          f"first reply from {target_text}"
                          + (f" (pod {who})" if who else "")
                          + f", {finding.get('unreplied_s')}s after the entry was created"))
    steps.append(Step(decided, "finding", f"{rule} ({severity}): {finding.get('summary', '')}"))
    steps.sort(key=lambda s: _parse_ts(s.ts))
    return steps


def matches(finding: dict[str, Any], *, tuple_text: str | None, entry_id: int | None,
            rule: str | None) -> bool:
    if finding.get("kind") != "finding":
        return False
    if rule is not None and finding.get("rule") != rule:
        return False
    if entry_id is not None and finding.get("entry_id") != entry_id:
        return False
    if tuple_text is not None:
        orig = finding.get("orig") or {}
        client = endpoint(str(orig.get('src')), str(orig.get('sport')))
        full = f"{client}->{endpoint(str(orig.get('dst')), str(orig.get('dport')))}"
        # IPv6 as the summaries print it, [fd00::5]:40000; unbracketed is ambiguous but
        # still accepted when it matches the whole tuple or client end exactly.
        bare = f"{orig.get('src')}:{orig.get('sport')}->{orig.get('dst')}:{orig.get('dport')}"
        want = tuple_text.replace(" ", "")
        if want not in (full, client, bare, bare.split("->")[0]):
            return False
    return True


def read_findings(lines: Iterable[bytes], skipped: list[int] | None = None,
                  ) -> Iterator[dict[str, Any]]:
    """The JSON objects among ``lines``. A line that is not JSON (stderr text in a ``2>&1``
    capture, a traceback, a truncated last line) is skipped; its number goes to ``skipped``."""
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            if skipped is not None:
                skipped.append(lineno)
            continue
        if isinstance(obj, dict):
            yield obj


def render(steps: list[Step]) -> str:
    first = _parse_ts(steps[0].ts)
    out = []
    for s in steps:
        t = _parse_ts(s.ts)
        out.append(f"{t:%H:%M:%S.%f}"[:-3] + f"  {(t - first).total_seconds():+8.3f}s  "
                   f"{s.what:<8} {s.text}")
    return "\n".join(out)
