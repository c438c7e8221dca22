"""The HTTPS front door of a real ``callboard serve``: access rules, CSRF, sessions, throttle,
isolation between users, bad input; driven by a stdlib HTTPS client and the CLI."""

from __future__ import annotations

import socket
import sqlite3
import ssl
from pathlib import Path
from typing import Any

import pytest
from support.harness import Daemon
from web.web_support import WebClient, add_user, codes_of, new_token

PASSWORD = "correct horse battery"


@pytest.fixture
def web(daemon_factory: Any) -> Daemon:
    d: Daemon = daemon_factory(
        "--web-port", "0",
        "--set", "web.failure_budget=3", "--set", "web.failure_budget_per_source=5",
    )  # fmt: skip
    add_user(d, "alice", PASSWORD, "--email", "alice@example.test", "--name", "Alice")
    add_user(d, "bob", PASSWORD)
    add_user(d, "root1", PASSWORD, "--admin")
    return d


def client(d: Daemon) -> WebClient:
    return WebClient(d.port("web"))


def alice_phone(d: Daemon) -> tuple[str, str]:
    dev = d.json("device", "add", "--model", "8841", "--user", "alice", "--line", "2001:Alice")
    return dev["name"], dev["activation_code"]["code"]


def test_every_answer_carries_the_security_headers(web: Daemon) -> None:
    c = client(web)
    for path in ("/sign-in", "/self-care/", "/api/v1/devices", "/api/openapi.json", "/nope"):
        headers = c.get(path).headers
        csp = headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src" not in csp
        assert "default-src 'none'" in csp and "unsafe-inline" not in csp
        assert headers["strict-transport-security"].startswith("max-age=")
        assert headers["x-content-type-options"] == "nosniff"
    cookie = c.history[0].headers["set-cookie"]
    for flag in ("Secure", "HttpOnly", "SameSite=strict", "Path=/"):
        assert flag.lower() in cookie.lower()
    assert "<script" not in c.get("/sign-in").text


def test_plain_http_on_the_web_port_is_refused(web: Daemon) -> None:
    with socket.create_connection(("127.0.0.1", web.port("web")), timeout=10) as sock:
        sock.sendall(b"GET /self-care/ HTTP/1.1\r\nHost: x\r\n\r\n")
        data = sock.recv(65536)
    assert b"HTTP/1.1 200" not in data and b"Self-Care" not in data and b"<html" not in data


def test_the_certificate_is_made_at_first_start(web: Daemon) -> None:
    assert (web.state_dir / "certs" / "web.pem").exists()
    assert (web.state_dir / "certs" / "web.key").stat().st_mode & 0o077 == 0
    pem = ssl.get_server_certificate(("127.0.0.1", web.port("web")))
    assert pem.strip() == (web.state_dir / "certs" / "web.pem").read_text().strip()


def test_anonymous_is_sent_to_sign_in_and_refused_by_the_api(web: Daemon) -> None:
    c = client(web)
    for path in ("/self-care/", "/admin/devices", "/admin/users"):
        reply = c.get(path)
        assert reply.status == 303 and reply.headers["location"].startswith("/sign-in?next=")
    reply = c.get("/api/v1/devices")
    assert reply.status == 401 and reply.headers["content-type"] == "application/problem+json"
    assert reply.headers["www-authenticate"].startswith("Bearer")
    assert reply.json()["status"] == 401


def test_a_plain_user_is_refused_admin_pages_and_routes(web: Daemon) -> None:
    name, _ = alice_phone(web)
    c = client(web)
    assert c.sign_in("bob", PASSWORD).headers["location"] == "/self-care/"
    for path in ("/admin/devices", f"/admin/devices/{name}", "/admin/users", "/admin/status"):
        assert c.get(path).status == 403, path
    csrf = c.csrf("/self-care/")
    assert c.post_form(f"/admin/devices/{name}/code", {"csrf": csrf}).status == 403
    assert (
        c.post_form(f"/admin/devices/{name}/delete", {"csrf": csrf, "confirm": "yes"}).status == 403
    )
    web.json("device", "show", name)  # still there
    bob = new_token(web, "bob-token", "--user", "bob")
    for method, path in [
        ("GET", "/api/v1/devices"),
        ("GET", f"/api/v1/devices/{name}/code"),
        ("GET", "/api/v1/users"),
        ("POST", f"/api/v1/devices/{name}/code/generate"),
        ("DELETE", f"/api/v1/devices/{name}"),
    ]:
        reply = c.api(method, path, bob)
        assert reply.status == 403, (method, path, reply.text)
        assert reply.headers["content-type"] == "application/problem+json"


def test_a_user_never_sees_another_users_phone_or_code(web: Daemon) -> None:
    name, code = alice_phone(web)
    bob = client(web)
    bob.sign_in("bob", PASSWORD)
    page = bob.get("/self-care/").text
    assert name not in page and code not in page and not codes_of(page)
    assert "No phones are assigned to you" in page
    token = new_token(web, "bob-api", "--user", "bob")
    mine = bob.api("GET", "/api/v1/me/devices", token)
    assert mine.status == 200 and mine.json() == []
    assert code not in bob.api("GET", f"/api/v1/devices/{name}", token).text
    alice = client(web)
    alice.sign_in("alice", PASSWORD)
    page = alice.get("/self-care/").text
    assert codes_of(page) == [code] and name in page
    assert "<svg" in page and "Ready to activate" in page


def test_forms_without_the_csrf_token_are_refused(web: Daemon) -> None:
    c = client(web)
    c.sign_in("root1", PASSWORD)
    before = web.json("user", "list")
    for fields in ({}, {"csrf": "forged"}):
        reply = c.post_form("/admin/users", {**fields, "name": "mallory", "password": "x" * 12})
        assert reply.status == 403 and "security token" in reply.text
    stranger = client(web)
    stolen = stranger.csrf()  # a valid token, but of another session
    reply = c.post_form("/admin/users", {"csrf": stolen, "name": "mallory"})
    assert reply.status == 403
    assert web.json("user", "list") == before
    # The API with the session cookie needs the token as a header on changes.
    reply = c.request("POST", "/api/v1/users", b'{"name": "mallory"}',
                      {"Content-Type": "application/json"})  # fmt: skip
    assert reply.status == 403 and web.json("user", "list") == before


def test_sign_in_rotates_the_session_id(web: Daemon) -> None:
    c = client(web)
    c.get("/sign-in")
    planted = c.cookie
    assert planted
    c.sign_in("alice", PASSWORD)
    assert c.cookie and c.cookie != planted
    assert c.get("/self-care/").status == 200
    attacker = WebClient(web.port("web"), cookie=planted)
    assert attacker.get("/self-care/").status == 303  # the pre-sign-in id is dead
    csrf = c.csrf("/self-care/")
    assert c.post_form("/sign-out", {"csrf": csrf}).status == 303
    assert c.get("/self-care/").status == 303


def test_sign_in_is_throttled_with_one_answer_for_unknown_and_wrong(web: Daemon) -> None:
    unknown = client(web).sign_in("nobody", "whatever-pass")
    wrong = client(web).sign_in("alice", "wrong-password")
    assert unknown.status == wrong.status == 401
    assert "wrong user name or password" in unknown.text
    assert _error(unknown.text) == _error(wrong.text)
    c = client(web)
    for _ in range(2):  # with the one above: alice's budget of 3 is spent
        assert c.sign_in("alice", "wrong-password").status == 401
    locked = c.sign_in("alice", PASSWORD)  # even the right password waits
    assert locked.status == 429 and "Too many failed sign-ins" in locked.text
    assert client(web).sign_in("bob", PASSWORD).status == 303  # another user may still
    assert client(web).sign_in("zed", "guess-guess").status == 401  # 5th failure here
    assert client(web).sign_in("bob", PASSWORD).status == 429  # this source is locked


def _error(html: str) -> str:
    start = html.index('id="error"')
    return html[start : html.index("</p>", start)]


def test_bad_csv_and_bad_json_change_nothing(web: Daemon) -> None:
    c = client(web)
    c.sign_in("root1", PASSWORD)
    csrf = c.csrf("/admin/import")
    bad = (
        b"mac,model,description,user,directory_number,display_name,requires_activation\n"
        b"001122334455,8841,ok,,3001,,\nnot-a-mac,8841,,,3002,,\n"
        b"001122334466,9999,,,3003,,\n"
    )
    reply = c.post_multipart("/admin/import", {"csrf": csrf}, {"file": bad})
    assert reply.status == 422
    assert (
        "line 3" in reply.text and "line 4" in reply.text and "nothing was imported" in reply.text
    )
    reply = c.post_multipart("/admin/import", {"csrf": csrf}, {"file": b"\xff\xfe\x00garbage"})
    assert reply.status == 400 and "not UTF-8" in reply.text
    reply = c.post_multipart("/admin/import", {"csrf": csrf}, {"file": b"colour,model\nred,8841\n"})
    assert reply.status == 400 and "unknown column" in reply.text
    assert web.json("device", "list") == []
    token = new_token(web, "ops")
    for raw in (b"{not json", b"[1, 2]", b'{"model": 8841}', b'{"model": "8841", "x": 1}'):
        reply = c.api("POST", "/api/v1/devices", token, raw=raw)
        assert reply.status == 400, raw
        assert reply.headers["content-type"] == "application/problem+json"
        assert reply.json()["detail"]
    reply = c.api("POST", "/api/v1/import", token, {"csv": bad.decode()})
    assert reply.status == 422 and [p["line"] for p in reply.json()["problems"]] == [3, 4]
    assert web.json("device", "list") == []


def test_tokens_are_hashed_read_only_tokens_see_no_codes_revoked_tokens_fail(
    web: Daemon,
) -> None:
    name, code = alice_phone(web)
    reader = new_token(web, "reader", "--read-only")
    writer = new_token(web, "writer")
    c = client(web)
    assert c.api("GET", "/api/v1/devices", reader).status == 200
    assert c.api("GET", f"/api/v1/devices/{name}/code", reader).status == 403
    assert c.api("POST", f"/api/v1/devices/{name}/code/release", reader).status == 403
    shown = c.api("GET", f"/api/v1/devices/{name}/code", writer)
    assert shown.status == 200 and shown.json()["code"] == code
    db = sqlite3.connect(web.state_dir / "callboard.sqlite3")
    stored = db.execute("SELECT token_sha256 FROM api_tokens").fetchall()
    hashes = db.execute("SELECT password_hash FROM users").fetchall()
    db.close()
    assert all(len(h) == 64 and reader not in h for (h,) in stored)
    assert all(h.startswith("$argon2id$") for (h,) in hashes)
    assert web.cli("token", "revoke", "writer").returncode == 0
    assert c.api("GET", "/api/v1/devices", writer).status == 401
    assert code not in web.log() and reader not in web.log() and PASSWORD not in web.log()


def test_cli_user_rules(web: Daemon) -> None:
    name, code = alice_phone(web)
    refused = web.cli("user", "delete", "alice")
    assert refused.returncode == 1 and "owns 1 device" in refused.stderr
    assert web.cli("user", "add", "alice").returncode == 1  # exists
    assert web.cli("user", "add", "bad name!").returncode == 1
    assert web.cli("user", "delete", "alice", "--force").returncode == 0
    assert [u["name"] for u in web.json("user", "list")] == ["bob", "root1"]
    # The phone stays, with no user (and its code), rather than naming a user who is gone.
    shown = web.json("device", "show", name)
    assert shown["user"] == "" and web.json("code", "show", name)["code"] == code
    assert "device.update" in web.log()
    c = client(web)
    assert c.sign_in("alice", PASSWORD).status == 401
    # A user of the same name made later does not inherit the phone.
    add_user(web, "alice", PASSWORD)
    c = client(web)
    c.sign_in("alice", PASSWORD)
    assert "No phones are assigned to you" in c.get("/self-care/").text


def test_a_device_is_edited_from_the_console_the_api_and_the_cli(web: Daemon) -> None:
    name, code = alice_phone(web)
    web.json("device", "add", "--model", "8841", "--line", "2009")  # another phone's number
    admin = client(web)
    admin.sign_in("root1", PASSWORD)
    page = admin.get(f"/admin/devices/{name}").text
    assert 'id="edit-device"' in page and ">2001:Alice</textarea>" in page
    csrf = admin.csrf(f"/admin/devices/{name}")
    form = {"csrf": csrf, "description": "Front desk", "user": "bob", "lines": "2001:Desk\n2002"}
    reply = admin.post_form(f"/admin/devices/{name}/edit", form)
    assert reply.status == 303 and reply.headers["location"] == f"/admin/devices/{name}?updated=1"
    assert "Device updated." in admin.get(reply.headers["location"]).text
    shown = web.json("device", "show", name)
    assert (shown["description"], shown["user"]) == ("Front desk", "bob")
    assert [ln["directory_number"] for ln in shown["lines"]] == ["2001", "2002"]
    assert web.json("code", "show", name)["code"] == code  # an edit keeps the code
    # An unknown user or a bad line: a clear refusal on the page, and nothing changes.
    for bad, words in (({"user": "nobody"}, "no user named"), ({"lines": "2001\n2001"}, "twice")):
        reply = admin.post_form(f"/admin/devices/{name}/edit", {**form, **bad})
        assert reply.status == 400 and words in reply.text, reply.text[:300]
    assert web.json("device", "show", name)["user"] == "bob"
    # Bob now sees it in Self-Care; Alice does not.
    bob = client(web)
    bob.sign_in("bob", PASSWORD)
    assert codes_of(bob.get("/self-care/").text) == [code]
    alice = client(web)
    alice.sign_in("alice", PASSWORD)
    assert not codes_of(alice.get("/self-care/").text)
    # The REST API: PATCH with only what changes; an admin route.
    token = new_token(web, "ops")
    api = client(web)
    reply = api.api("PATCH", f"/api/v1/devices/{name}", token, {"user": "alice"})
    assert reply.status == 200 and reply.json()["user"] == "alice"
    assert reply.json()["description"] == "Front desk"
    reply = api.api("PATCH", f"/api/v1/devices/{name}", token, {"user": "ghost"})
    assert reply.status == 400 and "no user named" in reply.json()["detail"]
    reply = api.api("PATCH", f"/api/v1/devices/{name}", token, {"lines": "2001"})
    assert reply.status == 400
    bob_token = new_token(web, "bob-edit", "--user", "bob")
    assert api.api("PATCH", f"/api/v1/devices/{name}", bob_token, {"user": "bob"}).status == 403
    # The CLI, over the admin socket.
    edited = web.json("device", "edit", name, "--line", "2003:Three", "--description", "")
    assert [ln["directory_number"] for ln in edited["lines"]] == ["2003"]
    assert edited["description"] == "" and edited["user"] == "alice"
    refused = web.cli("device", "edit", name, "--user", "ghost")
    assert refused.returncode == 1 and "no user named 'ghost'" in refused.stderr
    assert web.cli("device", "edit", name).returncode != 0  # nothing to change


def test_self_care_hides_codes_when_the_setting_is_off(daemon_factory: Any) -> None:
    d: Daemon = daemon_factory(
        "--web-port", "0", "--set", "self_care.show_phones_ready_to_activate=false"
    )
    add_user(d, "alice", PASSWORD)
    _name, code = alice_phone(d)
    c = client(d)
    c.sign_in("alice", PASSWORD)
    page = c.get("/self-care/").text
    assert code not in page and "Ask your administrator" in page and "<svg" not in page


def test_openapi_describes_every_route(web: Daemon) -> None:
    doc = client(web).get("/api/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    ops = [(m, p) for p, item in doc["paths"].items() for m in item]
    ids = [item[m]["operationId"] for p, item in doc["paths"].items() for m in item]
    assert len(ids) == len(set(ids)) and len(ops) >= 25
    needed_paths = [
        "/api/v1/devices", "/api/v1/devices/{name}/code/send", "/api/v1/tokens",
        "/api/v1/users/{name}/password", "/api/v1/me/devices", "/api/v1/import",
    ]  # fmt: skip
    for needed in needed_paths:
        assert needed in doc["paths"]
    assert "DeviceCreate" in doc["components"]["schemas"]


def test_no_web_listener_unless_asked(daemon: Daemon, tmp_path: Path) -> None:
    assert "web" not in daemon.status
    add_user(daemon, "carol", PASSWORD)  # accounts work over the socket all the same
    assert [u["name"] for u in daemon.json("user", "list")] == ["carol"]
