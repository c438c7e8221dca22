"""Admission of read requests as plain values: every refusal rule and its order, no sockets."""

from __future__ import annotations

import pytest
from callboard.protocols.filesource import AccessViolation, FileNotFound
from callboard.protocols.tftp import admission, codec
from callboard.protocols.tftp.admission import Admitted, Load, Refusal, Terms
from callboard.protocols.tftp.codec import ErrorCode
from callboard.protocols.tftp.server import TFTPSettings

SETTINGS = TFTPSettings(max_transfers=10, max_transfers_per_client=2, initial_timeout=0.5)
IDLE = Load(total=0, client=0)


def rrq(name: str, mode: str = "octet", **options: str) -> bytes:
    return codec.encode(codec.ReadRequest(name, mode, options))


def test_read_request_is_admitted_with_the_normalised_name() -> None:
    verdict = admission.admit(rrq("\\Desktops/./320x212x12/a.png", blksize="1468"), IDLE, SETTINGS)
    assert verdict == Admitted(
        "\\Desktops/./320x212x12/a.png", "Desktops/320x212x12/a.png", False, {"blksize": "1468"}
    )
    assert admission.admit(rrq("a", "NetASCII"), IDLE, SETTINGS) == Admitted("a", "a", True, {})


@pytest.mark.parametrize(
    ("datagram", "load", "code", "message"),
    [
        (b"\x00\x01a\x00octet", IDLE, 4, "request not NUL-terminated"),
        (b"\x00\x02a\x00", IDLE, 4, "request without mode"),
        (
            codec.encode(codec.WriteRequest("a", "octet", {})),
            IDLE,
            2,
            "write requests are not accepted",
        ),
        (rrq("a", "mail"), IDLE, 4, "mail mode is not supported"),
        (rrq("a"), Load(total=10, client=0), 0, "server busy"),
        (rrq("a"), Load(total=3, client=2), 0, "server busy"),
        (rrq("../etc/passwd"), IDLE, 2, "access violation"),
        (rrq("a\x01b"), IDLE, 2, "access violation"),
        (rrq("//./"), IDLE, 1, "file not found"),
    ],
)
def test_refusals_carry_the_error_packet(
    datagram: bytes, load: Load, code: int, message: str
) -> None:
    verdict = admission.admit(datagram, load, SETTINGS)
    assert isinstance(verdict, Refusal)
    assert (verdict.code, verdict.message) == (code, message)
    assert codec.decode(verdict.packet) == codec.Error(code, message)


def test_checks_run_in_the_order_clients_see() -> None:
    busy = Load(total=10, client=10)
    # A write request is refused as such even when busy; mail before busy; busy before the name.
    write = codec.encode(codec.WriteRequest("../x", "octet", {}))
    verdicts = [
        admission.admit(d, busy, SETTINGS) for d in (write, rrq("../x", "mail"), rrq("../x"))
    ]
    assert [(v.code, v.message) for v in verdicts if isinstance(v, Refusal)] == [
        (2, "write requests are not accepted"),
        (4, "mail mode is not supported"),
        (0, "server busy"),
    ]


@pytest.mark.parametrize(
    "datagram",
    [
        b"",
        b"\x00",
        b"\x00\x03\x00\x01data",
        b"\x00\x04\x00\x01",
        b"\x00\x05\x00\x01oops\x00",
        b"\x00\x06",
        b"\x00\x09xx",
    ],
)
def test_stray_packets_on_the_well_known_port_are_ignored(datagram: bytes) -> None:
    assert admission.admit(datagram, IDLE, SETTINGS) is None


def test_file_source_errors_map_to_codes_1_and_2() -> None:
    assert admission.refusal_for("a", FileNotFound("x")) == Refusal(
        "a", ErrorCode.FILE_NOT_FOUND, "file not found"
    )
    assert admission.refusal_for("a", AccessViolation("x")) == Refusal(
        "a", ErrorCode.ACCESS_VIOLATION, "access violation"
    )


def admitted(netascii: bool = False, **options: str) -> Admitted:
    return Admitted("f", "f", netascii, options)


def test_plain_request_gets_rfc1350_terms_and_no_oack() -> None:
    assert admission.agree(admitted(), 1000, SETTINGS) == Terms(512, 1, 0.5, False, None)


def test_options_are_capped_and_acknowledged_in_the_order_asked() -> None:
    terms = admission.agree(
        admitted(windowsize="100", tsize="0", blksize="9000", timeout="3"), 1234, SETTINGS
    )
    assert isinstance(terms, Terms)
    assert (terms.blksize, terms.windowsize, terms.timeout, terms.fixed_timeout) == (
        1468,
        64,
        3.0,
        True,
    )
    assert terms.oack == codec.encode_oack(
        {"windowsize": "64", "tsize": "1234", "blksize": "1468", "timeout": "3"}
    )


def test_netascii_never_offers_tsize() -> None:
    terms = admission.agree(admitted(True, tsize="0"), 1234, SETTINGS)
    assert terms == Terms(512, 1, 0.5, False, None)


@pytest.mark.parametrize("options", [{"blksize": "4"}, {"timeout": "0"}, {"windowsize": "x"}])
def test_bad_option_values_are_refused_with_error_8(options: dict[str, str]) -> None:
    verdict = admission.agree(admitted(**options), 10, SETTINGS)
    assert isinstance(verdict, Refusal) and verdict.code == ErrorCode.OPTION_REFUSED


REQUESTS = [
    rrq("SEP001122334455.cnf.xml"),
    rrq("a", "NetASCII", blksize="1468", tsize="0"),
    rrq("../x"),
    rrq("../x", "mail"),
    rrq("//./"),
    codec.encode(codec.WriteRequest("a", "octet", {})),
    b"\x00\x01a\x00octet",  # not NUL-terminated
    b"\x00\x01a\x00more\x00octet\x00",  # a NUL inside the name
    b"\x00\x04\x00\x01",
    b"\x00\x01" + b"x" * 600 + b"\x00octet\x00",  # too large to be remembered
]


@pytest.mark.parametrize("datagram", REQUESTS)
@pytest.mark.parametrize("load", [IDLE, Load(total=10, client=0), Load(total=0, client=2)])
def test_remembered_screening_answers_as_a_fresh_one(datagram: bytes, load: Load) -> None:
    fresh = admission._screen(datagram)
    for _ in range(2):  # the first time fills the cache, the second answers from it
        assert admission.admit(datagram, load, SETTINGS) == admission.admit(
            bytearray(datagram),  # type: ignore[arg-type]  # not hashable: never remembered
            load,
            SETTINGS,
        )
    assert admission._screen(datagram) == fresh


def test_the_same_request_bytes_are_admitted_or_refused_by_the_load_of_the_moment() -> None:
    datagram = rrq("a")
    assert isinstance(admission.admit(datagram, IDLE, SETTINGS), Admitted)
    busy = admission.admit(datagram, Load(total=10, client=0), SETTINGS)
    assert isinstance(busy, Refusal) and busy.message == "server busy"
    assert isinstance(admission.admit(datagram, IDLE, SETTINGS), Admitted)
