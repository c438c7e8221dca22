"""The OAuth wire format, sans-I/O: token requests, answers, errors and bearer headers."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from callboard.protocols.oauth import (
    ACTIVATION_GRANT,
    FORM_TYPE,
    ActivationGrant,
    OAuthError,
    RefreshGrant,
    bearer_challenge,
    bearer_from_http,
    bearer_from_sip,
    metadata,
    parse_token_request,
    thumbprint_hex,
    token_response,
    x5t_s256,
)


def test_the_activation_and_refresh_grants_are_read_from_the_form() -> None:
    body = f"grant_type={ACTIVATION_GRANT}&code=1234567812345678".encode()
    assert parse_token_request("POST", FORM_TYPE, body) == ActivationGrant("1234567812345678")
    refresh = parse_token_request(
        "POST", f"{FORM_TYPE}; charset=utf-8", b"grant_type=refresh_token&refresh_token=abc"
    )
    assert refresh == RefreshGrant("abc")
    assert "1234" not in repr(ActivationGrant("1234567812345678"))  # never in a log line


@pytest.mark.parametrize(
    ("method", "content_type", "body", "query", "status", "error"),
    [
        ("GET", FORM_TYPE, b"", b"", 405, "invalid_request"),
        ("POST", "application/json", b"{}", b"", 400, "invalid_request"),
        ("POST", FORM_TYPE, b"code=1", b"", 400, "invalid_request"),
        ("POST", FORM_TYPE, b"grant_type=password", b"", 400, "unsupported_grant_type"),
        ("POST", FORM_TYPE, f"grant_type={ACTIVATION_GRANT}".encode(), b"", 400, "invalid_request"),
        ("POST", FORM_TYPE, b"grant_type=refresh_token&grant_type=x", b"", 400, "invalid_request"),
        ("POST", FORM_TYPE, b"grant_type=refresh_token", b"code=1", 400, "invalid_request"),
        ("POST", FORM_TYPE, b"\xff\xfe", b"", 400, "invalid_request"),
    ],
)
def test_bad_token_requests_carry_their_rfc_6749_answer(
    method: str, content_type: str, body: bytes, query: bytes, status: int, error: str
) -> None:
    with pytest.raises(OAuthError) as caught:
        parse_token_request(method, content_type, body, query)
    assert (caught.value.status, caught.value.error) == (status, error)
    assert json.loads(caught.value.body())["error"] == error


def test_answers_are_json_and_never_cached() -> None:
    status, headers, body = token_response("at", 600, "rt", "config sip", {"device_name": "SEP1"})
    assert status == 200 and ("Cache-Control", "no-store") in headers
    assert json.loads(body) == {
        "access_token": "at",
        "token_type": "Bearer",
        "expires_in": 600,
        "refresh_token": "rt",
        "scope": "config sip",
        "device_name": "SEP1",
    }
    throttled = OAuthError.throttled(41.2)
    assert throttled.status == 429 and ("Retry-After", "42") in throttled.headers()


def test_metadata_names_the_grant_and_mutual_tls() -> None:
    doc = json.loads(metadata("https://edge:8443", scopes=["sip"], signing_algorithms=["ES256"]))
    assert doc["token_endpoint"] == "https://edge:8443/oauth/token"
    assert ACTIVATION_GRANT in doc["grant_types_supported"]
    assert doc["tls_client_certificate_bound_access_tokens"] is True


def test_bearer_credentials_in_http_and_sip() -> None:
    assert bearer_from_http("Bearer abc.def") == "abc.def"
    assert bearer_from_http("bearer   abc") == "abc"
    assert bearer_from_http("Basic xyz") is None and bearer_from_http(None) is None
    assert bearer_from_sip([("authorization", "Bearer abc.def")]) == "abc.def"
    assert bearer_from_sip([("proxy-authorization", 'Bearer token="abc.def"')]) == "abc.def"
    assert bearer_from_sip([("authorization", 'Digest username="1000"')]) is None


def test_challenges_quote_their_parameters() -> None:
    value = bearer_challenge("callboard", scope="sip", authz_server="https://edge:8443")
    assert value == 'Bearer realm="callboard", scope="sip", authz_server="https://edge:8443"'
    assert bearer_challenge('a"b', error="invalid_token") == (
        'Bearer realm="a\\"b", error="invalid_token"'
    )


def test_the_certificate_thumbprint_round_trips() -> None:
    der = b"not really a certificate"
    x5t = x5t_s256(der)
    digest = hashlib.sha256(der).digest()
    assert x5t == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert thumbprint_hex(x5t) == digest.hex()
    assert thumbprint_hex("short") is None
