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

/* ---- output ---- */
#if CTT_USE_RINGBUF
BPF_RINGBUF_OUTPUT(ctt_events, CTT_RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(ctt_events);
#endif

BPF_PERCPU_ARRAY(ctt_counters, __u64, CTT_NR_COUNTERS);

/* A NATed TCP entry seen at confirm: what UPDATE and DESTROY need to say
 * about it without re-reading the tuples. */
struct ctt_tracked {
	__u64 created_ns;
	struct ctt_flow orig;
	struct ctt_flow reply;
	__u32 netns_ino;
	__u32 mark;
	__u16 zone;
	__u16 l3num;
};

/* Key: the struct nf_conn address.  LRU, so that entries whose delete we
 * never saw (probe detached and re-attached) age out instead of filling it. */
BPF_TABLE("lru_hash", __u64, struct ctt_tracked, ctt_tracked, CTT_TRACKED_MAX);

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
#else
	if (ctt_events.perf_submit(ctx, data, size) < 0)
		ctt_count(CTT_CNT_LOST);
#endif
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
