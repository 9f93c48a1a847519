"""Evaluate C expressions (sizeof, offsetof, macros) against real system headers."""

from __future__ import annotations

import ctypes
import functools
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None,
                               reason="SKIPPED LOUDLY: gcc is missing; header cross-checks cannot run")


@functools.cache
def c_values(includes: tuple[str, ...], exprs: tuple[str, ...]) -> dict[str, int]:
    """{expr: value} for each C expression, compiled with ``includes``."""
    lines = ["#include <stdio.h>", "#include <stddef.h>"]
    lines += [f"#include <{h}>" for h in includes]
    lines.append("int main(void) {")
    lines += [f'  printf("%llu\\n", (unsigned long long)({e}));' for e in exprs]
    lines.append("  return 0; }")
    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d) / "t.c", Path(d) / "t"
        src.write_text("\n".join(lines))
        subprocess.run(["gcc", "-w", "-o", str(exe), str(src)], check=True, capture_output=True, text=True)
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split()
    return dict(zip(exprs, map(int, out), strict=True))


CROSS_AARCH64 = "aarch64-linux-gnu-gcc"
needs_cross_gcc = pytest.mark.skipif(
    shutil.which(CROSS_AARCH64) is None,
    reason=f"SKIPPED LOUDLY: {CROSS_AARCH64} is missing; arm64 header cross-checks cannot run "
           "(./scripts/setup installs it)")


def c_mismatches(includes: tuple[str, ...], expected: dict[str, int], cc: str = CROSS_AARCH64) -> list[str]:
    """The C expressions whose value is not the one ``expected`` gives, as ``cc`` (a cross
    compiler: nothing runs) compiles them with ``includes``: each is a static assertion."""
    lines = ["#include <stddef.h>", *(f"#include <{h}>" for h in includes)]
    lines += [f"_Static_assert((unsigned long long)({e}) == {v}ULL, \"#{i}\");"
              for i, (e, v) in enumerate(expected.items())]
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "t.c"
        src.write_text("\n".join(lines))
        p = subprocess.run([cc, "-w", "-c", "-o", str(Path(d) / "t.o"), str(src)], capture_output=True,
                           text=True)
    exprs = list(expected)
    wrong = sorted({int(n) for n in re.findall(r'static assertion failed: "#(\d+)"', p.stderr)})
    assert p.returncode == 0 or wrong, p.stderr
    return [exprs[i] for i in wrong]


def named_fields(struct: type[ctypes.Structure]) -> list[str]:
    """Field names worth checking: padding and reserved fields are named freely."""
    skip = ("pad", "_pad", "padding", "reserved")
    return [f[0] for f in struct._fields_ if not f[0].startswith(skip)]


def check_struct(includes: tuple[str, ...], c_name: str, struct: type[ctypes.Structure],
                 rename: dict[str, str] | None = None) -> None:
    """sizeof and every named field's offset must match the C definition."""
    rename = rename or {}
    fields = named_fields(struct)
    exprs = [f"sizeof({c_name})"] + [f"offsetof({c_name}, {rename.get(f, f)})" for f in fields]
    got = c_values(includes, tuple(exprs))
    assert ctypes.sizeof(struct) == got[exprs[0]], f"sizeof {c_name}"
    for f, e in zip(fields, exprs[1:], strict=True):
        assert getattr(struct, f).offset == got[e], f"{c_name}.{f}"
