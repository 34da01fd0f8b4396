"""Feed the identity index from a file of watch events, one JSON object per line, as it grows.

This is the identity source that needs no API access from the node: whatever
appends watch events (``{"type": ..., "object": ...}``, one per line) to a file,
on any machine, gives cttrace its names. The API's own watch stream
(``GET /api/v1/pods?watch=1``) is already in that format; so is a recording of it.
Objects need their ``kind`` (the watch stream has it) or one of the fields
:func:`~cttrace.identity.watch_events.infer_kind` recognises.

The follower reads what has been appended since the last
:meth:`IdentityFileFollower.poll`, like ``tail -F``: it waits for a file that
does not exist yet, starts over when the file is truncated, and reopens it from
the start when it is replaced (a new inode at the path, after draining the old
one). Each line is stamped with the clock at the moment it was read: that is
when cttrace learned the fact, which is what the index's timelines are on.

A bad line (not JSON, or not a watch event the index understands) is reported
through ``on_error(lineno, message)`` with its 1-based line number and skipped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import BinaryIO, Final, NamedTuple

import orjson

from cttrace.errors import IdentityError
from cttrace.identity.index import IdentityIndex

#: Bytes read per ``read()``; lines spanning reads are reassembled.
READ_CHUNK: Final = 1 << 20
#: Longest line accepted. The API server refuses objects over ~1.5 MiB (etcd's request
#: limit), so a longer "line" is not a watch event: most likely not a JSON-lines file.
MAX_LINE: Final = 16 << 20

ErrorHandler = Callable[[int, str], None]


class LineError(NamedTuple):
    lineno: int
    message: str


class IdentityFileFollower:
    """Apply new complete lines of ``path`` to ``index`` on every :meth:`poll`."""

    def __init__(self, path: str | os.PathLike[str], index: IdentityIndex, *,
                 clock: Callable[[], float] = time.time,
                 on_error: ErrorHandler | None = None) -> None:
        self.path = os.fspath(path)
        self.index = index
        self.clock = clock
        self.on_error = on_error
        self._file: BinaryIO | None = None
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._offset = 0  # bytes consumed from the open file (complete lines + _partial)
        self._partial = b""  # an incomplete last line, waiting for its newline
        self._discarding = False  # inside an over-long line: drop bytes up to its newline
        self._lineno = 0
        self.lines = 0  # lines applied, all files together
        self.errors = 0  # lines reported to on_error

    def poll(self) -> int:
        """Apply every complete line appended since the last call; returns how many applied.

        Raises :class:`IdentityError` when the path exists but cannot be read
        (a directory, no permission); a missing file is simply waited for.
        """
        applied = 0
        if self._file is not None:
            replaced = self._replaced()
            if replaced or self._truncated():
                if replaced:
                    applied += self._read_available(final=True)  # drain what the writer left
                self._close()
        if self._file is None and not self._open():
            return applied
        applied += self._read_available(final=False)
        self.index.mark_in_sync()  # read to the end once: the picture is whole
        return applied

    @property
    def in_sync(self) -> bool:
        """True once the file has been read to its end (what was there at start is applied)."""
        return self.index.in_sync

    def finish(self) -> int:
        """The writer is done: apply what is left, including an unterminated last line."""
        if self._file is None:
            return 0
        return self._read_available(final=True)

    def close(self) -> None:
        self._close()

    def __enter__(self) -> IdentityFileFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    # -- file handling -------------------------------------------------------------------------

    def _open(self) -> bool:
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - kept open across polls, closed in _close
        except FileNotFoundError:
            return False
        except IsADirectoryError:
            raise IdentityError(f"identity file {self.path} is a directory: give a file") from None
        except PermissionError:
            raise IdentityError(
                f"cannot read identity file {self.path}: permission denied (run as a user "
                "that can read it)") from None
        st = os.fstat(f.fileno())
        self._file = f
        self._ident = (st.st_dev, st.st_ino)
        self._offset = 0
        self._partial = b""
        self._discarding = False
        self._lineno = 0
        return True

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
        self._ident = None

    def _replaced(self) -> bool:
        """A different file (or none) is at the path now: the writer rotated or recreated it."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False  # removed, not yet recreated: keep reading what we have open
        return (st.st_dev, st.st_ino) != self._ident

    def _truncated(self) -> bool:
        # Truncate-then-rewrite past our offset between two polls is invisible here
        # (the same limit as tail -F's); writers should rotate by rename instead.
        assert self._file is not None
        return os.fstat(self._file.fileno()).st_size < self._offset

    # -- lines ---------------------------------------------------------------------------------

    def _read_available(self, *, final: bool) -> int:
        """Read to EOF, applying complete lines. ``final``: the writer is done with this file,
        so an unterminated last line is complete too."""
        assert self._file is not None
        applied = 0
        while True:
            chunk = self._file.read(READ_CHUNK)
            if not chunk:
                break
            ts = self.clock()
            self._offset += len(chunk)
            applied += self._feed(chunk, ts)
        if final and self._partial and not self._discarding:
            line, self._partial = self._partial, b""
            applied += self._apply_line(line, self.clock())
        return applied

    def _feed(self, chunk: bytes, ts: float) -> int:
        applied = 0
        data = self._partial + chunk if self._partial else chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()  # after the last newline: incomplete (often b"")
        for line in lines:
            if self._discarding:
                self._discarding = False
                self._lineno += 1
                continue
            applied += self._apply_line(line, ts)
        if len(self._partial) > MAX_LINE and not self._discarding:
            self._report(self._lineno + 1, f"line longer than {MAX_LINE} bytes: not a watch event")
            self._partial = b""
            self._discarding = True
        elif self._discarding:
            self._partial = b""
        return applied

    def _apply_line(self, line: bytes, ts: float) -> int:
        self._lineno += 1
        if not line.strip():
            return 0
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError as err:
            self._report(self._lineno, f"not JSON: {err}")
            return 0
        try:
            self.index.apply(event, ts)
        except IdentityError as err:
            self._report(self._lineno, str(err))
            return 0
        self.lines += 1
        return 1

    def _report(self, lineno: int, message: str) -> None:
        self.errors += 1
        if self.on_error is not None:
            self.on_error(lineno, message)


def load_file(path: str | os.PathLike[str], index: IdentityIndex, *,
              clock: Callable[[], float] = time.time) -> list[LineError]:
    """Apply a whole file once (and mark the index in sync); returns its bad lines.

    Raises :class:`IdentityError` when the file does not exist or cannot be read.
    """
    errors: list[LineError] = []
    follower = IdentityFileFollower(
        path, index, clock=clock, on_error=lambda n, msg: errors.append(LineError(n, msg)))
    with follower:
        if not os.path.exists(follower.path):
            raise IdentityError(f"identity file {follower.path} does not exist: check the path")
        follower.poll()
        follower.finish()
    return errors
