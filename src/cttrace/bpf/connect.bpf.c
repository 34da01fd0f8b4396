/* SPDX-License-Identifier: Apache-2.0 */
/*
 * connect.bpf.c: which socket (pid, comm, cgroup, netns) opened which 4-tuple.
 *
 *   tcp_connect (kprobe) -> CTT_EV_CONNECT
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
 * while the entries they create live in the node's.  IPv4 only (the record
 * holds IPv4 addresses; tcp_v6_connect also ends in tcp_connect).
 *
 * Debian 6.1 and 6.12 (the VM tier's kernels): int tcp_connect(struct sock *sk)
 * in both (include/net/tcp.h), a global text symbol of vmlinux in both; the
 * struct sock_common fields read here (skc_family, skc_num, skc_dport,
 * skc_daddr, skc_rcv_saddr, skc_net) are unchanged between them.
 */
#include "cttrace.h"

/* int tcp_connect(struct sock *sk): process context, the connecting task is current. */
int ctt_connect_enter(struct pt_regs *ctx, struct sock *sk)
{
	struct ctt_connect_event ev = {};
	__u16 family = 0, num = 0;
	__u64 id;

	CTT_READ(family, sk, struct sock, __sk_common.skc_family);
	if (family != AF_INET)
		return 0;
	CTT_READ(ev.saddr_be, sk, struct sock, __sk_common.skc_rcv_saddr);
	CTT_READ(ev.daddr_be, sk, struct sock, __sk_common.skc_daddr);
	CTT_READ(num, sk, struct sock, __sk_common.skc_num);  /* host order */
	CTT_READ(ev.dport_be, sk, struct sock, __sk_common.skc_dport);
	id = bpf_get_current_pid_tgid();
	ev.sport_be = htons(num);
	ev.hdr.ts_ns = bpf_ktime_get_ns();
	ev.hdr.kind = CTT_EV_CONNECT;
	ev.hdr.netns_ino = ctt_sock_netns(sk);
	ev.sock_ptr = (__u64)sk;
	ev.cgroup_id = bpf_get_current_cgroup_id();
	ev.pid = id >> 32;
	ev.tid = (__u32)id;
	bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
	ctt_emit(ctx, &ev, sizeof(ev));
	return 0;
}
