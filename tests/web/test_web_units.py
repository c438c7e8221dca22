"""Sessions, the sign-in throttle, password and token hashing, the OpenAPI generator: pure
rules with an injected clock, no sockets."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from callboard.daemon.registry.accounts import (
    hash_password,
    new_token,
    token_digest,
    verify_password,
)
from callboard.daemon.web.api import ApiArea
from callboard.daemon.web.sessions import SessionStore, SignInThrottle
from callboard.daemon.web.settings import SelfCareSettings
from support.harness import Daemon
from web.web_support import WebClient, codes_of


def test_sessions_expire_when_idle_and_at_the_absolute_limit() -> None:
    store = SessionStore(idle=1800, absolute=12 * 3600)
    s = store.sign_in(None, "alice", now=0.0)
    assert store.get(s.id, 1799.0) is s
    assert store.get(s.id, 1799.0 + 1801) is None  # idle
    s = store.sign_in(None, "alice", now=0.0)
    t = 0.0
    while t < 12 * 3600 - 1000:
        t += 1000
        assert store.get(s.id, t) is s
    assert store.get(s.id, 12 * 3600 + 1.0) is None  # absolute, despite activity


def test_sign_in_makes_a_new_session_and_kills_the_old_id() -> None:
    store = SessionStore(idle=1800, absolute=3600)
    anon = store.new("", 0.0)
    signed = store.sign_in(anon, "alice", 1.0)
    assert signed.id != anon.id and signed.csrf != anon.csrf
    assert store.get(anon.id, 2.0) is None and store.get(signed.id, 2.0) is signed
    assert signed.csrf_ok(signed.csrf) and not signed.csrf_ok(anon.csrf)
    assert not signed.csrf_ok("") and not signed.csrf_ok(None)
    store.end_user("alice")
    assert store.get(signed.id, 3.0) is None


def test_the_throttle_locks_per_user_and_per_source() -> None:
    throttle = SignInThrottle(budget=3, source_budget=10, window=900)
    for i in range(3):
        assert throttle.wait("alice", "10.0.0.1", float(i)) == 0
        throttle.failure("Alice", "10.0.0.1", float(i))
    assert throttle.wait("alice", "10.0.0.2", 3.0) > 0  # the name is locked, from anywhere
    assert throttle.wait("bob", "10.0.0.1", 3.0) == 0
    assert throttle.wait("alice", "10.0.0.1", 3.0 + 61) == 0  # the first lockout is 60 s


def test_passwords_are_argon2id_and_tokens_only_a_digest() -> None:
    stored = hash_password("correct horse battery")
    assert stored.startswith("$argon2id$") and "correct" not in stored
    assert verify_password(stored, "correct horse battery")
    assert not verify_password(stored, "wrong")
    assert not verify_password(None, "anything")  # an unknown user
    assert not verify_password("not a hash", "anything")
    token = new_token()
    assert token.startswith("cbt_") and len(token) > 40
    assert re.fullmatch(r"[0-9a-f]{64}", token_digest(token))


def test_the_openapi_document_is_generated_from_the_route_table() -> None:
    area: Any = ApiArea(None, None, None, SelfCareSettings())  # type: ignore[arg-type]
    from callboard.daemon.web.api import openapi_document

    doc = openapi_document(area.operations)
    routed = {(r.method, r.pattern) for r in area.routes}
    documented = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    assert documented == routed - {("GET", "/api/openapi.json")}
    refs = re.findall(r'"\$ref": "#/components/schemas/(\w+)"', str(doc).replace("'", '"'))
    assert refs and set(refs) <= set(doc["components"]["schemas"])


def test_the_demo_turns_the_web_on_with_a_user_who_sees_the_code(
    daemon_factory: Any, tmp_path: Path
) -> None:
    d: Daemon = daemon_factory("--demo", "--web-port", "0")
    deadline = time.monotonic() + 60
    while "password" not in d.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    m = re.search(r"https://127\.0\.0\.1:(\d+)/self-care/\s+user demo, password (\S+)", d.log())
    assert m, d.log()[-2000:]
    code = re.search(r"activation code (\d{4}-\d{4}-\d{4}-\d{4})", d.log())
    assert code
    c = WebClient(int(m.group(1)))
    assert c.sign_in("demo", m.group(2)).status == 303
    assert codes_of(c.get("/self-care/").text) == [code.group(1)]
