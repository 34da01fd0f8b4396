"""Finding MASQUERADE/SNAT rules in iptables-save and nft JSON output, and the links in `ip -j`."""

from __future__ import annotations

import shlex

import orjson

from cttrace.doctor.natrules import parse_iptables_save, parse_nft_ruleset
from cttrace.doctor.readers import parse_ip_links
from tests.unit.test_doctor_checks import LEGACY_SAVE, NFT_JSON, NFT_SAVE


def test_only_nat_table_masquerade_and_snat_rules_are_taken() -> None:
    rules = parse_iptables_save(LEGACY_SAVE, "iptables-legacy")
    assert [(r.chain, r.position, r.target, r.random_fully) for r in rules] == [
        ("POSTROUTING", 2, "MASQUERADE", False),
        ("KUBE-POSTROUTING", 1, "MASQUERADE", True),
    ]


def test_positions_count_every_rule_of_the_chain() -> None:
    # iptables -R addresses a rule by its number among all rules of the chain.
    rules = parse_iptables_save(LEGACY_SAVE, "iptables-legacy")
    assert rules[0].position == 2  # the jump to KUBE-POSTROUTING is rule 1


def test_random_is_not_random_fully() -> None:
    rules = parse_iptables_save(NFT_SAVE, "iptables-nft")
    snat = [r for r in rules if r.target == "SNAT"]
    assert len(snat) == 1 and not snat[0].random_fully


def test_iptables_fix_replaces_the_rule_in_place_and_survives_the_shell() -> None:
    rules = parse_iptables_save(NFT_SAVE, "iptables-nft")
    argv = shlex.split(rules[0].fix)
    assert argv == [
        "iptables-nft", "-t", "nat", "-R", "POSTROUTING", "1",
        "-s", "10.0.0.0/24", "-m", "comment", "--comment", "pod's egress",
        "-j", "MASQUERADE", "--random-fully",
    ]  # fmt: skip


def test_nft_rules_written_by_iptables_nft_are_left_to_iptables_nft_save() -> None:
    rules = parse_nft_ruleset(NFT_JSON)
    assert [(r.table, r.chain, r.position) for r in rules] == [
        ("inet ctlt", "post", 2),
        ("inet ctlt", "post", 3),
    ]


def test_nft_flags_as_string_or_list_are_both_understood() -> None:
    rules = parse_nft_ruleset(NFT_JSON)
    assert [r.random_fully for r in rules] == [False, True]
    listed = NFT_JSON.replace('"flags": "fully-random"', '"flags": ["persistent", "fully-random"]')
    assert [r.random_fully for r in parse_nft_ruleset(listed)] == [False, True]


def test_nft_fix_is_a_json_replace_of_the_same_rule_with_fully_random() -> None:
    rule = parse_nft_ruleset(NFT_JSON)[0]
    argv = shlex.split(rule.fix)
    assert argv[:2] == ["nft", "-j"]
    doc = orjson.loads(argv[2])
    replaced = doc["nftables"][0]["replace"]["rule"]
    assert (replaced["family"], replaced["table"], replaced["chain"], replaced["handle"]) == (
        "inet",
        "ctlt",
        "post",
        2,
    )
    assert replaced["expr"][0]["match"]["right"] == "x"  # the match is kept
    assert replaced["expr"][1] == {"masquerade": {"flags": ["fully-random"]}}


def test_nft_snat_keeps_its_address_and_existing_flags() -> None:
    text = orjson.dumps(
        {
            "nftables": [
                {
                    "rule": {
                        "family": "ip",
                        "table": "t",
                        "chain": "c",
                        "handle": 7,
                        "expr": [{"snat": {"addr": "1.1.1.1", "flags": "random"}}],
                    }
                }
            ]
        }
    ).decode()
    rule = parse_nft_ruleset(text)[0]
    assert rule.target == "snat" and not rule.random_fully
    doc = orjson.loads(shlex.split(rule.fix)[2])
    assert doc["nftables"][0]["replace"]["rule"]["expr"] == [
        {"snat": {"addr": "1.1.1.1", "flags": ["random", "fully-random"]}}
    ]


# Trimmed `ip -j -d link show` output from a namespace with a bridge and a veth port.
IP_LINKS = """[
 {"ifindex":1,"ifname":"lo","flags":["LOOPBACK"],"link_type":"loopback"},
 {"ifindex":2,"ifname":"ctlbr0","linkinfo":{"info_kind":"bridge","info_data":{}}},
 {"ifindex":3,"ifname":"ctlvb","link":"ctlva","linkinfo":{"info_kind":"veth"}},
 {"ifindex":4,"ifname":"ctlva","link":"ctlvb","master":"ctlbr0",
  "linkinfo":{"info_kind":"veth","info_slave_kind":"bridge"}},
 {"ifindex":5,"ifname":"ctlbr1","linkinfo":{"info_kind":"bridge"}},
 {"ifindex":6,"ifname":"ctlbond","master":"ctlbond0","linkinfo":{"info_slave_kind":"bond"}}
]"""


def test_ip_links_give_bridges_and_their_ports() -> None:
    assert parse_ip_links(IP_LINKS) == {"ctlbr0": ["ctlva"], "ctlbr1": []}
