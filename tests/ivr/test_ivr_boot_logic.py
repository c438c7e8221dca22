"""``phone boot --ivr`` as plain logic: ``BootSequence`` fed a bootstrap config (issue 14)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from callboard.daemon import certs
from callboard.phone.boot import (
    BootOptions,
    BootResult,
    BootSequence,
    CallActivation,
    Fetch,
    Fetched,
    Outcome,
    PhoneIdentity,
    Register,
    Registered,
    Sleep,
    Slept,
    VoiceActivated,
)

MAC = "00AABBCCDDEE"
CODE = "1234567812345678"
POOL = b"""<devicePool><callManagerGroup><members><member priority="0"><callManager>
    <ports><sipPort>5060</sipPort><securedSipPort>5061</securedSipPort></ports>
    <processNodeName>192.0.2.10</processNodeName></callManager></member></members>
  </callManagerGroup></devicePool>"""
BOOTSTRAP = (
    b"""<device>"""
    + POOL
    + b"""<sipProfile><sipLines>
    <line button="1"><featureID>9</featureID><featureLabel>Activate</featureLabel>
      <name>bootstrap-00aabbccddee</name><authName>bootstrap-00aabbccddee</authName>
      <authPassword>0123456789abcdef01234567</authPassword></line>
  </sipLines><dialTemplate>ivr-hotline.xml</dialTemplate></sipProfile></device>"""
)
HOTLINE = b'<dialTemplate><TEMPLATE match="" timeout="0" rewrite="2288" /></dialTemplate>'
REAL = (
    b"""<device>"""
    + POOL
    + b"""<sipProfile><sipLines>
    <line button="1"><featureID>9</featureID><name>1001</name><authName>a1001</authName>
      <authPassword>s3cret</authPassword></line></sipLines></sipProfile></device>"""
)


@pytest.fixture(scope="module")
def identity() -> PhoneIdentity:
    mic = certs.issue_mic(certs.make_lab_ca(), model="8841", mac=MAC)
    return PhoneIdentity(mac=MAC, model="8841", mic_cert=mic.cert, mic_key=mic.key, code=CODE)


def run(
    seq: BootSequence,
    files: Callable[[str, int], bytes | None],
    voice: VoiceActivated | None = None,
) -> tuple[BootResult, list[object]]:
    actions: list[object] = []
    counts: dict[str, int] = {}
    step = seq.start()
    while not isinstance(step, BootResult):
        actions.append(step)
        if isinstance(step, Fetch):
            counts[step.name] = counts.get(step.name, 0) + 1
            step = seq.feed(Fetched(step.name, files(step.name, counts[step.name]), "http",
                                    "192.0.2.10:6970"))  # fmt: skip
        elif isinstance(step, CallActivation):
            assert voice is not None, "unexpected call"
            step = seq.feed(voice)
        elif isinstance(step, Sleep):
            step = seq.feed(Slept())
        elif isinstance(step, Register):
            step = seq.feed(Registered(True, 200, "REGISTER: 1001=200"))
        else:
            raise AssertionError(step)
    return step, actions


def served(resync_after: int = 1) -> Callable[[str, int], bytes | None]:
    """The bootstrap config until the call; then the real one (after ``resync_after`` asks)."""

    def files(name: str, count: int) -> bytes | None:
        if name == f"SEP{MAC}.cnf.xml":
            return BOOTSTRAP if count <= resync_after else REAL
        return HOTLINE if name == "ivr-hotline.xml" else None

    return files


def test_the_hotline_is_called_then_the_real_config_registers(identity: PhoneIdentity) -> None:
    seq = BootSequence(identity, BootOptions(ivr=True, config_retry_delay=0))
    result, actions = run(seq, served(2), VoiceActivated(True, "called 2288: ok"))
    assert result.outcome is Outcome.ONBOARDED, result.steps
    calls = [a for a in actions if isinstance(a, CallActivation)]
    assert [c.number for c in calls] == ["2288"]
    assert [ln.auth_name for ln in calls[0].config.lines] == ["bootstrap-00aabbccddee"]
    registered = [a for a in actions if isinstance(a, Register)]
    assert [ln.name for ln in registered[0].config.lines] == ["1001"]
    assert "activated by voice" in result.reason
    assert any("still the bootstrap config" in s for s in result.steps)


def test_without_ivr_the_bootstrap_line_is_registered_as_is(identity: PhoneIdentity) -> None:
    result, actions = run(BootSequence(identity, BootOptions()), served())
    assert result.outcome is Outcome.ONBOARDED
    assert not [a for a in actions if isinstance(a, CallActivation)]


def test_a_failed_call_is_a_rejection(identity: PhoneIdentity) -> None:
    seq = BootSequence(identity, BootOptions(ivr=True))
    result, _ = run(seq, served(), VoiceActivated(False, "keyed 17 keys; the IVR never hung up"))
    assert result.outcome is Outcome.REJECTED and "never hung up" in result.reason


def test_no_code_no_hotline_and_no_resync_end_the_boot(identity: PhoneIdentity) -> None:
    no_code = PhoneIdentity(mac=MAC, model="8841", mic_cert=identity.mic_cert,
                            mic_key=identity.mic_key)  # fmt: skip
    result, _ = run(BootSequence(no_code, BootOptions(ivr=True)), served())
    assert result.outcome is Outcome.CODE_REQUIRED

    def no_hotline(name: str, count: int) -> bytes | None:
        return BOOTSTRAP if name.startswith("SEP") else None

    result, _ = run(BootSequence(identity, BootOptions(ivr=True)), no_hotline)
    assert result.outcome is Outcome.NOT_PROVISIONED and "no hotline" in result.reason
    seq = BootSequence(identity, BootOptions(ivr=True, config_retries=2, config_retry_delay=0))
    result, _ = run(seq, served(99), VoiceActivated(True, "ok"))
    assert result.outcome is Outcome.NOT_PROVISIONED and "stayed the bootstrap" in result.reason
