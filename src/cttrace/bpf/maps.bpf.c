/* SPDX-License-Identifier: Apache-2.0 */
/*
 * maps.bpf.c: settings, maps and helpers shared by every cttrace program.
 *
 * src/cttrace/sources/bpf.py concatenates, in this order, its settings
 * (#defines), cttrace.h, this file, conntrack.bpf.c, connect.bpf.c and
 * reset.bpf.c into one program text and compiles it once with BCC.
 *
 * Every read of kernel memory goes through CTT_READ (an explicit
 * bpf_probe_read_kernel at offsetof(type, member)), never `ptr->field`:
 * BCC only rewrites dereferences of pointers it can trace back to a probe
 * argument, the verifier rejects the others, and an automatically rewritten
 * read of ct->tuplehash[IP_CT_DIR_REPLY] at confirm time was seen returning
 * zeros (docs/DESIGN.md).  One spelling everywhere, visible in --dump-bpf.
 */
#include <uapi/linux/ptrace.h>
#include <linux/skbuff.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/netfilter.h>
#include <net/sock.h>
#include <net/net_namespace.h>
#include <net/netfilter/nf_conntrack.h>
#include <net/netfilter/nf_conntrack_tuple.h>

#include "cttrace.h"

/* ---- settings: userspace #defines these before this file ---- */
#ifndef CTT_NETNS_INO
#define CTT_NETNS_INO 0        /* conntrack entries of this netns only; 0: all */
#endif
#ifndef CTT_USE_RINGBUF
#define CTT_USE_RINGBUF 0      /* BPF_MAP_TYPE_RINGBUF (5.8+) instead of a perf buffer */
#endif
#ifndef CTT_RINGBUF_PAGES
#define CTT_RINGBUF_PAGES 256  /* ring buffer size in pages, a power of two */
#endif
#ifndef CTT_TRACKED_MAX
#define CTT_TRACKED_MAX 65536  /* NATed TCP entries remembered between confirm and delete */
#endif
#ifndef CTT_STASH_MAX
#define CTT_STASH_MAX 4096     /* calls in flight between a kprobe and its kretprobe */
#endif
#ifndef CTT_NETNS_MAX
#define CTT_NETNS_MAX 1024     /* network namespaces whose failed inserts are counted */
#endif
#ifndef CTT_STREAM_ALL
#define CTT_STREAM_ALL 0       /* 1: send every record (--flows); 0: only what a rule may need */
#endif
#ifndef CTT_LATE_NS
#define CTT_LATE_NS 3000000000ULL  /* an entry unreplied this long is reported (--late-after) */
#endif
#ifndef CTT_INHERIT_NS
#define CTT_INHERIT_NS 1000000000ULL  /* a connect() this long after confirm did not create it */
#endif
#ifndef CTT_CONNECTS_MAX
#define CTT_CONNECTS_MAX 65536 /* connect()s remembered until their entry is confirmed */
#endif
#ifndef CTT_WATCHED_MAX
#define CTT_WATCHED_MAX 16384  /* DNAT targets userspace watches */
#endif
#ifndef CTT_FENTRY
#define CTT_FENTRY 0           /* 1: tcp_connect through a BPF trampoline (fentry) */
#endif

/* ---- output ---- */
#if CTT_USE_RINGBUF
BPF_RINGBUF_OUTPUT(ctt_events, CTT_RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(ctt_events);
#endif

BPF_PERCPU_ARRAY(ctt_counters, __u64, CTT_NR_COUNTERS);

/* Key: the struct nf_conn address.  LRU, so that entries whose delete we
 * never saw (probe detached and re-attached) age out instead of filling it;
 * a delete that finds no record is counted (CTT_CNT_UNSEEN_DELETE). */
BPF_TABLE("lru_hash", __u64, struct ctt_tracked, ctt_tracked, CTT_TRACKED_MAX);

/* Unreplied tracked entries by their client address and port: a second
 * socket's connect() and a reset the client sends find their entry here.
 * Removed at the first reply and at delete. */
BPF_TABLE("lru_hash", struct ctt_client_key, __u64, ctt_unreplied, CTT_TRACKED_MAX);

/* The last connect() per socket 4-tuple (ctt_connect_event.flow, which is the
 * original tuple of the entry its SYN creates), until confirm copies it into the
 * entry it created (tcp_connect runs before the SYN reaches conntrack). */
BPF_TABLE("lru_hash", struct ctt_flow, struct ctt_connect_event, ctt_connects,
	  CTT_CONNECTS_MAX);

/* DNAT targets userspace watches (their owner died, changed, or left its
 * Service): every tracked entry toward one is reported.  Filled and emptied
 * by userspace from the identity index; the value is unused. */
BPF_HASH(ctt_watched, struct ctt_addr, __u8, CTT_WATCHED_MAX);

/* ---- helpers ---- */
#define CTT_READ(dst, ptr, type, member)                                      \
	bpf_probe_read_kernel(&(dst), sizeof(dst),                            \
			      (const char *)(ptr) + offsetof(type, member))

static __always_inline void ctt_count(__u32 slot)
{
	__u64 *value = ctt_counters.lookup(&slot);

	if (value)
		*value += 1;
}

static __always_inline void ctt_emit(void *ctx, void *data, __u32 size)
{
#if CTT_USE_RINGBUF
	if (ctt_events.ringbuf_output(data, size, 0) < 0)
		ctt_count(CTT_CNT_LOST);
	else
		ctt_count(CTT_CNT_EMITTED);
#else
	if (ctt_events.perf_submit(ctx, data, size) < 0)
		ctt_count(CTT_CNT_LOST);
	else
		ctt_count(CTT_CNT_EMITTED);
#endif
}

/* Is addr (union nf_inet_addr bytes) a DNAT target userspace watches? */
static __always_inline int ctt_is_watched(const __u8 *addr)
{
	struct ctt_addr key = {};

	__builtin_memcpy(key.addr, addr, sizeof(key.addr));
	return ctt_watched.lookup(&key) != NULL;
}

/* a[0:16] == b[0:16]; __builtin_memcmp may become a call to memcmp, which BPF lacks. */
static __always_inline int ctt_addr_eq(const __u8 *a, const __u8 *b)
{
	__u64 x[2], y[2];

	__builtin_memcpy(x, a, sizeof(x));
	__builtin_memcpy(y, b, sizeof(y));
	return x[0] == y[0] && x[1] == y[1];
}

static __always_inline void ctt_client_of(struct ctt_client_key *key, const struct ctt_flow *orig)
{
	__builtin_memcpy(key->addr, orig->saddr, sizeof(key->addr));
	key->port_be = orig->sport_be;
}

/*
 * Key for remembering a call between a kprobe and its kretprobe.
 * Conntrack runs in softirq context, where "current" is whatever task was
 * interrupted; all idle tasks (swapper/N) have pid 0, so two CPUs receiving
 * packets while idle would share one key.  Key those by CPU instead: a
 * softirq runs to completion on the CPU it started on.
 */
static __always_inline __u64 ctt_call_key(void)
{
	__u64 id = bpf_get_current_pid_tgid();

	if ((__u32)id == 0)
		id = 0xffffffff00000000ULL | bpf_get_smp_processor_id();
	return id;
}

/* ns.inum of a struct net (what /proc/<pid>/ns/net's inode number shows). */
static __always_inline __u32 ctt_net_ino(const struct net *net)
{
	__u32 ino = 0;

	if (net)
		CTT_READ(ino, net, struct net, ns.inum);
	return ino;
}

/* ct->ct_net is a possible_net_t: a struct net pointer under CONFIG_NET_NS. */
static __always_inline __u32 ctt_ct_netns(const struct nf_conn *ct)
{
#ifdef CONFIG_NET_NS
	struct net *net = NULL;

	CTT_READ(net, ct, struct nf_conn, ct_net);
	return ctt_net_ino(net);
#else
	return 0;
#endif
}

/* sk->__sk_common.skc_net, the socket's namespace. */
static __always_inline __u32 ctt_sock_netns(const struct sock *sk)
{
#ifdef CONFIG_NET_NS
	struct net *net = NULL;

	if (!sk)
		return 0;
	CTT_READ(net, sk, struct sock, __sk_common.skc_net);
	return ctt_net_ino(net);
#else
	return 0;
#endif
}

static __always_inline void ctt_copy_tuple(struct ctt_flow *out,
					   const struct nf_conntrack_tuple *t)
{
	__builtin_memcpy(out->saddr, &t->src.u3, sizeof(out->saddr));
	__builtin_memcpy(out->daddr, &t->dst.u3, sizeof(out->daddr));
	out->sport_be = t->src.u.all;
	out->dport_be = t->dst.u.all;
}
