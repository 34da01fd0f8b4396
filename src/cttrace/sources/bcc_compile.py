"""Compiling the BCC program: what BCC's own headers lack, supplied; a failure, one line.

BCC compiles against the running kernel's headers, but it puts its own copy
of the BPF uapi header (``virtual_bpf.h``, frozen when that BCC was released)
in front of the kernel's ``include/uapi/linux/bpf.h``: both carry the include
guard ``_UAPI__LINUX_BPF_H__``, so the kernel's copy is never read. A kernel
newer than the BCC then uses structs that only its own copy defines, e.g.
Debian's 6.12 ``include/linux/bpf.h`` takes ``sizeof(struct bpf_wq)``,
``struct bpf_rb_root``, ``struct bpf_rb_node`` and ``struct bpf_refcount``
(``btf_field_type_size()``), which bookworm's BCC 0.26 does not have.

This is settled by detection, never by kernel version, in two steps. Before
compiling, the headers are read (:func:`lacking_structs`): the structs the
kernel's ``include/linux/bpf.h`` takes the size or alignment of, which its own
uapi ``bpf.h`` defines and BCC's copy (embedded as text in libbcc) does not.
Their definitions, copied from the kernel's uapi header, are put in front of
the program, so a 6.12 node compiles once, not twice. Should the compile still
fail with clang reporting ``incomplete type 'struct X'`` in the kernel's
headers (a struct the reading missed), the kernel's definitions of those are
supplied too and it is compiled once more. Whatever still fails becomes one
line (:func:`summarise`) naming what is missing; the compiler's full output goes
to a log file that line names, never to the user's terminal.

libbcc prints clang's diagnostics straight to file descriptor 2, so the
compile runs with fd 2 redirected into a file (:func:`captured_stderr`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Where the kernel's own copy of the header lives in a header tree.
UAPI_BPF_H = "include/uapi/linux/bpf.h"
#: The kernel-internal header that uses the uapi header's structs.
LINUX_BPF_H = "include/linux/bpf.h"
#: CONFIG_IKHEADERS: the running kernel's headers as a tar archive.
KHEADERS = Path("/sys/kernel/kheaders.tar.xz")
#: clang: ``invalid application of 'sizeof' to an incomplete type 'struct bpf_wq'``,
#: ``variable has incomplete type 'struct X'``.
_INCOMPLETE = re.compile(r"incomplete (?:definition of )?type '(?:struct )?(\w+)'")
#: ``file:line:col: error: message``
_DIAGNOSTIC = re.compile(r"^(?P<file>[^\s:]+):(?P<line>\d+):\d+: (?P<level>error|fatal error): "
                         r"(?P<message>.*)$")
#: A complete-type use of a struct: ``sizeof(struct bpf_wq)``, ``__alignof__(struct bpf_wq)``.
_SIZED = re.compile(r"\b(?:sizeof|__alignof__|__alignof|_Alignof)\s*\(\s*struct\s+(\w+)\s*\)")
#: What program_text() puts before each file of the program.
_FILE_MARKER = re.compile(r"^/\* ==== (bpf/[\w.]+) ==== \*/$")
_MAIN = "/virtual/main.c"
_PRELUDE_HEAD = "/* cttrace: struct definitions BCC's uapi bpf.h lacks, from {source} */\n"


class CompileFailed(Exception):
    """BCC did not compile or load the program; ``str()`` is the one line for the user."""

    def __init__(self, line: str, output: str) -> None:
        super().__init__(line)
        self.output = output


@dataclass(frozen=True, slots=True)
class Compiled:
    module: Any
    """The ``bcc.BPF`` object."""
    supplied: tuple[str, ...]
    """Structs whose definitions were taken from the kernel's own uapi header."""


@contextlib.contextmanager
def captured_stderr() -> Iterator[Callable[[], str]]:
    """Redirect file descriptor 2 into a temporary file; yields a function returning
    what was written so far. Everything written to fd 2 meanwhile (by any thread) is
    captured."""
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        try:
            os.dup2(sink.fileno(), 2)

            def read() -> str:
                sink.seek(0)
                return sink.read().decode(errors="replace")

            yield read
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def incomplete_structs(output: str) -> list[str]:
    """The structs clang found used but never defined in the kernel's headers (not in the
    program itself: a typo there is the program's error), in order of first mention."""
    found: dict[str, None] = {}
    for line in output.splitlines():
        diagnostic = _DIAGNOSTIC.match(line)
        if diagnostic and diagnostic["file"] != _MAIN:
            for name in _INCOMPLETE.findall(diagnostic["message"]):
                found.setdefault(name, None)
    return list(found)


def struct_definitions(header: str, names: list[str]) -> dict[str, str]:
    """``struct NAME { ... } attrs;`` for each of ``names`` that ``header`` defines at top
    level (kernel style: the closing brace in column 0)."""
    found = {}
    for name in names:
        match = re.search(rf"^struct {re.escape(name)} \{{.*?^\}}[^;\n]*;", header,
                          re.MULTILINE | re.DOTALL)
        if match:
            found[name] = match.group(0)
    return found


def header_trees(release: str, headers_dir: Path | None) -> list[Path]:
    """Where BCC reads this kernel's headers from: the chosen directory, else
    /lib/modules/<release>/build and its ``source`` half (Debian, Ubuntu)."""
    if headers_dir is not None:
        return [headers_dir]
    modules = Path("/lib/modules") / release
    return [modules / "build", modules / "source"]


def kernel_header(release: str, headers_dir: Path | None,
                  name: str = UAPI_BPF_H) -> tuple[str, str] | None:
    """(text, where) of the kernel's own header ``name`` (default its uapi bpf.h), or None."""
    for tree in header_trees(release, headers_dir):
        path = tree / name
        with contextlib.suppress(OSError):
            return path.read_text(errors="replace"), str(path)
    if headers_dir is None and KHEADERS.exists():
        with (contextlib.suppress(OSError, tarfile.TarError, KeyError),
              tarfile.open(KHEADERS, "r:xz") as tar):
            member = tar.extractfile(f"./{name}")
            if member is not None:
                return member.read().decode(errors="replace"), f"{KHEADERS}:{name}"
    return None


def loaded_libbcc() -> Path | None:
    """The libbcc this process has loaded (``import bcc`` loads it), from /proc/self/maps."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split(maxsplit=5)[-1]
            if path.startswith("/") and "/libbcc.so" in path:
                return Path(path)
    return None


def lacking_structs(kernel_bpf_h: str, uapi_bpf_h: str, bcc_library: bytes) -> list[str]:
    """Structs whose size or alignment the kernel's include/linux/bpf.h needs, which the
    kernel's uapi bpf.h defines and BCC's copy of it (text inside ``bcc_library``) lacks."""
    used = dict.fromkeys(_SIZED.findall(kernel_bpf_h))
    return [name for name in used
            if struct_definitions(uapi_bpf_h, [name])
            and f"struct {name} {{".encode() not in bcc_library]


def source_location(text: str, file: str, line: int) -> str:
    """``bpf/<file>.c:<line>`` for a line of /virtual/main.c (``text``: what was compiled);
    other files as clang named them."""
    if file != _MAIN:
        return f"{file}:{line}"
    lines = text.splitlines()
    for index in range(min(line, len(lines)) - 1, -1, -1):
        marker = _FILE_MARKER.match(lines[index])
        if marker:
            return f"{marker.group(1)}:{line - index - 1}"
    return f"{file}:{line}"


def summarise(output: str, text: str) -> str:
    """One line saying what stopped the compile, from clang's ``output`` (``text``: the
    program compiled): the first error, where it is in bpf/, and how many followed."""
    errors = [m for m in map(_DIAGNOSTIC.match, output.splitlines()) if m]
    if not errors:
        tail = [line.strip() for line in output.splitlines() if line.strip()]
        return tail[-1] if tail else "no compiler message"
    first = errors[0]
    where = source_location(text, first["file"], int(first["line"]))
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return f"{where}: {first['message']}{more}"


def unsupplied_line(names: list[str], kernel_header: str | None) -> str:
    """One line for structs the kernel headers use that BCC's uapi header lacks and that
    could not be supplied (``kernel_header``: where the kernel's own copy was read)."""
    if kernel_header is None:
        why = f"the kernel's own {UAPI_BPF_H} was not found in its header tree"
    else:
        why = f"{kernel_header} does not define {'it' if len(names) == 1 else 'them'} either"
    return (f"the kernel headers use struct {', '.join(names)}, which BCC's copy of the BPF "
            f"uapi header lacks, and {why} (a newer BCC may have "
            f"{'it' if len(names) == 1 else 'them'})")


def _log_output(output: str) -> str:
    """Keep the compiler's full output in a file; its path."""
    fd, path = tempfile.mkstemp(prefix="cttrace-bcc-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(output)
    log.debug("BCC compiler output (%s):\n%s", path, output)
    return path


@contextlib.contextmanager
def kernel_source(headers_dir: Path | None) -> Iterator[None]:
    """BCC_KERNEL_SOURCE set to ``headers_dir`` (when not None) for the duration."""
    saved = os.environ.get("BCC_KERNEL_SOURCE")
    if headers_dir is not None:
        os.environ["BCC_KERNEL_SOURCE"] = str(headers_dir)
    try:
        yield
    finally:
        if headers_dir is not None:
            if saved is None:
                os.environ.pop("BCC_KERNEL_SOURCE", None)
            else:
                os.environ["BCC_KERNEL_SOURCE"] = saved


def compile_program(bpf_class: Any, text: str, release: str, headers_dir: Path | None,
                    bcc_library: Path | None = None) -> Compiled:
    """``bpf_class(text=...)`` against the headers in ``headers_dir`` (None: where BCC finds
    them), with the structs BCC's uapi header lacks supplied from the kernel's;
    :class:`CompileFailed` with one line on failure. ``bcc_library``: the libbcc whose
    embedded headers are read (default: the one this process loaded)."""
    with kernel_source(headers_dir):
        return _compile_supplying(bpf_class, text, release, headers_dir,
                                  bcc_library or loaded_libbcc())


def _presupplied(release: str, headers_dir: Path | None,
                 bcc_library: Path | None) -> tuple[list[str], tuple[str, str] | None]:
    """What :func:`lacking_structs` finds, and the kernel's uapi bpf.h (text, where)."""
    uapi = kernel_header(release, headers_dir)
    linux_bpf_h = kernel_header(release, headers_dir, LINUX_BPF_H)
    if uapi is None or linux_bpf_h is None or bcc_library is None:
        return [], uapi
    try:
        library = bcc_library.read_bytes()
    except OSError:
        return [], uapi
    return lacking_structs(linux_bpf_h[0], uapi[0], library), uapi


def _compile_supplying(bpf_class: Any, text: str, release: str, headers_dir: Path | None,
                       bcc_library: Path | None) -> Compiled:
    wanted, kernel_uapi = _presupplied(release, headers_dir, bcc_library)
    supplied: dict[str, str] = {}
    prelude = output = ""
    while True:
        if wanted:
            found = struct_definitions(kernel_uapi[0], wanted) if kernel_uapi else {}
            unsupplied = [name for name in wanted if name not in found]
            if unsupplied:
                raise CompileFailed(
                    f"{unsupplied_line(unsupplied, kernel_uapi and kernel_uapi[1])}"
                    f"; compiler output in {_log_output(output)}", output)
            assert kernel_uapi is not None
            supplied.update(found)
            prelude = (_PRELUDE_HEAD.format(source=kernel_uapi[1])
                       + "\n".join(supplied.values()) + "\n")
            log.debug("supplying struct %s from %s", ", ".join(found), kernel_uapi[1])
        full = prelude + text
        with captured_stderr() as read:
            try:
                return Compiled(bpf_class(text=full.encode()), tuple(supplied))
            except Exception as exc:  # BCC raises bare Exception for compile and load errors
                error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                output = read()
        wanted = [name for name in incomplete_structs(output) if name not in supplied]
        if not wanted:
            break
        if kernel_uapi is None:
            kernel_uapi = kernel_header(release, headers_dir)
    if not any(map(_DIAGNOSTIC.match, output.splitlines())):
        # No compiler error: loading failed (a map, permissions); BCC's message says which.
        raise CompileFailed(f"{error[:200]}; BCC's output in {_log_output(output)}", output)
    raise CompileFailed(f"{summarise(output, full)}; compiler output in {_log_output(output)}",
                        output)
