"""Byte-for-byte answers to a corpus of REGISTERs (and a few other requests), pinned.

The registrar's hot path is tuned for speed (lazy header reading, contacts kept as text,
pre-encoded pieces); this corpus holds every answer to what it was before the tuning, byte
for byte, so no shortcut can drift from the RFC 3261 rules: Cisco contacts, several
contacts, every ``Expires`` form, removals, the digest challenge, retransmissions and the
errors. The random parts (the To tag, the digest nonce) are masked; everything else, header
order and spelling included, must match ``data/register_corpus.json``.

Regenerate the pinned answers only for an intended change of the wire format::

    python tests/sip/test_sip_register_corpus.py > tests/sip/data/register_corpus.json
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from callboard.protocols.sip.registrar import (
    PolicyDecision,
    Registrar,
    RegistrarSettings,
    RegistrationRequest,
    Source,
)

PINNED = Path(__file__).parent / "data" / "register_corpus.json"
MAC = "001122334455"
DEVICE = f"SEP{MAC}"
CISCO = (
    f';+sip.instance="<urn:uuid:00000000-0000-0000-0000-{MAC}>"'
    f';+u.sip!devicename.ccm.cisco.com="{DEVICE}";+u.sip!model.ccm.cisco.com="683"'
    ';+u.sip!vc.ccm.cisco.com="114";reg-id=1;video;audio'
)


class CorpusPolicy:
    """Device ``SEP001122334455``: line 1001 open, 1002 with digest, 1003 refused."""

    def decide(self, request: RegistrationRequest) -> PolicyDecision:
        name = request.device_name or (request.bound_devices or (None,))[0]
        if name != DEVICE:
            return PolicyDecision.refuse(404, f"{name} is not a known device")
        if request.aor_user == "1002":
            return PolicyDecision.allow(DEVICE, ("a1002", "secret"))
        if request.aor_user == "1003":
            return PolicyDecision.refuse(403, "1003 is not a directory number of it")
        return PolicyDecision.allow(DEVICE)


def register(
    *,
    user: str = "1001",
    call_id: str = "c1@192.0.2.50",
    cseq: int = 1,
    branch: str = "z9hG4bK-1",
    contacts: tuple[str, ...] = (f"<sip:{'a' * 8}@192.0.2.50:5060;transport=udp>{CISCO}",),
    expires: str | None = "3600",
    via: str = "Via: SIP/2.0/UDP 192.0.2.50:5060;branch={branch};rport",
    extra: tuple[str, ...] = (),
    method: str = "REGISTER",
    eol: str = "\r\n",
) -> bytes:
    lines = [
        f"{method} sip:192.0.2.10 SIP/2.0",
        via.format(branch=branch),
        f"From: <sip:{user}@192.0.2.10>;tag=f{cseq}",
        f"To: <sip:{user}@192.0.2.10>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
        "Max-Forwards: 70",
        "User-Agent: Cisco-CP8841/14.2.1",
        *[f"Contact: {c}" for c in contacts],
        *([f"Expires: {expires}"] if expires is not None else []),
        *extra,
        "Content-Length: 0",
    ]
    return (eol.join(lines) + eol + eol).encode()


PLAIN = "<sip:1001@192.0.2.51:5062>"
CASES: list[tuple[str, str, bytes]] = [
    ("first registration (Cisco contact)", "udp", register()),
    ("retransmission", "udp", register()),
    ("refresh", "udp", register(cseq=2, branch="z9hG4bK-2")),
    ("stale CSeq", "udp", register(cseq=2, branch="z9hG4bK-3")),
    ("query", "udp", register(cseq=3, branch="z9hG4bK-4", contacts=(), expires=None)),
    ("second contact, expires param", "udp",
     register(call_id="c2", branch="z9hG4bK-5", contacts=(f"{PLAIN};expires=600",))),
    ("two contacts in one header", "udp",
     register(call_id="c3", branch="z9hG4bK-6",
              contacts=('"Desk" <sip:x@192.0.2.52>;q=0.5, <sip:y@192.0.2.53:5070>',))),
    ("default expiry (no Expires)", "udp",
     register(user="1004", call_id="c4", branch="z9hG4bK-7", expires=None)),
    ("too brief", "udp", register(user="1004", call_id="c5", branch="z9hG4bK-8", expires="30")),
    ("above the maximum", "udp",
     register(user="1004", call_id="c6", cseq=2, branch="z9hG4bK-9", expires="999999")),
    ("bad Expires", "udp", register(call_id="c7", branch="z9hG4bK-10", expires="soon")),
    ("bad expires param", "udp",
     register(call_id="c8", branch="z9hG4bK-11", contacts=(f"{PLAIN};expires=x",))),
    ("remove one contact", "udp",
     register(call_id="c2", cseq=2, branch="z9hG4bK-12", contacts=(f"{PLAIN};expires=0",))),
    ("wildcard without Expires 0", "udp",
     register(call_id="c9", branch="z9hG4bK-13", contacts=("*",), expires="60")),
    ("wildcard removal", "udp",
     register(user="1004", call_id="c10", branch="z9hG4bK-14", contacts=("*",), expires="0")),
    ("digest challenge", "udp", register(user="1002", call_id="c11", branch="z9hG4bK-15")),
    ("malformed Authorization", "udp",
     register(user="1002", call_id="c12", branch="z9hG4bK-16", extra=("Authorization: Digest",))),
    ("refused line", "udp", register(user="1003", call_id="c13", branch="z9hG4bK-17")),
    ("unknown device", "udp",
     register(call_id="c14", branch="z9hG4bK-18", contacts=(PLAIN,))),
    ("keep-alive to a backup", "udp",
     register(call_id="c15", branch="z9hG4bK-19",
              contacts=(f"{PLAIN};expires=0;cisco-keep-alive",))),
    ("no rport, received", "udp",
     register(user="1005", call_id="c16", branch="z9hG4bK-20",
              via="Via: SIP/2.0/UDP 198.51.100.7:5070;branch={branch}")),
    ("rport and received already there, two Vias", "udp",
     register(user="1006", call_id="c17", branch="z9hG4bK-21",
              via="Via: SIP/2.0/UDP 10.0.0.1;received=1.2.3.4;rport=9;branch={branch}"
                  "\r\nVia: SIP/2.0/UDP 10.0.0.2:5080;branch=z9hG4bK-x")),
    ("compact forms, bare LF, folding", "udp",
     register(user="1007", call_id="c18", branch="z9hG4bK-22", eol="\n",
              extra=("Supported: path,\n  outbound",))
     .replace(b"Contact:", b"m:").replace(b"Call-ID:", b"i:").replace(b"Via:", b"v:")),
    ("over TCP", "tcp",
     register(user="1008", call_id="c19", branch="z9hG4bK-23",
              via="Via: SIP/2.0/TCP 192.0.2.50:5060;branch={branch}")),
    ("over TLS, same branch again: a new transaction (Timer J 0)", "tls",
     register(user="1008", call_id="c19", branch="z9hG4bK-23",
              via="Via: SIP/2.0/TCP 192.0.2.50:5060;branch={branch}")),
    ("Max-Forwards 0", "udp",
     register(call_id="c20", branch="z9hG4bK-24").replace(b"Max-Forwards: 70", b"Max-Forwards: 0")),
    ("missing Call-ID", "udp",
     register(branch="z9hG4bK-25").replace(b"Call-ID: c1@192.0.2.50\r\n", b"")),
    ("bad Via", "udp", register(branch="z9hG4bK-26", via="Via: SIP/3.0 nowhere")),
    ("CSeq method mismatch", "udp",
     register(call_id="c21", branch="z9hG4bK-27").replace(b"1 REGISTER", b"1 INVITE")),
    ("bad start line", "udp", b"REGISTER\r\n\r\n"),
    ("OPTIONS", "udp", register(method="OPTIONS", call_id="c22", branch="z9hG4bK-28")),
    ("INVITE", "udp", register(method="INVITE", call_id="c23", branch="z9hG4bK-29")),
    ("too many contacts", "udp",
     register(call_id="c24", branch="z9hG4bK-30",
              contacts=tuple(f"<sip:{i}@192.0.2.9>" for i in range(11)))),
    ("To without a user", "udp",
     register(call_id="c25", branch="z9hG4bK-31").replace(
         b"To: <sip:1001@192.0.2.10>", b"To: <sip:192.0.2.10>")),
    ("too large", "udp",
     register(call_id="c26", branch="z9hG4bK-32", extra=("X-Pad: " + "p" * 70000,))),
]  # fmt: skip

_MASKS = (
    (re.compile(rb";tag=[0-9a-f]{8}\r\n"), b";tag=TAG\r\n"),
    (re.compile(rb'nonce="[^"]*"'), b'nonce="NONCE"'),
)


def replay() -> list[tuple[str, str | None]]:
    """Every case's answer in order (masked text, or None for no answer), on one registrar."""
    registrar = Registrar(
        CorpusPolicy(),
        RegistrarSettings(nonce_secret=b"k" * 32, max_expires=7200),
        now=lambda: 1000.0,
        wall_now=lambda: 1553819486.0,
    )
    out: list[tuple[str, str | None]] = []
    for name, transport, data in CASES:
        answer = registrar.handle_bytes(data, Source(transport, "192.0.2.50", 5060))
        if answer is None:
            out.append((name, None))
            continue
        assert not hasattr(answer, "addCallback"), name
        text = answer.data  # type: ignore[union-attr]
        for pattern, mask in _MASKS:
            text = pattern.sub(mask, text)
        where = f"{answer.host}:{answer.port} close={answer.close}"  # type: ignore[union-attr]
        out.append((name, f"{where}\n{text.decode()}"))
    return out


def test_every_answer_is_byte_identical_to_the_pinned_one() -> None:
    pinned = json.loads(PINNED.read_text())
    got = replay()
    assert [n for n, _ in got] == [n for n, _ in pinned]
    for (name, answer), (_, expected) in zip(got, pinned, strict=True):
        assert answer == expected, name


if __name__ == "__main__":
    json.dump(replay(), sys.stdout, indent=1)
    sys.stdout.write("\n")
