"""Feed the identity index from the Kubernetes API: list, then watch, Pods, Services, Slices.

Each of the three kinds has a daemon thread that lists it (paged), then watches
from the list's resourceVersion with bookmarks, the way client-go's reflector
does. Threads never touch the index: they put what they read, stamped with the
clock at the moment it came off the wire, on a queue, and :meth:`KubeIdentitySource.poll`
(called by the runtime's loop) applies the queue to the index. So the index is
only ever touched from the loop's thread, and the event path never waits on
the network.

What the API can do to a watcher, and what this module does about it:

* **410 Gone** (the resourceVersion to resume from was compacted away, or the
  apiserver's watch cache no longer reaches back that far, as after an apiserver
  restart): list again, quietly. The list is applied as a *relist*
  (:meth:`IdentityIndex.begin_relist`/``end_relist`` for that kind), so objects that
  vanished while the watch was down are ended at the list's time: no ownership
  change is lost, only its time is known less precisely.
* **Disconnects** (apiserver restart, network, a broken chunked stream): resume the
  watch from the last resourceVersion seen, after a capped exponential backoff
  with jitter (:func:`backoff_delay`), so a fleet of agents does not hammer an
  apiserver that is coming back.
* Routine ends of a watch (the server-side ``timeoutSeconds``): resume at once.

EndpointSlices are read as ``discovery.k8s.io/v1`` when the API serves it, else
``v1beta1`` (Kubernetes 1.17-1.20 serve only that); API discovery decides, again
before every list, so an upgrade that drops v1beta1 is followed.

Objects are passed on as the raw JSON the API sends (never the client's model
classes: a Pod is kilobytes and the index keeps a dozen fields), in the exact
``{"type": ..., "object": ...}`` shape of a watch event; list items, which the API
sends without ``kind``/``apiVersion``, get them filled in from the list.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, cast

import orjson
import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from cttrace.errors import IdentityError, UserError
from cttrace.identity.index import IdentityIndex
from cttrace.identity.watch_events import ENDPOINT_SLICE, POD, SERVICE

#: The API group of EndpointSlices, and its versions this module reads, preferred first.
DISCOVERY_GROUP: Final = "discovery.k8s.io"
SLICE_VERSIONS: Final = ("v1", "v1beta1")

#: HTTP 410 Gone: what the API answers (as a status, or inside an ERROR watch event) for a
#: resourceVersion it can no longer resume from, and for an expired ``continue`` token.
HTTP_GONE: Final = 410

Event = dict[str, Any]
Clock = Callable[[], float]
Log = Callable[[str], None]

# Parts of the official client without annotations, given the types they have.
_iter_resp_lines = cast(Callable[[urllib3.BaseHTTPResponse], Iterator[str]], iter_resp_lines)
_load_kube_config = cast(Callable[..., None], k8s_config.load_kube_config)
_load_incluster_config = cast(Callable[..., None], k8s_config.load_incluster_config)


class KubeConfigError(UserError):
    """No usable way to reach the Kubernetes API (kubeconfig, in-cluster config, credentials)."""


@dataclass(frozen=True, slots=True)
class Resource:
    """One API collection watched across all namespaces."""

    kind: str  # Pod, Service, EndpointSlice
    group: str  # "" for the core API
    version: str
    plural: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def path(self) -> str:
        base = f"/apis/{self.group}" if self.group else "/api"
        return f"{base}/{self.version}/{self.plural}"


PODS: Final = Resource(POD, "", "v1", "pods")
SERVICES: Final = Resource(SERVICE, "", "v1", "services")


def endpoint_slices(version: str) -> Resource:
    return Resource(ENDPOINT_SLICE, DISCOVERY_GROUP, version, "endpointslices")


@dataclass(frozen=True, slots=True)
class WatchSettings:
    """How the watchers talk to the API. Defaults follow client-go's reflector."""

    page_size: int = 500
    """Objects per list page (``limit``); continued with the ``continue`` token. client-go: 500."""
    watch_timeout_s: float = 300.0
    """Server-side watch timeout; each watch asks for a random time in ``[t, 2t)`` (as client-go
    does) so that agents started together do not reconnect together."""
    backoff_base_s: float = 0.8
    """First retry delay after a failure (client-go's reflector: 800 ms)."""
    backoff_cap_s: float = 30.0
    """Longest retry delay (client-go's reflector: 30 s)."""
    connect_timeout_s: float = 10.0
    """TCP+TLS connect timeout of every request."""
    read_timeout_s: float = 60.0
    """Longest silence tolerated while reading a list page. A watch tolerates its own
    timeout plus this much, since a quiet watch legitimately sends nothing."""


def backoff_delay(failures: int, *, base: float, cap: float,
                  rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retrying after ``failures`` consecutive failures (1 = first).

    Exponential (``base * 2**(failures-1)``), capped at ``cap``, with "equal jitter": a
    random point in the upper half, so retries spread out yet never shrink to zero.
    """
    if failures <= 0:
        return 0.0
    ceiling = min(cap, base * 2.0 ** min(failures - 1, 62))
    return ceiling / 2 + rand() * ceiling / 2


# -- shaping what the API sends ------------------------------------------------------------------


class WatchStreamError(Exception):
    """The watch stream sent something that is not a watch event: the stream is broken."""


class Expired(Exception):
    """HTTP 410 Gone: the resourceVersion (or continue token) is too old; list again."""


@dataclass(frozen=True, slots=True)
class ListPage:
    events: list[Event]  # the page's items as ADDED events
    resource_version: str  # the list's resourceVersion: where a watch resumes
    next: str | None  # continue token, None on the last page


def list_page_events(body: Mapping[str, Any], resource: Resource) -> ListPage:
    """Turn one page of a list response into ADDED watch events, filling each item's
    ``kind``/``apiVersion`` (the API leaves them out of list items)."""
    meta = body.get("metadata")
    items = body.get("items")
    if not isinstance(meta, Mapping) or not isinstance(items, list):
        raise WatchStreamError(f"{resource.path}: list response without metadata/items")
    rv = meta.get("resourceVersion")
    if not isinstance(rv, str) or not rv:
        raise WatchStreamError(f"{resource.path}: list response without a resourceVersion")
    events: list[Event] = []
    for item in items:
        if not isinstance(item, dict):
            raise WatchStreamError(f"{resource.path}: list item is not an object")
        item.setdefault("kind", resource.kind)
        item.setdefault("apiVersion", resource.api_version)
        events.append({"type": "ADDED", "object": item})
    token = meta.get("continue")
    return ListPage(events, rv, token if isinstance(token, str) and token else None)


def parse_watch_line(line: str | bytes) -> Event:
    """One line of a watch stream as an event dict; :class:`WatchStreamError` if it is not one."""
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError as err:
        raise WatchStreamError(f"watch stream sent a line that is not JSON: {err}") from None
    if (not isinstance(event, dict) or not isinstance(event.get("type"), str)
            or not isinstance(event.get("object"), dict)):
        raise WatchStreamError("watch stream sent JSON that is not a {type, object} event")
    return cast(Event, event)


def event_resource_version(event: Mapping[str, Any]) -> str | None:
    meta = event["object"].get("metadata")
    rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
    return rv if isinstance(rv, str) and rv else None


def watch_error(event: Mapping[str, Any]) -> Exception:
    """The exception an ERROR event stands for (its object is a ``Status``)."""
    status = event["object"]
    code = status.get("code")
    if code == HTTP_GONE:
        return Expired(str(status.get("message") or "resource version too old"))
    return WatchStreamError(f"watch ended with an error: {status.get('code')} "
                            f"{status.get('reason')}: {status.get('message')}")


def describe_error(err: BaseException) -> str:
    """One line for a failed request: status and reason for API errors, else the exception."""
    if isinstance(err, ApiException) and err.status:
        return f"HTTP {err.status} {err.reason or ''}".strip()
    if isinstance(err, ApiException):  # status 0: the client's own wrapping of a transport error
        text = " ".join(str(err.reason).split())
    else:
        if isinstance(err, urllib3.exceptions.MaxRetryError) and err.reason is not None:
            err = err.reason
        text = str(err) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _tls_failure(err: BaseException) -> str | None:
    """The TLS error behind a failed request, if that is what it was. The client reports it as
    an ``ApiException`` with status 0, or urllib3 as the reason of a ``MaxRetryError``."""
    if isinstance(err, ApiException) and err.status == 0 and "SSLError" in str(err.reason):
        return str(err.reason).replace("\n", ": ")
    if isinstance(err, urllib3.exceptions.MaxRetryError) and isinstance(
            err.reason, urllib3.exceptions.SSLError):
        return str(err.reason)
    return None


# -- talking to the API --------------------------------------------------------------------------


class WatchStream(Protocol):
    """An open watch: iterating yields its lines; ``abort()`` (any thread) unblocks a read."""

    def __iter__(self) -> Iterator[str]: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


class Transport(Protocol):
    """The three requests a watcher makes. Raise :class:`Expired` for 410, anything else for
    other failures (the watcher retries those)."""

    def served_versions(self, group: str) -> list[str] | None:
        """Versions of API group ``group`` the server serves; None when it serves no such group."""
        ...

    def list_page(self, resource: Resource, *, limit: int, cont: str | None) -> Mapping[str, Any]:
        ...

    def watch(self, resource: Resource, *, resource_version: str,
              timeout_s: int) -> WatchStream: ...

    def close(self) -> None: ...


class _HttpWatchStream:
    def __init__(self, resp: urllib3.BaseHTTPResponse) -> None:
        self._resp = resp

    def __iter__(self) -> Iterator[str]:
        return _iter_resp_lines(self._resp)

    def abort(self) -> None:
        # Shut the socket down under the blocked read: close() from another thread does not
        # reliably wake a thread blocked in a TLS read. urllib3 >= 2.3 has shutdown() for it.
        resp: Any = self._resp
        with contextlib.suppress(Exception):
            if hasattr(resp, "shutdown"):
                resp.shutdown()
            else:
                resp.connection.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._resp.close()
        self._resp.release_conn()


class ApiTransport:
    """:class:`Transport` over the official client: core/v1 for Pods and Services, the generic
    group/version/plural calls for EndpointSlices (the client has no v1beta1 discovery API any
    more; the raw path is the same). Responses are read raw (``_preload_content=False``)."""

    def __init__(self, configuration: k8s.Configuration, settings: WatchSettings) -> None:
        # No urllib3-level retries: the watchers retry with backoff; urllib3's immediate
        # retries would only hammer an apiserver that is restarting (and log each one).
        configuration.retries = 0
        self._api = k8s.ApiClient(configuration)
        self._core = k8s.CoreV1Api(self._api)
        self._groups = k8s.CustomObjectsApi(self._api)
        self._settings = settings

    def served_versions(self, group: str) -> list[str] | None:
        if group != DISCOVERY_GROUP:
            raise ValueError(f"no discovery for group {group}")
        try:
            resp = k8s.DiscoveryApi(self._api).get_api_group(
                _preload_content=False, _request_timeout=self._timeout())
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        body = _read_json(cast(urllib3.BaseHTTPResponse, resp))
        return [v["version"] for v in body.get("versions", ()) if isinstance(v, Mapping)]

    def list_page(self, resource: Resource, *, limit: int, cont: str | None) -> Mapping[str, Any]:
        kwargs: dict[str, Any] = {"limit": limit}
        if cont is not None:
            kwargs["_continue"] = cont
        try:
            resp = self._call(resource, kwargs, self._timeout())
        except ApiException as err:
            if err.status == HTTP_GONE:  # the continue token expired
                raise Expired(describe_error(err)) from None
            raise
        return _read_json(resp)

    def watch(self, resource: Resource, *, resource_version: str, timeout_s: int) -> WatchStream:
        kwargs: dict[str, Any] = {
            "watch": True,
            "resource_version": resource_version,
            "allow_watch_bookmarks": True,
            "timeout_seconds": timeout_s,
        }
        read = timeout_s + self._settings.read_timeout_s
        try:
            resp = self._call(resource, kwargs, (self._settings.connect_timeout_s, read))
        except ApiException as err:
            if err.status == HTTP_GONE:
                raise Expired(describe_error(err)) from None
            raise
        return _HttpWatchStream(resp)

    def close(self) -> None:
        cast(Callable[[], None], self._api.close)()

    def _timeout(self) -> tuple[float, float]:
        return (self._settings.connect_timeout_s, self._settings.read_timeout_s)

    def _call(self, resource: Resource, kwargs: dict[str, Any],
              timeout: tuple[float, float]) -> urllib3.BaseHTTPResponse:
        kwargs = {**kwargs, "_preload_content": False, "_request_timeout": timeout}
        resp: object
        if resource == PODS:
            resp = self._core.list_pod_for_all_namespaces(**kwargs)
        elif resource == SERVICES:
            resp = self._core.list_service_for_all_namespaces(**kwargs)
        else:
            resp = self._groups.list_cluster_custom_object(
                resource.group, resource.version, resource.plural, **kwargs)
        # With _preload_content=False the client hands back the raw urllib3 response.
        return cast(urllib3.BaseHTTPResponse, resp)


def _read_json(resp: urllib3.BaseHTTPResponse) -> dict[str, Any]:
    try:
        body = orjson.loads(resp.data)
    except orjson.JSONDecodeError as err:
        raise WatchStreamError(f"API response is not JSON: {err}") from None
    finally:
        resp.release_conn()
    if not isinstance(body, dict):
        raise WatchStreamError("API response is not a JSON object")
    return body


def load_configuration(kubeconfig: str | None, *,
                       environ: Mapping[str, str] = os.environ) -> k8s.Configuration:
    """Client configuration from ``kubeconfig``; without one, in-cluster config when running in a
    pod (KUBERNETES_SERVICE_HOST is set), else $KUBECONFIG or ~/.kube/config."""
    cfg = k8s.Configuration()
    if kubeconfig is None and environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            _load_incluster_config(client_configuration=cfg)
        except k8s_config.ConfigException as err:
            raise KubeConfigError(
                f"running in a pod but its service account is not usable ({err}): "
                "mount the service account token or pass --kubeconfig PATH") from None
        return cfg
    path = kubeconfig or environ.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())
    if kubeconfig is None and not any(Path(p).is_file() for p in path.split(os.pathsep) if p):
        raise KubeConfigError(
            "no Kubernetes API configured: pass --kubeconfig PATH, set KUBECONFIG, "
            "or run cttrace in a pod with a service account")
    if kubeconfig is not None and not Path(kubeconfig).is_file():
        raise KubeConfigError(f"kubeconfig {kubeconfig} does not exist or is not a file")
    try:
        _load_kube_config(config_file=path, client_configuration=cfg,
                          persist_config=False)
    except Exception as err:  # the loader raises ConfigException, YAML, OS and key errors alike
        raise KubeConfigError(f"kubeconfig {path} is not usable: {err}") from None
    return cfg


# -- the watchers ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Listed:
    """A complete list of one kind: the index replaces what it knows of that kind with it."""

    kind: str
    events: list[Event]
    ts: float


@dataclass(frozen=True, slots=True)
class _Changed:
    kind: str
    event: Event
    ts: float


@dataclass(frozen=True, slots=True)
class _Note:
    message: str


_Item = _Listed | _Changed | _Note


@dataclass
class _Shared:
    """What the watcher threads share with the loop's thread."""

    clock: Clock
    settings: WatchSettings
    stop: threading.Event = field(default_factory=threading.Event)
    items: queue.SimpleQueue[_Item] = field(default_factory=queue.SimpleQueue)
    counts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    wake_fd: int = -1

    def put(self, item: _Item) -> None:
        self.items.put(item)
        # Under the lock: close_wake() must not close (and the fd number be reused) between
        # the check and the write.
        with self.lock:
            if self.wake_fd >= 0:
                with contextlib.suppress(OSError):  # the counter is full: already readable
                    os.eventfd_write(self.wake_fd, 1)

    def close_wake(self) -> None:
        with self.lock:
            if self.wake_fd >= 0:
                os.close(self.wake_fd)
                self.wake_fd = -1

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] += n


class Watcher:
    """List-then-watch loop for one kind; runs in its own thread until ``shared.stop`` is set.

    ``resolve`` picks the :class:`Resource` before every list (None: the API serves none).
    """

    def __init__(self, kind: str, resolve: Callable[[Transport], Resource | None],
                 transport: Transport, shared: _Shared,
                 rand: Callable[[], float] = random.random) -> None:
        self.kind = kind
        self._resolve = resolve
        self._transport = transport
        self._shared = shared
        self._rand = rand
        self._stream: WatchStream | None = None
        self._stream_lock = threading.Lock()
        self._watches = 0
        self._failures = 0  # consecutive failed requests
        self._resource: Resource | None = None
        #: Where the watch resumes: the list's resourceVersion, then each event's (bookmarks
        #: included). None: list first.
        self.resource_version: str | None = None
        self.thread = threading.Thread(target=self.run, name=f"cttrace-kube-{kind}", daemon=True)

    def run(self) -> None:
        """The loop (the thread's target; tests may call it directly and set ``stop``)."""
        shared = self._shared
        expired = 0
        while not shared.stop.is_set():
            try:
                if self.resource_version is None and not self._list():
                    return  # the API serves no such resource: nothing to watch
                self._watch()
                expired = 0
            except Expired:
                # Quietly: a long disconnect or an apiserver restart ends like this, and the
                # relist reconciles everything. Only a server answering 410 again and again
                # (right after a fresh list) is relisted with backoff rather than in a loop.
                shared.count("relists_expired")
                self.resource_version = None
                expired += 1
                if expired > 1:
                    shared.stop.wait(backoff_delay(
                        expired - 1, base=shared.settings.backoff_base_s,
                        cap=shared.settings.backoff_cap_s, rand=self._rand))
            except Exception as err:
                if shared.stop.is_set():
                    break
                self._failures += 1
                shared.count("errors")
                if self._failures == 1:
                    what = "list" if self.resource_version is None else "watch"
                    self._note(f"{self.kind} {what} failed ({describe_error(err)}); "
                               "retrying with backoff")
                shared.stop.wait(backoff_delay(
                    self._failures, base=shared.settings.backoff_base_s,
                    cap=shared.settings.backoff_cap_s, rand=self._rand))

    def abort(self) -> None:
        """Unblock a read in progress (any thread); the loop then sees ``stop``."""
        with self._stream_lock:
            if self._stream is not None:
                self._stream.abort()

    def _note(self, message: str) -> None:
        self._shared.put(_Note(message))

    def _list(self) -> bool:
        """List the kind completely and queue it; False when the API does not serve it."""
        resource = self._resolve(self._transport)
        if resource is None:
            self._note(f"the API serves no {self.kind} (tried {DISCOVERY_GROUP} "
                       f"{', '.join(SLICE_VERSIONS)}): Service endpoints stay unknown")
            self._shared.put(_Listed(self.kind, [], self._shared.clock()))
            return False
        if self._resource is not None and resource != self._resource:
            self._note(f"{self.kind}: now reading {resource.api_version}")
        self._resource = resource
        events: list[Event] = []
        cont: str | None = None
        while True:
            page = list_page_events(
                self._transport.list_page(resource, limit=self._shared.settings.page_size,
                                          cont=cont), resource)
            events.extend(page.events)
            if page.next is None:
                break
            cont = page.next
        self._shared.put(_Listed(self.kind, events, self._shared.clock()))
        self._shared.count("lists")
        self.resource_version = page.resource_version
        return True

    def _watch(self) -> None:
        """Watch until the stream ends; raises :class:`Expired` on 410, anything on failure."""
        assert self._resource is not None and self.resource_version is not None
        shared = self._shared
        timeout = int(shared.settings.watch_timeout_s * (1 + self._rand())) or 1
        stream = self._transport.watch(self._resource, resource_version=self.resource_version,
                                       timeout_s=timeout)
        if self._watches:
            shared.count("watch_restarts")
        self._watches += 1
        if self._failures:
            self._note(f"{self.kind} watch reconnected after {self._failures} failed attempts")
            self._failures = 0
        with self._stream_lock:
            self._stream = stream
        try:
            if shared.stop.is_set():
                return
            for line in stream:
                if not line:
                    continue
                ts = shared.clock()
                event = parse_watch_line(line)
                etype = event["type"]
                if etype == "ERROR":
                    raise watch_error(event)
                self.resource_version = event_resource_version(event) or self.resource_version
                if etype == "BOOKMARK":
                    shared.count("bookmarks")  # moves the resume point; nothing to apply
                    continue
                shared.put(_Changed(self.kind, event, ts))
                shared.count("events")
        finally:
            with self._stream_lock:
                self._stream = None
            with contextlib.suppress(Exception):
                stream.close()


def resolve_endpoint_slices(transport: Transport) -> Resource | None:
    """discovery.k8s.io/v1 when served, else v1beta1, else None."""
    served = transport.served_versions(DISCOVERY_GROUP) or []
    for version in SLICE_VERSIONS:
        if version in served:
            return endpoint_slices(version)
    return None


def _fixed(resource: Resource) -> Callable[[Transport], Resource]:
    return lambda _transport: resource


# -- the source ------------------------------------------------------------------------------


class KubeIdentitySource:
    """Keeps an :class:`IdentityIndex` current from the Kubernetes API.

    ``open()`` loads the client configuration (raising :class:`KubeConfigError`) and starts the
    watcher threads; ``poll()``, from the loop's thread, applies what they read; ``close()``
    stops them. ``on_log`` receives one-line notes (failures, reconnects), always on the
    thread that calls ``poll()``.
    """

    name = "kubernetes"

    def __init__(self, index: IdentityIndex, *, kubeconfig: str | None,
                 clock: Clock = time.time, on_log: Log | None = None,
                 settings: WatchSettings | None = None,
                 transport: Transport | None = None) -> None:
        self.index = index
        self.kubeconfig = kubeconfig
        self.on_log = on_log
        self._shared = _Shared(clock=clock, settings=settings or WatchSettings())
        self._transport = transport
        self._watchers: list[Watcher] = []
        self._listed: set[str] = set()
        self._in_sync = False
        self._opened = False
        self._closed = False

    def open(self) -> None:
        """Connect (configuration errors raise :class:`KubeConfigError`) and start watching."""
        if self._opened:
            return
        if self._transport is None:
            cfg = load_configuration(self.kubeconfig)
            self._transport = ApiTransport(cfg, self._shared.settings)
            self._probe(cfg.host)
        self._shared.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._opened = True
        for kind, resolve in ((POD, _fixed(PODS)), (SERVICE, _fixed(SERVICES)),
                              (ENDPOINT_SLICE, resolve_endpoint_slices)):
            watcher = Watcher(kind, resolve, self._transport, self._shared)
            self._watchers.append(watcher)
            watcher.thread.start()

    def _probe(self, host: str) -> None:
        """One request before the threads start, so that what only the user can fix (credentials,
        TLS trust) is an error now, not a source that never gets in sync. An API that cannot be
        reached is only noted: the watchers keep trying (an agent may start before its API)."""
        assert self._transport is not None
        try:
            self._transport.served_versions(DISCOVERY_GROUP)
        except Exception as err:
            tls = _tls_failure(err)
            if tls is not None:
                raise KubeConfigError(
                    f"TLS to the Kubernetes API at {host} failed ({tls}): check the "
                    "kubeconfig's certificate-authority") from None
            if isinstance(err, ApiException) and err.status in (401, 403):
                raise KubeConfigError(
                    f"the Kubernetes API at {host} refused cttrace ({describe_error(err)}): "
                    "check the credentials in the kubeconfig or the service account") from None
            self._note_now(f"the API at {host} is not usable yet ({describe_error(err)}); "
                           "retrying in the background")

    def _note_now(self, message: str) -> None:
        if self.on_log is not None:
            self.on_log(f"kubernetes: {message}")

    def fileno(self) -> int:
        """Readable while changes wait for :meth:`poll` (an eventfd)."""
        return self._shared.wake_fd

    @property
    def in_sync(self) -> bool:
        """True once every kind has been listed completely and applied."""
        return self._in_sync

    def poll(self) -> int:
        """Apply everything the watchers have read so far; returns how many events were applied."""
        shared = self._shared
        if shared.wake_fd >= 0:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(shared.wake_fd)
        applied = 0
        while True:
            try:
                item = shared.items.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Changed):
                applied += self._apply((item.event,), item.kind, item.ts)
            elif isinstance(item, _Listed):
                self.index.begin_relist((item.kind,))
                applied += self._apply(item.events, item.kind, item.ts)
                self.index.end_relist(item.ts, (item.kind,))
                self._listed.add(item.kind)
            else:
                self._note_now(item.message)
        if not self._in_sync and len(self._listed) == len(self._watchers) and self._watchers:
            self._in_sync = True
            self.index.mark_in_sync()
        return applied

    def _apply(self, events: Iterable[Event], kind: str, ts: float) -> int:
        applied = 0
        for event in events:
            try:
                self.index.apply(event, ts, kind=kind)
                applied += 1
            except IdentityError as err:
                self._shared.count("bad_events")
                self._note_now(f"skipped a {kind} the index cannot read: {err}")
        return applied

    def stats(self) -> dict[str, int]:
        """Counters: ``lists`` (complete lists, initial and re-), ``relists_expired`` (relists
        after 410 Gone), ``watch_restarts`` (watches reopened after the first, whatever ended
        the previous one), ``errors`` (failed requests), ``events``, ``bookmarks``,
        ``bad_events`` (objects the index rejected)."""
        with self._shared.lock:
            out = dict(self._shared.counts)
        for name in ("lists", "relists_expired", "watch_restarts", "errors", "events",
                     "bookmarks", "bad_events"):
            out.setdefault(name, 0)
        return out

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the watcher threads (waiting up to ``timeout_s``) and drop the connections."""
        if self._closed:
            return
        self._closed = True
        self._shared.stop.set()
        for watcher in self._watchers:
            watcher.abort()
        deadline = time.monotonic() + timeout_s
        for watcher in self._watchers:
            watcher.thread.join(max(0.0, deadline - time.monotonic()))
        if self._transport is not None:
            with contextlib.suppress(Exception):
                self._transport.close()
        self._shared.close_wake()

    def __enter__(self) -> KubeIdentitySource:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
