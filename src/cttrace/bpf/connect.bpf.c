/* SPDX-License-Identifier: Apache-2.0 */
/*
 * connect.bpf.c: which socket (pid, comm, cgroup, netns) opened which 4-tuple.
 *
 *   tcp_connect (fentry, or kprobe) -> remembered; CTT_EV_CONNECT when it matters
 *
 * tcp_v4_connect binds the source port (inet_hash_connect), then calls
 * tcp_connect(sk), which builds and sends the SYN.  At tcp_connect's entry
 * the socket holds its final 4-tuple and no packet has left yet.  That is
 * why this is not a kretprobe on tcp_v4_connect: the SYN leaves inside it,
 * and on a veth the answer can be handled by the softirq that runs when
 * the sender re-enables bottom halves, still inside tcp_v4_connect; the VM
 * tier saw the entry's SYN_SENT -> SYN_RECV before tcp_v4_connect returned.
 * A connect reported after its entry was answered would hide
 * inherited-entry, which needs the new socket before the reply.
 *
 * The tuple is the one the socket sees, before any NAT: it equals the
 * original tuple of the conntrack entry its SYN creates or reuses.  Not
 * filtered by network namespace: on a node, clients live in pod namespaces
 * while the entries they create live in the node's.
 *
 * IPv6: tcp_v6_connect also ends in tcp_connect, with the addresses in
 * skc_v6_daddr and skc_v6_rcv_saddr.  An AF_INET6 socket connecting to a
 * v4-mapped address (::ffff:a.b.c.d, a dual-stack program reaching an IPv4
 * Service) is handed by tcp_v6_connect to tcp_v4_connect, which sets the IPv4
 * fields (sk_daddr_set, sk_rcv_saddr_set) before its tcp_connect; its SYN is an
 * IPv4 packet and creates an IPv4 entry, so it is reported as the IPv4 4-tuple
 * read from skc_daddr and skc_rcv_saddr (family AF_INET), which joins that entry.
 *
 * Each connect is remembered in ctt_connects (confirm copies it into the entry
 * its SYN creates) and sent only when it lands on an unreplied entry another
 * socket created (inherited-entry: the creator's connect and the entry are
 * sent first, see ctt_report_entry), or on an entry userspace already holds.
 * tcp_connect is a vmlinux function: with BTF it is reached through a BPF
 * trampoline (fentry, CTT_FENTRY), cheaper per call than a kprobe.
 *
 * Debian 6.1 and 6.12 (the VM tier's kernels): int tcp_connect(struct sock *sk)
 * in both (include/net/tcp.h), a global text symbol of vmlinux in both; the
 * struct sock_common fields read here (skc_family, skc_num, skc_dport,
 * skc_daddr, skc_rcv_saddr, skc_v6_daddr, skc_v6_rcv_saddr, skc_net) are
 * unchanged between them, as are sk_daddr_set and sk_rcv_saddr_set
 * (include/net/inet_hashtables.h), which write the v4-mapped copies.
 */
#include "cttrace.h"

/* Is this connect one that lands on an unreplied entry another socket created? */
static __always_inline int ctt_join_connect(void *ctx, const struct ctt_connect_event *ev)
{
	struct ctt_client_key client = {};
	struct ctt_tracked *t;
	__u64 *ct_ptr;

	ctt_client_of(&client, &ev->flow);
	ct_ptr = ctt_unreplied.lookup(&client);
	if (!ct_ptr)
		return 0;
	t = ctt_tracked.lookup(ct_ptr);
	if (!t || t->replied_ns)
		return 0;
	if (t->l3num != ev->family || t->orig.dport_be != ev->flow.dport_be ||
	    !ctt_addr_eq(t->orig.daddr, ev->flow.daddr))
		return 0;
	if (!t->reported) {
		if (t->creator.hdr.kind && t->creator.sock_ptr == ev->sock_ptr &&
		    ev->hdr.ts_ns - t->creator.hdr.ts_ns <= CTT_INHERIT_NS)
			return 0;  /* the creator's own connect, seen again */
		if (!t->creator.hdr.kind && ev->hdr.ts_ns - t->created_ns <= CTT_INHERIT_NS) {
			t->creator = *ev;  /* it created the entry; its record came second */
			return 0;
		}
		ctt_report_entry(ctx, (struct nf_conn *)*ct_ptr, *ct_ptr, t,
				 TCP_CONNTRACK_SYN_SENT);
	}
	ctt_emit(ctx, (void *)ev, sizeof(*ev));
	return 1;
}

/*
 * The socket's addresses as its SYN's conntrack entry holds them (union
 * nf_inet_addr bytes) and that entry's family; 0 for a socket of another family.
 */
static __always_inline __u16 ctt_sock_addrs(struct sock *sk, struct ctt_flow *flow)
{
	__u32 saddr_be = 0, daddr_be = 0;
	__u16 family = 0;

	CTT_READ(family, sk, struct sock, __sk_common.skc_family);
#if IS_ENABLED(CONFIG_IPV6)
	if (family == AF_INET6) {
		__u32 daddr[4] = {};

		CTT_READ(daddr, sk, struct sock, __sk_common.skc_v6_daddr);
		/* ipv6_addr_v4mapped(): ::ffff:a.b.c.d goes out as IPv4 (see the top) */
		if (daddr[0] || daddr[1] || daddr[2] != htonl(0x0000ffff)) {
			__builtin_memcpy(flow->daddr, daddr, sizeof(daddr));
			CTT_READ(flow->saddr, sk, struct sock, __sk_common.skc_v6_rcv_saddr);
			return AF_INET6;
		}
		family = AF_INET;
	}
#endif
	if (family != AF_INET)
		return 0;
	CTT_READ(saddr_be, sk, struct sock, __sk_common.skc_rcv_saddr);
	CTT_READ(daddr_be, sk, struct sock, __sk_common.skc_daddr);
	__builtin_memcpy(flow->saddr, &saddr_be, sizeof(saddr_be));
	__builtin_memcpy(flow->daddr, &daddr_be, sizeof(daddr_be));
	return AF_INET;
}

/* int tcp_connect(struct sock *sk): process context, the connecting task is current. */
static __always_inline int ctt_on_connect(void *ctx, struct sock *sk)
{
	struct ctt_connect_event ev = {};
	__u16 num = 0;
	__u64 id;

	ev.family = ctt_sock_addrs(sk, &ev.flow);
	if (!ev.family)
		return 0;
	CTT_READ(num, sk, struct sock, __sk_common.skc_num);  /* host order */
	CTT_READ(ev.flow.dport_be, sk, struct sock, __sk_common.skc_dport);
	id = bpf_get_current_pid_tgid();
	ev.flow.sport_be = htons(num);
	ev.hdr.ts_ns = bpf_ktime_get_ns();
	ev.hdr.kind = CTT_EV_CONNECT;
	ev.hdr.netns_ino = ctt_sock_netns(sk);
	ev.sock_ptr = (__u64)sk;
	ev.cgroup_id = bpf_get_current_cgroup_id();
	ev.pid = id >> 32;
	ev.tid = (__u32)id;
	bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
	if (CTT_STREAM_ALL) {
		ctt_emit(ctx, &ev, sizeof(ev));
	} else if (!ctt_join_connect(ctx, &ev)) {
		ctt_count(CTT_CNT_QUIET);
	}
	ctt_connects.update(&ev.flow, &ev);
	return 0;
}

#if CTT_FENTRY
KFUNC_PROBE(tcp_connect, struct sock *sk)
{
	return ctt_on_connect(ctx, sk);
}
#else
int ctt_connect_enter(struct pt_regs *ctx, struct sock *sk)
{
	return ctt_on_connect(ctx, sk);
}
#endif
