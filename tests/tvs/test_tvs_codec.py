"""TVS frame codec: round trips, typed errors, and a fuzzed decoder."""

from __future__ import annotations

import contextlib
import struct

import pytest
from callboard.protocols.tvs import codec
from callboard.protocols.tvs.codec import (
    ActivateRequest,
    ActivateResponse,
    Command,
    DeviceName,
    VerifyRequest,
    VerifyResponse,
)
from hypothesis import given, settings
from hypothesis import strategies as st


def test_header_layout_matches_the_notes() -> None:
    raw = VerifyRequest(0x1234, "CP-8841-SEP001122334455", b"\x30\x00").encode()
    assert raw[:8] == bytes.fromhex("5701010000001234")
    (length,) = struct.unpack(">H", raw[8:10])
    assert length == len(raw) - 10
    assert raw[10:13] == b"\x01\x00\x18" and raw[13] == 0x01  # DEVICE_NAME with 0x01 prefix


def test_verify_response_example_from_the_notes() -> None:
    raw = VerifyResponse(0x1234, 0, (1, 3), 86400).encode()
    assert raw.hex() == "5701020000001234001007000100080002010309000400015180"
    frame, used = codec.decode_frame(raw)
    assert used == len(raw)
    parsed = VerifyResponse.from_frame(frame)
    assert parsed == VerifyResponse(0x1234, 0, (1, 3), 86400)


def test_activate_round_trip_and_repr_hides_code() -> None:
    req = ActivateRequest(99, DeviceName("8865NR", "00AABBCCDDEE"), "0123456789012345")
    frame, _ = codec.decode_frame(req.encode())
    assert frame.command == Command.ACTIVATE_REQUEST
    assert ActivateRequest.from_frame(frame) == req
    assert "0123456789012345" not in repr(req)
    resp = ActivateResponse(99, 0, "activated", "SEP00AABBCCDDEE")
    assert ActivateResponse.from_frame(codec.decode_frame(resp.encode())[0]) == resp


@pytest.mark.parametrize(
    "name", ["CP-8841-SEP00AABBCCDDEE", "CP-8865NR-SEP00AABBCCDDEE", "CP-7965G-SEP00AABBCCDDEE"]
)
def test_device_names_lenient_on_model(name: str) -> None:
    assert DeviceName.parse(name).name == name


@pytest.mark.parametrize(
    "name",
    ["CP-8841-SEP00aabbccddee", "SEP00AABBCCDDEE", "CP-8841-SEP00AABBCCDD", "CP--SEP00AABBCCDDEE"],
)
def test_bad_device_names(name: str) -> None:
    with pytest.raises(codec.BadElements):
        DeviceName.parse(name)


def test_incomplete_and_bad_headers() -> None:
    raw = VerifyResponse(1, 0).encode()
    for cut in range(len(raw)):
        with pytest.raises(codec.IncompleteFrame):
            codec.decode_frame(raw[:cut])
    with pytest.raises(codec.BadHeader):
        codec.decode_frame(b"\x58" + raw[1:])
    with pytest.raises(codec.FrameTooLarge):
        codec.decode_header(struct.pack(">BBBBIH", 0x57, 1, 1, 0, 0, 0xFFFF))


def test_two_frames_in_one_buffer() -> None:
    a = VerifyResponse(1, 0).encode()
    b = VerifyResponse(2, 1).encode()
    frame, used = codec.decode_frame(a + b)
    assert frame.session_id == 1
    assert codec.decode_frame((a + b)[used:])[0].session_id == 2


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_decoder_returns_frame_or_typed_error(data: bytes) -> None:
    try:
        frame, used = codec.decode_frame(data)
    except codec.CodecError:
        return
    assert 10 <= used <= len(data)
    for parse in (ActivateRequest.from_frame, VerifyRequest.from_frame):
        with contextlib.suppress(codec.CodecError):
            parse(frame)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 255),
    st.integers(0, 2**32 - 1),
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=6),
)
def test_fuzz_valid_frames_round_trip(
    command: int, sid: int, elements: list[tuple[int, bytes]]
) -> None:
    raw = codec.encode_frame(command, sid, elements)
    frame, used = codec.decode_frame(raw)
    assert used == len(raw)
    assert (frame.command, frame.session_id, list(frame.elements)) == (command, sid, elements)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 255), st.integers(0, 2**32 - 1), st.binary(max_size=200), st.integers(0, 400))
def test_fuzz_tvs_headers_with_garbage_bodies(cmd: int, sid: int, body: bytes, length: int) -> None:
    data = struct.pack(">BBBBIH", 0x57, 1, cmd, 0, sid, length) + body
    with contextlib.suppress(codec.CodecError):
        codec.decode_frame(data, max_frame=256)
