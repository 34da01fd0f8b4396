"""``cttrace lab``: conntrack's failures behind Kubernetes, reproduced on the real kernel.

A lab is a Kubernetes node made of network namespaces (:mod:`cttrace.lab.node`):
pods behind veths, kube-proxy's iptables chains, a fabric that silently drops,
plus the identity a Kubernetes API would serve, written as watch events to a
file. Scenarios (:mod:`cttrace.lab.scenarios`) replay field failures with real
packets so that cttrace can be shown, and tested, catching them;
:mod:`cttrace.lab.background` runs one beside a tracer.

Everything is named ``ctl-<instance>-*`` and removed on exit; ``cttrace lab
down --all`` removes what a killed lab left behind.

This package imports nothing on purpose: the pod server and client processes
(``python -m cttrace.lab.podserver``/``podclient``), started for every pod and
every connection, then load only what they use.
"""
