"""The phone's boot with a TFTP-role ITL: .sgn names, signatures checked, HTTPS 6971 pinned."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from callboard.daemon import certs
from callboard.phone.boot import (
    BootOptions,
    BootResult,
    BootSequence,
    Fetch,
    Fetched,
    FetchFailed,
    Outcome,
    PhoneIdentity,
    Register,
    Registered,
    parsed_default_config,
    verified_itl,
    verified_sgn,
)
from callboard.protocols.tvs.itl import ITLError, Role, build_itl, parse_itl
from callboard.protocols.tvs.sgn import SgnError, build_signed, verify_sgn
from cryptography.hazmat.primitives.asymmetric import rsa

MAC = "00AABBCCDDEE"
SEP = f"SEP{MAC}.cnf.xml"
SEP_CONFIG = b"""<?xml version="1.0"?>
<device>
  <devicePool><callManagerGroup><members><member priority="0"><callManager>
    <ports><sipPort>5060</sipPort><securedSipPort>5061</securedSipPort></ports>
    <processNodeName>192.0.2.10</processNodeName></callManager></member></members>
  </callManagerGroup></devicePool>
  <sipProfile><sipLines>
    <line button="1" lineIndex="1"><featureID>9</featureID><proxy>USECALLMANAGER</proxy>
      <name>1001</name><authName>1001</authName><authPassword>pw</authPassword></line>
  </sipLines></sipProfile>
  <transportLayerProtocol>1</transportLayerProtocol>
</device>"""
TS = 1_800_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> certs.ServerCertificates:
    return certs.init_certs(tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> certs.ServerCertificates:
    return certs.init_certs(tmp_path_factory.mktemp("other"))


@pytest.fixture(scope="module")
def itl(server: certs.ServerCertificates) -> bytes:
    return server.build_itl(timestamp=TS)  # v1.1, CCM+TFTP (RSA) and TFTP (EC)


@pytest.fixture(scope="module")
def identity() -> PhoneIdentity:
    lab = certs.make_lab_ca()
    mic = certs.issue_mic(lab, model="8841", mac=MAC)
    return PhoneIdentity(mac=MAC, model="8841", mic_cert=mic.cert, mic_key=mic.key)


def signed(server: certs.ServerCertificates, data: bytes, name: str) -> bytes:
    cert, key = server.sgn_signer()
    return build_signed(data, name, cert, key, TS)


Answer = Callable[[Fetch], Fetched | FetchFailed]


def run(seq: BootSequence, answer: Answer) -> tuple[BootResult, list[object]]:
    actions: list[object] = []
    step = seq.start()
    while not isinstance(step, BootResult):
        actions.append(step)
        if isinstance(step, Fetch):
            step = seq.feed(answer(step))
        elif isinstance(step, Register):
            step = seq.feed(Registered(True, 200, "ok"))
        else:  # pragma: no cover
            raise AssertionError(step)
    return step, actions


def files(itl: bytes, **by_name: bytes | None) -> Answer:
    table: dict[str, bytes | None] = {"ITLFile.tlv": itl, **by_name}

    def answer(fetch: Fetch) -> Fetched | FetchFailed:
        if fetch.secure:
            return FetchFailed(fetch.name, "connection refused")
        return Fetched(fetch.name, table.get(fetch.name), "http", "192.0.2.10:6970")

    return answer


def test_signed_config_is_checked_and_the_itl_goes_to_the_sip_agent(
    identity: PhoneIdentity, itl: bytes, server: certs.ServerCertificates
) -> None:
    answer = files(itl, **{f"{SEP}.sgn": signed(server, SEP_CONFIG, SEP)})
    result, actions = run(BootSequence(identity), answer)
    assert result.ok, result.steps
    fetched = [a for a in actions if isinstance(a, Fetch)]
    # 6971 first (pinned to the ITL's EC TFTP record), then the signed file over 6970.
    assert [(f.name, f.secure) for f in fetched[-2:]] == [
        (f"{SEP}.sgn", True),
        (f"{SEP}.sgn", False),
    ]
    tftp_ec = next(r for r in parse_itl(itl).records if r.role == Role.TFTP)
    assert fetched[-2].pins == ((tftp_ec.hash_algorithm, tftp_ec.certificate_hash),)
    assert any("signature ok" in s and f"{SEP}.sgn" in s for s in result.steps)
    [register] = [a for a in actions if isinstance(a, Register)]
    assert register.itl_signature == parse_itl(itl).signature.hex()
    assert register.itl_tftp_server == "192.0.2.10"


def test_https_answer_is_the_unsigned_config(identity: PhoneIdentity, itl: bytes) -> None:
    def answer(fetch: Fetch) -> Fetched | FetchFailed:
        if fetch.secure:
            return Fetched(fetch.name, SEP_CONFIG, "https", "192.0.2.10:6971")
        return Fetched(fetch.name, itl if fetch.name == "ITLFile.tlv" else None, "http", "x:1")

    result, actions = run(BootSequence(identity), answer)
    assert result.ok, result.steps
    assert f"{SEP}.sgn" not in [a.name for a in actions if isinstance(a, Fetch) and not a.secure]


def test_a_wrong_https_certificate_ends_the_boot(identity: PhoneIdentity, itl: bytes) -> None:
    def answer(fetch: Fetch) -> Fetched | FetchFailed:
        if fetch.secure:
            return FetchFailed(fetch.name, "server certificate is not the ITL's", untrusted=True)
        return Fetched(fetch.name, itl if fetch.name == "ITLFile.tlv" else None, "http", "x:1")

    result, _ = run(BootSequence(identity), answer)
    assert result.outcome is Outcome.UNTRUSTED and result.exit_code != 0
    assert "not the ITL's" in result.reason


@pytest.mark.parametrize("case", ["unsigned", "tampered", "other signer", "other name"])
def test_unsigned_or_badly_signed_files_are_refused(
    identity: PhoneIdentity, itl: bytes, server: certs.ServerCertificates,
    other: certs.ServerCertificates, case: str,
) -> None:  # fmt: skip
    good = signed(server, SEP_CONFIG, SEP)
    blob = {
        "unsigned": SEP_CONFIG,
        "tampered": good[:-2] + b"X>",
        "other signer": signed(other, SEP_CONFIG, SEP),
        "other name": signed(server, SEP_CONFIG, "SEP001122334455.cnf.xml"),
    }[case]
    result, _ = run(BootSequence(identity), files(itl, **{f"{SEP}.sgn": blob}))
    assert result.outcome is Outcome.UNTRUSTED and result.exit_code == 6
    assert f"{SEP}.sgn refused: not validly signed" in result.reason


def test_xml_default_is_fetched_signed_too(
    identity: PhoneIdentity, itl: bytes, server: certs.ServerCertificates
) -> None:
    default = b"<Default><activationCodeOnboarding/></Default>"
    answer = files(itl, **{"XMLDefault.cnf.xml.sgn": signed(server, default, "XMLDefault.cnf.xml")})
    result, actions = run(BootSequence(identity, BootOptions(config_retries=1)), answer)
    names = [a.name for a in actions if isinstance(a, Fetch)]
    assert "XMLDefault.cnf.xml.sgn" in names and "XMLDefault.cnf.xml" not in names
    assert result.outcome is Outcome.NOT_PROVISIONED  # read and understood: autoregistration


def test_an_itl_without_a_tftp_role_means_plain_files(
    identity: PhoneIdentity, server: certs.ServerCertificates
) -> None:
    assert isinstance(server.sast.key, rsa.RSAPrivateKey)
    plain_itl = build_itl(
        server.sast.cert, server.sast.key,
        [(Role.SAST, server.sast.cert), (Role.TVS, server.tvs.cert)], timestamp=TS,
    )  # fmt: skip
    result, actions = run(BootSequence(identity), files(plain_itl, **{SEP: SEP_CONFIG}))
    assert result.ok
    assert all(not a.name.endswith(".sgn") for a in actions if isinstance(a, Fetch))


def test_https_off_or_tftp_only_skips_6971(
    identity: PhoneIdentity, itl: bytes, server: certs.ServerCertificates
) -> None:
    answer = files(itl, **{f"{SEP}.sgn": signed(server, SEP_CONFIG, SEP)})
    for options in (BootOptions(https_port=0), BootOptions(transport="tftp")):
        result, actions = run(BootSequence(identity, options), answer)
        assert result.ok and not any(isinstance(a, Fetch) and a.secure for a in actions)


# Verified files are kept by content: checked once, never trusted by name --------------------


def test_the_trust_list_is_verified_once_per_content_and_a_tampered_one_still_fails(
    identity: PhoneIdentity, itl: bytes, server: certs.ServerCertificates
) -> None:
    verified_itl.cache_clear()
    answer = files(itl, **{f"{SEP}.sgn": signed(server, SEP_CONFIG, SEP)})
    first, _ = run(BootSequence(identity), answer)
    second, _ = run(BootSequence(identity), answer)
    assert first.ok and second.ok and first.steps == second.steps
    info = verified_itl.cache_info()
    assert (info.misses, info.currsize) == (1, 1) and info.hits >= 1
    assert verified_itl(bytes(itl)) == parse_itl(itl, verify=True)  # same answer, by content

    tampered = itl[:-1] + bytes([itl[-1] ^ 1])  # same length and name, one bit off
    with pytest.raises(ITLError):
        parse_itl(tampered, verify=True)
    for _ in range(2):  # a failure is not kept: refused every time
        result, _ = run(BootSequence(identity), files(tampered, **{SEP: SEP_CONFIG}))
        assert result.outcome is Outcome.UNTRUSTED and "ITLFile.tlv refused" in result.reason
    assert verified_itl.cache_info().currsize == 1


def test_a_signed_file_is_verified_once_per_content_and_a_tampered_one_still_fails(
    identity: PhoneIdentity, itl: bytes, server: certs.ServerCertificates
) -> None:
    verified_sgn.cache_clear()
    parsed_default_config.cache_clear()
    default = b'<Default><activationCodeOnboarding><model id="683" name="Cisco 8841"/>'
    default += b"</activationCodeOnboarding></Default>"
    good = signed(server, default, "XMLDefault.cnf.xml")
    options = BootOptions(config_retries=1)
    for _ in range(3):
        result, _ = run(
            BootSequence(identity, options), files(itl, **{"XMLDefault.cnf.xml.sgn": good})
        )
        assert result.outcome is Outcome.CODE_REQUIRED  # read, understood: my model needs a code
    assert verified_sgn.cache_info().misses == 1 and verified_sgn.cache_info().hits == 2
    assert parsed_default_config.cache_info().misses == 1
    signer, body = verified_sgn(itl, good, "XMLDefault.cnf.xml.sgn")
    assert body == verify_sgn(good, signer, filename="XMLDefault.cnf.xml.sgn") == default

    tampered = good[:-2] + b"X>"
    for _ in range(2):
        result, _ = run(
            BootSequence(identity, options), files(itl, **{"XMLDefault.cnf.xml.sgn": tampered})
        )
        assert result.outcome is Outcome.UNTRUSTED
        assert "XMLDefault.cnf.xml.sgn refused: not validly signed" in result.reason
    with pytest.raises(SgnError):  # the same content under another name is refused too
        verified_sgn(itl, good, "SEP001122334455.cnf.xml.sgn")
