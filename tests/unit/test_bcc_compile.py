"""Compiling with BCC, without BCC: what the compile lacks is found in clang's output and
supplied from the kernel's own uapi header, and a failure is one line, not a compiler dump.

The compiler outputs in data/bcc/ were captured from bookworm's BCC 0.26 compiling
cttrace's program against Debian's 6.12 headers (the structs its include/linux/bpf.h
uses and BCC's copy of the uapi header lacks) and against Debian's 6.1 headers with
a field renamed to one struct nf_conn does not have. A fake ``BPF`` class replays
them on file descriptor 2, where libbcc writes them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cttrace.errors import SourceError
from cttrace.sources import bpf as bpf_module
from cttrace.sources.bcc_compile import (
    CompileFailed,
    compile_program,
    incomplete_structs,
    lacking_structs,
    source_location,
    struct_definitions,
    summarise,
)
from cttrace.sources.probe import BpfFeatures

DATA = Path(__file__).parent / "data" / "bcc"
INCOMPLETE_6_12 = (DATA / "incomplete-structs-6.12.txt").read_text()
MISSING_FIELD = (DATA / "missing-field-6.1.txt").read_text()
LACKING = ["bpf_wq", "bpf_rb_root", "bpf_rb_node", "bpf_refcount"]
#: A uapi bpf.h in the kernel's style: opaque structs, closing brace in column 0.
UAPI_BPF_H = """\
#ifndef _UAPI__LINUX_BPF_H__
#define _UAPI__LINUX_BPF_H__
struct bpf_timer {
	__u64 __opaque[2];
} __attribute__((aligned(8)));

struct bpf_wq {
	__u64 __opaque[2];
} __attribute__((aligned(8)));

struct bpf_rb_root {
	__u64 __opaque[2];
} __attribute__((aligned(8)));

struct bpf_rb_node {
	__u64 __opaque[4];
} __attribute__((aligned(8)));

struct bpf_refcount {
	__u32 __opaque[1];
} __attribute__((aligned(4)));

struct bpf_sysctl {
	__u32	write;
	__u32	file_pos;
};
#endif
"""


def program(line_of_marker: int, file: str = "conntrack.bpf.c") -> str:
    """A program text whose ``bpf/<file>`` starts after line ``line_of_marker``."""
    return "\n" * (line_of_marker - 1) + f"/* ==== bpf/{file} ==== */\n" + "x;\n" * 100


#: include/linux/bpf.h in the kernel's style: btf_field_type_size() and friends.
LINUX_BPF_H = """\
	case BPF_TIMER:
		return sizeof(struct bpf_timer);
	case BPF_WORKQUEUE:
		return sizeof(struct bpf_wq);
	case BPF_REFCOUNT:
		return __alignof__(struct bpf_refcount);
	struct bpf_map *map;  /* a pointer: needs no definition */
	return sizeof(struct bpf_prog_aux);  /* not a uapi struct */
"""
#: What libbcc embeds of its own uapi bpf.h, among its other bytes.
LIBBCC = b"\x7fELF...R\"********(struct bpf_timer {\n\t__u64 __opaque[2];\n}..."


def headers(tmp_path: Path, uapi: str = UAPI_BPF_H, linux_bpf_h: str | None = None) -> Path:
    tree = tmp_path / "linux-headers"
    (tree / "include" / "uapi" / "linux").mkdir(parents=True)
    (tree / "include" / "uapi" / "linux" / "bpf.h").write_text(uapi)
    if linux_bpf_h is not None:
        (tree / "include" / "linux").mkdir(parents=True)
        (tree / "include" / "linux" / "bpf.h").write_text(linux_bpf_h)
    return tree


def libbcc(tmp_path: Path, content: bytes = LIBBCC) -> Path:
    path = tmp_path / "libbcc.so.0"
    path.write_bytes(content)
    return path


class FakeBPF:
    """``bcc.BPF``: each construction replays the next compiler output on fd 2 and fails
    as BCC does, until the outputs run out; then it compiles. Keeps the texts it got."""

    def __init__(self, *outputs: str) -> None:
        self.outputs = list(outputs)
        self.texts: list[str] = []

    def __call__(self, text: bytes) -> object:
        self.texts.append(text.decode())
        if self.outputs:
            os.write(2, self.outputs.pop(0).encode())
            raise Exception("Failed to compile BPF module <text>")
        return self


def test_the_structs_the_kernel_headers_lack_are_read_from_clangs_output() -> None:
    assert incomplete_structs(INCOMPLETE_6_12) == LACKING


def test_an_incomplete_struct_in_the_program_itself_is_not_the_headers_fault() -> None:
    output = ("/virtual/main.c:12:3: error: incomplete definition of type 'struct nf_connn'\n"
              "1 error generated.\n")
    assert incomplete_structs(output) == []


def test_definitions_are_taken_whole_from_the_kernels_uapi_header() -> None:
    found = struct_definitions(UAPI_BPF_H, ["bpf_rb_node", "bpf_refcount", "bpf_nothing"])
    assert found == {
        "bpf_rb_node": "struct bpf_rb_node {\n\t__u64 __opaque[4];\n} "
                       "__attribute__((aligned(8)));",
        "bpf_refcount": "struct bpf_refcount {\n\t__u32 __opaque[1];\n} "
                        "__attribute__((aligned(4)));",
    }


def test_reading_the_headers_finds_what_bccs_copy_lacks_before_any_compile() -> None:
    assert lacking_structs(LINUX_BPF_H, UAPI_BPF_H, LIBBCC) == ["bpf_wq", "bpf_refcount"]
    assert lacking_structs(LINUX_BPF_H, UAPI_BPF_H, LIBBCC + b"struct bpf_wq {") == [
        "bpf_refcount"]


def test_what_the_headers_show_lacking_is_supplied_and_the_program_compiles_once(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    fake = FakeBPF()
    tree = headers(tmp_path, linux_bpf_h=LINUX_BPF_H)
    compiled = compile_program(fake, "int main_text;\n", "6.12.0-test", tree, libbcc(tmp_path))
    assert compiled.supplied == ("bpf_wq", "bpf_refcount")
    (text,) = fake.texts
    assert text.startswith("/* cttrace: struct definitions BCC's uapi bpf.h lacks, from "
                           f"{tree}/include/uapi/linux/bpf.h */\n")
    assert text.endswith("int main_text;\n")
    assert "struct bpf_timer" not in text
    assert capfd.readouterr().err == ""


def test_a_missing_field_is_summarised_in_one_line_at_its_place_in_bpf() -> None:
    # main.c:318 in the captured output; bpf/conntrack.bpf.c begins after line 259.
    line = summarise(MISSING_FIELD, program(259))
    assert line == "bpf/conntrack.bpf.c:59: no member named 'nope_field' in 'nf_conn'"


def test_errors_in_kernel_headers_keep_their_file_and_count_the_rest() -> None:
    line = summarise(INCOMPLETE_6_12, program(10))
    assert line == ("include/linux/bpf.h:368: invalid application of 'sizeof' to an incomplete "
                    "type 'struct bpf_wq' (and 7 more errors)")
    assert source_location(program(10), "/virtual/main.c", 3) == "/virtual/main.c:3"


def test_lacking_structs_are_supplied_before_the_program_and_it_compiles_again(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # No include/linux/bpf.h to read: the compiler's errors are what finds them.
    fake = FakeBPF(INCOMPLETE_6_12)
    compiled = compile_program(fake, "int main_text;\n", "6.12.0-test", headers(tmp_path),
                               libbcc(tmp_path))
    assert compiled.module is fake
    assert compiled.supplied == tuple(LACKING)
    first, second = fake.texts
    assert first == "int main_text;\n"
    prelude, rest = second.split("int main_text;\n")
    assert rest == ""
    for name in LACKING:
        assert struct_definitions(prelude, [name]) == struct_definitions(UAPI_BPF_H, [name])
    assert "bpf_timer" not in prelude and "bpf_sysctl" not in prelude
    assert capfd.readouterr().err == ""  # the first compile's errors never reach the terminal


def test_what_cannot_be_supplied_is_named_in_one_line(tmp_path: Path,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    uapi = UAPI_BPF_H.replace("struct bpf_refcount {", "struct bpf_refcount_renamed {")
    fake = FakeBPF(INCOMPLETE_6_12)
    with pytest.raises(CompileFailed) as failed:
        compile_program(fake, "x;\n", "6.12.0-test", headers(tmp_path, uapi), libbcc(tmp_path))
    line = str(failed.value)
    assert "\n" not in line
    assert line.startswith(
        "the kernel headers use struct bpf_refcount, which BCC's copy of the BPF uapi header "
        f"lacks, and {tmp_path}/linux-headers/include/uapi/linux/bpf.h does not define it either")
    log = Path(line.rsplit("compiler output in ", 1)[1])
    assert log.read_text() == INCOMPLETE_6_12
    log.unlink()
    assert len(fake.texts) == 1 and capfd.readouterr().err == ""


def test_a_broken_program_is_one_line_naming_the_field_not_a_compiler_dump(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """On 6.12 the lacking structs are supplied first; the program's own error remains."""
    fake = FakeBPF(INCOMPLETE_6_12, MISSING_FIELD)
    features = BpfFeatures(release="6.12.0-test", headers_dir=headers(tmp_path), ringbuf=True,
                           send_reset_kprobe=True, send_reset_tracepoint=False,
                           receive_reset_tracepoint=False, tracefs=None)
    with pytest.raises(SourceError) as failed:
        bpf_module._compile(fake, program(259), features)
    line = str(failed.value)
    assert "\n" not in line
    # The retried text has the supplied structs in front; the line still points into bpf/.
    marker = fake.texts[1].splitlines().index("/* ==== bpf/conntrack.bpf.c ==== */") + 1
    assert marker > 259
    assert line.startswith("BCC could not compile or load cttrace's BPF programs on "
                           f"6.12.0-test: bpf/conntrack.bpf.c:{318 - marker}: no member named "
                           "'nope_field' in 'nf_conn'; compiler output in /")
    assert line.endswith("(`cttrace watch --dump-bpf` prints the program)")
    log = Path(line.split("compiler output in ", 1)[1].split(" ", 1)[0])
    assert log.read_text() == MISSING_FIELD
    log.unlink()
    assert capfd.readouterr().err == ""
