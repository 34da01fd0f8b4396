"""The ``netlink`` source: conntrack events from ctnetlink, as ``conntrack -E`` reads them.

Needs only CAP_NET_ADMIN and works on kernels where kprobes or BCC cannot.
Three things decide whether it keeps up at high connection rates (``conntrack -E``
loses ~27% of NEW events at ~9.7k conn/s on these machines: docs/DESIGN.md, "Kernel
facts verified here"), and they matter more than parse speed:

* a classic BPF socket filter (:func:`ctnetlink.nat_tcp_filter`) drops events
  that are not TCP or have no NAT bit, and UPDATEs into FIN_WAIT, CLOSE_WAIT
  and LAST_ACK that no rule reads, inside the kernel, before they are charged
  to the receive buffer;
* a large receive buffer (SO_RCVBUFFORCE, which ignores net.core.rmem_max);
* when the buffer still overflows (ENOBUFS), the loss is counted and reported
  and the table is dumped again, so the correlator can resynchronise.

Kernel fact the caller should know: with ``net.netfilter.nf_conntrack_events=2``
(the default of recent kernels, this machine's 6.18 included) an entry gets its
event cache extension only if a ctnetlink listener existed in its namespace when
it was created (nf_ct_ecache_ext_add), so entries older than the first listener
never report UPDATE or DESTROY (verified here: ``conntrack -D`` of such an entry
sends nothing). The initial dump still lists them; ``stats().extra["events_sysctl"]``
says which mode the namespace is in.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import time
from collections.abc import Callable

from cttrace.errors import NotRootError, SourceError
from cttrace.events import CtEvent, Event, Flow, Lost, ResyncDone
from cttrace.netns import entered_netns
from cttrace.sources import SourceStats
from cttrace.sources.ctnetlink import (
    NFNLGRP_CONNTRACK_DESTROY,
    NFNLGRP_CONNTRACK_NEW,
    NFNLGRP_CONNTRACK_UPDATE,
    decode_messages,
    delete_request,
    dump_request,
    nat_tcp_filter,
)

# Constants Python's socket module lacks (include/uapi/linux/netlink.h, asm-generic/socket.h).
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33

EVENT_GROUPS = (NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_UPDATE, NFNLGRP_CONNTRACK_DESTROY)

#: Bytes of receive space kept free for one more datagram. ctnetlink event
#: messages are < 1 KiB (ctnetlink_nlmsg_size); dump batches are <= 32 KiB
#: (netlink_dump caps max_recvmsg_len at 32 KiB).
_MAX_DATAGRAM = 64 * 1024
_BATCH_BYTES = 1024 * 1024
#: Upper bound on datagrams per read() so one busy read cannot starve the loop.
DEFAULT_BATCH = 4096
#: A dump that stalls this long (per recv) is an error, not a wait forever.
DUMP_RECV_TIMEOUT = 10.0

log = logging.getLogger(__name__)

_NOT_AVAILABLE = (errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT, errno.ENOENT, errno.EOPNOTSUPP)
_MODPROBE_HINT = "load it with `modprobe nf_conntrack_netlink`"


class NetlinkSource:
    """ctnetlink NEW/UPDATE/DESTROY events of one network namespace, filtered to NATed TCP.

    ``stats().filtered`` counts events dropped in userspace (with the kernel
    filter on, it stays 0 unless the kernel refused the filter). ``extra``:
    ``kernel_filter`` (1 if the BPF filter is attached), ``rcvbuf_bytes``
    (granted), ``events_sysctl`` (nf_conntrack_events of the namespace),
    ``dropped_messages`` (the kernel's exact count of events dropped on a full
    buffer: the socket's sk_drops from /proc/net/netlink; -1 if unknown),
    ``malformed``, ``dump_filtered`` (irrelevant entries skipped in dumps).
    """

    name = "netlink"

    def __init__(
        self,
        netns: str | None = None,
        rcvbuf: int = 32 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
        *,
        kernel_filter: bool = True,
        batch: int = DEFAULT_BATCH,
    ) -> None:
        """``netns``: a name from ``ip netns list`` or a path (/proc/PID/ns/net); None: ours.

        ``rcvbuf``: receive buffer in bytes; ``kernel_filter=False`` keeps every
        event until userspace (for comparison and tests); ``batch``: most
        datagrams one :meth:`read` takes.
        """
        self._netns = netns
        self._rcvbuf = rcvbuf
        self._clock = clock
        self._kernel_filter = kernel_filter
        self._batch = batch
        self._events_sock: socket.socket | None = None
        self._dump_sock: socket.socket | None = None
        self._buf = bytearray(_BATCH_BYTES)
        self._view = memoryview(self._buf)
        self._pending: list[Event] = []
        self._seq = 0
        self._stats = SourceStats()
        self._malformed = 0
        self._dump_filtered = 0
        self._proc_netlink: int | None = None  # fd of our netns' /proc/net/netlink
        self._drops_counted = 0  # of the socket's sk_drops, what Lost events reported

    # --- Source protocol ---------------------------------------------------

    def open(self) -> None:
        """Open both sockets in the namespace, subscribe, and dump the table once.

        The first :meth:`read` returns that dump (CtKind.DUMP events, then
        ResyncDone) before any live event.
        """
        if self._events_sock is not None:
            return
        try:
            with entered_netns(self._netns):
                events_sock = _netlink_socket()
                try:
                    dump_sock = _netlink_socket()
                except BaseException:
                    events_sock.close()
                    raise
                # /proc/sys/net and /proc/thread-self/net belong to the netns of
                # the thread that opens them.
                events_sysctl = _read_events_sysctl()
                self._proc_netlink = _open_proc_netlink()
        except OSError as exc:
            raise _socket_error(exc, "socket(AF_NETLINK, NETLINK_NETFILTER)") from exc
        self._events_sock, self._dump_sock = events_sock, dump_sock
        try:
            self._setup_event_socket(events_sock)
            dump_sock.settimeout(DUMP_RECV_TIMEOUT)
            self._stats.extra["events_sysctl"] = events_sysctl
            # Subscribed first, dumped second: no entry can fall between the two.
            self._pending = self._resync()
        except BaseException:
            self.close()
            raise

    def fileno(self) -> int:
        if self._events_sock is None:
            raise SourceError("netlink source is not open")
        return self._events_sock.fileno()

    def read(self) -> list[Event]:
        """Everything ready now (at most ``batch`` datagrams), never blocking on events.

        After an overflow it returns, in order: the events received before it,
        a :class:`Lost`, the rest of the batch, the table dump and
        :class:`ResyncDone`.
        """
        sock = self._events_sock
        if sock is None:
            raise SourceError("netlink source is not open")
        out = self._pending
        self._pending = []
        ts = self._clock()
        view = self._view
        limit = len(self._buf) - _MAX_DATAGRAM
        off = 0
        overflowed = False
        for _ in range(self._batch):
            if off > limit:
                break
            try:
                # MSG_TRUNC makes netlink_recvmsg return the datagram's real length.
                n = sock.recv_into(view[off:], _MAX_DATAGRAM, socket.MSG_TRUNC)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise SourceError(f"netlink source: recv failed: {exc.strerror}") from exc
                # netlink_overrun() set sk_err: at least one event was dropped
                # since the last read. What is still queued is intact.
                self._collect(view[:off], ts, out)
                off = 0
                missed = self._missed_since_last()
                out.append(Lost(ts, self.name, missed, "ENOBUFS"))
                self._stats.lost += missed
                overflowed = True
                continue
            if n > _MAX_DATAGRAM:
                self._malformed += 1  # cannot happen for ctnetlink events; never misparse
                continue
            off = (off + n + 3) & ~3
        self._collect(view[:off], ts, out)
        if overflowed:
            out.extend(self._resync())
        self._stats.events += len(out)
        return out

    def stats(self) -> SourceStats:
        """``lost`` is messages lost: the socket's drop count once the kernel gave one."""
        drops = self._drops()
        if drops is not None:
            self._stats.extra["dropped_messages"] = drops
            # Drops after the overflow that was read (the buffer stays congested until
            # drained) show only in sk_drops: lost is never below it.
            self._stats.lost = max(self._stats.lost, drops)
        elif self._events_sock is not None:
            self._stats.extra["dropped_messages"] = -1
        self._stats.extra["malformed"] = self._malformed
        self._stats.extra["dump_filtered"] = self._dump_filtered
        return self._stats

    def close(self) -> None:
        for sock in (self._events_sock, self._dump_sock):
            if sock is not None:
                sock.close()
        self._events_sock = self._dump_sock = None
        if self._proc_netlink is not None:
            os.close(self._proc_netlink)
            self._proc_netlink = None

    # --- internals -------------------------------------------------------------

    def _drops(self) -> int | None:
        """The event socket's sk_drops (messages netlink_overrun() dropped); None: unknown."""
        if self._events_sock is None or self._proc_netlink is None:
            return None
        inode = os.fstat(self._events_sock.fileno()).st_ino
        drops = _socket_drops(self._proc_netlink, inode)
        return drops if drops >= 0 else None

    def _missed_since_last(self) -> int:
        """Messages dropped since the last overflow was reported: sk_drops' growth (at
        least 1, as ENOBUFS means one was); 1 when the kernel does not say."""
        drops = self._drops()
        if drops is None:
            return 1
        missed = max(1, drops - self._drops_counted)
        self._drops_counted = max(drops, self._drops_counted + 1)
        return missed

    def _setup_event_socket(self, sock: socket.socket) -> None:
        self._stats.extra["rcvbuf_bytes"] = _set_rcvbuf(sock, self._rcvbuf)
        filtering = self._kernel_filter
        if filtering:
            # Attached before joining the groups so no unfiltered event is queued.
            try:
                _attach_filter(sock, nat_tcp_filter())
            except OSError as exc:
                # Userspace still filters; the kernel only saved work and buffer space.
                log.warning(
                    "netlink source: kernel refused the conntrack socket filter (%s); "
                    "filtering in userspace, so heavy traffic overflows sooner",
                    exc.strerror,
                )
                filtering = False
        self._stats.extra["kernel_filter"] = int(filtering)
        for group in EVENT_GROUPS:
            try:
                sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
            except OSError as exc:
                raise _socket_error(exc, "joining the ctnetlink event groups") from exc
        sock.setblocking(False)

    def _collect(self, data: memoryview, ts: float, out: list[Event]) -> None:
        if not data:
            return
        decoded = decode_messages(data, ts)
        out.extend(decoded.events)
        self._stats.filtered += decoded.filtered
        self._malformed += decoded.malformed

    def _resync(self) -> list[Event]:
        """Dump the table on the second socket: DUMP events of relevant entries, then ResyncDone."""
        sock = self._dump_sock
        assert sock is not None
        self._seq += 1
        try:
            sock.send(dump_request(self._seq))
        except OSError as exc:
            raise _socket_error(exc, "conntrack table dump") from exc
        out: list[Event] = []
        buf = self._view
        while True:
            try:
                n = sock.recv_into(buf, len(buf))
            except TimeoutError as exc:
                raise SourceError(
                    f"netlink source: conntrack table dump stalled for {DUMP_RECV_TIMEOUT:.0f}s"
                ) from exc
            except OSError as exc:
                raise _socket_error(exc, "conntrack table dump") from exc
            decoded = decode_messages(buf[:n], self._clock(), dump=True)
            out.extend(decoded.events)
            self._dump_filtered += decoded.filtered
            self._malformed += decoded.malformed
            if decoded.errno:
                raise _socket_error(
                    OSError(decoded.errno, os.strerror(decoded.errno)), "conntrack table dump"
                )
            if decoded.done or n == 0:
                break
        ids = frozenset(e.entry_id for e in out if isinstance(e, CtEvent))
        out.append(ResyncDone(self._clock(), self.name, ids))
        self._stats.resyncs += 1
        return out


def _netlink_socket() -> socket.socket:
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
    )
    sock.bind((0, 0))  # kernel-assigned port id
    return sock


def _set_rcvbuf(sock: socket.socket, size: int) -> int:
    """Ask for ``size`` bytes; returns what the kernel granted (it doubles the request)."""
    try:
        # SO_RCVBUFFORCE ignores net.core.rmem_max but needs CAP_NET_ADMIN.
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    granted: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return granted


def _attach_filter(sock: socket.socket, program: bytes) -> None:
    """SO_ATTACH_FILTER takes a ``struct sock_fprog`` {u16 len; struct sock_filter *filter}."""
    code = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(code))  # `code` outlives the call
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def _read_events_sysctl() -> int:
    """net.netfilter.nf_conntrack_events of the current thread's netns; -1 if unreadable."""
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_events", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return -1


def _open_proc_netlink() -> int | None:
    try:
        return os.open("/proc/thread-self/net/netlink", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _socket_drops(fd: int, inode: int) -> int:
    """The Drops column of /proc/net/netlink for the socket with ``inode`` (netlink_seq_show)."""
    try:
        text = os.pread(fd, 1 << 20, 0).decode("ascii", "replace")
    except OSError:
        return -1
    for line in text.splitlines()[1:]:
        fields = line.split()
        # sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
        if len(fields) >= 10 and fields[9] == str(inode):
            return int(fields[8])
    return -1


def _socket_error(exc: OSError, what: str) -> SourceError | NotRootError:
    """Turn an errno from socket setup or a dump into one line the user can act on."""
    if exc.errno in (errno.EPERM, errno.EACCES):
        return NotRootError(f"the netlink source ({what})")
    if exc.errno in _NOT_AVAILABLE:
        return SourceError(
            f"conntrack netlink is not available in this kernel ({what}: "
            f"{errno.errorcode.get(exc.errno or 0, exc.errno)}): {_MODPROBE_HINT}"
        )
    if exc.errno == errno.EINVAL and "dump" in what:
        # nfnetlink_rcv_msg answers EINVAL when no ctnetlink subsystem is registered.
        return SourceError(
            f"the kernel rejected the conntrack table dump (EINVAL): nf_conntrack_netlink is "
            f"probably not loaded: {_MODPROBE_HINT}"
        )
    return SourceError(f"netlink source: {what} failed: {exc.strerror or exc}")


class ConntrackDeleter:
    """Deletes single conntrack entries over ctnetlink (``--remediate``), in one netns."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._sock: socket.socket | None = None
        self._seq = 0

    def open(self) -> None:
        with entered_netns(self.netns):
            try:
                sock = _netlink_socket()
            except OSError as exc:
                raise _socket_error(exc, "conntrack delete socket") from exc
        sock.settimeout(DUMP_RECV_TIMEOUT)
        self._sock = sock

    def delete(self, orig: Flow, *, entry_id: int, zone: int = 0) -> int:
        """Delete the entry; returns 0, or the errno the kernel answered (ENOENT: gone)."""
        if self._sock is None:
            self.open()
        sock = self._sock
        assert sock is not None
        self._seq += 1
        try:
            sock.send(delete_request(self._seq, orig, entry_id=entry_id, zone=zone))
            reply = sock.recv(4096)
        except OSError as exc:
            return exc.errno or errno.EIO
        return decode_messages(reply, 0.0).errno

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
