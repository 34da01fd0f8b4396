/* SPDX-License-Identifier: Apache-2.0 */
/*
 * conntrack.bpf.c: translated (DNAT or IPVS) TCP conntrack entries from confirm to delete.
 *
 *   __nf_conntrack_confirm (fexit, or kprobe + kretprobe) -> the entry is tracked
 *   nf_conntrack_tcp_packet (fexit, or kprobe + kretprobe) -> its state changes
 *   nf_ct_delete (fentry, or kprobe)                       -> it is gone
 *
 * Only TCP entries whose destination was translated (ctt_translated: DNAT, or
 * IPVS) are tracked.  The kernel keeps what it knows of each (creation time,
 * tuples, the socket that created it, its last TCP state: struct ctt_tracked)
 * and sends a record to userspace only once the entry becomes interesting to a
 * rule (ctt_report_entry):
 *   - its first reply comes CTT_LATE_NS or more after confirm, or it is still
 *     unreplied that long when the client retransmits (late-establish,
 *     wrong-pod, the no-reply evidence of unnated-reply);
 *   - its DNAT target is in ctt_watched (userspace: the target's owner died,
 *     changed, or left its Service);
 *   - a second socket's connect() lands on it while unreplied (connect.bpf.c:
 *     inherited-entry), or the client resets its target's answer (reset.bpf.c);
 * from then on its wanted state changes and its delete follow.  A healthy
 * entry (answered in time by a target nobody watches, one socket) sends
 * nothing.  With CTT_STREAM_ALL (--flows) every entry is reported at confirm.
 * Reported late, an entry's history is replayed first: a NEW stamped with its
 * confirm time, then its first reply, so userspace sees what it would have
 * seen had the record been sent at the time.
 *
 * Two variants of each hook are compiled; userspace loads one
 * (cttrace/sources/trampoline.py, cttrace/sources/bpf.py):
 *   - BPF trampolines (ctt_*_fexit, ctt_ct_delete_fentry): one program per
 *     call, and an fexit program sees the function's arguments and its return
 *     value together, so no call is remembered between two probes.  These are
 *     functions of the nf_conntrack module, which BCC (0.26, Debian 12) cannot
 *     attach to (it resolves fentry/fexit targets in vmlinux's BTF only):
 *     userspace loads them itself against the module's BTF
 *     (/sys/kernel/btf/nf_conntrack, CONFIG_DEBUG_INFO_BTF_MODULES).
 *   - kprobes, where the kernel has no BTF or trampolines: the entry probe
 *     stashes what the return probe needs (ctt_confirm_stash, ctt_tcp_stash).
 * nf_conntrack_tcp_packet runs for every TCP packet conntrack sees; it is still
 * the only place a state change shows (there is no conntrack tracepoint, and
 * conntrack's event cache is delivered only to ctnetlink listeners), so it stays
 * hooked: for an entry not tracked, its fexit program is one hash lookup
 * (ctt_tracked), and the kprobe pair's entry probe is one lookup too.
 * All three functions are global symbols of nf_conntrack: load it before
 * attaching.
 *
 * Kernels compared (Debian 6.1.0-57 and 6.12.118+deb12, the two the VM tier
 * boots): the three signatures are the same in both header trees
 * (int __nf_conntrack_confirm(struct sk_buff *skb); int nf_conntrack_tcp_packet(
 * struct nf_conn *ct, struct sk_buff *skb, unsigned int dataoff, enum
 * ip_conntrack_info ctinfo, const struct nf_hook_state *state); bool
 * nf_ct_delete(struct nf_conn *ct, u32 portid, int report)), all three are
 * FUNCs of nf_conntrack's module BTF in both,
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

/*
 * Was the entry's destination translated?  A NAT status bit (iptables or
 * nftables DNAT, and SNAT: nf_nat), or a reply that comes from another address
 * or port than the client connected to: IPVS with net.ipv4.vs.conntrack=1
 * (kube-proxy's IPVS mode) rewrites the unconfirmed entry's reply tuple itself
 * (ip_vs_update_conntrack -> nf_conntrack_alter_reply, before the packet goes
 * on to POST_ROUTING's confirm) and sets no NAT bit.  The netlink source keeps
 * the same entries (cttrace.sources.ctnetlink.translated).
 */
static __always_inline int ctt_translated(unsigned long status,
					  const struct nf_conntrack_tuple *orig,
					  const struct nf_conntrack_tuple *reply)
{
	return (status & IPS_NAT_MASK) || orig->dst.u.all != reply->src.u.all ||
	       !ctt_addr_eq((const __u8 *)&orig->dst.u3, (const __u8 *)&reply->src.u3);
}

/* Read ct's tuples and status; 1 for a TCP entry whose destination was translated.
 * The reply tuple is read only for TCP entries. */
static __always_inline int ctt_read_translated_tcp(const struct nf_conn *ct,
						   struct nf_conntrack_tuple *orig,
						   struct nf_conntrack_tuple *reply,
						   unsigned long *status)
{
	CTT_READ(*orig, ct, struct nf_conn, tuplehash[IP_CT_DIR_ORIGINAL].tuple);
	if (orig->dst.protonum != IPPROTO_TCP)
		return 0;
	CTT_READ(*reply, ct, struct nf_conn, tuplehash[IP_CT_DIR_REPLY].tuple);
	CTT_READ(*status, ct, struct nf_conn, status);
	return ctt_translated(*status, orig, reply);
}

/* Fill ev with what the kernel holds for ct, whose tuples and status were read
 * already (with one explicit bpf_probe_read_kernel each: see maps.bpf.c). */
static __always_inline void ctt_read_entry(struct ctt_ct_event *ev,
					   const struct nf_conn *ct,
					   const struct nf_conntrack_tuple *orig,
					   const struct nf_conntrack_tuple *reply,
					   unsigned long status)
{
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
	ctt_copy_tuple(&ev->reply, reply);
}

/*
 * int __nf_conntrack_confirm(struct sk_buff *skb)
 * The entry is skb->_nfct & NFCT_PTRMASK (the low bits hold ctinfo).  NAT has
 * run by now: DNAT in PREROUTING/OUTPUT, SNAT in POSTROUTING/INPUT, and confirm
 * is the last netfilter hook (NF_IP_PRI_CONNTRACK_CONFIRM).  Fills ev and
 * returns 1 for an entry to track; 0 (counted) for the others.
 */
static __always_inline int ctt_confirm_read(struct sk_buff *skb, struct ctt_ct_event *ev)
{
	unsigned long nfct = 0, status = 0;
	struct nf_conntrack_tuple orig = {}, reply = {};
	struct nf_conn *ct;
	__u32 netns;

	CTT_READ(nfct, skb, struct sk_buff, _nfct);
	ct = (struct nf_conn *)(nfct & NFCT_PTRMASK);
	if (!ct)
		return 0;

	if (!ctt_read_translated_tcp(ct, &orig, &reply, &status)) {
		ctt_count(CTT_CNT_FILTERED);
		return 0;
	}
	netns = ctt_ct_netns(ct);
	if (CTT_NETNS_INO && netns != CTT_NETNS_INO) {
		ctt_count(CTT_CNT_FILTERED);
		return 0;
	}

	ev->hdr.kind = CTT_EV_CT_NEW;
	ev->hdr.netns_ino = netns;
	ctt_read_entry(ev, ct, &orig, &reply, status);
	return 1;
}

/* What the kernel keeps of ev's entry, created now. */
static __always_inline void ctt_track(struct ctt_tracked *t, const struct ctt_ct_event *ev)
{
	struct ctt_connect_event *creator;

	t->created_ns = ev->created_ns;
	t->orig = ev->orig;
	t->reply = ev->reply;
	t->netns_ino = ev->hdr.netns_ino;
	t->mark = ev->mark;
	t->zone = ev->zone;
	t->l3num = ev->l3num;
	t->status = ev->status;
	t->state = ev->tcp_state;
	/* The socket whose SYN this is: tcp_connect ran just before (connect.bpf.c). */
	creator = ctt_connects.lookup(&ev->orig);
	if (creator && ev->created_ns - creator->hdr.ts_ns <= CTT_INHERIT_NS)
		t->creator = *creator;
}

/* Confirm of ev's entry returned verdict: track the entry, or count the failed insert. */
static __always_inline void ctt_confirmed(void *ctx, struct ctt_ct_event *ev, int verdict)
{
	struct ctt_tracked tracked = {};
	struct ctt_client_key client = {};
	__u64 ct_ptr;

	if (verdict != NF_ACCEPT) {
		/* insert clash: the packet is dropped and the entry never existed */
		ctt_count(CTT_CNT_NOT_ACCEPTED);
		ctt_count_insert_failed(ev->hdr.netns_ino);
		return;
	}
	ev->hdr.ts_ns = bpf_ktime_get_ns();
	ev->created_ns = ev->hdr.ts_ns;
	/* read before the kernel set IPS_CONFIRMED (kprobe); NF_ACCEPT means it is set now */
	ev->status |= IPS_CONFIRMED;

	ctt_track(&tracked, ev);
	ct_ptr = ev->ct_ptr;
	if (CTT_STREAM_ALL || ctt_is_watched(ev->reply.saddr)) {
		tracked.reported = 1;
		ctt_count(CTT_CNT_REPORTED);
		/* Its creator's connect first, as ctt_report_entry does (--flows sent it already):
		 * a later socket on the tuple is inherited-entry's "new" next to this "old". */
		if (!CTT_STREAM_ALL && tracked.creator.hdr.kind)
			ctt_emit(ctx, &tracked.creator, sizeof(tracked.creator));
		ctt_emit(ctx, ev, sizeof(*ev));
	}
	ctt_tracked.update(&ct_ptr, &tracked);
	ctt_count(CTT_CNT_TRACKED);
	ctt_client_of(&client, &ev->orig);
	ctt_unreplied.update(&client, &ct_ptr);
}

/*
 * fexit: the arguments and the verdict in one program.  skb still holds our
 * entry: a TCP insert clash is not resolved by swapping in the entry already in
 * the table (only protocols with nf_conntrack_l4proto.allow_clash are, and TCP
 * has none; nf_ct_resolve_clash), the skb keeps ours and NF_DROP is returned.
 * ev lives in a per-CPU slot (the stack holds struct ctt_tracked already); a
 * trampoline program does not run nested in itself on one CPU (the kernel skips
 * and counts such a run: recursion_misses), so the slot is this call's alone.
 */
BPF_PERCPU_ARRAY(ctt_confirm_scratch, struct ctt_ct_event, 1);

BPF_PROG(ctt_confirm_fexit, struct sk_buff *skb, int verdict)
{
	__u32 zero = 0;
	struct ctt_ct_event *ev = ctt_confirm_scratch.lookup(&zero);

	if (!ev)
		return 0;
	__builtin_memset(ev, 0, sizeof(*ev));
	if (ctt_confirm_read(skb, ev))
		ctt_confirmed(ctx, ev, verdict);
	return 0;
}

/*
 * kprobe: the entry is read at entry, where it is certainly ours, and kept
 * until the return probe reads the verdict.
 */
int ctt_confirm_enter(struct pt_regs *ctx, struct sk_buff *skb)
{
	struct ctt_ct_event ev = {};
	__u64 key;

	if (!ctt_confirm_read(skb, &ev))
		return 0;
	key = ctt_call_key();
	if (ctt_confirm_stash.update(&key, &ev) < 0)
		ctt_count(CTT_CNT_STASH_FULL);
	return 0;
}

int ctt_confirm_return(struct pt_regs *ctx)
{
	__u64 key = ctt_call_key();
	struct ctt_ct_event *ev = ctt_confirm_stash.lookup(&key);

	if (!ev)
		return 0;
	ctt_confirmed(ctx, ev, PT_REGS_RC(ctx));
	ctt_confirm_stash.delete(&key);
	return 0;
}

/*
 * int nf_conntrack_tcp_packet(struct nf_conn *ct, struct sk_buff *skb, ...)
 * Runs for every TCP packet conntrack sees, with ct->lock held while it moves
 * ct->proto.tcp.state.  The kprobe variant remembers the state before the call
 * of tracked entries only (ctt_tcp_stash), so the cost for all other traffic is
 * one hash lookup; the fexit variant (below) compares with ctt_tracked's state.
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

/* The entry is answered or gone: no connect() or reset can inherit or reset it now. */
static __always_inline void ctt_forget_unreplied(const struct ctt_tracked *t, __u64 ct_ptr)
{
	struct ctt_client_key client = {};
	__u64 *held;

	ctt_client_of(&client, &t->orig);
	held = ctt_unreplied.lookup(&client);
	if (held && *held == ct_ptr)
		ctt_unreplied.delete(&client);
}

/*
 * The entry became interesting: from now on userspace holds it.  Its history
 * so far is sent first: the creating socket's connect(), a NEW stamped with
 * the confirm time, and, when it was answered before state_before (the state
 * at this moment), its first reply.  Nothing when it was reported already:
 * of two CPUs that find it unreported, the one that swaps `reported` sends it.
 */
static __always_inline void ctt_report_entry(void *ctx, struct nf_conn *ct, __u64 ct_ptr,
					     struct ctt_tracked *t, __u8 state_before)
{
	struct ctt_ct_event ev = {};

	if (t->reported || __sync_val_compare_and_swap(&t->reported, 0, 1) != 0)
		return;
	ctt_count(CTT_CNT_REPORTED);
	if (t->creator.hdr.kind)
		ctt_emit(ctx, &t->creator, sizeof(t->creator));
	ctt_fill_tracked(&ev, CTT_EV_CT_NEW, ct, ct_ptr, t);
	ev.hdr.ts_ns = t->created_ns;
	ev.status &= ~(IPS_SEEN_REPLY | IPS_ASSURED);
	ev.tcp_state = TCP_CONNTRACK_SYN_SENT;
	ctt_emit(ctx, &ev, sizeof(ev));
	if (!t->replied_ns || state_before == TCP_CONNTRACK_SYN_SENT)
		return;
	ev.hdr.kind = CTT_EV_CT_UPDATE;
	ev.hdr.ts_ns = t->replied_ns;
	ev.status |= IPS_SEEN_REPLY;
	ev.old_tcp_state = TCP_CONNTRACK_SYN_SENT;
	ev.tcp_state = state_before;
	ctt_emit(ctx, &ev, sizeof(ev));
}

/*
 * ct's call of nf_conntrack_tcp_packet is over; old_state was its state before.
 * Decides whether the entry became interesting, and emits CTT_EV_CT_UPDATE for
 * a change the rules need of an entry userspace holds.
 */
static __always_inline void ctt_report_transition(void *ctx, struct nf_conn *ct,
						  __u64 ct_ptr, struct ctt_tracked *t,
						  __u8 old_state)
{
	struct ctt_ct_event ev = {};
	__u64 now = bpf_ktime_get_ns();
	__u64 seen;
	__u8 state = 0;

	CTT_READ(state, ct, struct nf_conn, proto.tcp.state);
	if (state == old_state) {
		/* A retransmitted SYN of an entry still unreplied CTT_LATE_NS after confirm. */
		if (old_state == TCP_CONNTRACK_SYN_SENT && !t->replied_ns &&
		    now - t->created_ns >= CTT_LATE_NS)
			ctt_report_entry(ctx, ct, ct_ptr, t, old_state);
		return;
	}
	/*
	 * Claim the change: two CPUs that each finished a packet of this entry (the
	 * final ACK and a retransmitted FIN, say) before either program ran read the
	 * same state here; the one that swaps it reports the change, the other finds
	 * the new state stored and has nothing new to say.
	 */
	seen = t->state;
	if (seen == state || __sync_val_compare_and_swap(&t->state, seen, state) != seen)
		return;
	if (old_state == TCP_CONNTRACK_SYN_SENT && !t->replied_ns) {
		t->replied_ns = now;  /* the first reply (or the RST that closed it unanswered) */
		ctt_forget_unreplied(t, ct_ptr);
		if (now - t->created_ns >= CTT_LATE_NS)
			ctt_report_entry(ctx, ct, ct_ptr, t, old_state);
	}
	if (!t->reported && ctt_is_watched(t->reply.saddr))
		ctt_report_entry(ctx, ct, ct_ptr, t, old_state);
	if (!t->reported)
		return;
	if (!ctt_transition_wanted(old_state, state)) {
		ctt_count(CTT_CNT_FILTERED_TRANSITION);
		return;
	}
	ctt_fill_tracked(&ev, CTT_EV_CT_UPDATE, ct, ct_ptr, t);
	ev.hdr.ts_ns = now;
	ev.tcp_state = state;
	ev.old_tcp_state = old_state;
	ctt_emit(ctx, &ev, sizeof(ev));
}

/*
 * fexit: the call is over; the state before it is the one ctt_tracked holds
 * (ctt_report_transition stores every change it sees).  For an entry not
 * tracked this is the whole cost: one hash lookup.  Two CPUs may each finish a
 * packet of one entry before either program runs (the lock is released by
 * then): both see the newest state, and the intermediate one is not reported,
 * the same window the kprobe pair has between its two probes; the change itself
 * is reported once (ctt_report_transition claims it).
 */
BPF_PROG(ctt_tcp_packet_fexit, struct nf_conn *ct)
{
	__u64 ct_ptr = (__u64)ct;
	struct ctt_tracked *tracked = ctt_tracked.lookup(&ct_ptr);

	/* Not tracked, or the packet killed the entry: ctt_ct_delete_fentry reported it. */
	if (!tracked)
		return 0;
	ctt_report_transition(ctx, ct, ct_ptr, tracked, tracked->state);
	return 0;
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

/* A confirmed translated TCP entry of the traced namespace(s): ctt_tracked should hold it. */
static __always_inline int ctt_should_be_tracked(const struct nf_conn *ct)
{
	struct nf_conntrack_tuple orig = {}, reply = {};
	unsigned long status = 0;

	if (!ctt_read_translated_tcp(ct, &orig, &reply, &status) || !(status & IPS_CONFIRMED))
		return 0;
	return !CTT_NETNS_INO || ctt_ct_netns(ct) == CTT_NETNS_INO;
}

/* A tracked entry is deleted now: what userspace holds of it ends with DESTROY. */
static __always_inline void ctt_deleted(void *ctx, struct nf_conn *ct, __u64 ct_ptr,
					struct ctt_tracked *tracked)
{
	struct ctt_ct_event ev = {};

	ctt_forget_unreplied(tracked, ct_ptr);
	if (tracked->reported) {
		CTT_READ(ev.tcp_state, ct, struct nf_conn, proto.tcp.state);
		ctt_fill_tracked(&ev, CTT_EV_CT_DESTROY, ct, ct_ptr, tracked);
		ctt_emit(ctx, &ev, sizeof(ev));
	}
	ctt_tracked.delete(&ct_ptr);
}

/* Evicted from the LRU map (or confirmed before we attached): counted. */
static __always_inline void ctt_deleted_unseen(const struct nf_conn *ct)
{
	if (ctt_should_be_tracked(ct))
		ctt_count(CTT_CNT_UNSEEN_DELETE);
}

/*
 * bool nf_ct_delete(struct nf_conn *ct, u32 portid, int report)
 * Every way a confirmed entry dies goes through here: timeout (gc worker),
 * nf_ct_kill (RST, NEW SYN on a closed entry), early drop, ctnetlink delete,
 * flush, namespace exit.  The entry is still intact at entry.
 *
 * A RST to an entry that never saw a reply makes nf_conntrack_tcp_packet kill
 * the entry itself, after it set the new state (CLOSE) and before it returns:
 * that call's transition (SYN_SENT -> CLOSE) would be lost with the entry, so
 * it is handled here first: UPDATE, then DESTROY.  The fentry variant finds it
 * as a state that differs from the one ctt_tracked holds.
 */
BPF_PROG(ctt_ct_delete_fentry, struct nf_conn *ct)
{
	__u64 ct_ptr = (__u64)ct;
	struct ctt_tracked *tracked = ctt_tracked.lookup(&ct_ptr);
	__u8 state = 0;

	if (!tracked) {
		ctt_deleted_unseen(ct);
		return 0;
	}
	CTT_READ(state, ct, struct nf_conn, proto.tcp.state);
	if (state != tracked->state)
		ctt_report_transition(ctx, ct, ct_ptr, tracked, tracked->state);
	ctt_deleted(ctx, ct, ct_ptr, tracked);
	return 0;
}

/* The kprobe variant finds the pending call in ctt_tcp_stash. */
int ctt_ct_delete(struct pt_regs *ctx, struct nf_conn *ct)
{
	__u64 ct_ptr = (__u64)ct;
	struct ctt_tracked *tracked = ctt_tracked.lookup(&ct_ptr);
	struct ctt_tcp_call *call;
	__u64 call_key;

	if (!tracked) {
		ctt_deleted_unseen(ct);
		return 0;
	}
	call_key = ctt_call_key();
	call = ctt_tcp_stash.lookup(&call_key);
	if (call && call->ct_ptr == ct_ptr) {
		ctt_report_transition(ctx, ct, ct_ptr, tracked, call->old_state);
		ctt_tcp_stash.delete(&call_key);
	}
	ctt_deleted(ctx, ct, ct_ptr, tracked);
	return 0;
}
