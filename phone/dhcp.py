"""DHCPv4 for the emulated phone: learn the provisioning servers the way a phone does.

A Cisco phone boots with no address, broadcasts DHCPDISCOVER with option 55 asking for
option 150 (TFTP server addresses, RFC 5859) and option 66 (TFTP server name), takes the
first DHCPOFFER, confirms it with DHCPREQUEST and reads the DHCPACK. Option 150 is a list of
IPv4 addresses, four bytes each, tried in order; option 66 is one name (a DNS name or a
dotted address as text), used only when there is no option 150.

Wire form of option 150 naming 192.0.2.10 then 192.0.2.11::

    96 08 c0 00 02 0a c0 00 02 0b
    |  |  \\---------/ \\---------/
    |  |   first       second
    |  length (4 per address)
    code 150

The codec (``build_*``, ``parse_reply``, :class:`DHCPClient`) is sans-I/O. The adapter at
the end binds UDP 68 on one interface (``SO_BINDTODEVICE``, which needs ``CAP_NET_RAW``) and
broadcasts, with the BROADCAST flag set so that servers broadcast their replies to a client
that has no address yet.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import secrets
import socket
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from callboard.protocols.models import normalise_mac
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import DatagramProtocol

SERVER_PORT = 67
CLIENT_PORT = 68
MAGIC_COOKIE = b"\x63\x82\x53\x63"
BROADCAST_FLAG = 0x8000
_HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")  # 236 bytes, then the cookie


class Op(IntEnum):
    BOOTREQUEST = 1
    BOOTREPLY = 2


class MessageType(IntEnum):
    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8


class Option(IntEnum):
    PAD = 0
    SUBNET_MASK = 1
    ROUTER = 3
    DNS_SERVERS = 6
    HOSTNAME = 12
    DOMAIN_NAME = 15
    NTP_SERVERS = 42
    REQUESTED_ADDRESS = 50
    LEASE_TIME = 51
    OVERLOAD = 52
    MESSAGE_TYPE = 53
    SERVER_ID = 54
    PARAMETER_LIST = 55
    MAX_MESSAGE_SIZE = 57
    VENDOR_CLASS = 60
    CLIENT_ID = 61
    TFTP_SERVER_NAME = 66
    TFTP_SERVERS = 150
    END = 255


# What a phone asks for in option 55: netmask, router, DNS, domain, NTP, then 66 and 150.
PHONE_PARAMETERS = (
    Option.SUBNET_MASK,
    Option.ROUTER,
    Option.DNS_SERVERS,
    Option.DOMAIN_NAME,
    Option.NTP_SERVERS,
    Option.TFTP_SERVER_NAME,
    Option.TFTP_SERVERS,
)


class DHCPError(ValueError):
    """A datagram that is not a usable DHCP reply (the client ignores it)."""


# -- options ----------------------------------------------------------------------------------


def encode_options(options: Iterable[tuple[int, bytes]]) -> bytes:
    """Options as code-length-value, a value over 255 bytes split into repeats (RFC 3396)."""
    out = bytearray()
    for code, value in options:
        chunks = [value[i : i + 255] for i in range(0, len(value), 255)] or [b""]
        for chunk in chunks:
            out += bytes((code, len(chunk))) + chunk
    out.append(Option.END)
    return bytes(out)


def decode_options(data: bytes, into: dict[int, bytes] | None = None) -> dict[int, bytes]:
    """``{code: value}``; repeats of one code are concatenated (RFC 3396); stops at END."""
    options: dict[int, bytes] = {} if into is None else into
    i = 0
    while i < len(data):
        code = data[i]
        if code == Option.END:
            break
        if code == Option.PAD:
            i += 1
            continue
        if i + 1 >= len(data) or i + 2 + data[i + 1] > len(data):
            raise DHCPError(f"option {code} runs past the end of the message")
        length = data[i + 1]
        options[code] = options.get(code, b"") + data[i + 2 : i + 2 + length]
        i += 2 + length
    return options


def _ipv4(value: bytes) -> str:
    return str(ipaddress.IPv4Address(value))


def _ipv4_list(value: bytes | None) -> list[str]:
    """A list-of-addresses option; malformed (not 4*N bytes, N >= 1) reads as absent."""
    if not value or len(value) % 4:
        return []
    return [_ipv4(value[i : i + 4]) for i in range(0, len(value), 4)]


def tftp_servers(options: Mapping[int, bytes]) -> list[str]:
    """Option 150: every address, in the order given (the phone's order of preference)."""
    return _ipv4_list(options.get(Option.TFTP_SERVERS))


def tftp_server_name(options: Mapping[int, bytes]) -> str | None:
    """Option 66: one name, NUL padding and surrounding spaces removed; empty is absent."""
    raw = options.get(Option.TFTP_SERVER_NAME)
    if raw is None:
        return None
    name = raw.split(b"\0", 1)[0].decode("ascii", "replace").strip()
    return name or None


def provisioning_servers(options: Mapping[int, bytes]) -> list[str]:
    """Option 150's addresses if present, else option 66's single name, else nothing."""
    servers = tftp_servers(options)
    if servers:
        return servers
    name = tftp_server_name(options)
    return [name] if name else []


# -- messages ---------------------------------------------------------------------------------


def mac_bytes(mac: bytes | str) -> bytes:
    """Six bytes from bytes or from text in any spelling :func:`normalise_mac` accepts."""
    if isinstance(mac, bytes):
        if len(mac) != 6:
            raise ValueError(f"a MAC is 6 bytes, not {len(mac)}")
        return mac
    return bytes.fromhex(normalise_mac(mac))


def _request_message(
    message_type: MessageType,
    mac: bytes,
    xid: int,
    extra: Sequence[tuple[int, bytes]],
    hostname: str | None,
    vendor_class: str | None,
    secs: int,
) -> bytes:
    header = _HEADER.pack(
        Op.BOOTREQUEST,
        1,  # htype: Ethernet
        6,  # hlen
        0,  # hops
        xid,
        min(secs, 0xFFFF),
        BROADCAST_FLAG,
        bytes(4),  # ciaddr: none yet
        bytes(4),
        bytes(4),
        bytes(4),
        mac.ljust(16, b"\0"),
        bytes(64),
        bytes(128),
    )
    options: list[tuple[int, bytes]] = [
        (Option.MESSAGE_TYPE, bytes((message_type,))),
        (Option.CLIENT_ID, b"\x01" + mac),
        (Option.MAX_MESSAGE_SIZE, struct.pack("!H", 1500)),
        *extra,
    ]
    if hostname:
        options.append((Option.HOSTNAME, hostname.encode("ascii")))
    if vendor_class:
        options.append((Option.VENDOR_CLASS, vendor_class.encode("ascii")))
    options.append((Option.PARAMETER_LIST, bytes(PHONE_PARAMETERS)))
    return header + MAGIC_COOKIE + encode_options(options)


def build_discover(
    mac: bytes,
    xid: int,
    *,
    hostname: str | None = None,
    vendor_class: str | None = None,
    secs: int = 0,
) -> bytes:
    """DHCPDISCOVER, broadcast flag set, option 55 asking for 150 and 66 among others."""
    return _request_message(MessageType.DISCOVER, mac, xid, (), hostname, vendor_class, secs)


def build_request(
    mac: bytes,
    xid: int,
    offer: Reply,
    *,
    hostname: str | None = None,
    vendor_class: str | None = None,
    secs: int = 0,
) -> bytes:
    """DHCPREQUEST in SELECTING state: the offered address and the offering server's id."""
    server_id = offer.options.get(Option.SERVER_ID)
    if server_id is None or len(server_id) != 4:
        raise DHCPError("the offer has no server identifier (option 54)")
    extra = [
        (Option.REQUESTED_ADDRESS, ipaddress.IPv4Address(offer.yiaddr).packed),
        (Option.SERVER_ID, server_id),
    ]
    return _request_message(MessageType.REQUEST, mac, xid, extra, hostname, vendor_class, secs)


@dataclass(frozen=True)
class Reply:
    """A parsed BOOTREPLY."""

    message_type: MessageType
    xid: int
    yiaddr: str
    siaddr: str
    chaddr: bytes
    options: dict[int, bytes] = field(repr=False)

    @property
    def server_id(self) -> str | None:
        raw = self.options.get(Option.SERVER_ID)
        return _ipv4(raw) if raw is not None and len(raw) == 4 else None


def parse_reply(data: bytes) -> Reply:
    """A server's BOOTREPLY, options included (with ``sname``/``file`` overload, RFC 2131)."""
    if len(data) < _HEADER.size + len(MAGIC_COOKIE):
        raise DHCPError(f"{len(data)} bytes is too short for a DHCP message")
    (op, htype, hlen, _hops, xid, _secs, _flags, _ci, yi, si, _gi, chaddr, sname, file) = (
        _HEADER.unpack_from(data)
    )
    if op != Op.BOOTREPLY:
        raise DHCPError(f"op {op} is not a BOOTREPLY")
    if htype != 1 or hlen != 6:
        raise DHCPError(f"hardware type {htype}/{hlen} is not Ethernet")
    if data[_HEADER.size : _HEADER.size + 4] != MAGIC_COOKIE:
        raise DHCPError("no DHCP magic cookie (a plain BOOTP reply)")
    options = decode_options(data[_HEADER.size + 4 :])
    overload = options.pop(Option.OVERLOAD, b"\0")[:1]
    if overload in (b"\x01", b"\x03"):
        decode_options(file, options)
    if overload in (b"\x02", b"\x03"):
        decode_options(sname, options)
    raw_type = options.get(Option.MESSAGE_TYPE, b"")
    if len(raw_type) != 1 or raw_type[0] not in MessageType._value2member_map_:
        raise DHCPError("no valid DHCP message type (option 53)")
    return Reply(MessageType(raw_type[0]), xid, _ipv4(yi), _ipv4(si), chaddr[:6], options)


@dataclass(frozen=True)
class Lease:
    """What the DHCPACK gave us."""

    address: str
    server_id: str | None
    netmask: str | None
    routers: list[str]
    lease_seconds: int | None
    tftp_servers: list[str]
    tftp_server_name: str | None

    @property
    def provisioning_servers(self) -> list[str]:
        """Option 150 in order, else option 66, else nothing (the phone asks its user)."""
        if self.tftp_servers:
            return list(self.tftp_servers)
        return [self.tftp_server_name] if self.tftp_server_name else []

    @property
    def prefix_length(self) -> int | None:
        if self.netmask is None:
            return None
        return ipaddress.IPv4Network(f"0.0.0.0/{self.netmask}").prefixlen

    def as_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "prefix_length": self.prefix_length,
            "server_id": self.server_id,
            "routers": self.routers,
            "lease_seconds": self.lease_seconds,
            "tftp_servers": self.tftp_servers,
            "tftp_server_name": self.tftp_server_name,
            "provisioning_servers": self.provisioning_servers,
        }


def lease_from(ack: Reply) -> Lease:
    options = ack.options
    mask = options.get(Option.SUBNET_MASK)
    lease_time = options.get(Option.LEASE_TIME)
    return Lease(
        address=ack.yiaddr,
        server_id=ack.server_id,
        netmask=_ipv4(mask) if mask is not None and len(mask) == 4 else None,
        routers=_ipv4_list(options.get(Option.ROUTER)),
        lease_seconds=struct.unpack("!I", lease_time)[0]
        if lease_time is not None and len(lease_time) == 4
        else None,
        tftp_servers=tftp_servers(options),
        tftp_server_name=tftp_server_name(options),
    )


class DHCPClient:
    """The client's exchange, sans I/O: bytes out for each step, a :class:`Lease` at the end.

    ``start()`` gives the DISCOVER; ``receive(datagram)`` gives the REQUEST to send after an
    offer, the ``Lease`` after the ACK, or ``None`` for anything that is not for us. A NAK
    starts over (``receive`` returns a fresh DISCOVER). ``retransmit()`` is the last message,
    for the adapter's timer.
    """

    def __init__(
        self,
        mac: bytes,
        xid: int | None = None,
        *,
        hostname: str | None = None,
        vendor_class: str | None = None,
    ) -> None:
        self.mac = mac_bytes(mac)
        self.xid = secrets.randbits(32) if xid is None else xid
        self.hostname = hostname
        self.vendor_class = vendor_class
        self.state = "init"
        self.offer: Reply | None = None
        self.lease: Lease | None = None
        self._last = b""

    def start(self) -> bytes:
        self.state = "selecting"
        self.offer = None
        self._last = build_discover(
            self.mac, self.xid, hostname=self.hostname, vendor_class=self.vendor_class
        )
        return self._last

    def retransmit(self) -> bytes:
        return self._last

    def receive(self, datagram: bytes) -> bytes | Lease | None:
        try:
            reply = parse_reply(datagram)
        except DHCPError:
            return None
        if reply.xid != self.xid or reply.chaddr != self.mac:
            return None
        if self.state == "selecting" and reply.message_type is MessageType.OFFER:
            try:
                request = build_request(
                    self.mac,
                    self.xid,
                    reply,
                    hostname=self.hostname,
                    vendor_class=self.vendor_class,
                )
            except DHCPError:
                return None
            self.offer = reply
            self.state = "requesting"
            self._last = request
            return request
        if self.state == "requesting" and reply.server_id == self._chosen_server():
            if reply.message_type is MessageType.ACK:
                self.state = "bound"
                self.lease = lease_from(reply)
                return self.lease
            if reply.message_type is MessageType.NAK:
                return self.start()
        return None

    def _chosen_server(self) -> str | None:
        return self.offer.server_id if self.offer is not None else None


# -- the adapter ------------------------------------------------------------------------------


def interface_mac(interface: str) -> bytes:
    """The interface's own hardware address, from sysfs."""
    path = Path("/sys/class/net") / interface / "address"
    try:
        return mac_bytes(path.read_text().strip())
    except OSError:
        raise ValueError(f"no network interface {interface!r}") from None


def open_client_socket(interface: str) -> socket.socket:
    """UDP 68 on ``interface`` only, allowed to broadcast; non-blocking, for the reactor."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.bind(("0.0.0.0", CLIENT_PORT))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _ClientProtocol(DatagramProtocol):
    noisy = False

    def __init__(
        self,
        client: DHCPClient,
        reactor: Any,
        done: defer.Deferred[Lease],
        retransmit: float,
        max_retransmit: float,
    ) -> None:
        self.client = client
        self.reactor = reactor
        self.done = done
        self.delay = retransmit
        self.max_delay = max_retransmit
        self.timer: IDelayedCall | None = None

    def startProtocol(self) -> None:
        self._send(self.client.start())

    def _send(self, message: bytes) -> None:
        if self.transport is None:
            return
        self.transport.write(message, ("255.255.255.255", SERVER_PORT))
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = self.reactor.callLater(self.delay, self._again)

    def _again(self) -> None:
        # RFC 2131 4.1: back off, doubling, up to a ceiling.
        self.delay = min(self.delay * 2, self.max_delay)
        self._send(self.client.retransmit())

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        result = self.client.receive(datagram)
        if isinstance(result, Lease):
            self.stop()
            if not self.done.called:
                self.done.callback(result)
        elif isinstance(result, bytes):
            self._send(result)

    def stop(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


def request_lease(
    reactor: Any,
    interface: str,
    mac: bytes | str | None = None,
    *,
    timeout: float = 30.0,
    retransmit: float = 2.0,
    max_retransmit: float = 16.0,
    hostname: str | None = None,
    vendor_class: str | None = None,
) -> defer.Deferred[Lease]:
    """DISCOVER … ACK on ``interface``; fires with the :class:`Lease` or fails on ``timeout``.

    ``mac`` is the phone's MAC (the ``chaddr``; default the interface's own). Needs root or
    ``CAP_NET_RAW`` + ``CAP_NET_BIND_SERVICE`` (interface binding, port 68).
    """
    client = DHCPClient(
        interface_mac(interface) if mac is None else mac_bytes(mac),
        hostname=hostname,
        vendor_class=vendor_class,
    )
    done: defer.Deferred[Lease] = defer.Deferred()
    sock = open_client_socket(interface)
    proto = _ClientProtocol(client, reactor, done, retransmit, max_retransmit)
    try:
        port = reactor.adoptDatagramPort(sock.fileno(), socket.AF_INET, proto)
    finally:
        sock.close()  # the reactor has its own duplicate

    done.addTimeout(timeout, reactor)

    def finish(result: Any) -> Any:
        proto.stop()
        stopped = port.stopListening()
        if isinstance(stopped, defer.Deferred):
            stopped.addCallback(lambda _: result)
            return stopped
        return result

    done.addBoth(finish)
    return done


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m callboard.phone.dhcp IFACE``: get a lease, print it as JSON."""
    parser = argparse.ArgumentParser(
        prog="callboard-phone-dhcp",
        description="Ask DHCP for a lease as a Cisco phone would; print what it offers.",
    )
    parser.add_argument("interface")
    parser.add_argument("--mac", help="the chaddr to use (default: the interface's MAC)")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--retransmit", type=float, default=2.0)
    parser.add_argument("--vendor-class", help='option 60, e.g. "Cisco Systems, Inc. IP Phone"')
    args = parser.parse_args(argv)

    from twisted.internet import task

    outcome: dict[str, Any] = {}

    async def run(reactor: Any) -> None:
        try:
            lease = await request_lease(
                reactor,
                args.interface,
                args.mac,
                timeout=args.timeout,
                retransmit=args.retransmit,
                vendor_class=args.vendor_class,
            )
        except defer.TimeoutError:
            outcome["error"] = f"no DHCP lease on {args.interface} within {args.timeout:g}s"
            return
        except (OSError, ValueError) as exc:
            outcome["error"] = f"{args.interface}: {exc}"
            return
        outcome["lease"] = lease.as_json()

    with contextlib.suppress(SystemExit):  # react() always ends with SystemExit
        task.react(lambda r: defer.ensureDeferred(run(r)), [])
    if "error" in outcome:
        print(f"callboard phone dhcp: {outcome['error']}", file=sys.stderr)
        return 1
    print(json.dumps(outcome["lease"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
