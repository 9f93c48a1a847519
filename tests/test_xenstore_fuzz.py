"""A fuzzing flood of raw XenStore messages (hypothesis): the store serves on after each."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import needs_kvm
from .test_xenstore import HEADER, Wire, xs

__all__ = ["xs"]


@needs_kvm
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 2**32 - 1), st.binary(max_size=64)),
                min_size=1, max_size=20), st.binary(max_size=40))
def test_fuzz_flood(xs: Path, requests: list[tuple[int, int, bytes]], junk: bytes) -> None:
    w = Wire(xs)
    w.s.sendall(b"".join(HEADER.pack(op, 7, tx, len(p)) + p for op, tx, p in requests) + junk)
    w.close()
    check = Wire(xs)
    assert check.call(10, b"1\0") == (10, b"/local/domain/1\0")
    check.close()
