/* SPDX-License-Identifier: Apache-2.0 */
/*
 * conntrack.bpf.c: NATed TCP conntrack entries from confirm to delete.
 *
 *   __nf_conntrack_confirm (kprobe + kretprobe)   -> CTT_EV_CT_NEW
 *   nf_conntrack_tcp_packet (kprobe + kretprobe)  -> CTT_EV_CT_UPDATE
 *   nf_ct_delete (kprobe)                         -> CTT_EV_CT_DESTROY
 *
 * Only TCP entries with a NAT transformation (IPS_NAT_MASK) are tracked, and
 * only the state changes the correlator's rules need leave the kernel: out of
 * SYN_SENT (the recycled-IP window closes), into ESTABLISHED, and into TIME_WAIT
 * and CLOSE (the connection is over: an entry that lingers for minutes after a
 * graceful close must not read as a live connection to a pod that is gone).
 * All three functions are global symbols of the nf_conntrack module: load it
 * before attaching.
 *
 * Kernels compared (Debian 6.1.0-57 and 6.12.118+deb12, the two the VM tier
 * boots): the three signatures are the same in both header trees
 * (int __nf_conntrack_confirm(struct sk_buff *skb); int nf_conntrack_tcp_packet(
 * struct nf_conn *ct, struct sk_buff *skb, unsigned int dataoff, enum
 * ip_conntrack_info ctinfo, const struct nf_hook_state *state); bool
 * nf_ct_delete(struct nf_conn *ct, u32 portid, int report)), all three are
 * global text symbols (T) of nf_conntrack.ko in both (6.1 also has
 * __nf_conntrack_confirm.cold and nf_conntrack_tcp_packet.cold, local
 * split-off parts the probes do not touch), and struct nf_conn and
 * struct ip_ct_tcp are declared identically in both; the field offsets come
 * from the running kernel's headers at compile time either way.
 */
#include "cttrace.h"

/* Entry of __nf_conntrack_confirm, kept until its return says NF_ACCEPT. */
BPF_HASH(ctt_confirm_stash, __u64, struct ctt_ct_event, CTT_STASH_MAX);

struct ctt_tcp_call {
	__u64 ct_ptr;
	__u8 old_state;
};

BPF_HASH(ctt_tcp_stash, __u64, struct ctt_tcp_call, CTT_STASH_MAX);

/*
 * NATed TCP entries whose confirm failed (the insert clashed on a tuple already
 * in the table, typically a SNAT port race: the packet is dropped, and the
 * kernel counts insert_failed and drop in that namespace's statistics), per
 * network namespace (ns.inum).  Read by userspace for snat-collision in the
 * namespaces it does not sample itself.  LRU: namespaces come and go with pods.
 */
BPF_TABLE("lru_hash", __u32, __u64, ctt_insert_failed, CTT_NETNS_MAX);

static __always_inline void ctt_count_insert_failed(__u32 netns)
{
	__u64 one = 1, *count = ctt_insert_failed.lookup(&netns);

	if (!count && ctt_insert_failed.insert(&netns, &one) == 0)
		return;
	if (!count)
		count = ctt_insert_failed.lookup(&netns); /* another CPU inserted it first */
	if (count)
		__sync_fetch_and_add(count, 1);
}

/* Fill ev with what the kernel holds for ct.  The tuples are read with one
 * explicit bpf_probe_read_kernel each (see maps.bpf.c). */
static __always_inline void ctt_read_entry(struct ctt_ct_event *ev,
					   const struct nf_conn *ct,
					   const struct nf_conntrack_tuple *orig)
{
	struct nf_conntrack_tuple reply = {};
	unsigned long status = 0;

	CTT_READ(reply, ct, struct nf_conn, tuplehash[IP_CT_DIR_REPLY].tuple);
	CTT_READ(status, ct, struct nf_conn, status);
	CTT_READ(ev->tcp_state, ct, struct nf_conn, proto.tcp.state);
#ifdef CONFIG_NF_CONNTRACK_MARK
	CTT_READ(ev->mark, ct, struct nf_conn, mark);
#endif
#ifdef CONFIG_NF_CONNTRACK_ZONES
	CTT_READ(ev->zone, ct, struct nf_conn, zone.id);
#endif
	ev->ct_ptr = (__u64)ct;
	ev->status = (__u32)status;
	ev->l3num = orig->src.l3num;
	ctt_copy_tuple(&ev->orig, orig);
	ctt_copy_tuple(&ev->reply, &reply);
}

/*
 * int __nf_conntrack_confirm(struct sk_buff *skb)
 * The entry is skb->_nfct & NFCT_PTRMASK (the low bits hold ctinfo).  It is
 * read here, at entry, because on a clash the kernel may swap the skb's entry
 * for the one already in the table and free ours before returning.
 * NAT has run by now: DNAT in PREROUTING/OUTPUT, SNAT in POSTROUTING/INPUT,
 * and confirm is the last netfilter hook (NF_IP_PRI_CONNTRACK_CONFIRM).
 */
int ctt_confirm_enter(struct pt_regs *ctx, struct sk_buff *skb)
{
	unsigned long nfct = 0, status = 0;
	struct nf_conntrack_tuple orig = {};
	struct ctt_ct_event ev = {};
	struct nf_conn *ct;
	__u32 netns;
	__u64 key;

	CTT_READ(nfct, skb, struct sk_buff, _nfct);
	ct = (struct nf_conn *)(nfct & NFCT_PTRMASK);
	if (!ct)
		return 0;

	CTT_READ(orig, ct, struct nf_conn, tuplehash[IP_CT_DIR_ORIGINAL].tuple);
	CTT_READ(status, ct, struct nf_conn, status);
	if (orig.dst.protonum != IPPROTO_TCP || !(status & IPS_NAT_MASK)) {
		ctt_count(CTT_CNT_FILTERED);
		return 0;
	}
	netns = ctt_ct_netns(ct);
	if (CTT_NETNS_INO && netns != CTT_NETNS_INO) {
		ctt_count(CTT_CNT_FILTERED);
		return 0;
	}

	ev.hdr.kind = CTT_EV_CT_NEW;
	ev.hdr.netns_ino = netns;
	ctt_read_entry(&ev, ct, &orig);
	key = ctt_call_key();
	if (ctt_confirm_stash.update(&key, &ev) < 0)
		ctt_count(CTT_CNT_STASH_FULL);
	return 0;
}

int ctt_confirm_return(struct pt_regs *ctx)
{
	__u64 key = ctt_call_key();
	struct ctt_ct_event *ev = ctt_confirm_stash.lookup(&key);
	struct ctt_tracked tracked = {};
	int verdict = PT_REGS_RC(ctx);
	__u64 ct_ptr;

	if (!ev)
		return 0;
	if (verdict != NF_ACCEPT) {
		/* insert clash: the packet is dropped and the entry never existed */
		ctt_count(CTT_CNT_NOT_ACCEPTED);
		ctt_count_insert_failed(ev->hdr.netns_ino);
		ctt_confirm_stash.delete(&key);
		return 0;
	}
	ev->hdr.ts_ns = bpf_ktime_get_ns();
	ev->created_ns = ev->hdr.ts_ns;
	/* read before the kernel set IPS_CONFIRMED; NF_ACCEPT means it is set now */
	ev->status |= IPS_CONFIRMED;

	tracked.created_ns = ev->created_ns;
	tracked.orig = ev->orig;
	tracked.reply = ev->reply;
	tracked.netns_ino = ev->hdr.netns_ino;
	tracked.mark = ev->mark;
	tracked.zone = ev->zone;
	tracked.l3num = ev->l3num;
	ct_ptr = ev->ct_ptr;
	ctt_tracked.update(&ct_ptr, &tracked);

	ctt_emit(ctx, ev, sizeof(*ev));
	ctt_confirm_stash.delete(&key);
	return 0;
}

/*
 * int nf_conntrack_tcp_packet(struct nf_conn *ct, struct sk_buff *skb, ...)
 * Runs for every TCP packet conntrack sees; only tracked entries are
 * remembered, so the cost for all other traffic is one hash lookup.
 */
int ctt_tcp_packet_enter(struct pt_regs *ctx, struct nf_conn *ct)
{
	__u64 ct_ptr = (__u64)ct;
	struct ctt_tcp_call call = {};
	__u64 key;

	if (!ctt_tracked.lookup(&ct_ptr))
		return 0;
	call.ct_ptr = ct_ptr;
	CTT_READ(call.old_state, ct, struct nf_conn, proto.tcp.state);
	key = ctt_call_key();
	if (ctt_tcp_stash.update(&key, &call) < 0)
		ctt_count(CTT_CNT_STASH_FULL);
	return 0;
}

/*
 * Bit s of CTT_WANTED_FROM_STATES / CTT_WANTED_TO_STATES is enum tcp_conntrack's
 * state s: a change out of a "no reply yet" state (the first reply) or into a state
 * some rule reads. Userspace #defines both from the rules' declarations.
 */
#if !defined(CTT_WANTED_FROM_STATES) || !defined(CTT_WANTED_TO_STATES)
#error "CTT_WANTED_FROM_STATES and CTT_WANTED_TO_STATES come from cttrace's BpfSettings"
#endif
static __always_inline int ctt_transition_wanted(__u8 old_state, __u8 new_state)
{
	return (old_state < 32 && ((CTT_WANTED_FROM_STATES >> old_state) & 1)) ||
	       (new_state < 32 && ((CTT_WANTED_TO_STATES >> new_state) & 1));
}

/*
 * Fill ev from the kernel-side record of a tracked entry: the tuples, zone,
 * mark and netns were captured at confirm; the status and the clock are read now.
 */
static __always_inline void ctt_fill_tracked(struct ctt_ct_event *ev, __u32 kind,
					     struct nf_conn *ct, __u64 ct_ptr,
					     const struct ctt_tracked *tracked)
{
	unsigned long status = 0;

	CTT_READ(status, ct, struct nf_conn, status);
	ev->hdr.ts_ns = bpf_ktime_get_ns();
	ev->hdr.kind = kind;
	ev->hdr.netns_ino = tracked->netns_ino;
	ev->ct_ptr = ct_ptr;
	ev->created_ns = tracked->created_ns;
	ev->orig = tracked->orig;
	ev->reply = tracked->reply;
	ev->status = (__u32)status;
	ev->mark = tracked->mark;
	ev->zone = tracked->zone;
	ev->l3num = tracked->l3num;
}

/* Emit CTT_EV_CT_UPDATE when ct's state moved from old_state in a way the rules need. */
static __always_inline void ctt_report_transition(struct pt_regs *ctx, struct nf_conn *ct,
						  __u64 ct_ptr, const struct ctt_tracked *tracked,
						  __u8 old_state)
{
	struct ctt_ct_event ev = {};

	CTT_READ(ev.tcp_state, ct, struct nf_conn, proto.tcp.state);
	if (ev.tcp_state == old_state)
		return;
	if (!ctt_transition_wanted(old_state, ev.tcp_state)) {
		ctt_count(CTT_CNT_FILTERED_TRANSITION);
		return;
	}
	ctt_fill_tracked(&ev, CTT_EV_CT_UPDATE, ct, ct_ptr, tracked);
	ev.old_tcp_state = old_state;
	ctt_emit(ctx, &ev, sizeof(ev));
}

int ctt_tcp_packet_return(struct pt_regs *ctx)
{
	__u64 key = ctt_call_key();
	struct ctt_tcp_call *call = ctt_tcp_stash.lookup(&key);
	struct ctt_tracked *tracked;
	__u8 old_state;
	__u64 ct_ptr;

	if (!call)
		return 0;
	ct_ptr = call->ct_ptr;
	old_state = call->old_state;
	ctt_tcp_stash.delete(&key);

	/* Gone when the packet killed the entry: ctt_ct_delete reported it. */
	tracked = ctt_tracked.lookup(&ct_ptr);
	if (!tracked)
		return 0;
	ctt_report_transition(ctx, (struct nf_conn *)ct_ptr, ct_ptr, tracked, old_state);
	return 0;
}

/*
 * bool nf_ct_delete(struct nf_conn *ct, u32 portid, int report)
 * Every way a confirmed entry dies goes through here: timeout (gc worker),
 * nf_ct_kill (RST, NEW SYN on a closed entry), early drop, ctnetlink delete,
 * flush, namespace exit.  The entry is still intact at entry.  When the kill
 * comes from nf_conntrack_tcp_packet itself, its pending state change is
 * reported first: UPDATE (SYN_SENT -> CLOSE), then DESTROY.
 */
int ctt_ct_delete(struct pt_regs *ctx, struct nf_conn *ct)
{
	__u64 ct_ptr = (__u64)ct;
	struct ctt_tracked *tracked = ctt_tracked.lookup(&ct_ptr);
	struct ctt_ct_event ev = {};
	struct ctt_tcp_call *call;
	__u64 call_key;

	if (!tracked)
		return 0;
	/*
	 * A RST to an entry that never saw a reply (or a SYN on a closed one)
	 * makes nf_conntrack_tcp_packet kill the entry itself, before it
	 * returns: its SYN_SENT -> CLOSE would be lost with the entry.  Report
	 * the transition of that call here, before the delete.
	 */
	call_key = ctt_call_key();
	call = ctt_tcp_stash.lookup(&call_key);
	if (call && call->ct_ptr == ct_ptr) {
		ctt_report_transition(ctx, ct, ct_ptr, tracked, call->old_state);
		ctt_tcp_stash.delete(&call_key);
	}
	CTT_READ(ev.tcp_state, ct, struct nf_conn, proto.tcp.state);
	ctt_fill_tracked(&ev, CTT_EV_CT_DESTROY, ct, ct_ptr, tracked);
	ctt_emit(ctx, &ev, sizeof(ev));
	ctt_tracked.delete(&ct_ptr);
	return 0;
}
