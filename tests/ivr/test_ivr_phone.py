"""``callboard phone boot --ivr`` and ``phone storm --ivr``: the emulated phone activates by
voice against a real daemon (issue 14), and the IVR's RTP stream as the phone received it
is paced (20 ms) and in sequence.

The phone fetches its config (the bootstrap one), reads the hotline from the dial template,
registers the bootstrap account, calls the number, keys the code as RFC 4733 events, hears
the confirmation, answers the BYE and the NOTIFY check-sync, fetches its config again (the
real one) and registers its real line.
"""

from __future__ import annotations

import itertools
import re
import statistics
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from callboard.phone.boot import BootOptions, Outcome, PhoneIdentity
from callboard.phone.driver import boot_phone
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from e2e.phone_e2e_support import boot, make_lab, mic_files
from support.harness import Daemon, run_cli
from twisted.internet import reactor

MAC = "00AABB112233"
# The daemons here serve no HTTPS 6971; a phone would try the default port, where another
# program on this machine may listen.
NO_HTTPS = ("--https-port", "0")


def _served(daemon_factory: Any, *extra: str) -> Daemon:
    served: Daemon = daemon_factory("--set", "ivr.answer_delay=0.2", *extra)
    assert served.cli("defaults", "set", "8841", "--onboarding", "ivr").returncode == 0
    return served


def _add(served: Daemon, mac: str = MAC) -> str:
    dev = served.json("device", "add", "--model", "8841", "--mac", mac, "--line", "3001:Desk",
                      "--password", "pw-3001")  # fmt: skip
    code: str = served.json("code", "show", dev["name"])["code"]
    return code


def test_phone_boot_ivr_activates_by_voice_and_registers_its_real_line(
    daemon_factory: Any, tmp_path: Path
) -> None:
    served = _served(daemon_factory)
    code = _add(served)
    lab = make_lab(tmp_path / "lab")
    mic = mic_files(lab, tmp_path / "mic", model="8841", mac=MAC)
    shown = served.cli("device", "show", f"SEP{MAC}").stdout
    assert "onboarding:          ivr (model default)" in shown
    assert "bootstrap:           waiting for the activation call (bootstrap-00aabb112233, " \
        "not registered)" in shown  # fmt: skip
    result = boot(served, mic, model="8841", mac=MAC, extra=("--ivr", "--code", code, *NO_HTTPS))
    out = result.stdout
    assert result.returncode == 0, out + result.stderr + served.log()[-3000:]
    assert "bootstrap config" in out and "the hotline dials activate" in out
    # The daemon's ITL names a TFTP-role certificate: the hotline comes signed, and checked.
    assert re.search(r"ivr-hotline\.xml\.sgn: \d+ bytes, signature ok", out), out
    assert "keys sent as RFC 4733 events" in out and "NOTIFY check-sync" in out
    assert "onboarded (activated by voice and configured, 1 line(s))" in out
    assert "REGISTER to tcp:" in out and "3001=200" in out
    device = served.json("device", "show", f"SEP{MAC}")
    assert device["state"] == "active"
    assert [r["aor"] for r in device["registrations"]] == ["sip:3001@127.0.0.1"]
    assert device["bootstrap"] == "used: activated by voice"
    assert device["onboarding"] == "ivr" and device["onboarding_source"] == "model default"
    assert code.replace("-", "") not in served.log() and code.replace("-", "") not in out


def test_a_wrong_code_keyed_by_the_phone_is_refused(daemon_factory: Any, tmp_path: Path) -> None:
    """The IVR says no, asks again, hears nothing and hangs up: no NOTIFY, exit 4."""
    served = _served(daemon_factory, "--set", "ivr.first_digit_timeout=1")
    code = _add(served).replace("-", "")
    wrong = "".join(str((int(c) + 1) % 10) for c in code)
    lab = make_lab(tmp_path / "lab")
    mic = mic_files(lab, tmp_path / "mic", model="8841", mac=MAC)
    result = boot(served, mic, model="8841", mac=MAC, extra=("--ivr", "--code", wrong, *NO_HTTPS))
    assert result.returncode == Outcome.REJECTED.value, result.stdout + result.stderr
    assert "without telling the phone to resync" in result.stdout
    assert served.json("device", "show", f"SEP{MAC}")["state"] == "awaiting-activation"
    assert served.json("code", "show", f"SEP{MAC}")["state"] == "issued"
    assert '"outcome": "rejected"' in served.log() and wrong not in served.log()


@pytest_twisted.ensureDeferred
async def test_the_ivr_stream_the_phone_hears_is_paced_and_in_sequence(
    daemon_factory: Any, tmp_path: Path
) -> None:
    served = _served(daemon_factory)
    code = _add(served)
    lab = make_lab(tmp_path / "lab")
    cert_path, key_path = mic_files(lab, tmp_path / "mic", model="8841", mac=MAC)
    key: Any = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    identity = PhoneIdentity(mac=MAC, model="8841", code=code, mic_key=key, mic_cert=cert)
    options = BootOptions(transport="http", http_port=served.port("http"), https_port=0,
                          timeout=5, ivr=True)  # fmt: skip
    result = await boot_phone(reactor, identity, ["127.0.0.1"], options)
    assert result.outcome is Outcome.ONBOARDED, result.steps
    call = result.voice
    assert call is not None and call.bye and "check-sync" in call.notify_events
    heard = call.heard
    assert len(heard) > 100  # seconds of prompts at 50 packets a second
    seqs = [(h.sequence - heard[0].sequence) % 65536 for h in heard]
    assert seqs == list(range(len(heard)))  # loopback: none lost, none reordered
    stamps = [(h.timestamp - heard[0].timestamp) % 2**32 for h in heard]
    assert stamps == [160 * i for i in range(len(heard))]
    gaps = [b.at - a.at for a, b in itertools.pairwise(heard)]
    assert 0.018 < statistics.mean(gaps) < 0.022, statistics.mean(gaps)
    assert statistics.median(gaps) == pytest.approx(0.020, abs=0.006)
    assert max(gaps) < 1.0  # no stall (a loaded machine may delay a packet or two)
    # The confirmation: speech after the code was keyed, before the BYE.
    assert call.speech_after_code > 1.0, call.speech_after_code


def test_storm_ivr_onboards_ten_phones_by_voice(daemon_factory: Any, tmp_path: Path) -> None:
    lab_dir = tmp_path / "lab"
    make_lab(lab_dir)
    served = _served(daemon_factory, "--set", "ivr.unknown_phones=true")
    result = run_cli(
        "phone", "storm", "--provision", "--count", "10", "--model", "8841",
        "--lab-ca", str(lab_dir), "--server", "127.0.0.1", "--admin-socket", str(served.socket),
        "--http-port", str(served.port("http")), "--tftp-port", str(served.port("tftp")),
        "--transport", "http", "--mic-cache", str(tmp_path / "mics"), "--timeout", "10",
        "--concurrency", "10", "--ivr", *NO_HTTPS,
        timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr + served.log()[-3000:]
    assert "10/10 phones onboarded" in result.stdout
    assert "IVR call" in result.stdout  # the per-step times name the call
    devices = served.json("device", "list")
    assert sum(1 for d in devices if d["state"] == "active") == 10
    assert not [d for d in devices if d["name"].startswith("BAT")]
    assert served.log().count('"outcome": "activated"') == 10
