"""A Kubernetes node made of network namespaces on the real kernel: :class:`Lab`.

Layout (``routed``, AWS VPC CNI style; every box is a network namespace)::

     pod netns (ctl-<i>-<pod>)          node netns (ctl-<i>-node)         fabric netns
     10.0.1.x/32 on ctl<i>p<n>  <-veth->  ctl<i>h<n>: proxy_arp, no IP   (ctl-<i>-fabric)
     default via 169.254.1.1             route 10.0.1.x/32 dev ctl<i>h<n>  10.0.0.1 on ctl<i>fab1
                                         10.0.0.10/24 on ctl<i>fab0 <-veth->  drops all
                                         default via 10.0.0.1              transit traffic
                                         ip_forward=1, kube-proxy rules

The ``bridge`` layout (kubenet/docker style) puts the pod veths on a bridge
``ctl<i>br`` (10.0.2.1/24) instead, pods in 10.0.2.0/24 with the bridge as gateway.

An IPv6 node (``family="6"``) is the same with the addresses of
:data:`~cttrace.lab.addressing.IPV6`: pods take /128s from fd00:10:1::/64, their
gateway is fe80::1, answered by the node with proxy NDP (the IPv6 proxy_arp);
ip6tables carries kube-proxy's rules. A dual-stack node (``family="dual"``) has
both, every pod and Service an address of each family, and its scenarios'
traffic goes over IPv6.

Why a fabric: a packet to a pod IP that no longer has a /32 route follows the
node's default route, as it would into a VPC. The fabric namespace has
forwarding off, so ip_route_input_slow() gives such packets an unreachable
route whose handler, ip_error(), counts them (IpInAddrErrors) and drops them
*without* an ICMP error when the device does not forward. No reply, no error:
the client's SYN is confirmed in the node's conntrack and stays SYN_SENT. And
since the node's only way out is the fabric, no lab packet can ever reach the
machine's real network. IPv6 alike: the node's IPv6 default route also ends in
the fabric. There a route lookup that finds nothing answers with an ICMPv6
"no route" (ip6_pkt_drop), unlike IPv4's ip_error(), so the fabric's IPv6
default route is a blackhole: dst_discard() drops the packet, no error, whoever
sent it.

Nothing here touches the machine's root namespace: links are created directly
inside their namespaces, iptables and sysctls run via ``ip netns exec``.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

from cttrace.addr import is_ipv6
from cttrace.events import Flow
from cttrace.lab.addressing import (
    AddressPlan,
    Family,
    address_in,
    plans_for,
    traffic_plan,
)
from cttrace.lab.cluster import LabPod, LabService, Workload
from cttrace.lab.identity_log import IdentityLog
from cttrace.lab.k8s_objects import endpoint_slice_objects, pod_object, service_object
from cttrace.lab.naming import STATE_ROOT, LabNames, k8s_suffix, new_instance
from cttrace.lab.plumbing import (
    add_netns,
    delete_netns,
    in_netns,
    ip_batch,
    lab_netns,
    run,
    sysctl,
)
from cttrace.lab.preconditions import (
    LabError,
    require_br_netfilter,
    require_root,
    require_tools,
)
from cttrace.lab.processes import ClientSession, PodServer
from cttrace.lab.proxies import DEFAULT_PROXY, ServiceProxy, make_proxy
from cttrace.lab.results import Attempt
from cttrace.lab.teardown import signals_deferred, write_state

Layout = Literal["routed", "bridge"]
LAYOUTS: tuple[Layout, ...] = ("routed", "bridge")

#: Addresses per family: see cttrace.lab.addressing (IPv4: node 10.0.0.10, fabric 10.0.0.1;
#: routed pods take /32s from 10.0.1.0/24 behind the gateway 169.254.1.1 that nobody owns
#: and the node's proxy_arp answers for, as with Calico; bridge pods 10.0.2.0/24).
NODE_NAME = "ip-10-0-0-10.ec2.internal"  # how EKS names nodes

#: Set in every namespace before its links exist (new devices copy ``default``): without
#: duplicate address detection an address is usable at once rather than "tentative" for
#: about a second, and the kernel sends no DAD probes of its own into the scenarios.
_IPV6_NAMESPACE_SYSCTLS = {"net.ipv6.conf.all.disable_ipv6": 0,
                           "net.ipv6.conf.default.disable_ipv6": 0,
                           "net.ipv6.conf.all.accept_dad": 0,
                           "net.ipv6.conf.default.accept_dad": 0}

#: How long a scenario waits for its ``wait_ready`` callback (a tracer attaching).
READY_DEADLINE_S = 60.0

ReadyCheck = Callable[[], bool]


class LabAborted(LabError):
    """The lab was stopped (Ctrl-C, or the caller closed it) while a scenario ran."""

    def __init__(self) -> None:
        super().__init__("the lab was stopped before the scenario finished")


class Lab:
    """One node: built by ``__enter__`` or :meth:`build`, torn down by ``__exit__``/:meth:`close`.

    Pods and Services are added by scenarios. Each change is made in the kernel
    and written to the identity file; the scenarios decide when each of the two
    happens, which is how kubelet lag is played.
    """

    def __init__(
        self,
        *,
        instance: str | None = None,
        layout: Layout = "routed",
        identity_path: Path | None = None,
        state_root: Path = STATE_ROOT,
        keep: bool = False,
        family: Family | str = Family.V4,
        proxy: str = DEFAULT_PROXY,
    ) -> None:
        if layout not in LAYOUTS:
            raise LabError(f"unknown lab layout {layout!r}: use one of {', '.join(LAYOUTS)}")
        self.family = Family.parse(family)
        #: Who writes the Service rules (see cttrace.lab.proxies).
        self.proxy: ServiceProxy = make_proxy(proxy, self.family)
        self.names = LabNames(instance or new_instance())
        self.layout: Layout = layout
        self.plans = plans_for(self.family)  # every family the node has, IPv4 first
        self.plan = traffic_plan(self.family)  # the family scenarios connect over
        self.state_root = state_root
        self.state_dir = self.names.state_dir(state_root)
        self.identity_path = identity_path or self.state_dir / "identity.jsonl"
        self.keep = keep
        self.pods: dict[str, LabPod] = {}  # pods whose namespace exists, by name
        self.services: list[LabService] = []
        self._identity: IdentityLog | None = None
        self._slots = itertools.count(1)
        self._replicaset_uids: dict[str, str] = {}
        self._allocated_ips: set[str] = set()
        self._netns: list[str] = []  # the namespaces this Lab created and still owns, in order
        self._stop = threading.Event()
        self._close_lock = threading.Lock()
        self._closed = False

    # -- names -------------------------------------------------------------------------------

    @property
    def instance(self) -> str:
        return self.names.instance

    @property
    def node_netns(self) -> str:
        """Where kube-proxy's rules and the conntrack table to watch live."""
        return self.names.node_netns

    @property
    def node_name(self) -> str:
        return NODE_NAME

    @property
    def host_ip(self) -> str:
        """The node's own address (pods' status.hostIP: its first family's)."""
        return self.plans[0].host_ip

    @property
    def pod_cidr(self) -> str:
        """The pods' network of the node's first family (kube-proxy's --cluster-cidr)."""
        plan = self.plans[0]
        net = plan.bridge_pod_net if self.layout == "bridge" else plan.routed_pod_net
        return str(ipaddress.ip_network(f"{plan.pod_ip(net, 0)}/{plan.link_prefix}"))

    # -- life cycle ----------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self.build()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def build(self) -> None:
        """Create the node and fabric namespaces (and bridge), kube-proxy's base rules and
        an empty identity file. On any failure, whatever was created is removed again."""
        require_root()
        require_tools()
        if self.layout == "bridge":
            require_br_netfilter()
        if lab_netns(self.names.netns_prefix):
            raise LabError(
                f"lab instance {self.instance!r} already exists "
                f"(remove it with `cttrace lab down --instance {self.instance}`)"
            )
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        n = self.names
        # Creating the node namespace claims the instance: `ip netns add` fails if the name
        # exists, so two labs given the same id never take over each other's state.
        self.add_netns(n.node_netns)
        write_state(n, {
            "instance": self.instance, "pid": os.getpid(), "layout": self.layout,
            "family": self.family.value,
            "proxy": self.proxy.name,
            "node_netns": n.node_netns, "identity_path": str(self.identity_path),
            "created": time.time(),
        }, self.state_root)
        self._identity = IdentityLog(self.identity_path)
        self.add_netns(n.fabric_netns)
        node, fabric = n.node_netns, n.fabric_netns
        # Set explicitly: a new namespace inherits the root namespace's IPv4 settings
        # (net.core.devconf_inherit_init_net=0 means "inherit" for IPv4).
        sysctl(node, {"net.ipv4.ip_forward": 1})
        sysctl(fabric, {"net.ipv4.ip_forward": 0})
        if self.has_ipv6:
            sysctl(node, {**_IPV6_NAMESPACE_SYSCTLS, "net.ipv6.conf.all.forwarding": 1})
            sysctl(fabric, {**_IPV6_NAMESPACE_SYSCTLS, "net.ipv6.conf.all.forwarding": 0})
        ip_batch(node, ["link set lo up",
                        f"link add {n.fabric_link_node} type veth peer name {n.fabric_link_fabric}"
                        f" netns {fabric}"])
        ip_batch(fabric, ["link set lo up", f"link set {n.fabric_link_fabric} up", *(
            f"addr add {p.fabric_ip}/{p.link_prefix} dev {n.fabric_link_fabric}{p.addr_flags}"
            for p in self.plans), *(["route add blackhole ::/0"] if self.has_ipv6 else [])])
        # `ip -batch` takes no -4/-6 per line: each command's address says its family.
        ip_batch(node, [f"link set {n.fabric_link_node} up", *(
            cmd for p in self.plans for cmd in (
                f"addr add {p.host_ip}/{p.link_prefix} dev {n.fabric_link_node}{p.addr_flags}",
                f"route add default via {p.fabric_ip} dev {n.fabric_link_node}"))])
        if self.layout == "bridge":
            # No multicast snooping: the bridge floods NDP's solicited-node multicast to every
            # port, as it floods ARP broadcasts, instead of waiting to learn MLD listeners.
            ip_batch(node, [f"link add {n.bridge} type bridge mcast_snooping 0",
                            *(f"addr add {p.bridge_ip}/{p.link_prefix} dev {n.bridge}{p.addr_flags}"
                              for p in self.plans),
                            f"link set {n.bridge} up"])
        self.proxy.start(self)
        self.sync_rules()

    @property
    def has_ipv6(self) -> bool:
        return any(p.version == 6 for p in self.plans)

    def close(self) -> None:
        """Tear everything down (idempotent, safe from any thread); ``keep`` leaves it running."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        with signals_deferred():
            if self._netns and not self.keep:
                self.proxy.stop()
                for pod in self.pods.values():
                    if pod.server is not None:
                        pod.server.kill()
                # Newest first: pods, then the fabric, then the node.
                for netns in reversed(self._netns):
                    delete_netns(netns)
                self._netns.clear()
                shutil.rmtree(self.state_dir, ignore_errors=True)
            if self._identity is not None:
                self._identity.close()

    def abort(self) -> None:
        """Make a scenario running in another thread stop at its next step (LabAborted)."""
        self._stop.set()

    def check_running(self) -> None:
        if self._stop.is_set():
            raise LabAborted()

    def pause_until(self, ts: float) -> None:
        """Wait until wall-clock ``ts`` (scenario pacing), or raise LabAborted if stopped."""
        if self._stop.wait(max(0.0, ts - time.time())):
            raise LabAborted()

    def wait_ready(self, ready: ReadyCheck | None, *, deadline_s: float = READY_DEADLINE_S) -> None:
        """Poll ``ready`` until it returns True, so that a tracer attaches before traffic starts."""
        if ready is None:
            return
        deadline = time.monotonic() + deadline_s
        while not ready():
            if time.monotonic() > deadline:
                raise LabError(f"not ready after {deadline_s:g} s (the tracer never signalled)")
            if self._stop.wait(0.05):
                raise LabAborted()

    # -- pods ------------------------------------------------------------------------------------

    def start_pod(self, workload: Workload, *, suffix: str | None = None,
                  ips: tuple[str, ...] | None = None) -> LabPod:
        """Create a pod: namespace, veth, addresses and routes (what a CNI ADD does), start its
        server, then publish it (Pod ADDED). ``ips`` reuses specific, free addresses (a
        dead pod's ``ips``: one per family of the node)."""
        self.check_running()
        name = workload.pod_name(suffix or k8s_suffix())
        if name in self.pods:
            raise LabError(f"pod {workload.namespace}/{name} already exists in the lab")
        ips = ips or self._free_ips()
        held = [ip for ip in ips for pod in self.pods.values() if ip in pod.ips]
        if held:
            raise LabError(f"{held[0]} is still held by a running lab pod")
        self._allocated_ips.update(ips)
        ip = address_in(ips, self.plan.version)
        if ip is None or len(ips) != len(self.plans):
            raise LabError(f"a pod of this {self.family} lab needs one address per family, "
                           f"not {', '.join(ips)}")
        pod = LabPod(
            workload=workload, name=name, uid=str(uuid.uuid4()),
            replicaset_uid=self._replicaset_uids.setdefault(workload.replicaset, str(uuid.uuid4())),
            ip=ip, other_ips=tuple(a for a in ips if a != ip), node_name=NODE_NAME,
            host_ip=self.host_ip, netns=self.names.pod_netns(name),
            slot=next(self._slots), created_at=time.time(),
        )
        self.pods[name] = pod
        self.add_netns(pod.netns)
        if self.has_ipv6:
            sysctl(pod.netns, _IPV6_NAMESPACE_SYSCTLS)  # before its veth end exists
        self._plumb(pod)
        pod.server = PodServer(pod.netns, pod.ip, pod.port, pod.identity_line,
                               log=self.state_dir / "logs" / f"{pod.name}.log")
        self.publish("ADDED", pod_object(pod))
        return pod

    def _plumb(self, pod: LabPod) -> None:
        node, host, peer = self.node_netns, self.names.pod_link_node(pod.slot), \
            self.names.pod_link_pod(pod.slot)
        ip_batch(node, [f"link add {host} type veth peer name {peer} netns {pod.netns}"])
        plans = [(p, ip) for p in self.plans if (ip := address_in(pod.ips, p.version))]
        if self.layout == "bridge":
            ip_batch(pod.netns, ["link set lo up", f"link set {peer} up", *(
                cmd for p, ip in plans for cmd in (
                    f"addr add {ip}/{p.link_prefix} dev {peer}{p.addr_flags}",
                    f"route add default via {p.bridge_ip}"))])
            ip_batch(node, [f"link set {host} master {self.names.bridge} up"])
            return
        ip_batch(pod.netns, ["link set lo up", f"link set {peer} up", *(
            cmd for p, ip in plans for cmd in (
                f"addr add {ip}/{p.host_prefix} dev {peer}{p.addr_flags}",
                # IPv6: fe80::1 is on-link on every interface already (fe80::/64).
                *([f"route add {p.routed_gateway} dev {peer} scope link"]
                  if p.version == 4 else []),
                f"route add default via {p.routed_gateway} dev {peer}"))])
        # proxy_arp / proxy_ndp: the node answers the pod's ARP (NDP neighbour
        # solicitation) for the gateway: arp_process() checks the target is routed out of
        # another device; ndisc_recv_ns() answers for a `neigh add proxy` entry when the
        # device forwards. proxy_delay=0: otherwise pneigh_enqueue() delays each proxied
        # reply by up to 0.8 s, longer than some of the scenarios' connect timeouts.
        settings: dict[str, str | int] = {}
        proxies = []
        for p, _ in plans:
            if p.version == 4:
                settings |= {f"net.ipv4.conf.{host}.proxy_arp": 1,
                             f"net.ipv4.neigh.{host}.proxy_delay": 0}
            else:
                settings |= {f"net.ipv6.conf.{host}.proxy_ndp": 1,
                             f"net.ipv6.neigh.{host}.proxy_delay": 0}
                proxies.append(f"neigh add proxy {p.routed_gateway} dev {host}")
        sysctl(node, settings)
        ip_batch(node, [f"link set {host} up", *proxies, *(
            f"route add {ip}/{p.host_prefix} dev {host}"
            + (" scope link" if p.version == 4 else "") for p, ip in plans)])

    def kill_pod(self, pod: LabPod) -> None:
        """The pod vanishes abruptly, in the kernel only: its veth goes first (and the /32
        route with it), so the FIN the kernel sends for the killed server's sockets has
        no way out; then SIGKILL; then its namespace. The API and kube-proxy rules are
        left as they were: call :meth:`delete_pod_object` and :meth:`set_endpoints`."""
        self.check_running()
        run(["ip", "-n", self.node_netns, "link", "del", self.names.pod_link_node(pod.slot)])
        if pod.server is not None:
            pod.server.kill()
        delete_netns(pod.netns)
        self._netns.remove(pod.netns)
        del self.pods[pod.name]

    def delete_pod_object(self, pod: LabPod) -> None:
        """The API catches up: Pod DELETED."""
        self.publish("DELETED", pod_object(pod, deleted_at=time.time()))

    # -- services --------------------------------------------------------------------------------

    def add_service(self, namespace: str, name: str, *, app: str, vip: str, port: int = 80,
                    target_port: int = 8080, port_name: str = "http",
                    endpoints: Iterable[LabPod] = ()) -> LabService:
        """A ClusterIP Service and its EndpointSlices (ADDED), then a kube-proxy sync.

        ``vip`` is written as IPv4; an IPv6 or dual-stack node gives the Service the VIP(s)
        of its families instead (:meth:`AddressPlan.vip`)."""
        self.check_running()
        vips = [p.vip(vip) for p in self.plans]
        traffic_vip = self.plan.vip(vip)
        svc = LabService(
            namespace=namespace, name=name, uid=str(uuid.uuid4()), vip=traffic_vip,
            other_vips=tuple(v for v in vips if v != traffic_vip), port=port,
            target_port=target_port, port_name=port_name, app=app,
            slice_name=f"{name}-{k8s_suffix()}", slice_uid=str(uuid.uuid4()),
            created_at=time.time(), endpoints=list(endpoints),
        )
        self.services.append(svc)
        self.publish("ADDED", service_object(svc))
        for slice_obj in endpoint_slice_objects(svc):
            self.publish("ADDED", slice_obj)
        self.sync_rules()
        return svc

    def set_endpoints(self, svc: LabService, endpoints: Iterable[LabPod]) -> None:
        """The EndpointSlice controller and kube-proxy catch up: slice MODIFIED, rules synced."""
        self.check_running()
        svc.endpoints = list(endpoints)
        svc.slice_generation += 1
        for slice_obj in endpoint_slice_objects(svc):
            self.publish("MODIFIED", slice_obj)
        self.sync_rules()

    def sync_rules(self) -> None:
        """One kube-proxy sync: the node's Service rules made to match ``services``."""
        self.proxy.sync(self.services)

    def set_bridge_nf_call_iptables(self, enabled: bool) -> None:
        """Whether bridged frames of the node's families traverse iptables/ip6tables (and
        so conntrack) in the node: bridge-nf-call-iptables, bridge-nf-call-ip6tables."""
        names = {4: "iptables", 6: "ip6tables"}
        sysctl(self.node_netns, {f"net.bridge.bridge-nf-call-{names[p.version]}": int(enabled)
                                 for p in self.plans})

    # -- clients ---------------------------------------------------------------------------------

    def open_session(self, client: LabPod, svc: LabService, *, sport: int,
                     connect_timeout: float = 1.5, reply_timeout: float = 1.0,
                     v4_mapped: bool = False) -> ClientSession:
        """Connect from ``client`` (bound to ``sport``) to the Service VIP; see ClientSession.
        ``v4_mapped``: through an AF_INET6 socket to ``::ffff:<IPv4 VIP>``."""
        self.check_running()
        return ClientSession(
            client.netns, src=client.ip, sport=sport, dst=svc.vip, dport=svc.port,
            connect_timeout=connect_timeout, reply_timeout=reply_timeout,
            log=self.state_dir / "logs" / f"client-{client.name}.log", v4_mapped=v4_mapped,
        )

    def connect(self, client: LabPod, svc: LabService, *, sport: int,
                connect_timeout: float = 1.5, v4_mapped: bool = False) -> Attempt:
        """One short connection: connect, read the greeting, close."""
        session = self.open_session(client, svc, sport=sport, connect_timeout=connect_timeout,
                                    v4_mapped=v4_mapped)
        session.close()
        return Attempt.from_report(sport, session.pid, session.greeting)

    def conntrack_entries(self, flow: Flow) -> tuple[str, ...]:
        """The node's conntrack entries for ``flow``'s original source, as ``conntrack -L``
        prints them (with ``id=``: the same id before and after means the same entry)."""
        # conntrack -L lists IPv4 entries only unless -f says otherwise.
        family = "ipv6" if is_ipv6(flow.src) else "ipv4"
        out = run(in_netns(self.node_netns, [
            "conntrack", "-L", "-f", family, "-p", "tcp", "--orig-src", flow.src,
            "--sport", str(flow.sport), "-o", "id",
        ]))
        return tuple(line for line in out.splitlines() if line.strip())

    # -- internals -------------------------------------------------------------------------------

    def add_netns(self, name: str) -> None:
        """Create network namespace ``name``, owned (and deleted) by this lab."""
        add_netns(name)
        self._netns.append(name)

    def _free_ips(self) -> tuple[str, ...]:
        """The next never-used pod addresses, one per family (the same host number in
        each): the lab recycles an IP only when told to."""
        for host in range(10, 250):
            ips = tuple(self._pod_ip(p, host) for p in self.plans)
            if not self._allocated_ips.intersection(ips):
                return ips
        raise LabError("the lab's pod network is full")

    def _pod_ip(self, plan: AddressPlan, host: int) -> str:
        net = plan.bridge_pod_net if self.layout == "bridge" else plan.routed_pod_net
        return plan.pod_ip(net, host)

    def publish(self, event_type: Literal["ADDED", "MODIFIED", "DELETED"],
                 obj: dict[str, object]) -> None:
        if self._identity is None:
            raise LabError("the lab is not built yet (use it as a context manager)")
        self._identity.emit(event_type, obj)
