"""The lazy netascii view knows its converted size without holding the file."""

from __future__ import annotations

from callboard.protocols.filesource import MemoryBody
from callboard.protocols.tftp.transfer import NetasciiBody
from hypothesis import given
from hypothesis import strategies as st


@given(st.binary(max_size=3 * NetasciiBody.CHUNK + 17).map(lambda b: b.replace(b"x", b"\n")))
def test_size_matches_the_converted_bytes(data: bytes) -> None:
    converted = data.replace(b"\r", b"\r\x00").replace(b"\n", b"\r\n")
    body = NetasciiBody(MemoryBody(data))
    assert body.size == len(converted)
    whole = b"".join(body.read_at(i, 512) for i in range(0, len(converted), 512))
    assert whole == converted
