"""``cttrace doctor``: checks the node-level invariants behind cttrace's detection rules.

Detection says a conntrack surprise happened; the doctor says the node is set
up so that it will: the SYN_SENT timeout against the CNI's IP reuse cooldown,
bridged traffic skipping iptables, MASQUERADE/SNAT without ``--random-fully``,
a filling table, insert failures. Each check has a stable id, a verdict, the
values observed and the exact command lines that fix it. JSON schema: README.md.

Modules: ``checks`` (the checks), ``readers`` (where facts come from),
``natrules`` (iptables/nft NAT rule parsing), ``cooldown`` (the CNI's IP
cooldown), ``model`` (results, exit code), ``render`` (table, JSON), ``cli``.
"""
