"""The phone's boot logic without sockets: ``BootSequence`` fed with fake fetch results."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from callboard.daemon import certs
from callboard.phone.boot import (
    Activate,
    Activated,
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
    Sleep,
    Slept,
)
from callboard.phone.config import parse_default_config, parse_device_config
from callboard.protocols.tvs.codec import ActivateResponse, ActivateStatus
from callboard.protocols.tvs.itl import Role, build_itl
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

MAC = "00AABBCCDDEE"
CODE = "1234567812345678"

XML_DEFAULT = b"""<?xml version="1.0"?>
<Default>
  <callManagerGroup><members><member priority="0"><callManager>
    <ports><sipPort>5060</sipPort><securedSipPort>5061</securedSipPort></ports>
    <processNodeName>192.0.2.10</processNodeName></callManager></member></members>
  </callManagerGroup>
  <TVS><members>
    <member priority="1"><port>2446</port><address>192.0.2.11</address></member>
    <member priority="0"><port>2445</port><address>192.0.2.10</address></member>
  </members></TVS>
  <activationCodeOnboarding>
    <model id="683" name="Cisco 8841"/>
  </activationCodeOnboarding>
</Default>"""

SEP_CONFIG = b"""<?xml version="1.0"?>
<device>
  <devicePool><callManagerGroup><members><member priority="0"><callManager>
    <ports><sipPort>5060</sipPort><securedSipPort>5061</securedSipPort></ports>
    <processNodeName>192.0.2.10</processNodeName></callManager></member></members>
  </callManagerGroup></devicePool>
  <sipProfile><sipLines>
    <line button="1" lineIndex="1"><featureID>9</featureID><name>1001</name>
      <displayName>Alice &amp; Bob</displayName><authName>a1001</authName>
      <authPassword>s3cret</authPassword></line>
  </sipLines></sipProfile>
  <loadInformation>sip88xx.14-2-1</loadInformation>
  <transportLayerProtocol>1</transportLayerProtocol>
</device>"""

SEP_NO_SIP = SEP_CONFIG.replace(b"<sipPort>5060</sipPort>", b"<sipPort>0</sipPort>")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> certs.ServerCertificates:
    return certs.init_certs(tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def itl(server: certs.ServerCertificates) -> bytes:
    """An ITL without a TFTP role, so the phone fetches plain files (the daemon's ITL has
    one: signed files are tested in test_phone_signed_boot.py)."""
    assert isinstance(server.sast.key, rsa.RSAPrivateKey)
    records = [(Role.SAST, server.sast.cert), (Role.TVS, server.tvs.cert)]
    return build_itl(server.sast.cert, server.sast.key, records, timestamp=1_800_000_000)


@pytest.fixture(scope="module")
def identity() -> PhoneIdentity:
    lab = certs.make_lab_ca()
    mic = certs.issue_mic(lab, model="8841", mac=MAC)
    return PhoneIdentity(
        mac="00:aa:bb:cc:dd:ee", model="CP-8841", mic_cert=mic.cert, mic_key=mic.key
    )


Files = dict[str, bytes | None]


def run(
    seq: BootSequence,
    files: Files | Callable[[str, int], bytes | None],
    *,
    activate: ActivateResponse | Activated | None = None,
    register: Registered | None = None,
) -> tuple[BootResult, list[object]]:
    """Drive the sequence to its end, answering every action; returns the result and actions."""
    actions: list[object] = []
    counts: dict[str, int] = {}
    step = seq.start()
    while not isinstance(step, BootResult):
        actions.append(step)
        if isinstance(step, Fetch):
            counts[step.name] = counts.get(step.name, 0) + 1
            data = files(step.name, counts[step.name]) if callable(files) else files.get(step.name)
            step = seq.feed(Fetched(step.name, data, "http", "192.0.2.10:6970"))
        elif isinstance(step, Activate):
            assert activate is not None, "unexpected activation"
            answer = (
                activate
                if isinstance(activate, Activated)
                else Activated(activate, "192.0.2.10:2445")
            )
            step = seq.feed(answer)
        elif isinstance(step, Sleep):
            step = seq.feed(Slept())
        elif isinstance(step, Register):
            assert register is not None, "unexpected registration"
            step = seq.feed(register)
        else:  # pragma: no cover
            raise AssertionError(step)
    return step, actions


def fetched_names(actions: list[object]) -> list[str]:
    return [a.name for a in actions if isinstance(a, Fetch)]


def test_bat_phone_with_code_activates_then_fetches_its_config(
    identity: PhoneIdentity, itl: bytes, server: certs.ServerCertificates
) -> None:
    phone = PhoneIdentity(
        mac=MAC, model="8841", mic_cert=identity.mic_cert, mic_key=identity.mic_key, code=CODE
    )
    lines: list[str] = []
    seq = BootSequence(phone, BootOptions(), emit=lines.append)

    def files(name: str, n: int) -> bytes | None:
        return {
            f"ITLSEP{MAC}.tlv": itl,
            "XMLDefault.cnf.xml": XML_DEFAULT,
            f"SEP{MAC}.cnf.xml": SEP_CONFIG if n >= 3 else None,
        }.get(name)

    ok = ActivateResponse(1, ActivateStatus.ACTIVATED, "activated", f"SEP{MAC}")
    result, actions = run(seq, files, activate=ok, register=Registered(True, 200, "1001=200"))
    assert result.ok and result.exit_code == 0
    assert fetched_names(actions) == [
        f"CTLSEP{MAC}.tlv",
        f"ITLSEP{MAC}.tlv",
        f"SEP{MAC}.cnf.xml",
        "XMLDefault.cnf.xml",
        f"SEP{MAC}.cnf.xml",
        f"SEP{MAC}.cnf.xml",
    ]
    activate = next(a for a in actions if isinstance(a, Activate))
    # TVS members in priority order; the pin is the ITL's TVS certificate.
    assert [m.address for m in activate.members] == ["192.0.2.10", "192.0.2.11"]
    assert activate.pinned_der == server.tvs.cert.public_bytes(serialization.Encoding.DER)
    assert any(isinstance(a, Sleep) for a in actions)
    assert result.config is not None and result.config.lines[0].display_name == "Alice & Bob"
    assert result.registration_status == 200
    assert lines == list(result.steps)
    assert f"[http] ITLSEP{MAC}.tlv: {len(itl)} bytes, signature ok, TVS pinned" in lines
    assert "code entered" in "\n".join(lines)
    assert CODE not in "\n".join(lines) and CODE not in repr(phone)


def test_itlfile_is_the_fallback_when_no_per_device_itl(
    identity: PhoneIdentity, itl: bytes
) -> None:
    seq = BootSequence(identity, BootOptions(register=False))
    result, actions = run(seq, {"ITLFile.tlv": itl, f"SEP{MAC}.cnf.xml": SEP_CONFIG})
    assert result.ok
    assert fetched_names(actions)[:4] == [
        f"CTLSEP{MAC}.tlv",
        f"ITLSEP{MAC}.tlv",
        "ITLFile.tlv",
        f"SEP{MAC}.cnf.xml",
    ]
    assert seq.pinned_der is not None


def test_sep_config_present_needs_no_code_and_no_xmldefault(identity: PhoneIdentity) -> None:
    seq = BootSequence(identity)
    result, actions = run(
        seq, {f"SEP{MAC}.cnf.xml": SEP_CONFIG}, register=Registered(True, 200, "ok")
    )
    assert result.ok and result.activation is None
    assert "XMLDefault.cnf.xml" not in fetched_names(actions)
    assert "no trust list" in "\n".join(result.steps)


def test_model_needing_a_code_without_one_stops_with_code_required(
    identity: PhoneIdentity, itl: bytes
) -> None:
    seq = BootSequence(identity)
    result, actions = run(seq, {"ITLFile.tlv": itl, "XMLDefault.cnf.xml": XML_DEFAULT})
    assert result.outcome is Outcome.CODE_REQUIRED and result.exit_code == 3
    assert "activation code required" in result.reason
    assert not any(isinstance(a, Activate) for a in actions)


def test_model_not_listed_is_autoregistration_and_never_asks_for_a_code(
    identity: PhoneIdentity, itl: bytes
) -> None:
    other = XML_DEFAULT.replace(b'name="Cisco 8841"', b'name="Cisco 8851"')
    seq = BootSequence(identity, BootOptions(register=False))

    def files(name: str, n: int) -> bytes | None:
        # the SEP config shows up on the second poll, as after auto-registration
        if name == f"SEP{MAC}.cnf.xml":
            return SEP_CONFIG if n >= 3 else None
        return {"ITLFile.tlv": itl, "XMLDefault.cnf.xml": other}.get(name)

    result, actions = run(seq, files)
    assert result.ok
    assert not any(isinstance(a, Activate) for a in actions)
    assert "not listed: autoregistration" in "\n".join(result.steps)


def test_autoregistration_without_a_config_gives_up_after_the_polls(
    identity: PhoneIdentity,
) -> None:
    other = XML_DEFAULT.replace(b'name="Cisco 8841"', b'name="Cisco 8851"')
    seq = BootSequence(identity, BootOptions(config_retries=3))
    result, actions = run(seq, {"XMLDefault.cnf.xml": other})
    assert result.outcome is Outcome.NOT_PROVISIONED
    assert fetched_names(actions).count(f"SEP{MAC}.cnf.xml") == 4
    assert sum(isinstance(a, Sleep) for a in actions) == 2


def test_bad_itl_signature_stops_the_boot(identity: PhoneIdentity, itl: bytes) -> None:
    broken = bytearray(itl)
    broken[-10] ^= 0xFF  # inside the signed records
    seq = BootSequence(identity)
    result, actions = run(seq, {f"ITLSEP{MAC}.tlv": bytes(broken), f"SEP{MAC}.cnf.xml": SEP_CONFIG})
    assert result.outcome is Outcome.UNTRUSTED
    assert "signature BAD" in "\n".join(result.steps)
    assert f"SEP{MAC}.cnf.xml" not in fetched_names(actions)


def test_no_itl_means_no_pin_and_the_code_is_not_sent(identity: PhoneIdentity) -> None:
    phone = PhoneIdentity(
        mac=MAC, model="8841", mic_cert=identity.mic_cert, mic_key=identity.mic_key, code=CODE
    )
    result, actions = run(BootSequence(phone), {"XMLDefault.cnf.xml": XML_DEFAULT})
    assert result.outcome is Outcome.UNTRUSTED
    assert not any(isinstance(a, Activate) for a in actions)
    # ...unless the lab explicitly allows trust on first use.
    ok = ActivateResponse(1, ActivateStatus.ACTIVATED, "activated", f"SEP{MAC}")
    seq = BootSequence(phone, BootOptions(allow_tofu=True, register=False))

    def files(name: str, n: int) -> bytes | None:
        if name == f"SEP{MAC}.cnf.xml":
            return SEP_CONFIG if n >= 2 else None
        return {"XMLDefault.cnf.xml": XML_DEFAULT}.get(name)

    result, actions = run(seq, files, activate=ok)
    assert result.ok, result.reason
    activate = next(a for a in actions if isinstance(a, Activate))
    assert activate.pinned_der is None


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (ActivateStatus.REJECTED, Outcome.REJECTED),
        (ActivateStatus.RATE_LIMITED, Outcome.REJECTED),
        (ActivateStatus.CERTIFICATE_NOT_ACCEPTED, Outcome.CERTIFICATE_REFUSED),
    ],
)
def test_refused_activation_reports_status_and_reason(
    identity: PhoneIdentity, itl: bytes, status: ActivateStatus, outcome: Outcome
) -> None:
    phone = PhoneIdentity(
        mac=MAC, model="8841", mic_cert=identity.mic_cert, mic_key=identity.mic_key, code=CODE
    )
    refused = ActivateResponse(1, status, "because the test says so")
    result, actions = run(
        BootSequence(phone),
        {"ITLFile.tlv": itl, "XMLDefault.cnf.xml": XML_DEFAULT},
        activate=refused,
    )
    assert result.outcome is outcome
    assert f"status {int(status)}" in result.reason and "because the test says so" in result.reason
    assert fetched_names(actions).count(f"SEP{MAC}.cnf.xml") == 1


def test_tvs_pin_mismatch_is_untrusted(identity: PhoneIdentity, itl: bytes) -> None:
    phone = PhoneIdentity(
        mac=MAC, model="8841", mic_cert=identity.mic_cert, mic_key=identity.mic_key, code=CODE
    )
    impostor = Activated(None, "192.0.2.10:2445", "not the ITL's TVS", untrusted=True)
    result, _ = run(
        BootSequence(phone),
        {"ITLFile.tlv": itl, "XMLDefault.cnf.xml": XML_DEFAULT},
        activate=impostor,
    )
    assert result.outcome is Outcome.UNTRUSTED and "not the ITL's TVS" in result.reason


def test_unreachable_server_ends_the_boot(identity: PhoneIdentity) -> None:
    seq = BootSequence(identity)
    step = seq.start()
    assert isinstance(step, Fetch)
    result = seq.feed(FetchFailed(step.name, "http 192.0.2.10:6970: connection refused"))
    assert isinstance(result, BootResult)
    assert result.outcome is Outcome.UNREACHABLE and result.exit_code == 7
    assert "connection refused" in result.reason


def test_failed_registration_is_not_onboarded(identity: PhoneIdentity) -> None:
    result, _ = run(
        BootSequence(identity),
        {f"SEP{MAC}.cnf.xml": SEP_CONFIG},
        register=Registered(False, 403, "1001=403"),
    )
    assert result.outcome is Outcome.REGISTRATION_FAILED
    assert result.registration_status == 403


def test_config_without_sip_port_skips_register_unless_asked(identity: PhoneIdentity) -> None:
    result, actions = run(BootSequence(identity), {f"SEP{MAC}.cnf.xml": SEP_NO_SIP})
    assert result.ok and not any(isinstance(a, Register) for a in actions)
    result, _ = run(
        BootSequence(identity, BootOptions(register=True)), {f"SEP{MAC}.cnf.xml": SEP_NO_SIP}
    )
    assert result.outcome is Outcome.REGISTRATION_FAILED


def test_malformed_configs_are_errors_not_crashes(identity: PhoneIdentity) -> None:
    result, _ = run(BootSequence(identity), {"XMLDefault.cnf.xml": b"<Default><oops"})
    assert result.outcome is Outcome.ERROR and "XMLDefault" in result.reason
    result, _ = run(BootSequence(identity), {f"SEP{MAC}.cnf.xml": b"<Default/>"})
    assert result.outcome is Outcome.ERROR


def test_parsers_read_what_the_daemon_renders(tmp_path: Path) -> None:
    default = parse_default_config(XML_DEFAULT)
    assert default.requires_code("Cisco 8841") and not default.requires_code("Cisco 7821")
    assert default.activation_models == (("683", "Cisco 8841"),)
    config = parse_device_config(SEP_CONFIG)
    assert config.sip_server is not None and config.sip_server.sip_port == 5060
    assert config.transport == "tcp" and config.load == "sip88xx.14-2-1"
    assert "s3cret" not in repr(config.lines[0])


def test_identity_normalises_and_validates() -> None:
    lab = certs.make_lab_ca()
    mic = certs.issue_mic(lab, model="7821", mac="001122334455")
    phone = PhoneIdentity(mac="00-11-22-33-44-55", model="Cisco 7821", mic_cert=mic.cert,
                          mic_key=mic.key, code="1234-5678-1234-5678")  # fmt: skip
    assert phone.mac == "001122334455" and phone.model == "7821" and phone.model_id == "621"
    assert phone.device_name == "CP-7821-SEP001122334455" and phone.code == CODE
    with pytest.raises(ValueError):
        PhoneIdentity(mac="nope", model="7821", mic_cert=mic.cert, mic_key=mic.key)
    with pytest.raises(ValueError):
        PhoneIdentity(mac=MAC, model="7821", mic_cert=mic.cert, mic_key=mic.key, code="12")
