"""MASQUERADE/SNAT rules as iptables (legacy and nft backends) and native nft hold them.

Without ``--random-fully`` (nft: ``fully-random``, NF_NAT_RANGE_PROTO_RANDOM_FULLY)
``get_unique_tuple()`` first keeps the original source port when no confirmed
entry uses it, and otherwise searches from an offset that simultaneous
connections can share (a per-protocol rover, or with ``--random`` a hash of
the addresses, ``nf_nat_l4proto_unique_tuple()``). An entry is in the hash
table only once confirmed, so two connections set up at the same moment on two
CPUs can be given the same tuple, and the second is dropped at
``__nf_conntrack_confirm()`` (``insert_failed``). With the flag, port
preservation is skipped and every connection draws a random offset.

Every rule found carries the exact command that replaces it in place with a
``--random-fully`` version.
"""

from __future__ import annotations

import copy
import shlex
from dataclasses import dataclass
from typing import Any

import orjson

#: (backend name used in reports and fix commands, the program that dumps it).
#: ``*-save`` without ``-t`` dumps only the tables that exist; ``-t nat`` would
#: instantiate an empty legacy nat table in the namespace as a side effect.
IPTABLES_DUMPS: tuple[tuple[str, str], ...] = (
    ("iptables-legacy", "iptables-legacy-save"),
    ("ip6tables-legacy", "ip6tables-legacy-save"),
    ("iptables-nft", "iptables-nft-save"),
    ("ip6tables-nft", "ip6tables-nft-save"),
)
NFT_DUMP = ("nft", "-j", "list", "ruleset")

_IPTABLES_TARGETS = frozenset({"MASQUERADE", "SNAT"})
_NFT_STATEMENTS = ("masquerade", "snat")


@dataclass(frozen=True, slots=True)
class NatRule:
    backend: str  # iptables-legacy, ip6tables-nft, nft, ...
    table: str  # "nat" for iptables; "<family> <table>" for nft
    chain: str
    position: int  # iptables: 1-based rule number in the chain; nft: rule handle
    rule: str  # what the user recognises: the iptables-save line, or a short nft description
    target: str  # MASQUERADE, SNAT, masquerade, snat
    random_fully: bool
    fix: str  # replaces the rule in place with a fully-random version

    def to_json(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "table": self.table,
            "chain": self.chain,
            "position": self.position,
            "rule": self.rule,
            "target": self.target,
            "random_fully": self.random_fully,
        }


def parse_iptables_save(text: str, backend: str) -> list[NatRule]:
    """MASQUERADE/SNAT rules of the ``nat`` table in ``iptables-save`` output."""
    rules: list[NatRule] = []
    table = ""
    positions: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("*"):
            table, positions = line[1:].strip(), {}
            continue
        if table != "nat" or not line.startswith("-A "):
            continue
        tokens = shlex.split(line)
        chain, spec = tokens[1], tokens[2:]
        positions[chain] = positions.get(chain, 0) + 1
        target = _iptables_target(spec)
        if target not in _IPTABLES_TARGETS:
            continue
        rules.append(
            NatRule(
                backend=backend,
                table="nat",
                chain=chain,
                position=positions[chain],
                rule=line,
                target=target,
                random_fully="--random-fully" in spec,
                fix=shlex.join(
                    [
                        backend,
                        "-t",
                        "nat",
                        "-R",
                        chain,
                        str(positions[chain]),
                        *spec,
                        "--random-fully",
                    ]
                ),
            )
        )
    return rules


def _iptables_target(spec: list[str]) -> str:
    for i, tok in enumerate(spec[:-1]):
        if tok in ("-j", "--jump"):
            return spec[i + 1]
    return ""


def parse_nft_ruleset(text: str) -> list[NatRule]:
    """Native nft masquerade/snat rules in ``nft -j list ruleset`` output.

    Rules holding an ``xt`` expression were written by iptables-nft (it uses the
    x_tables compat targets); they are reported from ``iptables-nft-save``.
    """
    doc = orjson.loads(text)
    rules: list[NatRule] = []
    for item in doc.get("nftables", []):
        rule = item.get("rule")
        if not isinstance(rule, dict):
            continue
        exprs: list[dict[str, Any]] = rule.get("expr", [])
        if any("xt" in e for e in exprs):
            continue
        for index, stmt in enumerate(exprs):
            name = next((k for k in _NFT_STATEMENTS if k in stmt), None)
            if name is None:
                continue
            flags = _nft_flags(stmt[name])
            rules.append(
                NatRule(
                    backend="nft",
                    table=f"{rule['family']} {rule['table']}",
                    chain=rule["chain"],
                    position=int(rule["handle"]),
                    rule=(
                        f"{rule['family']} {rule['table']} {rule['chain']} "
                        f"handle {rule['handle']}: {name}{' ' + ','.join(flags) if flags else ''}"
                    ),
                    target=name,
                    random_fully="fully-random" in flags,
                    fix=_nft_fix(rule, index, name, flags),
                )
            )
            break
    return rules


def _nft_flags(args: object) -> list[str]:
    # nft -j prints a single flag as a string and several as a list.
    if not isinstance(args, dict):
        return []
    flags = args.get("flags", [])
    return [flags] if isinstance(flags, str) else list(flags)


def _nft_fix(rule: dict[str, Any], index: int, name: str, flags: list[str]) -> str:
    """``nft -j '<replace>'``: the same rule with ``fully-random`` added to its NAT statement."""
    new_rule = {k: copy.deepcopy(v) for k, v in rule.items()}
    args = new_rule["expr"][index][name]
    new_args: dict[str, Any] = dict(args) if isinstance(args, dict) else {}
    new_args["flags"] = [*flags, "fully-random"]
    new_rule["expr"][index] = {name: new_args}
    payload = orjson.dumps({"nftables": [{"replace": {"rule": new_rule}}]}).decode()
    return shlex.join(["nft", "-j", payload])
