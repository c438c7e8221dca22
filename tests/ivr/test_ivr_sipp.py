"""Activation by voice end to end: a real daemon, sipp as the phone (issue 14).

The phone fetches its SEP<MAC>.cnf.xml over HTTP (the bootstrap config with its own
account), registers that account (digest), calls the activation number and keys the code as
RFC 4733 events (``play_pcap_audio`` of Debian's dtmf_2833_N.pcap, one pcap per digit) or
as SIP INFO. Scenarios are written per test: sipp does not expand keys inside
``[authentication]``, and the digits are the code's.
"""

# ruff: noqa: E501 - SIP messages and sipp XML lines are as long as they are
from __future__ import annotations

import re
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.harness import Daemon

SIPP = "/usr/bin/sipp"
PCAPS = Path("/usr/share/sip-tester")
PCAP_NAMES = {**{str(d): f"dtmf_2833_{d}.pcap" for d in range(10)}, "*": "dtmf_2833_star.pcap",
              "#": "dtmf_2833_pound.pcap"}  # fmt: skip
MAC = "00AABB112233"
MODEL_ID = "36670"  # 8841 (protocols.models)


@pytest.fixture(autouse=True)
def _sipp_and_its_pcaps() -> None:
    """A missing peer is a failure, never a skip: .ci/run installs Debian's sip-tester."""
    assert Path(SIPP).exists() and (PCAPS / "dtmf_2833_1.pcap").exists(), (
        "sip-tester (sipp and its dtmf_2833_N.pcap files) is not installed"
    )


HEAD = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="ivr">
"""

REGISTER = """
  <send retrans="500"><![CDATA[
      REGISTER sip:[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      From: <sip:{user}@[remote_ip]>;tag=[pid]reg{n}
      To: <sip:{user}@[remote_ip]>
      Call-ID: [call_id]
      CSeq: {cseq} REGISTER
      Max-Forwards: 70
      User-Agent: {agent}
      Contact: <sip:{user}@[local_ip]:[local_port];transport=[transport]>;+sip.instance="<urn:uuid:00000000-0000-0000-0000-{mac}>";+u.sip!model.ccm.cisco.com="{model_id}"
{auth}      Expires: 3600
      Content-Length: 0

  ]]></send>
"""

INVITE = """
  <send retrans="500"><![CDATA[
      INVITE sip:{number}@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      From: <sip:{user}@[remote_ip]>;tag=[pid]call[call_number]
      To: <sip:{number}@[remote_ip]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Max-Forwards: 70
      User-Agent: {agent}
      Contact: <sip:{user}@[local_ip]:[local_port];transport=[transport]>
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=phone 1 1 IN IP[local_ip_type] [media_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP {formats}
      a=rtpmap:0 PCMU/8000
      a=rtpmap:8 PCMA/8000
      a=rtpmap:101 telephone-event/8000
      a=fmtp:101 0-15
      a=ptime:20

  ]]></send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="{invite_answer}" rtd="true"/>
  <send><![CDATA[
      ACK sip:{number}@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      From: <sip:{user}@[remote_ip]>;tag=[pid]call[call_number]
      [last_To:]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Max-Forwards: 70
      Content-Length: 0

  ]]></send>
"""

INFO = """
  <send retrans="500"><![CDATA[
      INFO sip:{number}@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      From: <sip:{user}@[remote_ip]>;tag=[pid]call[call_number]
      [last_To:]
      Call-ID: [call_id]
      CSeq: {cseq} INFO
      Max-Forwards: 70
      Content-Type: application/dtmf-relay
      Content-Length: [len]

      Signal={digit}
      Duration=160
  ]]></send>
  <recv response="200"/>
"""

PCAP = """
  <nop><action><exec play_pcap_audio="{pcap}"/></action></nop>
  <pause milliseconds="320"/>
"""

BYE_IN = """
  <recv request="BYE" timeout="{timeout}"/>
  <send><![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

  ]]></send>
"""

BYE_OUT = """
  <send retrans="500"><![CDATA[
      BYE sip:{number}@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      From: <sip:{user}@[remote_ip]>;tag=[pid]call[call_number]
      [last_To:]
      Call-ID: [call_id]
      CSeq: 99 BYE
      Max-Forwards: 70
      Content-Length: 0

  ]]></send>
  <recv response="200"/>
"""

NOTIFY_IN = """
  <recv request="NOTIFY" timeout="5000">
    <action><ereg regexp="{event}" search_in="hdr" header="Event:" check_it="true" assign_to="ev{n}"/></action>
  </recv>
  <send><![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

  ]]></send>
  <Reference variables="ev{n}"/>
"""


class Phone:
    """What the test knows about the phone: its bootstrap account, from its config."""

    def __init__(self, daemon: Daemon, mac: str = MAC) -> None:
        self.daemon = daemon
        self.mac = mac
        self.user = ""
        self.password = ""

    def fetch_config(self) -> str:
        url = f"http://127.0.0.1:{self.daemon.port('http')}/SEP{self.mac}.cnf.xml"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text: str = resp.read().decode()
        return text

    def learn_account(self) -> None:
        config = self.fetch_config()
        assert "<featureLabel>Activate</featureLabel>" in config
        self.user = re.findall(r"<authName>(.*?)</authName>", config)[0]
        self.password = re.findall(r"<authPassword>(.*?)</authPassword>", config)[0]
        assert self.user == f"bootstrap-{self.mac.lower()}" and len(self.password) >= 16

    def register(self, n: int, *, expect: int = 200, agent: str = "Cisco-CP8841/sipp") -> str:
        fill = {"user": self.user, "mac": self.mac.lower(), "model_id": MODEL_ID, "agent": agent,
                "n": n}  # fmt: skip
        auth = f"      [authentication username={self.user} password={self.password}]\n"
        steps = REGISTER.format(cseq=1, auth="", **fill)
        steps += '  <recv response="401" auth="true"/>\n'
        steps += REGISTER.format(cseq=2, auth=auth, **fill)
        steps += f'  <recv response="{expect}"/>\n'
        return steps

    def call(self, *, number: str = "activate", formats: str = "0 8 101", answer: int = 200,
             agent: str = "Cisco-CP8841/sipp") -> str:  # fmt: skip
        return INVITE.format(user=self.user, number=number, formats=formats,
                             invite_answer=answer, agent=agent)  # fmt: skip


def keyed(digits: str) -> str:
    return "".join(PCAP.format(pcap=PCAPS / PCAP_NAMES[d]) for d in digits)


def info(digits: str, number: str, user: str, first_cseq: int = 2) -> str:
    return "".join(
        INFO.format(number=number, user=user, cseq=first_cseq + i, digit=d)
        for i, d in enumerate(digits)
    )


def run_sipp(daemon: Daemon, body: str, tmp_path: Path, name: str, timeout: float = 90) -> None:
    scenario = tmp_path / f"{name}.xml"
    scenario.write_text(HEAD + body + "</scenario>\n")
    media = _free_udp_port()
    args = [SIPP, f"127.0.0.1:{daemon.port('sip')}", "-sf", str(scenario), "-m", "1",
            "-i", "127.0.0.1", "-p", "0", "-mi", "127.0.0.1", "-mp", str(media),
            "-t", "u1", "-timeout", f"{int(timeout)}s", "-timeout_error", "-nostdin",
            "-trace_err", "-error_file", str(tmp_path / f"{name}.err")]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout + 30,
                            cwd=tmp_path, check=False)  # fmt: skip
    errors = (tmp_path / f"{name}.err").read_text() if (tmp_path / f"{name}.err").exists() else ""
    assert result.returncode == 0, (result.stdout[-3000:], errors[-3000:], daemon.log()[-4000:])


def _free_udp_port() -> int:
    # sipp uses the media port and the next ones (RTP echo, video): keep to even ports.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port - port % 2


@pytest.fixture
def served(daemon_factory: Any) -> Daemon:
    d: Daemon = daemon_factory("--set", "ivr.answer_delay=0.2", "--set",
                               "ivr.inter_digit_timeout=4")  # fmt: skip
    assert d.cli("defaults", "set", "8841", "--onboarding", "ivr").returncode == 0
    return d


def add_sep(daemon: Daemon, mac: str = MAC) -> str:
    dev = daemon.json("device", "add", "--model", "8841", "--mac", mac, "--line", "3001:Desk",
                      "--password", "pw-3001")  # fmt: skip
    assert dev["name"] == f"SEP{mac}" and dev["state"] == "awaiting-activation", dev
    code: str = daemon.json("code", "show", dev["name"])["code"]
    return code.replace("-", "")


def test_rfc4733_digits_activate_and_the_phone_is_told_to_resync(
    served: Daemon, tmp_path: Path
) -> None:
    code = add_sep(served)
    phone = Phone(served)
    phone.learn_account()
    body = phone.register(1) + phone.call()
    body += '  <pause milliseconds="600"/>\n' + keyed(code + "#")
    body += BYE_IN.format(timeout=15000)
    body += NOTIFY_IN.format(event="check-sync", n=1)
    body += NOTIFY_IN.format(event="service-control", n=2)
    # The bootstrap account is gone: registering it again is refused.
    body += REGISTER.format(cseq=3, auth="", user=phone.user, mac=MAC.lower(),
                            model_id=MODEL_ID, agent="Cisco-CP8841/sipp", n=9)  # fmt: skip
    body += '  <recv response="403"/>\n'
    run_sipp(served, body, tmp_path, "rfc4733")
    device = served.json("device", "show", f"SEP{MAC}")
    assert device["state"] == "active"
    assert served.json("code", "show", f"SEP{MAC}")["state"] == "used"
    config = phone.fetch_config()
    assert "<name>3001</name>" in config and "Activate" not in config
    log = served.log()
    assert code not in log and "activation by voice" in log and '"digits": 16' in log


def test_sip_info_digits_activate(served: Daemon, tmp_path: Path) -> None:
    code = add_sep(served)
    phone = Phone(served)
    phone.learn_account()
    body = phone.register(1) + phone.call(agent="Generic/1.0")
    body += info("12*" + code + "#", "activate", phone.user)
    body += BYE_IN.format(timeout=15000) + NOTIFY_IN.format(event="check-sync", n=1)
    run_sipp(served, body, tmp_path, "info")
    assert served.json("device", "show", f"SEP{MAC}")["state"] == "active"


def test_wrong_codes_until_the_budget_is_spent(served: Daemon, tmp_path: Path) -> None:
    code = add_sep(served)
    wrong = "".join(str((int(c) + 1) % 10) for c in code)
    phone = Phone(served)
    phone.learn_account()
    body = phone.register(1) + phone.call()
    # The TVS budget (5 by default): five wrong codes lock the device; the call ends.
    body += info((wrong + "#") * 5, "activate", phone.user)
    body += BYE_IN.format(timeout=30000)
    run_sipp(served, body, tmp_path, "budget")
    assert served.json("device", "show", f"SEP{MAC}")["state"] == "awaiting-activation"
    assert served.json("code", "show", f"SEP{MAC}")["state"] == "issued"
    log = served.log()
    assert log.count("activation by voice") >= 5 and "locked" in log
    assert wrong not in log and code not in log


def test_hang_up_mid_code_activates_nothing(served: Daemon, tmp_path: Path) -> None:
    code = add_sep(served)
    phone = Phone(served)
    phone.learn_account()
    body = phone.register(1) + phone.call()
    # A flood of digits first: kept up to a bound, then one refusal; nothing activated.
    body += info("7" * 60 + "#", "activate", phone.user, first_cseq=100)
    body += info(code[:7], "activate", phone.user) + BYE_OUT.format(number="activate",
                                                                    user=phone.user)  # fmt: skip
    run_sipp(served, body, tmp_path, "hangup")
    assert served.json("device", "show", f"SEP{MAC}")["state"] == "awaiting-activation"
    log = served.log()
    assert "abandoned" in log and '"digits": 7' in log and '"digits": 24' in log


def test_used_code_and_other_numbers_are_refused(served: Daemon, tmp_path: Path) -> None:
    add_sep(served)
    phone = Phone(served)
    phone.learn_account()
    # Any number but the activation number: 403.
    run_sipp(served, phone.register(1) + phone.call(number="911", answer=403), tmp_path, "other")
    # No common codec: 488.
    run_sipp(served, phone.register(2) + phone.call(formats="18 101", answer=488), tmp_path,
             "nocodec")  # fmt: skip


def test_unknown_phone_gets_file_not_found_by_default(served: Daemon) -> None:
    phone = Phone(served, mac="00AABB999999")
    with pytest.raises(urllib.error.HTTPError) as err:
        phone.fetch_config()
    assert err.value.code == 404


def test_unknown_phone_claims_a_bat_record_with_the_model_from_its_register(
    daemon_factory: Any, tmp_path: Path
) -> None:
    served: Daemon = daemon_factory("--set", "ivr.unknown_phones=true", "--set",
                                    "ivr.answer_delay=0.2")  # fmt: skip
    assert served.cli("defaults", "set", "8841", "--onboarding", "ivr").returncode == 0
    bat = served.json("device", "add", "--model", "8841", "--line", "4001:Desk")
    assert bat["name"].startswith("BAT")
    code = served.json("code", "show", bat["name"])["code"].replace("-", "")
    phone = Phone(served, mac="00AABB445566")
    phone.learn_account()
    body = phone.register(1) + phone.call() + info(code + "#", "activate", phone.user)
    body += BYE_IN.format(timeout=15000)
    run_sipp(served, body, tmp_path, "bat")
    device = served.json("device", "show", "SEP00AABB445566")
    assert device["state"] == "active" and device["model"] == "8841"


def test_a_device_s_own_onboarding_beats_its_model_default(
    daemon_factory: Any, tmp_path: Path
) -> None:
    served: Daemon = daemon_factory()  # every model's default: activation-code (TVS)
    dev = served.json("device", "add", "--model", "8841", "--mac", MAC, "--line", "3001:Desk",
                      "--onboarding", "ivr")  # fmt: skip
    assert dev["state"] == "awaiting-activation"
    Phone(served).learn_account()  # the bootstrap config, though 8841 activates through TVS
    plain = served.json("device", "add", "--model", "8841", "--mac", "00AABB112244")
    assert plain["state"] == "awaiting-activation"
    with pytest.raises(urllib.error.HTTPError) as err:
        Phone(served, mac="00AABB112244").fetch_config()
    assert err.value.code == 404
    # The CSV column: ivr, blank (the model's) and a bad value refused with its line.
    sheet = tmp_path / "phones.csv"
    sheet.write_text("mac,model,directory_number,onboarding\n"
                     "00AABB112255,8841,3005,ivr\n00AABB112266,8841,3006,\n")  # fmt: skip
    assert served.cli("import", str(sheet)).returncode == 0
    Phone(served, mac="00AABB112255").learn_account()
    with pytest.raises(urllib.error.HTTPError):
        Phone(served, mac="00AABB112266").fetch_config()
    bad = tmp_path / "bad.csv"
    bad.write_text("mac,model,onboarding\n00AABB112277,8841,voice\n")
    result = served.cli("import", str(bad))
    assert result.returncode != 0 and "line 2:" in result.stderr and "onboarding" in result.stderr


def test_an_expired_code_is_not_accepted(daemon_factory: Any, tmp_path: Path) -> None:
    # The shortest lifetime the settings allow (0.01 h = 36 s): the call starts while the code
    # is live and the code is keyed once it has expired.
    served: Daemon = daemon_factory("--set", "ivr.answer_delay=0.2", "--set",
                                    "registry.code_ttl_hours=0.01", "--set",
                                    "ivr.first_digit_timeout=90")  # fmt: skip
    assert served.cli("defaults", "set", "8841", "--onboarding", "ivr").returncode == 0
    code = add_sep(served)
    phone = Phone(served)
    phone.learn_account()
    body = phone.register(1) + phone.call() + '  <pause milliseconds="38000"/>\n'
    body += info(code + "#", "activate", phone.user)
    body += '  <pause milliseconds="500"/>\n' + BYE_OUT.format(number="activate", user=phone.user)
    run_sipp(served, body, tmp_path, "expired")
    assert served.json("device", "show", f"SEP{MAC}")["state"] == "awaiting-activation"
    assert served.json("code", "show", f"SEP{MAC}")["state"] == "expired"
    log = served.log()
    assert '"outcome": "rejected"' in log and '"outcome": "activated"' not in log
    assert code not in log


def test_a_used_code_is_not_accepted(served: Daemon, tmp_path: Path) -> None:
    code = add_sep(served)
    first = Phone(served)
    first.learn_account()
    body = first.register(1) + first.call() + info(code + "#", "activate", first.user)
    body += BYE_IN.format(timeout=15000) + NOTIFY_IN.format(event="check-sync", n=1)
    run_sipp(served, body, tmp_path, "first")
    assert served.json("code", "show", f"SEP{MAC}")["state"] == "used"
    # A second phone waiting for its own code keys the first phone's (used) one.
    add_sep(served, mac="00AABB112299")
    second = Phone(served, mac="00AABB112299")
    second.learn_account()
    body = second.register(1) + second.call() + info(code + "#", "activate", second.user)
    body += '  <pause milliseconds="500"/>\n' + BYE_OUT.format(number="activate", user=second.user)
    run_sipp(served, body, tmp_path, "used")
    assert served.json("device", "show", "SEP00AABB112299")["state"] == "awaiting-activation"
    assert served.json("code", "show", "SEP00AABB112299")["state"] == "issued"
    log = served.log()
    # A used code is no longer looked up (the registry answers as TVS does).
    assert '"outcome": "rejected", "reason": "unknown activation code"' in log
    assert log.count('"outcome": "activated"') == 1
    assert code not in log


def test_require_mic_wants_a_trusted_certificate_naming_the_mac(
    daemon_factory: Any, tmp_path: Path
) -> None:
    from callboard.daemon import certs
    from support.edge import sip_register

    lab, rogue = certs.make_lab_ca(), certs.make_lab_ca()
    certs.write_lab_ca(tmp_path / "trust", lab)
    good = certs.write_mic(tmp_path / "good", certs.issue_mic(lab, model="8841", mac=MAC))
    other = certs.write_mic(tmp_path / "other",
                            certs.issue_mic(lab, model="8841", mac="00AABB112200"))  # fmt: skip
    untrusted = certs.write_mic(tmp_path / "rogue", certs.issue_mic(rogue, model="8841", mac=MAC))
    served: Daemon = daemon_factory("--manufacturing-trust", str(tmp_path / "trust"),
                                    "--set", "ivr.require_mic=true")  # fmt: skip
    assert served.cli("defaults", "set", "8841", "--onboarding", "ivr").returncode == 0
    add_sep(served)
    phone = Phone(served)
    phone.learn_account()
    port = served.port("sip-tls")
    assert sip_register(port, untrusted, aor=phone.user)[0] == 403
    assert sip_register(port, other, aor=phone.user)[0] == 403
    assert sip_register(port, None, aor=phone.user)[0] == 403
    # The MIC of this MAC, chaining to the trust store: on to the digest challenge.
    assert sip_register(port, good, aor=phone.user)[0] == 401
    log = served.log()
    assert "client certificate refused" in log and "not SEP00AABB112233" in log
