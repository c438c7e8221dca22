"""REGISTER rules of the sans-I/O registrar, with injected time and no sockets."""

from __future__ import annotations

from typing import Any

from callboard.protocols.sip.digest import build_authorization, parse_challenge
from callboard.protocols.sip.message import Response, parse_message, parse_name_addr
from callboard.protocols.sip.registrar import Registrar, Source

SRC = Source("udp", "192.0.2.50", 50057)


def send(reg: Registrar, data: bytes, source: Source = SRC) -> Response:
    reply = reg.handle_bytes(data, source)
    assert reply is not None
    msg = parse_message(reply.data)
    assert isinstance(msg, Response)
    return msg


def contact_expires(resp: Response) -> dict[str, int]:
    out = {}
    for v in resp.headers.values("contact"):
        na = parse_name_addr(v)
        out[na.uri] = int(na.param("expires") or -1)
    return out


def test_register_active_device(make_registrar: Any, make_register: Any, policy: Any) -> None:
    reg = make_registrar()
    resp = send(reg, make_register())
    assert resp.status == 200
    assert resp.headers.get("expires") == "120"
    assert resp.headers.get("server") == "Callboard"
    assert resp.headers.get("date") == "Fri, 29 Mar 2019 00:31:26 GMT"
    assert ";tag=" in (resp.headers.get("to") or "")
    [contact] = resp.headers.values("contact")
    assert contact.endswith(";expires=3600;x-cisco-newreg")
    seen = policy.seen[-1]
    assert (seen.device_name, seen.mac, seen.model_id, seen.aor_user) == (
        "SEP001122334455",
        "001122334455",
        "683",
        "1001",
    )
    [b] = reg.bindings_for_device("SEP001122334455")
    assert b.aor == "sip:1001@192.0.2.10"
    assert b.transport == "udp" and b.source == "192.0.2.50:50057"
    assert b.user_agent == "Cisco-CP8841/12.8.1" and b.expires_in == 3600
    # A refresh is not a new registration; neither is a second line of the same device.
    resp = send(reg, make_register(cseq=102))
    assert "x-cisco-newreg" not in resp.headers.values("contact")[0]


def test_clocks_are_the_injected_ones(make_registrar: Any, make_register: Any, clock: Any) -> None:
    """Expiry on ``now`` (the reactor's seconds in the daemon), wall time only where shown."""
    reg = make_registrar()
    send(reg, make_register(expires=600))
    [b] = reg.bindings_for_device("SEP001122334455")
    assert b.expires_at == clock.t + 600 and b.registered_at == 1553819486.0
    clock.advance(100)
    assert reg.bindings_for_device("SEP001122334455")[0].expires_in == 500


def test_newreg_only_for_first_line(make_registrar: Any, make_register: Any) -> None:
    reg = make_registrar()
    send(reg, make_register())
    policy_line2 = make_register(user="1002", call_id="other")
    resp = send(reg, policy_line2)
    assert resp.status == 401  # line 1002 has a password


def test_unknown_and_inactive(make_registrar: Any, make_register: Any) -> None:
    reg = make_registrar(warning_host="cb.example")
    resp = send(reg, make_register(device="SEP999999999999", mac="999999999999"))
    assert resp.status == 404
    assert resp.headers.get("warning") == '399 cb.example "unknown device SEP999999999999"'
    resp = send(reg, make_register(device="SEP00AABBCCDDEE", mac="00aabbccddee", user="2001"))
    assert resp.status == 403
    assert "not activated" in (resp.headers.get("warning") or "")
    resp = send(reg, make_register(mac="0011223344ff"))
    assert resp.status == 403 and "MAC" in (resp.headers.get("warning") or "")
    resp = send(reg, make_register(model="621"))
    assert resp.status == 403
    resp = send(reg, make_register(user="5555"))
    assert resp.status == 403
    assert reg.binding_count() == 0
    assert reg.counters.refused_404 == 1 and reg.counters.refused_403 == 4


def test_expiry_rules(make_registrar: Any, make_register: Any, clock: Any) -> None:
    reg = make_registrar()
    # header value
    assert contact_expires(send(reg, make_register(expires=600))) == {
        "sip:f0ae9f65-9fa6-4a32-84ba-4d40048f79c8@192.0.2.50:50057;transport=udp": 600
    }
    # default when neither
    resp = send(reg, make_register(expires=None, cseq=200))
    assert list(contact_expires(resp).values()) == [3600]
    # max shortens
    resp = send(reg, make_register(expires=100000, cseq=201))
    assert list(contact_expires(resp).values()) == [7200]
    # contact param wins over header
    c = '<sip:x@192.0.2.50:5060>;+sip.instance="<urn:uuid:00000000-0000-0000-0000-001122334455>"'
    resp = send(reg, make_register(contacts=[c + ";expires=300"], expires=3600, cseq=202))
    assert list(contact_expires(resp).values()) == [300]
    # 423 for too brief, nothing changes
    resp = send(reg, make_register(expires=30, cseq=203))
    assert resp.status == 423 and resp.headers.get("min-expires") == "60"
    assert reg.bindings_for_device("SEP001122334455")[0].expires_in == 300
    # expiry by the sweep
    clock.advance(299)
    assert reg.sweep() == 0
    clock.advance(2)
    assert reg.sweep() == 1
    assert reg.bindings_for_device("SEP001122334455") == []
    assert reg.counters.expired == 1


def test_removals_and_wildcard(make_registrar: Any, make_register: Any) -> None:
    reg = make_registrar()
    send(reg, make_register(cseq=1))
    other = '<sip:second@192.0.2.51:5060>;+u.sip!devicename.ccm.cisco.com="SEP001122334455"'
    send(reg, make_register(contacts=[other], call_id="cid-2", cseq=1))
    assert len(reg.bindings_for_device("SEP001122334455")) == 2
    # '*' with a non-zero Expires, or with another contact → 400
    assert send(reg, make_register(contacts=["*"], expires=60, cseq=2)).status == 400
    assert send(reg, make_register(contacts=["*", other], expires=0, cseq=3)).status == 400
    assert send(reg, make_register(contacts=["*"], expires=None, cseq=4)).status == 400
    # expires=0 on one contact removes just that one
    resp = send(reg, make_register(contacts=[other + ";expires=0"], call_id="cid-2", cseq=2))
    assert resp.status == 200 and len(resp.headers.values("contact")) == 1
    assert resp.headers.get("expires") is None
    # '*' with Expires 0 removes all
    resp = send(reg, make_register(contacts=["*"], expires=0, call_id="cid-3", cseq=5))
    assert resp.status == 200 and resp.headers.values("contact") == []
    assert reg.binding_count() == 0


def test_query_lists_bindings(make_registrar: Any, make_register: Any) -> None:
    reg = make_registrar()
    send(reg, make_register(expires=900))
    resp = send(reg, make_register(contacts=[], call_id="query", cseq=1))
    assert resp.status == 200
    assert list(contact_expires(resp).values()) == [900]
    assert reg.counters.queries == 1


def test_cseq_ordering(make_registrar: Any, make_register: Any) -> None:
    reg = make_registrar()
    assert send(reg, make_register(cseq=10)).status == 200
    assert send(reg, make_register(cseq=10)).status == 400
    assert send(reg, make_register(cseq=9, expires=0)).status == 400
    assert reg.binding_count() == 1
    # a new Call-ID (the phone rebooted) replaces it whatever the CSeq
    assert send(reg, make_register(cseq=1, call_id="rebooted")).status == 200
    [b] = reg.bindings_for_device("SEP001122334455")
    assert b.call_id == "rebooted"


def test_multiple_contacts_all_or_none(make_registrar: Any, make_register: Any) -> None:
    reg = make_registrar()
    a = '<sip:a@192.0.2.50:5060>;+u.sip!devicename.ccm.cisco.com="SEP001122334455"'
    b = "<sip:b@192.0.2.50:5061>"
    # comma-separated in one header, compact form
    data = make_register(contacts=[], extra=(f"m: {a}, {b}",))
    resp = send(reg, data)
    assert resp.status == 200 and len(resp.headers.values("contact")) == 2
    # one bad contact (too brief) → nothing of that request applies
    c = "<sip:c@192.0.2.50:5062>;expires=5"
    resp = send(reg, make_register(contacts=[a, c], cseq=500))
    assert resp.status == 423
    assert reg.binding_count() == 2


def test_max_forwards_options_and_methods(make_registrar: Any, make_register: Any) -> None:
    reg = make_registrar()
    assert send(reg, make_register(max_forwards=0)).status == 483
    opts = send(reg, make_register(method="OPTIONS"))
    assert opts.status == 200 and opts.headers.get("allow") == "REGISTER, OPTIONS, REFER"
    inv = send(reg, make_register(method="INVITE"))
    assert inv.status == 405 and inv.headers.get("allow") == "REGISTER, OPTIONS, REFER"
    assert reg.handle_bytes(make_register(method="ACK"), SRC) is None


def test_domain_check(make_registrar: Any, make_register: Any) -> None:
    reg = make_registrar(domains=frozenset({"cucm.example"}))
    assert send(reg, make_register()).status == 404
    assert send(reg, make_register(host="cucm.example")).status == 200


def test_retransmission_absorbed(make_registrar: Any, make_register: Any, clock: Any) -> None:
    reg = make_registrar()
    data = make_register(branch="z9hG4bKretrans1")
    first = reg.handle_bytes(data, SRC)
    again = reg.handle_bytes(data, SRC)
    assert first is not None and first == again
    assert reg.counters.retransmissions == 1 and reg.counters.registrations == 1
    clock.advance(40)
    reg.sweep()
    assert reg.handle_bytes(data, SRC) != first  # transaction forgotten: CSeq check → 400


def test_via_received_rport(make_registrar: Any, make_register: Any) -> None:
    reg = make_registrar()
    via = "Via: SIP/2.0/UDP 10.1.1.1:5070;branch=z9hG4bKnat1;rport"
    reply = reg.handle_bytes(make_register(via=via), Source("udp", "192.0.2.99", 40000))
    assert reply is not None and (reply.host, reply.port) == ("192.0.2.99", 40000)
    top = parse_message(reply.data).headers.values("via")[0]
    assert top == "SIP/2.0/UDP 10.1.1.1:5070;branch=z9hG4bKnat1;received=192.0.2.99;rport=40000"
    via = "Via: SIP/2.0/UDP 10.1.1.1:5070;branch=z9hG4bKnat2"
    reply = reg.handle_bytes(make_register(via=via, cseq=300), Source("udp", "192.0.2.99", 40000))
    assert reply is not None and (reply.host, reply.port) == ("192.0.2.99", 5070)


def test_digest_flow(make_registrar: Any, make_register: Any, clock: Any) -> None:
    """SHA-256 first stays an option (for phones other than Cisco's)."""
    reg = make_registrar(nonce_lifetime=30, digest_algorithms=("SHA-256", "MD5"))
    data = make_register(user="1002", cseq=1)
    resp = send(reg, data)
    assert resp.status == 401
    challenges = resp.headers.get_all("www-authenticate")
    assert [c.split("algorithm=")[1].split(",")[0] for c in challenges] == ["SHA-256", "MD5"]
    ch = parse_challenge(challenges)
    assert ch.algorithm == "SHA-256" and ch.qop == "auth"

    def authed(cseq: int, password: str = "pw", md5: bool = False) -> bytes:
        use = ch if not md5 else parse_challenge(challenges[1:])
        auth = build_authorization(
            use, method="REGISTER", uri="sip:192.0.2.10", username="a1002", password=password
        )
        return make_register(user="1002", cseq=cseq, extra=(f"Authorization: {auth}",))

    assert send(reg, authed(2, "wrong")).status == 403
    assert send(reg, authed(3)).status == 200
    assert send(reg, authed(4, md5=True)).status == 200
    clock.advance(31)
    stale = send(reg, authed(5))
    assert stale.status == 401
    assert all("stale=true" in v for v in stale.headers.get_all("www-authenticate"))
    assert send(reg, make_register(user="1002", cseq=6, extra=("Authorization: Digest x",)))


def test_drop_device(make_registrar: Any, make_register: Any) -> None:
    reg = make_registrar()
    send(reg, make_register())
    assert reg.drop_device("SEP001122334455") == 1
    assert reg.bindings_for_device("SEP001122334455") == []
    resp = send(reg, make_register(cseq=900, call_id="after-drop"))
    assert "x-cisco-newreg" in resp.headers.values("contact")[0]
    assert reg.counters_snapshot()["bindings"] == 1


def test_malformed_gets_400_or_drop(make_registrar: Any, make_register: Any) -> None:
    reg = make_registrar()
    data = make_register().replace(b"CSeq: 101 REGISTER", b"CSeq: abc REGISTER")
    assert send(reg, data).status == 400
    data = make_register().replace(b"CSeq: 101 REGISTER", b"CSeq: 101 OPTIONS")
    assert send(reg, data).status == 400
    for digits in ("CSeq: \u00b2 REGISTER", "Expires: \u00b2", "Max-Forwards: \u00b2"):
        name = digits.split(":")[0].encode()
        lines = [ln for ln in make_register().split(b"\r\n") if not ln.startswith(name + b":")]
        data = b"\r\n".join([lines[0], digits.encode(), *lines[1:]])
        assert send(reg, data).status == 400, digits  # '²' passes str.isdigit, not int()
    assert reg.handle_bytes(b"\xff\xfe garbage", SRC) is None
    assert reg.handle_bytes(b"SIP/2.0 200 OK\r\n\r\n", SRC) is None
    data = make_register().replace(b"To: <sip:1001", b"To: <http:1001")
    assert send(reg, data).status == 400
    data = make_register().replace(b"Content-Length: 0", b"Content-Length: 50")
    assert send(reg, data).status == 400
    big = make_register(extra=("X-Pad: " + "a" * 70000,))
    assert send(reg, big).status == 513
