"""The emulated phone's DHCP codec and exchange, sans I/O."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from callboard.phone.dhcp import (
    BROADCAST_FLAG,
    MAGIC_COOKIE,
    DHCPClient,
    DHCPError,
    Lease,
    MessageType,
    Option,
    build_discover,
    decode_options,
    encode_options,
    parse_reply,
    provisioning_servers,
    tftp_server_name,
    tftp_servers,
)

MAC = bytes.fromhex("00AABBCCDDEE")
XID = 0x1234ABCD
SERVER = "192.0.2.1"


def reply(
    message_type: MessageType,
    *,
    xid: int = XID,
    chaddr: bytes = MAC,
    yiaddr: str = "192.0.2.150",
    options: list[tuple[int, bytes]] | None = None,
    sname: bytes = b"",
    file: bytes = b"",
    op: int = 2,
    cookie: bytes = MAGIC_COOKIE,
) -> bytes:
    """A server's reply, built independently of the module under test."""
    header = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        op, 1, 6, 0, xid, 0, BROADCAST_FLAG,
        bytes(4), ipaddress.IPv4Address(yiaddr).packed, bytes(4), bytes(4),
        chaddr.ljust(16, b"\0"), sname.ljust(64, b"\0"), file.ljust(128, b"\0"),
    )  # fmt: skip
    body = bytes((53, 1, message_type))
    for code, value in options if options is not None else phone_options():
        body += bytes((code, len(value))) + value
    return header + cookie + body + b"\xff"


def phone_options() -> list[tuple[int, bytes]]:
    return [
        (54, ipaddress.IPv4Address(SERVER).packed),
        (51, struct.pack("!I", 43200)),
        (1, bytes((255, 255, 255, 0))),
        (3, bytes((192, 0, 2, 1))),
        (150, bytes.fromhex("c000020ac000020b")),
        (66, b"192.0.2.10"),
    ]


def options_of(message: bytes) -> dict[int, bytes]:
    assert message[236:240] == MAGIC_COOKIE
    return decode_options(message[240:])


# -- requests ---------------------------------------------------------------------------------


def test_discover_is_a_broadcast_bootrequest_asking_for_150_and_66() -> None:
    message = build_discover(MAC, XID, hostname="SEP00AABBCCDDEE", vendor_class="Cisco IP Phone")
    op, htype, hlen, _hops, xid, _secs, flags = struct.unpack_from("!BBBBIHH", message)
    assert (op, htype, hlen, xid) == (1, 1, 6, XID)
    assert flags & BROADCAST_FLAG
    assert message[12:16] == bytes(4)  # ciaddr: no address yet
    assert message[28:34] == MAC
    options = options_of(message)
    assert options[53] == bytes((1,))
    requested = list(options[55])
    assert 150 in requested and 66 in requested and 1 in requested and 3 in requested
    assert options[61] == b"\x01" + MAC
    assert options[12] == b"SEP00AABBCCDDEE"
    assert options[60] == b"Cisco IP Phone"
    assert 50 not in options and 54 not in options


def test_request_names_the_offer_and_its_server() -> None:
    client = DHCPClient(MAC, XID)
    client.start()
    request = client.receive(reply(MessageType.OFFER))
    assert isinstance(request, bytes)
    assert struct.unpack_from("!I", request, 4)[0] == XID
    options = options_of(request)
    assert options[53] == bytes((3,))
    assert options[50] == ipaddress.IPv4Address("192.0.2.150").packed
    assert options[54] == ipaddress.IPv4Address(SERVER).packed
    assert 150 in options[55]


# -- replies ----------------------------------------------------------------------------------


def test_option_150_wire_form() -> None:
    options = decode_options(bytes.fromhex("96 08 c0 00 02 0a c0 00 02 0b ff"))
    assert tftp_servers(options) == ["192.0.2.10", "192.0.2.11"]
    assert encode_options([(150, bytes.fromhex("c000020ac000020b"))]) == bytes.fromhex(
        "9608c000020ac000020bff"
    )


def test_option_150_keeps_every_address_in_order() -> None:
    addresses = ["192.0.2.30", "192.0.2.10", "198.51.100.7", "192.0.2.20"]
    raw = b"".join(ipaddress.IPv4Address(a).packed for a in addresses)
    assert tftp_servers({150: raw}) == addresses
    assert provisioning_servers({150: raw, 66: b"ignored.example"}) == addresses


def test_option_66_is_the_fallback() -> None:
    assert provisioning_servers({66: b"callboard.example.net"}) == ["callboard.example.net"]
    assert provisioning_servers({66: b"192.0.2.10\0\0"}) == ["192.0.2.10"]
    assert tftp_server_name({66: b"  "}) is None
    assert provisioning_servers({}) == []


@pytest.mark.parametrize("raw", [b"", b"\xc0\x00\x02", b"\xc0\x00\x02\x0a\x01"])
def test_a_malformed_option_150_falls_back_to_66(raw: bytes) -> None:
    assert tftp_servers({150: raw}) == []
    assert provisioning_servers({150: raw, 66: b"tftp.example"}) == ["tftp.example"]


def test_long_options_are_split_and_joined_rfc3396() -> None:
    many = b"".join(ipaddress.IPv4Address(f"10.0.{i // 256}.{i % 256}").packed for i in range(100))
    wire = encode_options([(150, many)])
    assert wire[0] == 150 and wire[1] == 255 and wire[257] == 150  # two instances
    assert decode_options(wire)[150] == many
    assert len(tftp_servers(decode_options(wire))) == 100


def test_overloaded_file_and_sname_fields_are_read() -> None:
    file_options = bytes((66, 4)) + b"tftp" + b"\xff"
    sname_options = bytes((150, 4, 192, 0, 2, 10)) + b"\xff"
    parsed = parse_reply(
        reply(
            MessageType.ACK,
            options=[(54, bytes((192, 0, 2, 1))), (52, b"\x03")],
            file=file_options,
            sname=sname_options,
        )
    )
    assert tftp_server_name(parsed.options) == "tftp"
    assert tftp_servers(parsed.options) == ["192.0.2.10"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x02" * 100, "too short"),
        (reply(MessageType.OFFER, op=1), "not a BOOTREPLY"),
        (reply(MessageType.OFFER, cookie=b"\0\0\0\0"), "magic cookie"),
        (reply(MessageType.OFFER)[:-1][:-3], "runs past the end"),
        (reply(MessageType.OFFER, options=[])[:240] + b"\xff", "message type"),
    ],
)
def test_malformed_replies_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(DHCPError, match=message):
        parse_reply(data)


# -- the exchange -----------------------------------------------------------------------------


def test_discover_offer_request_ack() -> None:
    client = DHCPClient(MAC, XID)
    discover = client.start()
    assert options_of(discover)[53] == bytes((1,))
    assert client.retransmit() == discover
    request = client.receive(reply(MessageType.OFFER))
    assert isinstance(request, bytes) and client.retransmit() == request
    lease = client.receive(reply(MessageType.ACK))
    assert isinstance(lease, Lease)
    assert lease == Lease(
        address="192.0.2.150",
        server_id=SERVER,
        netmask="255.255.255.0",
        routers=["192.0.2.1"],
        lease_seconds=43200,
        tftp_servers=["192.0.2.10", "192.0.2.11"],
        tftp_server_name="192.0.2.10",
    )
    assert lease.provisioning_servers == ["192.0.2.10", "192.0.2.11"]
    assert lease.prefix_length == 24
    assert client.state == "bound"


def test_replies_for_someone_else_are_ignored() -> None:
    client = DHCPClient(MAC, XID)
    client.start()
    assert client.receive(reply(MessageType.OFFER, xid=XID + 1)) is None
    assert client.receive(reply(MessageType.OFFER, chaddr=bytes(6))) is None
    assert client.receive(b"garbage") is None
    assert client.receive(reply(MessageType.ACK)) is None  # no ACK before an offer
    assert client.state == "selecting"


def test_only_the_chosen_server_can_ack() -> None:
    client = DHCPClient(MAC, XID)
    client.start()
    client.receive(reply(MessageType.OFFER))
    other = [(54, bytes((192, 0, 2, 99))), *phone_options()[1:]]
    assert client.receive(reply(MessageType.ACK, options=other)) is None
    assert client.receive(reply(MessageType.OFFER)) is None  # a second offer: already chose
    assert isinstance(client.receive(reply(MessageType.ACK)), Lease)


def test_an_offer_without_server_id_is_ignored() -> None:
    client = DHCPClient(MAC, XID)
    client.start()
    assert client.receive(reply(MessageType.OFFER, options=phone_options()[1:])) is None
    assert client.state == "selecting"


def test_a_nak_starts_over() -> None:
    client = DHCPClient(MAC, XID)
    client.start()
    client.receive(reply(MessageType.OFFER))
    again = client.receive(reply(MessageType.NAK, options=[(54, bytes((192, 0, 2, 1)))]))
    assert isinstance(again, bytes) and options_of(again)[53] == bytes((1,))
    assert client.state == "selecting"


def test_mac_spellings() -> None:
    for spelling in ("00:aa:bb:cc:dd:ee", "00-AA-BB-CC-DD-EE", "00aa.bbcc.ddee", MAC):
        assert DHCPClient(spelling, XID).mac == MAC
    with pytest.raises(ValueError):
        DHCPClient("00:aa:bb", XID)
    assert Option.TFTP_SERVERS == 150 and Option.TFTP_SERVER_NAME == 66
