"""What every lab scenario is made of: the workloads it runs and how it tells its story.

The workloads look like a real shop (names, replica-set hashes, registry images)
so that findings read as they would on a real cluster. The helpers format pods,
Services and conntrack lines the same way in every scenario's narration.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from cttrace.addr import endpoint
from cttrace.events import Flow
from cttrace.lab.cluster import LabPod, LabService, Workload
from cttrace.lab.results import Attempt, Exchange, Step, StepCallback

_IMAGES = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
FRONTEND = Workload("shop", "frontend", "6d8c9", f"{_IMAGES}/shop/frontend:2.14.0")
CART = Workload("shop", "cart", "7d9f8", f"{_IMAGES}/shop/cart:1.9.3")
CHECKOUT = Workload("shop", "checkout", "6f7b8", f"{_IMAGES}/shop/checkout:4.0.2")
CHECKOUT_NEXT = Workload("shop", "checkout", "8c4d2", f"{_IMAGES}/shop/checkout:4.1.0")
CATALOG = Workload("shop", "catalog", "79d4b", f"{_IMAGES}/shop/catalog:0.31.0")
LEDGER = Workload("billing", "ledger", "5c8f9", f"{_IMAGES}/billing/ledger:3.2.1")


class Story:
    """Records each step with its time and tells ``on_step`` about it."""

    def __init__(self, on_step: StepCallback | None) -> None:
        self.steps: list[Step] = []
        self._on_step = on_step

    def __call__(self, name: str, note: str) -> None:
        self.steps.append(Step(name=name, ts=time.time(), note=note))
        if self._on_step is not None:
            self._on_step(note)


def pod_text(pod: LabPod) -> str:
    return f"{pod.namespace}/{pod.name} ({pod.ip})"


def service_text(svc: LabService) -> str:
    return f"Service {svc.namespace}/{svc.name} {endpoint(svc.vip, svc.port)}"


def flow_to(client: LabPod, svc: LabService, sport: int) -> Flow:
    return Flow(client.ip, sport, svc.vip, svc.port)


def outcome_text(attempt: Attempt) -> str:
    if attempt.outcome == "answered":
        return f"answered: {attempt.line!r}"
    return f"{attempt.outcome} after {attempt.ended - attempt.started:.1f} s"


def conntrack_text(entries: tuple[str, ...]) -> str:
    """``conntrack: SYN_SENT [UNREPLIED] id=123`` from ``conntrack -L -o id`` lines."""
    if not entries:
        return "conntrack: no entry"
    fields = entries[0].split()
    # "tcp 6 <timeout> <STATE> src=... [UNREPLIED] ... [ASSURED] ... id=N"
    flags = [f for f in fields if f in ("[UNREPLIED]", "[ASSURED]")]
    ids = [f for f in fields if f.startswith("id=")]
    return " ".join(["conntrack:", fields[3], *flags, *ids])


def conntrack_state(entries: tuple[str, ...]) -> str:
    """The TCP state of the first ``conntrack -L`` line, or ``none``."""
    return entries[0].split()[3] if entries else "none"


def exchange_of(report: Mapping[str, object]) -> Exchange:
    """One line's round trip as a pod client reported it."""
    echo = report.get("echo")
    return Exchange(text=str(report["text"]), sent_at=float(str(report["sent_at"])),
                    outcome=str(report["outcome"]), echo=None if echo is None else str(echo))
