/* SPDX-License-Identifier: Apache-2.0 */
/*
 * cttrace.h: the records cttrace's BPF programs send to userspace.
 *
 * This one header is the contract between the kernel side (the bpf/ .c files,
 * compiled by BCC) and the userspace decoder
 * (src/cttrace/sources/bpf_layout.py mirrors every struct with ctypes;
 * tests/unit/test_bpf_layout.py compiles this file with gcc and checks the
 * mirror's sizes and offsets against it).  Every struct is laid out by hand
 * with explicit padding so that clang (BPF) and gcc (x86-64) agree.
 *
 * Byte order: addresses and ports are kept exactly as the kernel holds them
 * (network byte order, `_be` fields); userspace converts them.
 */
#ifndef CTTRACE_H
#define CTTRACE_H

#include <linux/types.h>

/* ctt_header.kind */
#define CTT_EV_CT_NEW      1 /* __nf_conntrack_confirm returned NF_ACCEPT */
#define CTT_EV_CT_UPDATE   2 /* nf_conntrack_tcp_packet changed ct->proto.tcp.state */
#define CTT_EV_CT_DESTROY  3 /* nf_ct_delete on a tracked entry */
#define CTT_EV_CONNECT     4 /* tcp_connect: a socket is about to send its SYN */
#define CTT_EV_RESET       5 /* a TCP RST sent or received */

/* Slots of the per-CPU counter map ctt_counters. */
#define CTT_CNT_LOST          0 /* output to the ring/perf buffer failed: event lost */
#define CTT_CNT_FILTERED      1 /* confirm seen but not TCP, not translated or other netns */
#define CTT_CNT_NOT_ACCEPTED  2 /* confirm returned != NF_ACCEPT (insert clash: drop) */
#define CTT_CNT_STASH_FULL    3 /* a call could not be remembered for its return probe: event lost */
#define CTT_CNT_FILTERED_TRANSITION 4 /* a tracked entry's state change no rule needs: not sent */
#define CTT_CNT_EMITTED       5 /* records written to the ring/perf buffer */
#define CTT_CNT_TRACKED       6 /* translated TCP entries added to ctt_tracked at confirm */
#define CTT_CNT_REPORTED      7 /* tracked entries that became interesting: sent to userspace */
#define CTT_CNT_UNSEEN_DELETE 8 /* a translated TCP entry's delete found no ctt_tracked record:
				 * evicted by the LRU, or confirmed before the programs attached */
#define CTT_CNT_QUIET         9 /* connects and resets kept in the kernel: no rule needs them */
#define CTT_NR_COUNTERS       10

/*
 * One direction of a conntrack tuple, or a socket's 4-tuple (and as such the
 * key of ctt_connects).  An IPv4 address fills the first 4 bytes and the rest
 * is zero, as in the kernel's tuples (nf_ct_get_tuple and nf_ct_invert_tuple
 * memset the tuple before filling it), so equal flows of either family are
 * equal bytes.
 */
struct ctt_flow {
	__u8 saddr[16];  /* union nf_inet_addr: IPv4 in the first 4 bytes */
	__u8 daddr[16];
	__u16 sport_be;
	__u16 dport_be;
};                               /* 36 bytes, 2-aligned */

struct ctt_header {
	__u64 ts_ns;      /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u32 kind;       /* CTT_EV_* */
	__u32 netns_ino;  /* inode of the network namespace (ns.inum) the fact happened in */
};                               /* 16 bytes */

struct ctt_ct_event {
	struct ctt_header hdr;
	__u64 ct_ptr;           /* address of the struct nf_conn: the entry id */
	__u64 created_ns;       /* when the entry was confirmed (same clock as ts_ns) */
	struct ctt_flow orig;   /* tuplehash[IP_CT_DIR_ORIGINAL]: what the client asked for */
	struct ctt_flow reply;  /* tuplehash[IP_CT_DIR_REPLY]: its source is the DNAT target */
	__u32 status;           /* ct->status, enum ip_conntrack_status bits */
	__u32 mark;             /* ct->mark (0 without CONFIG_NF_CONNTRACK_MARK) */
	__u16 zone;             /* ct->zone.id (0 without CONFIG_NF_CONNTRACK_ZONES) */
	__u16 l3num;            /* AF_INET or AF_INET6 */
	__u8 tcp_state;         /* ct->proto.tcp.state, enum tcp_conntrack */
	__u8 old_tcp_state;     /* state before the change (CTT_EV_CT_UPDATE only) */
	__u8 _pad[2];
};                               /* 120 bytes */

struct ctt_connect_event {
	struct ctt_header hdr;  /* netns_ino: the socket's namespace */
	__u64 sock_ptr;         /* struct sock address: tells two sockets on one tuple apart */
	__u64 cgroup_id;        /* bpf_get_current_cgroup_id() of the connecting task */
	__u32 pid;              /* tgid */
	__u32 tid;
	struct ctt_flow flow;   /* saddr: skc_rcv_saddr or skc_v6_rcv_saddr; daddr: skc_daddr
				 * or skc_v6_daddr; sport: skc_num in network order; dport:
				 * skc_dport.  A v4-mapped AF_INET6 socket is given as IPv4. */
	__u16 family;           /* AF_INET or AF_INET6: the family of the entry its SYN creates */
	__u16 _pad;
	char comm[16];
};                               /* 96 bytes */

struct ctt_reset_event {
	struct ctt_header hdr;
	__u64 sock_ptr;         /* 0 when no socket owns the segment being answered */
	struct ctt_flow flow;   /* the RST's own direction: flow.saddr sent it to flow.daddr */
	__u16 family;           /* AF_INET or AF_INET6 */
	__u8 sent;              /* 1: this host sent the RST, 0: a local socket received it */
	__u8 _pad;
};                               /* 64 bytes */

/*
 * What the kernel keeps of one NATed TCP entry (map ctt_tracked, key: the
 * struct nf_conn address), from confirm to delete.  Userspace reads it when it
 * asks for the entries toward an address (bpf_layout.CttTracked mirrors it).
 */
struct ctt_tracked {
	__u64 created_ns;       /* confirm */
	__u64 replied_ns;       /* first state change out of SYN_SENT; 0: never answered */
	struct ctt_flow orig;
	struct ctt_flow reply;
	__u32 netns_ino;
	__u32 mark;
	__u16 zone;
	__u16 l3num;
	__u32 status;           /* ct->status at confirm */
	/*
	 * Two programs on two CPUs may handle one entry at once, so these two are
	 * claimed with __sync_val_compare_and_swap: 64 bits wide because an atomic
	 * on a 32-bit word needs alu32, which BCC's default BPF target lacks.
	 */
	__u64 state;            /* the last ct->proto.tcp.state reported or passed over */
	__u64 reported;         /* 1: userspace holds this entry: its changes and delete go out */
	struct ctt_connect_event creator;  /* hdr.kind 0: no local connect() seen creating it */
};                               /* 216 bytes */

/* The client side of an entry (its original source), for joins by address and port. */
struct ctt_client_key {
	__u8 addr[16];
	__u16 port_be;
	__u16 _pad;
};                               /* 20 bytes */

/* A watched DNAT target: union nf_inet_addr's 16 bytes, IPv4 in the first 4. */
struct ctt_addr {
	__u8 addr[16];
};

#endif /* CTTRACE_H */
