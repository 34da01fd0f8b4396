"""Guest side of the VM tier: few BCC compiles per boot, all at the same time.

These tests run only inside the Debian kernel that tests/vm/run_vm_tier.py
boots (it sets CTTRACE_VM_GUEST=1); anywhere else they are not collected,
because this machine's own kernel has no kprobes. The host-side entry point,
tests/test_vm_tier.py, fails when the VM cannot run.

Compiling and loading the programs takes a minute or more under emulation, and
there are three users of a compile: test_bpf_source.py opens one
:class:`BpfSource` in-process (filtered to one node namespace; its tests read
the same :class:`EventLog`, each on its own tuples); test_watch_bpf.py drives
one long-lived ``cttrace watch --source bpf`` process, the way a user runs it,
through every lab scenario in turn; test_agent_bpf.py runs one ``cttrace
agent --source bpf`` process the way the DaemonSet does. The two processes are
started as soon as the tests are collected and the agent's tests run last, so
that all three compiles run at the same time (the guest has two CPUs) and the
agent meanwhile sees every other test's traffic. Each process's SIGTERM test
checks that the BPF programs *it* loaded are gone (:func:`prog_ids_of`), so
the tests do not depend on what else is loaded at the time.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from cttrace.events import Event
from cttrace.sources import Source
from cttrace.sources.bpf import BpfSettings, BpfSource
from cttrace.sources.bpf_layout import decode
from tests.watch_process import WatchProcess

from .topology import Topology

GUEST = os.environ.get("CTTRACE_VM_GUEST") == "1"
if not GUEST:
    collect_ignore_glob = ["test_*.py"]

#: Where the runner collects results (a --rwdir shared with the host).
OUT_DIR = Path(os.environ.get("CTTRACE_VM_OUT", "/tmp"))
#: The shared watch's --dead-after: how long an entry may outlive its pod.
DEAD_AFTER_S = 2.0
#: A BCC compile under emulation takes a minute or two, longer with three at once.
COMPILE_DEADLINE_S = 420.0


class DrainedWatchProcess(WatchProcess):
    """A :class:`WatchProcess` whose stderr is read as it comes: BCC prints its
    compiler's warnings there, and a full pipe would stop the process."""

    def __init__(self, args: list[str], ready_file: Path, *, command: str = "watch",
                 wrapper: Sequence[str] = ()) -> None:
        os.environ["PYTHONFAULTHANDLER"] = "1"  # for diagnose(): Python stacks on SIGABRT
        try:
            super().__init__(args, ready_file, command=command, wrapper=wrapper)
        finally:
            del os.environ["PYTHONFAULTHANDLER"]
        self._err = bytearray()
        self._err_reader = threading.Thread(target=self._drain, daemon=True)
        self._err_reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        while chunk := os.read(fd, 65536):
            self._err += chunk

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                self._err_reader.join(timeout=10)
                raise AssertionError(f"cttrace exited early ({self.proc.returncode}): "
                                     f"{self._err.decode(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"cttrace did not become ready within {timeout:.0f} s; "
                                     f"{self.diagnose()}")
            time.sleep(0.1)

    def diagnose(self) -> str:
        """Where a stuck process is: each thread's state and kernel stack, then its Python
        stacks (SIGABRT: PYTHONFAULTHANDLER prints them as it dies), then its stderr."""
        pid = self.proc.pid
        parts = []
        for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
            with contextlib.suppress(OSError):
                state = next(line for line in (task / "status").read_text().splitlines()
                             if line.startswith("State:"))
                parts.append(f"thread {task.name} {state} wchan={(task / 'wchan').read_text()}"
                             f"\n{(task / 'stack').read_text()}")
        self.proc.send_signal(signal.SIGABRT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        self._err_reader.join(timeout=10)
        parts.append(f"stderr: {self._err.decode(errors='replace')[-6000:]}")
        return "\n".join(parts)

    def stop(self, timeout: float = 30.0) -> int:
        rc = super().stop(timeout)  # its read of stderr finds it drained
        self._err_reader.join(timeout=timeout)
        self.stderr = bytes(self._err) + self.stderr
        return rc

    def terminate(self, deadline_s: float) -> tuple[int, float]:
        """SIGTERM, as a container runtime stops it: (exit code, seconds to exit).
        Fails if the process outlives ``deadline_s``."""
        sent = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {deadline_s:.0f} s after SIGTERM; "
                                 f"{self.diagnose()}") from None
        return rc, time.monotonic() - sent

    def save(self, path: Path) -> None:
        """Kill it if still running; write what it printed (stderr, then the stdout lines)."""
        self.kill()
        self._reader.join(timeout=10)
        self._err_reader.join(timeout=10)
        while not self._q.empty():
            line = self._q.get_nowait()
            if line is not None:
                self.lines.append(line)
        with contextlib.suppress(OSError), open(path, "w") as log:
            log.write(self._err.decode(errors="replace"))
            log.write("\n--- stdout lines read ---\n")
            log.writelines(json.dumps(line) + "\n" for line in self.lines)


class SharedWatch:
    """One ``cttrace watch --source bpf --output json`` process for every scenario.

    It follows ``identity.jsonl`` in its directory, a symlink that
    :meth:`follow` points at each lab's own identity file in turn (the
    follower sees a new inode at the path and starts over on it), and
    :meth:`caught_up` tells a lab when the process has read that file to its
    end, so that a scenario's first packet never beats its pods' identity.
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ctl-watch-"))
        self.link = self.dir / "identity.jsonl"
        # An empty cluster to start with: --ready-file waits for identity in sync
        # (read to its end), which a missing file never is.
        start = self.dir / "identity-start.jsonl"
        start.touch()
        self.follow(start)
        self.started = time.time()
        self.process = DrainedWatchProcess(
            # Without --flows: the kernel sends only what a rule may need, as in production.
            ["--source", "bpf", "--output", "json",
             "--identity-file", str(self.link), "--dead-after", f"{DEAD_AFTER_S:g}"],
            self.dir / "ready",
        )

    def follow(self, identity: Path) -> None:
        point(self.link, identity)

    def caught_up(self, identity: Path) -> bool:
        """The watch process holds ``identity`` open and has read all of it."""
        return has_read(self.process.proc.pid, identity)

    def close(self) -> None:
        """Kill it if still running; keep what it printed in the results directory."""
        self.process.save(OUT_DIR / "watch.log")
        shutil.rmtree(self.dir, ignore_errors=True)


def point(link: Path, target: Path) -> None:
    """Make ``link`` a symlink to ``target`` in one step (a follower of ``link`` sees a new
    inode at the path and starts over on it)."""
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def has_read(pid: int, path: Path) -> bool:
    """Process ``pid`` holds ``path`` open and has read all of it."""
    want = os.path.realpath(path)
    try:
        size = os.stat(want).st_size
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != want:
                    continue
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
            except OSError:
                continue
            pos = int(info.split("pos:", 1)[1].split()[0])
            return pos >= size
    except OSError:
        return False
    return False


class SharedAgent:
    """One ``cttrace agent --source bpf`` process, started as the DaemonSet starts it
    (deploy/base/daemonset.yaml), with what the VM does not have replaced:

    * ``--source bpf`` instead of ``auto``: here a fallback to netlink would hide a failure;
    * ``--listen 127.0.0.1:0``: loopback, on a port the kernel picks (its "started" log
      line says which);
    * ``--alertmanager-url`` at a closed loopback port: no Alertmanager in the VM, and
      alerts it cannot deliver must not hold up its shutdown past the deadline;
    * no identity: no API server in the VM (identity is the kernel tier's business), so
      ``/readyz`` turns ready once the source is attached.

    It traces the guest's own namespace, as the DaemonSet traces the node's
    (``hostNetwork``); without ``--netns`` the bpf source reports NATed entries of
    every namespace, the topology's and the labs' included.
    """

    NODE = "ctl-vm-node"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ctl-agent-"))
        with socket.socket() as sock:  # a port nobody listens on
            sock.bind(("127.0.0.1", 0))
            self.alertmanager_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.started = time.time()
        self.process = DrainedWatchProcess(
            ["--source", "bpf", "--listen", "127.0.0.1:0", "--node", self.NODE,
             "--alertmanager-url", self.alertmanager_url],
            self.dir / "ready", command="agent",
        )
        self.port = 0

    def close(self) -> None:
        self.process.save(OUT_DIR / "agent.log")
        shutil.rmtree(self.dir, ignore_errors=True)


def bpf_prog_ids() -> set[int]:
    """Ids of the BPF programs loaded in the kernel now (``bpftool prog show``)."""
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    out = subprocess.run([bpftool, "--json", "prog", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {int(prog["id"]) for prog in json.loads(out or "[]")}


def prog_ids_of(pid: int) -> set[int]:
    """Ids of the BPF programs process ``pid`` holds open (``prog_id:`` in the fdinfo of
    its BPF program fds; BCC keeps one open for every program it loaded)."""
    ids = set()
    for fdinfo in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            for line in fdinfo.read_text().splitlines():
                if line.startswith("prog_id:"):
                    ids.add(int(line.split()[1]))
    return ids


def kprobe_events_of(pid: int) -> list[str]:
    """The tracefs kprobe events BCC created for process ``pid`` (named ``…_bcc_<pid>``)."""
    events = Path("/sys/kernel/tracing/kprobe_events").read_text()
    return [line for line in events.splitlines() if f"_bcc_{pid} " in line]


def assert_detached(pid: int, programs: set[int], deadline_s: float) -> None:
    """After process ``pid`` exited: none of ``programs`` is loaded any more (they are freed
    after their last reference goes: waited for, up to ``deadline_s``), and none of its
    kprobe events is left."""
    deadline = time.monotonic() + deadline_s
    while (left := bpf_prog_ids() & programs) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == set(), f"BPF programs left after exit: {sorted(left)}"
    assert kprobe_events_of(pid) == []


_shared_watch: SharedWatch | None = None
_shared_agent: SharedAgent | None = None
AGENT_MODULE = "test_agent_bpf.py"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """Start the shared watch and agent processes now if any test needs them: their
    compiles then overlap the in-process one. The agent's tests go last: by then its
    compile is long done, and the others' compiles did not wait for it."""
    global _shared_watch, _shared_agent
    if not GUEST:
        return
    if _shared_watch is None and any(
        "bpf_watch" in getattr(item, "fixturenames", ()) for item in items
    ):
        _shared_watch = SharedWatch()
    if _shared_agent is None and any(
        "bpf_agent" in getattr(item, "fixturenames", ()) for item in items
    ):
        _shared_agent = SharedAgent()
    items.sort(key=lambda item: item.path.name == AGENT_MODULE)  # stable: order kept otherwise


def pytest_unconfigure(config: pytest.Config) -> None:
    for shared in (_shared_watch, _shared_agent):
        if shared is not None:
            shared.close()


@pytest.fixture(scope="session")
def bpf_watch() -> SharedWatch:
    """The shared ``cttrace watch --source bpf`` process, attached (its ready file written)."""
    assert _shared_watch is not None, "started by pytest_collection_modifyitems"
    watch = _shared_watch
    if not watch.process.ready_file.exists():
        watch.process.wait_ready(timeout=COMPILE_DEADLINE_S)
    write_timing("watch_compile_and_attach_s",
                  watch.process.ready_file.stat().st_mtime - watch.started)
    return watch


@pytest.fixture(scope="session")
def bpf_agent() -> SharedAgent:
    """The shared ``cttrace agent --source bpf`` process, attached: its ready file written
    and its "started" log line read (``port`` set)."""
    assert _shared_agent is not None, "started by pytest_collection_modifyitems"
    agent = _shared_agent
    if not agent.port:
        agent.process.wait_ready(timeout=COMPILE_DEADLINE_S)
        write_timing("agent_compile_and_attach_s",
                     agent.process.ready_file.stat().st_mtime - agent.started)
        started = agent.process.wait_for(
            lambda x: x.get("kind") == "agent" and x.get("msg") == "started", timeout=10)
        host, port = started["listen"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0, started
        agent.port = int(port)
    return agent


class EventLog:
    """Everything a source delivered, searchable by the tests.

    ``raws``: the raw records behind the events, when the source is the bpf one.
    """

    def __init__(self, source: Source, raws: list[bytes] | None = None) -> None:
        self.source = source
        self.events: list[Event] = []
        self.raws = raws if raws is not None else []

    def pump(self, timeout: float) -> None:
        ready, _, _ = select.select([self.source.fileno()], [], [], timeout)
        if ready:
            self.events.extend(self.source.read())

    def wait_for(self, predicate: Callable[[Event], bool], what: str,
                 timeout: float = 60.0) -> Event:
        """The first event matching ``predicate``, waiting up to ``timeout`` s for it."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {what} within {timeout} s; got {self.events[-20:]}")
            self.pump(min(remaining, 1.0))

    def matching(self, predicate: Callable[[Event], bool]) -> list[Event]:
        return [event for event in self.events if predicate(event)]

    def raw_of(self, event: Event) -> bytes:
        """The raw record an event was decoded from (same decoder, clock offset aside)."""
        for raw in self.raws:
            if decode(raw)._replace(ts=0.0) == event._replace(ts=0.0):
                return raw
        raise LookupError(f"no raw record for {event}")


@pytest.fixture(scope="session")
def topology() -> Iterator[Topology]:
    topo = Topology()
    try:
        topo.create()
        yield topo
    finally:
        topo.destroy()


@pytest.fixture(scope="module")
def raws() -> list[bytes]:
    return []


@pytest.fixture(scope="module")
def bpf(topology: Topology, raws: list[bytes]) -> Iterator[BpfSource]:
    """The one in-process BpfSource, reporting the node namespace's entries; closed
    when the module that uses it ends."""
    # Every record (what --flows streams): these tests check each record field by field.
    source = BpfSource(netns_ino=topology.netns_ino(topology.node_ns), on_raw=raws.append,
                       settings=BpfSettings(stream_all=True))
    started = time.monotonic()
    source.open()
    write_timing("compile_and_attach_s", time.monotonic() - started)
    try:
        yield source
    finally:
        source.close()


@pytest.fixture(scope="module")
def tracer(bpf: BpfSource, raws: list[bytes]) -> EventLog:
    return EventLog(bpf, raws)


@pytest.fixture(scope="session")
def samples() -> Iterator[dict[str, dict[str, object]]]:
    """Raw records with what the scenario says they hold, for tests/unit/data/bpf/."""
    recorded: dict[str, dict[str, object]] = {}
    yield recorded
    out = OUT_DIR / "bpf-samples"
    out.mkdir(parents=True, exist_ok=True)
    for name, sample in recorded.items():
        (out / f"{name}.json").write_text(json.dumps(sample, indent=1, sort_keys=True) + "\n")


def wait_until(condition: Callable[[], bool], what: str, deadline_s: float) -> None:
    """Wait for ``condition`` (polled every 0.1 s); fail after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_s:.0f} s waiting for {what}")
        time.sleep(0.1)


def write_timing(key: str, seconds: float) -> None:
    path = OUT_DIR / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[key] = round(seconds, 1)
    path.write_text(json.dumps(timings))
