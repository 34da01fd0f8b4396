"""--remediate decides only on unreplied entries whose pod is gone, rate-limited, logged."""

from __future__ import annotations

from cttrace.correlator import Correlator
from cttrace.events import CtKind, Flow, TcpState
from cttrace.remediate import Mode, Remediation, Remediator, stale_reason
from tests.unit.test_correlator import CART, CART_A, POD_IP, REPLIED, ct, world


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def setup(mode: Mode = Mode.ON, **kw: float) -> tuple[Correlator, list[Remediation], list[int],
                                                       Remediator, Clock]:
    ident = world(t_a_dies=None)
    corr = Correlator(identity=ident)
    log: list[Remediation] = []
    deleted: list[int] = []

    def delete(entry: object) -> int:
        deleted.append(entry.entry_id)  # type: ignore[attr-defined]
        return 0

    clock = Clock()
    rem = Remediator(mode, corr, delete if mode is Mode.ON else None, log.append,
                     clock=clock, **kw)  # type: ignore[arg-type]
    return corr, log, deleted, rem, clock


def test_unreplied_entry_to_a_deleted_pod_is_deleted_and_logged() -> None:
    corr, log, deleted, rem, _ = setup()
    corr.feed(ct(CtKind.NEW, 9.0, TcpState.SYN_SENT), 9.0)
    assert rem.check(9.5) == [] and deleted == [], "pod alive: nothing to do"
    corr.identity.release(POD_IP, CART_A, 10.0)  # type: ignore[union-attr]
    rem.check(10.1)
    assert deleted == [1]
    assert log[0].action == "deleted" and "no longer holds 10.244.1.5" in log[0].reason
    assert log[0].to_json()["kind"] == "remediation"


def test_replied_and_established_entries_are_never_touched() -> None:
    corr, _, deleted, rem, _ = setup()
    corr.feed(ct(CtKind.NEW, 9.0, TcpState.SYN_SENT), 9.0)
    corr.feed(ct(CtKind.UPDATE, 9.01, TcpState.ESTABLISHED, REPLIED), 9.01)
    ident = corr.identity
    ident.endpoint(CART, POD_IP, CART_A.uid, 0.0, 9.5)  # type: ignore[union-attr]
    ident.release(POD_IP, CART_A, 10.0)  # type: ignore[union-attr]
    rem.check(11.0)
    assert deleted == []
    entry = next(iter(corr.entries.values()))
    assert stale_reason(entry, ident, 11.0) is None  # type: ignore[arg-type]


def test_dry_run_only_logs() -> None:
    corr, log, _, rem, _ = setup(Mode.DRY_RUN)
    corr.feed(ct(CtKind.NEW, 9.0, TcpState.SYN_SENT), 9.0)
    corr.identity.release(POD_IP, CART_A, 10.0)  # type: ignore[union-attr]
    rem.check(10.1)
    assert [r.action for r in log] == ["would-delete"]


def test_deletions_are_rate_limited_and_the_rest_wait() -> None:
    corr, _, deleted, rem, clock = setup(rate_per_s=1.0, burst=2)
    for i in range(5):
        corr.feed(ct(CtKind.NEW, 9.0, TcpState.SYN_SENT, entry_id=i,
                     orig=Flow("10.244.1.9", 41000 + i, "10.96.0.10", 80)), 9.0)
    corr.identity.release(POD_IP, CART_A, 10.0)  # type: ignore[union-attr]
    rem.check(10.1)
    assert len(deleted) == 2
    clock.t += 1.0
    rem.check(11.1)
    assert len(deleted) == 3
    clock.t += 10.0
    rem.check(21.1)
    assert sorted(deleted) == [0, 1, 2, 3, 4]
