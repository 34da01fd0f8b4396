"""The lab's identity file: the watch stream a Kubernetes API server would send.

One JSON object per line, ``{"type": "ADDED"|"MODIFIED"|"DELETED", "object": {...}}``,
written the moment the lab changes something, and flushed at once: a tracer
following the file stamps each change when it reads it, so a late write would
look like kubelet lag that never happened.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Literal

import orjson

from cttrace.lab.k8s_objects import JsonObject

EventType = Literal["ADDED", "MODIFIED", "DELETED"]


class IdentityLog:
    """Appends watch events to ``path`` (truncated on open: a lab starts an empty cluster)."""

    def __init__(self, path: Path, *, first_resource_version: int = 1000) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_APPEND, so a line someone else appends (a test's malformed event) is never
        # overwritten by the next event written at this handle's own offset.
        self._file = path.open("ab")
        self._file.truncate(0)
        self._lock = threading.Lock()
        self._resource_version = first_resource_version

    def emit(self, event_type: EventType, obj: JsonObject) -> JsonObject:
        """Write one event; stamps ``metadata.resourceVersion`` like etcd's revision counter."""
        with self._lock:
            self._resource_version += 1
            obj["metadata"]["resourceVersion"] = str(self._resource_version)
            self._file.write(orjson.dumps({"type": event_type, "object": obj}) + b"\n")
            self._file.flush()
        return obj

    def close(self) -> None:
        with self._lock:
            self._file.close()
