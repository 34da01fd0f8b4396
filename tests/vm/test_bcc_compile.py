"""A program BCC cannot compile, with the real BCC and kernel headers: one clear line.

cttrace's own program with one line added that reads a field ``struct nf_conn``
does not have, opened the way ``cttrace watch --source auto`` opens a source: it
falls back to netlink and says why in one line naming the field and the place in
bpf/, and the compiler's output (on 6.12 after the structs BCC's uapi header lacks
were supplied) lands in the log file that line names, not on the terminal.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from cttrace.sources import bpf as bpf_module
from cttrace.sources.select import open_source

pytestmark = pytest.mark.vm

BROKEN = ("\nstatic __always_inline __u32 ctt_broken(struct nf_conn *ct)\n"
          "{\n\treturn ct->ctt_no_such_field;\n}\n")


def test_a_broken_program_is_one_line_and_auto_falls_back_to_netlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    bpf_dir = tmp_path / "bpf"
    shutil.copytree(str(bpf_module.default_bpf_dir()), bpf_dir)
    conntrack = bpf_dir / "conntrack.bpf.c"
    conntrack.write_text(conntrack.read_text() + BROKEN)
    broken_line = len(conntrack.read_text().splitlines()) - 1
    monkeypatch.setattr(bpf_module, "default_bpf_dir", lambda: bpf_dir)

    source, note = open_source("auto", None)
    try:
        assert source.name == "netlink"
    finally:
        source.close()
    assert note is not None and "\n" not in note
    match = re.fullmatch(
        r"bpf source unavailable: BCC could not compile or load cttrace's BPF programs on "
        r"(?P<release>\S+): bpf/conntrack\.bpf\.c:(?P<line>\d+): no member named "
        r"'ctt_no_such_field' in 'struct nf_conn'; compiler output in (?P<log>\S+) "
        r"\(`cttrace watch --dump-bpf` prints the program\); using netlink", note)
    assert match, note
    assert int(match["line"]) == broken_line
    log = Path(match["log"])
    assert "error: no member named 'ctt_no_such_field'" in log.read_text()
    log.unlink()
    assert "error:" not in capfd.readouterr().err
