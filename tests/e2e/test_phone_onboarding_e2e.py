"""``callboard phone boot`` against a real ``callboard serve``: every onboarding path, end to end.

Each test starts the daemon (loopback, port 0) with a lab manufacturing CA as its trust store,
provisions phones with the admin CLI and runs the phone CLI as a subprocess.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from callboard.daemon import certs
from e2e.phone_e2e_support import boot, device, http_get, mic_files
from support.harness import Daemon

BAT_MAC = "00AABBCC0101"


@pytest.fixture
def served(daemon_factory: Any, lab: certs.LabCA, lab_dir: Path) -> Daemon:
    d: Daemon = daemon_factory("--manufacturing-trust", str(lab_dir))
    return d


def add_bat(daemon: Daemon, model: str = "8841", dn: str = "2001") -> tuple[str, str]:
    dev = daemon.json("device", "add", "--model", model, "--line", f"{dn}:Desk {dn}",
                      "--password", "pw-" + dn)  # fmt: skip
    assert dev["name"].startswith("BAT"), dev
    code = daemon.json("code", "show", dev["name"])["code"]
    return dev["name"], code


def test_bat_record_code_and_mic_onboard_over_http(
    served: Daemon, lab: certs.LabCA, tmp_path: Path
) -> None:
    bat, code = add_bat(served)
    assert http_get(served, f"SEP{BAT_MAC}.cnf.xml") == 404
    mic = mic_files(lab, tmp_path / "mics", model="8841", mac=BAT_MAC)

    result = boot(served, mic, model="8841", mac=BAT_MAC, extra=("--code", code))

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "[http] ITLSEP" in out and "signature ok, TVS pinned" in out
    assert "requires an activation code" in out and "status 0 activated" in out
    assert '[config] line 1: 2001 "Desk 2001"' in out
    assert "[tftp]" not in out  # HTTP answered, so TFTP was never needed
    assert code not in out + result.stderr and code.replace("-", "") not in out
    dev = device(served, f"SEP{BAT_MAC}")
    assert dev is not None and dev["state"] == "active"
    assert device(served, bat) is None
    assert served.json("code", "show", f"SEP{BAT_MAC}")["state"] == "used"
    assert http_get(served, f"SEP{BAT_MAC}.cnf.xml") == 200
    # The last step: REGISTER the line the config named, with its digest credentials.
    assert "[sip] REGISTER to tcp:127.0.0.1:" in out and "2001=200" in out
    shown = served.json("device", "show", f"SEP{BAT_MAC}")
    assert shown["registrations"], shown


def test_bat_onboarding_over_tftp_only(served: Daemon, lab: certs.LabCA, tmp_path: Path) -> None:
    mac = "00AABBCC0102"
    _bat, code = add_bat(served, dn="2002")
    mic = mic_files(lab, tmp_path / "mics", model="8841", mac=mac)

    result = boot(served, mic, model="8841", mac=mac, extra=("--code", code, "--transport", "tftp"))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "[http]" not in result.stdout
    assert f"[tftp] ITLSEP{mac}.tlv" in result.stdout
    assert f"[tftp] SEP{mac}.cnf.xml" in result.stdout
    dev = device(served, f"SEP{mac}")
    assert dev is not None and dev["state"] == "active"


def test_sep_record_code_bound_to_the_mac(served: Daemon, lab: certs.LabCA, tmp_path: Path) -> None:
    mac = "00AABBCC0103"
    dev = served.json("device", "add", "--model", "8851", "--mac", mac, "--line", "2003")
    assert dev["name"] == f"SEP{mac}" and dev["state"] == "awaiting-activation"
    code = served.json("code", "show", f"SEP{mac}")["code"]
    assert http_get(served, f"SEP{mac}.cnf.xml") == 404
    mic = mic_files(lab, tmp_path / "mics", model="8851", mac=mac)

    result = boot(served, mic, model="8851", mac=mac, extra=("--code", code))

    assert result.returncode == 0, result.stdout + result.stderr
    assert served.json("code", "show", f"SEP{mac}")["state"] == "used"
    assert device(served, f"SEP{mac}")["state"] == "active"  # type: ignore[index]


def test_autoregistration_model_onboards_without_a_code(
    served: Daemon, lab: certs.LabCA, tmp_path: Path
) -> None:
    mac = "00AABBCC0104"
    served.json("defaults", "set", "7821", "--onboarding", "autoregistration")
    served.json("device", "add", "--model", "7821", "--mac", mac, "--line", "2004")
    mic = mic_files(lab, tmp_path / "mics", model="7821", mac=mac)

    result = boot(served, mic, model="7821", mac=mac)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "[tvs]" not in result.stdout
    assert "code" not in result.stdout.lower()


def test_model_needing_a_code_without_one_exits_nonzero(
    served: Daemon, lab: certs.LabCA, tmp_path: Path
) -> None:
    bat, _code = add_bat(served)
    mic = mic_files(lab, tmp_path / "mics", model="8841", mac=BAT_MAC)

    result = boot(served, mic, model="8841", mac=BAT_MAC)

    assert result.returncode == 3
    assert "activation code required" in result.stderr
    assert device(served, bat) is not None


def test_wrong_code_is_refused_and_the_device_stays_bat(
    served: Daemon, lab: certs.LabCA, tmp_path: Path
) -> None:
    bat, code = add_bat(served)
    digits = code.replace("-", "")
    wrong = digits[:-1] + str((int(digits[-1]) + 1) % 10)
    mic = mic_files(lab, tmp_path / "mics", model="8841", mac=BAT_MAC)

    result = boot(served, mic, model="8841", mac=BAT_MAC, extra=("--code", wrong))

    assert result.returncode == 4, result.stdout + result.stderr
    assert "status 1 rejected" in result.stderr
    assert "activation code not accepted" in result.stderr
    assert wrong not in result.stdout + result.stderr
    assert device(served, bat) is not None
    assert device(served, f"SEP{BAT_MAC}") is None
    assert served.json("code", "show", bat)["state"] == "issued"


def test_mic_from_an_untrusted_ca_is_refused_with_the_certificate_reason(
    served: Daemon, tmp_path: Path
) -> None:
    bat, code = add_bat(served)
    rogue = certs.make_lab_ca(root_cn="Rogue Root", ca_cn="Rogue CA")
    mic = mic_files(rogue, tmp_path / "rogue", model="8841", mac=BAT_MAC)

    result = boot(served, mic, model="8841", mac=BAT_MAC, extra=("--code", code))

    assert result.returncode == 5, result.stdout + result.stderr
    assert "status 2 certificate not accepted" in result.stderr
    assert "certificate not accepted:" in result.stderr
    assert device(served, bat) is not None
    assert served.json("code", "show", bat)["state"] == "issued"


def test_servers_are_tried_in_option_150_order(
    served: Daemon, lab: certs.LabCA, tmp_path: Path
) -> None:
    """127.0.0.2 answers nothing (the daemon listens on 127.0.0.1 only); the second one wins."""
    mac = "00AABBCC0105"
    served.json("device", "add", "--model", "8841", "--mac", mac, "--no-require-activation")
    mic = mic_files(lab, tmp_path / "mics", model="8841", mac=mac)

    result = boot(
        served, mic, model="8841", mac=mac, server="127.0.0.2,127.0.0.1",
        extra=("--timeout", "1", "--transport", "http"),
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"provisioning server 127.0.0.1:{served.port('http')} answers over http" in result.stdout


def test_unreachable_server_exits_nonzero(lab: certs.LabCA, tmp_path: Path) -> None:
    mic = mic_files(lab, tmp_path / "mics", model="8841", mac=BAT_MAC)
    nobody = Daemon(tmp_path / "none")
    nobody.status = {"http": ["127.0.0.1:9"], "tftp": ["127.0.0.1:9"]}

    result = boot(nobody, mic, model="8841", mac=BAT_MAC, extra=("--timeout", "0.5"))

    assert result.returncode == 7, result.stdout + result.stderr
    assert "no provisioning server answered" in result.stderr
    assert "http 127.0.0.1:9" in result.stderr and "tftp 127.0.0.1:9" in result.stderr
