"""Run a block of code inside another network namespace, for the current thread only.

Conntrack tables, ctnetlink event groups and netlink sockets are all per network
namespace: a socket belongs to the namespace its creating thread was in when
``socket()`` ran, and keeps it for life. So watching a node namespace other than
our own only needs the socket to be *created* there; after that the thread can
go back. Python 3.11 has no ``os.setns`` (added in 3.12), hence libc via ctypes.

``setns(2)`` with ``CLONE_NEWNET`` switches only the calling thread (a network
namespace is not one of the namespaces that must be shared by all threads), so
other threads of cttrace are not disturbed while we are away.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

from cttrace.errors import NotRootError, UserError

#: Where ``ip netns add NAME`` bind-mounts the namespace (iproute2's NETNS_RUN_DIR).
NETNS_RUN_DIR = "/var/run/netns"

#: ``CLONE_NEWNET`` from include/uapi/linux/sched.h: setns() checks the fd is a network namespace.
CLONE_NEWNET = 0x40000000


class NetnsError(UserError):
    """The requested network namespace cannot be entered."""


def list_named_netns(run_dir: str = NETNS_RUN_DIR) -> list[str]:
    """The names ``ip netns list`` shows (the entries of iproute2's run directory)."""
    try:
        return sorted(os.listdir(run_dir))
    except FileNotFoundError:
        return []


def netns_path(name: str, run_dir: str = NETNS_RUN_DIR) -> str:
    """Resolve ``NAME`` (as in ``ip netns exec NAME``) or an explicit path to a netns file.

    A value containing ``/`` is taken as a path (``/proc/PID/ns/net``,
    ``/var/run/netns/NAME``); anything else is a name under ``run_dir``.
    """
    if "/" in name:
        path = name
    elif name in ("", ".", ".."):
        raise NetnsError(f"invalid network namespace name {name!r}")
    else:
        path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        known = list_named_netns(run_dir)
        listing = ", ".join(known) if known else "none"
        raise NetnsError(
            f"network namespace {name!r} not found ({path} does not exist); "
            f"`ip netns list` has: {listing}"
        )
    return path


_libc: ctypes.CDLL | None = None


def _setns(fd: int, nstype: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextmanager
def entered_netns(name: str | None, run_dir: str = NETNS_RUN_DIR) -> Iterator[None]:
    """Switch the current thread into network namespace ``name`` for the ``with`` block.

    ``None`` means "stay where we are" so callers need no second code path.
    Sockets created inside the block stay in that namespace after it ends; the
    thread itself always returns to its original namespace, even on error.
    """
    if name is None:
        yield
        return
    path = netns_path(name, run_dir)
    # /proc/thread-self, not /proc/self: the latter names the thread-group
    # leader's namespace, which is not ours if this thread moved before.
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except PermissionError as exc:
            raise NotRootError(f"entering network namespace {name!r}") from exc
        try:
            _enter(target, name, path)
        finally:
            os.close(target)
        try:
            yield
        finally:
            # If this fails the thread would be stranded in the wrong namespace:
            # let the OSError propagate rather than continue there silently.
            _setns(original, CLONE_NEWNET)
    finally:
        os.close(original)


def _enter(fd: int, name: str, path: str) -> None:
    try:
        _setns(fd, CLONE_NEWNET)
    except OSError as exc:
        if exc.errno == errno.EPERM:
            # setns() on a network namespace needs CAP_SYS_ADMIN in the target's user ns.
            raise NotRootError(f"entering network namespace {name!r}") from exc
        if exc.errno == errno.EINVAL:
            raise NetnsError(f"{path} is not a network namespace (setns: EINVAL)") from exc
        raise NetnsError(f"cannot enter network namespace {name!r}: {exc.strerror}") from exc


def netns_inode(name: str | None, run_dir: str = NETNS_RUN_DIR) -> int:
    """The inode number (``ns.inum``, what the bpf source reports) of network namespace
    ``name``, or of the calling thread's own when None. NetnsError or OSError if it
    cannot be read."""
    return os.stat(netns_path(name, run_dir) if name else "/proc/thread-self/ns/net").st_ino


def netns_name_of(inode: int, run_dir: str = NETNS_RUN_DIR) -> str | None:
    """The ``ip netns`` name of the network namespace with ``inode``, if it has one."""
    try:
        nsfs = os.stat("/proc/thread-self/ns/net").st_dev
    except OSError:
        return None
    for name in list_named_netns(run_dir):
        try:
            st = os.stat(os.path.join(run_dir, name))
        except OSError:
            continue
        if st.st_ino == inode and st.st_dev == nsfs:  # a bind mount of the namespace
            return name
    return None
