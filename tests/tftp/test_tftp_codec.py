"""Codec: round trips, option negotiation limits, and a fuzzed decoder that never crashes."""

from __future__ import annotations

import contextlib

import pytest
from callboard.protocols.tftp import codec
from callboard.protocols.tftp.codec import ErrorCode
from hypothesis import given, settings
from hypothesis import strategies as st


def test_rrq_with_options_round_trips() -> None:
    packet = codec.ReadRequest(
        "SEP001122334455.cnf.xml", "octet", {"blksize": "1468", "tsize": "0"}
    )
    assert codec.decode(codec.encode(packet)) == packet


def test_rrq_mode_and_option_names_are_case_insensitive() -> None:
    packet = codec.decode(b"\x00\x01file\x00OCTET\x00BlkSize\x001024\x00blksize\x0099\x00")
    assert packet == codec.ReadRequest("file", "octet", {"blksize": "1024"})


def test_dangling_option_name_is_ignored() -> None:
    packet = codec.decode(b"\x00\x01f\x00octet\x00tsize\x00")
    assert packet == codec.ReadRequest("f", "octet", {})


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", ErrorCode.ILLEGAL_OPERATION),
        (b"\x00", ErrorCode.ILLEGAL_OPERATION),
        (b"\x00\x01file\x00octet", ErrorCode.ILLEGAL_OPERATION),  # not NUL-terminated
        (b"\x00\x01file\x00", ErrorCode.ILLEGAL_OPERATION),  # no mode
        (b"\x00\x01file\x00binary\x00", ErrorCode.ILLEGAL_OPERATION),
        (b"\x00\x01fi\x00le\x00octet\x00", ErrorCode.ACCESS_VIOLATION),  # NUL in the name
        (b"\x00\x04\x00", ErrorCode.ILLEGAL_OPERATION),
        (b"\x00\x04\x00\x01\x00", ErrorCode.ILLEGAL_OPERATION),
        (b"\x00\x09", ErrorCode.ILLEGAL_OPERATION),
    ],
)
def test_malformed_packets_carry_the_error_code(raw: bytes, code: ErrorCode) -> None:
    with pytest.raises(codec.MalformedPacket) as caught:
        codec.decode(raw)
    assert caught.value.code == code


def test_other_packets_round_trip() -> None:
    for packet in (
        codec.Data(65535, b"x" * 10),
        codec.Ack(0),
        codec.Error(1, "file not found"),
        codec.OptionAck({"blksize": "1468", "windowsize": "16"}),
        codec.WriteRequest("x", "netascii", {}),
    ):
        assert codec.decode(codec.encode(packet)) == packet


def test_data_block_number_wraps_on_encode() -> None:
    assert codec.encode_data(65536, b"") == b"\x00\x03\x00\x00"


def _agree(options: dict[str, str], size: int | None = 1000) -> codec.Negotiated:
    return codec.negotiate(options, size=size, max_blksize=1468, max_windowsize=64)


def test_negotiation_caps_and_reports() -> None:
    agreed = _agree({"blksize": "65464", "windowsize": "500", "tsize": "0", "timeout": "3"})
    assert (agreed.blksize, agreed.windowsize, agreed.timeout) == (1468, 64, 3.0)
    assert agreed.oack == {"blksize": "1468", "windowsize": "64", "tsize": "1000", "timeout": "3"}


def test_unknown_options_are_ignored_and_no_oack_without_known_ones() -> None:
    assert _agree({"multicast": "", "rollover": "0"}) == codec.Negotiated()


def test_tsize_left_out_when_size_unknown() -> None:
    assert _agree({"tsize": "0"}, size=None).oack is None


@pytest.mark.parametrize(
    "options",
    [
        {"blksize": "7"},
        {"blksize": "65465"},
        {"blksize": "abc"},
        {"blksize": ""},
        {"timeout": "0"},
        {"timeout": "256"},
        {"windowsize": "0"},
        {"windowsize": "65536"},
        {"tsize": "-1"},
        {"blksize": "١٢٣"},  # non-ASCII digits
    ],
)
def test_bad_option_values_are_refused(options: dict[str, str]) -> None:
    with pytest.raises(codec.OptionError):
        _agree(options)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=600))
def test_decoder_never_raises_anything_else(raw: bytes) -> None:
    try:
        codec.decode(raw)
    except codec.MalformedPacket as exc:
        assert isinstance(exc.code, ErrorCode)


_text = st.text(
    alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=20
)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from([b"\x00\x01", b"\x00\x02"]),
    st.lists(_text, max_size=8),
    st.binary(max_size=5),
)
def test_structured_requests_decode_or_fail_typed(
    opcode: bytes, fields: list[str], tail: bytes
) -> None:
    raw = opcode + b"".join(f.encode() + b"\x00" for f in fields) + tail
    try:
        packet = codec.decode(raw)
    except codec.MalformedPacket:
        return
    assert isinstance(packet, codec.ReadRequest | codec.WriteRequest)
    with contextlib.suppress(codec.OptionError):
        codec.negotiate(packet.options, size=10, max_blksize=1468, max_windowsize=64)


@settings(max_examples=1000, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=6), st.binary(min_size=2, max_size=2).map(lambda b: b"\x00\x04" + b)
    )
)
def test_decode_ack_agrees_with_decode(raw: bytes) -> None:
    try:
        packet: codec.Packet | None = codec.decode(raw)
    except codec.MalformedPacket:
        packet = None
    expected = packet.block if isinstance(packet, codec.Ack) else None
    assert codec.decode_ack(raw) == expected
    assert codec.opcode(raw) == (int.from_bytes(raw[:2], "big") if len(raw) >= 2 else None)
