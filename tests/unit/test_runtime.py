"""The event loop: under a steady stream it reads in batches and loses nothing."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from cttrace.correlator import Correlator
from cttrace.events import Event, Lost
from cttrace.runtime import Pipeline
from cttrace.sources import SourceStats


class PipeSource:
    """Each byte written to the pipe is one event; read() takes all that is there."""

    name = "pipe"

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.reads = 0

    def open(self) -> None:
        pass

    def fileno(self) -> int:
        return self.r

    def read(self) -> list[Event]:
        self.reads += 1
        try:
            data = os.read(self.r, 1 << 20)
        except BlockingIOError:
            return []
        return [Lost(0.0, self.name, 0, "test") for _ in data]

    def stats(self) -> SourceStats:
        return SourceStats()

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


@pytest.fixture
def source() -> Iterator[PipeSource]:
    src = PipeSource()
    yield src
    src.close()


def test_a_steady_stream_is_read_in_batches_and_nothing_is_lost(source: PipeSource) -> None:
    coalesce_s, written = 0.05, 0
    pipeline = Pipeline(source, Correlator(), [], coalesce_s=coalesce_s)
    stop = threading.Event()
    summaries = []
    runner = threading.Thread(target=lambda: summaries.append(pipeline.run(stop)))
    runner.start()
    started = time.monotonic()
    try:
        while time.monotonic() - started < 0.4:
            os.write(source.w, b"x")  # one event about every millisecond
            written += 1
            time.sleep(0.001)
        deadline = time.monotonic() + 5.0
        while pipeline._events < written and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        runner.join()
    elapsed = time.monotonic() - started
    assert summaries[0].events == written
    # Every read is followed by a pause of coalesce_s: ~8 wake-ups for ~300 events.
    assert source.reads <= elapsed / coalesce_s + 2 < written / 10
