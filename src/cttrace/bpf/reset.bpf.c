/* SPDX-License-Identifier: Apache-2.0 */
/*
 * reset.bpf.c: TCP resets sent and received by this host.
 *
 *   tcp_v4_send_reset (kprobe), or tcp:tcp_send_reset    -> CTT_EV_RESET, sent=1
 *   tcp_v6_send_reset (kprobe, with the IPv4 one)        -> CTT_EV_RESET, sent=1
 *   tcp:tcp_receive_reset (with CTT_STREAM_ALL only)     -> CTT_EV_RESET, sent=0
 *
 * A sent reset leaves the kernel only when it is evidence for a rule: the
 * client resets the target of one of its unreplied entries (unnated-reply:
 * the answer came from the pod IP), found through ctt_unreplied; the entry
 * is reported first (ctt_report_entry).  With CTT_STREAM_ALL every reset goes.
 *
 * The reset that matters most has no socket: a SYN-ACK that arrives from a
 * pod IP instead of the Service VIP (the reply was not reverse-NATed) matches
 * no local socket, and the client's kernel answers it with a RST through
 * tcp_v4_send_reset(NULL, skb).  Before v6.10 (commit 19822a980e19,
 * "trace: tcp: fully support trace_tcp_send_reset") the tcp_send_reset
 * tracepoint requires a socket and never sees that case, so the kprobe is
 * preferred whenever tcp_v4_send_reset can be probed; userspace decides.
 * IPv6 has the same case (a Service's SYN-ACK from the pod's IPv6 address,
 * bridge-nf-call-ip6tables=0) answered by tcp_v6_send_reset(NULL, skb)
 * (net/ipv6/tcp_ipv6.c), probed beside it when it can be; with the tracepoint
 * instead, socketless IPv6 resets are not seen either, as for IPv4.  A
 * v4-mapped socket's segments are IPv4 packets: tcp_v4_send_reset answers them.
 *
 * Debian 6.1 and 6.12 (the VM tier's kernels) differ here.  tcp_v4_send_reset
 * is a local (static) text symbol of net/ipv4/tcp_ipv4.c in both, traceable in
 * both; since v6.10 it takes a third argument, enum sk_rst_reason reason,
 * which the kprobe does not read (its first two are unchanged); the same holds
 * for tcp_v6_send_reset (net/ipv6/tcp_ipv6.c, built in: CONFIG_IPV6=y).  The
 * tcp:tcp_send_reset tracepoint is a DEFINE_EVENT of class tcp_event_sk_skb
 * on 6.1 (fields skaddr, family, sport, dport, saddr_v6, daddr_v6, ...) but a
 * TRACE_EVENT of its own on 6.12 (skbaddr, skaddr, state, reason, saddr and
 * daddr as struct sockaddr_in6 bytes; no family, sport, dport, saddr_v6), so
 * the CTT_SEND_RESET_TRACEPOINT variant below only compiles where the old
 * fields exist; on 6.12 the kprobe is what runs.  tcp:tcp_receive_reset is
 * a DEFINE_EVENT of class tcp_event_sk with the same fields in both.
 */
#include "cttrace.h"

#ifndef CTT_SEND_RESET_TRACEPOINT
#define CTT_SEND_RESET_TRACEPOINT 0  /* 1: use tcp:tcp_send_reset (no kprobe target) */
#endif
#ifndef CTT_RECEIVE_RESET_TRACEPOINT
#define CTT_RECEIVE_RESET_TRACEPOINT 1
#endif

static __always_inline void ctt_reset_out(void *ctx, const struct ctt_reset_event *ev)
{
	struct ctt_client_key client = {};
	struct ctt_tracked *t;
	__u64 *ct_ptr;

	if (CTT_STREAM_ALL) {
		ctt_emit(ctx, (void *)ev, sizeof(*ev));
		return;
	}
	__builtin_memcpy(client.addr, ev->flow.saddr, sizeof(client.addr));
	client.port_be = ev->flow.sport_be;
	ct_ptr = ctt_unreplied.lookup(&client);
	t = ct_ptr ? ctt_tracked.lookup(ct_ptr) : NULL;
	if (!t || t->replied_ns || t->reply.sport_be != ev->flow.dport_be ||
	    !ctt_addr_eq(t->reply.saddr, ev->flow.daddr)) {
		ctt_count(CTT_CNT_QUIET);
		return;
	}
	ctt_report_entry(ctx, (struct nf_conn *)*ct_ptr, *ct_ptr, t, TCP_CONNTRACK_SYN_SENT);
	ctt_emit(ctx, (void *)ev, sizeof(*ev));
}

/*
 * void tcp_v4_send_reset(const struct sock *sk, struct sk_buff *skb, ...)
 * void tcp_v6_send_reset(const struct sock *sk, struct sk_buff *skb, ...)
 * skb is the segment being answered (its network header an iphdr or an
 * ipv6hdr, per family); the RST goes back to its source.
 * The kernel still returns without sending for a RST or a non-local
 * destination: this records the attempt.
 */
static __always_inline int ctt_on_send_reset(void *ctx, const struct sock *sk,
					     struct sk_buff *skb, __u16 family)
{
	struct ctt_reset_event ev = {};
	unsigned char *head = NULL;
	__u16 network_off = 0, transport_off = 0;
	struct net_device *dev = NULL;
	struct tcphdr th = {};

	CTT_READ(head, skb, struct sk_buff, head);
	CTT_READ(network_off, skb, struct sk_buff, network_header);
	CTT_READ(transport_off, skb, struct sk_buff, transport_header);
	bpf_probe_read_kernel(&th, sizeof(th), head + transport_off);
	if (th.rst)
		return 0;  /* never answered */
	if (family == AF_INET6) {
		struct ipv6hdr ip6h = {};

		bpf_probe_read_kernel(&ip6h, sizeof(ip6h), head + network_off);
		__builtin_memcpy(ev.flow.saddr, &ip6h.daddr, sizeof(ip6h.daddr));
		__builtin_memcpy(ev.flow.daddr, &ip6h.saddr, sizeof(ip6h.saddr));
	} else {
		struct iphdr iph = {};

		bpf_probe_read_kernel(&iph, sizeof(iph), head + network_off);
		__builtin_memcpy(ev.flow.saddr, &iph.daddr, sizeof(iph.daddr));
		__builtin_memcpy(ev.flow.daddr, &iph.saddr, sizeof(iph.saddr));
	}

	ev.hdr.ts_ns = bpf_ktime_get_ns();
	ev.hdr.kind = CTT_EV_RESET;
	if (sk) {
		ev.hdr.netns_ino = ctt_sock_netns(sk);
	} else {
#ifdef CONFIG_NET_NS
		struct net *net = NULL;

		CTT_READ(dev, skb, struct sk_buff, dev);
		if (dev)
			CTT_READ(net, dev, struct net_device, nd_net);
		ev.hdr.netns_ino = ctt_net_ino(net);
#endif
	}
	ev.sock_ptr = (__u64)sk;
	ev.family = family;
	ev.sent = 1;
	ev.flow.sport_be = th.dest;
	ev.flow.dport_be = th.source;
	ctt_reset_out(ctx, &ev);
	return 0;
}

/* Kprobes: tcp_v4_send_reset and tcp_v6_send_reset are static (reached through
 * BTF only where they were not inlined), and resets are rare next to packets. */
int ctt_send_reset_enter(struct pt_regs *ctx, const struct sock *sk, struct sk_buff *skb)
{
	return ctt_on_send_reset(ctx, sk, skb, AF_INET);
}

int ctt_send_reset6_enter(struct pt_regs *ctx, const struct sock *sk, struct sk_buff *skb)
{
	return ctt_on_send_reset(ctx, sk, skb, AF_INET6);
}

/*
 * Both tracepoints come from the tcp_event_sk(_skb) classes of
 * include/trace/events/tcp.h: the socket's local address is saddr/sport,
 * ports are already in host order.  `local` and `remote` are s or d: which
 * side of the RST's own flow the socket's local address is on.
 */
#define CTT_RESET_FROM_TP(args, ev, sent_, local, remote)                     \
	do {                                                                  \
		(ev).hdr.ts_ns = bpf_ktime_get_ns();                          \
		(ev).hdr.kind = CTT_EV_RESET;                                 \
		(ev).hdr.netns_ino =                                          \
			ctt_sock_netns((const struct sock *)(args)->skaddr);  \
		(ev).sock_ptr = (__u64)(args)->skaddr;                        \
		(ev).family = (args)->family;                                 \
		(ev).sent = (sent_);                                          \
		if ((args)->family == AF_INET6) {                             \
			__builtin_memcpy((ev).flow.local##addr, (args)->saddr_v6, 16); \
			__builtin_memcpy((ev).flow.remote##addr, (args)->daddr_v6, 16); \
		} else {                                                      \
			__builtin_memcpy((ev).flow.local##addr, (args)->saddr, 4); \
			__builtin_memcpy((ev).flow.remote##addr, (args)->daddr, 4); \
		}                                                             \
		(ev).flow.local##port_be = htons((args)->sport);              \
		(ev).flow.remote##port_be = htons((args)->dport);             \
	} while (0)

#if CTT_SEND_RESET_TRACEPOINT
TRACEPOINT_PROBE(tcp, tcp_send_reset)
{
	struct ctt_reset_event ev = {};

	CTT_RESET_FROM_TP(args, ev, 1, s, d);
	ctt_reset_out(args, &ev);
	return 0;
}
#endif

#if CTT_RECEIVE_RESET_TRACEPOINT
TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
	struct ctt_reset_event ev = {};

	CTT_RESET_FROM_TP(args, ev, 0, d, s);
	ctt_emit(args, &ev, sizeof(ev));
	return 0;
}
#endif
