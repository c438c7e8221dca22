"""The edge in the real daemon: ``serve --edge-port --sip-oauth-port``, the admin CLI's
``--allow-remote``, ``device set``, ``revoke-tokens`` and blanking the MAC, curl and ssl as
the phone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from callboard.daemon import certs
from support.edge import activate, get_config, sip_register
from support.harness import run_cli

MAC_A, MAC_B, MAC_C = "00AABBCCEE01", "00AABBCCEE02", "00AABBCCEE03"


def test_remote_activation_through_the_daemon_and_its_cli(
    daemon_factory: Any, tmp_path: Path
) -> None:
    lab = certs.make_lab_ca()
    certs.write_lab_ca(tmp_path / "trust", lab)
    mic_a = certs.write_mic(tmp_path / "a", certs.issue_mic(lab, model="8841", mac=MAC_A))
    mic_b = certs.write_mic(tmp_path / "b", certs.issue_mic(lab, model="8841", mac=MAC_B))
    daemon = daemon_factory(
        "--manufacturing-trust", str(tmp_path / "trust"), "--edge-port", "0",
        "--sip-oauth-port", "0",
    )  # fmt: skip
    base = f"https://127.0.0.1:{daemon.port('edge')}"
    sip_port = daemon.port("sip-oauth")
    assert (daemon.state_dir / "certs" / "edge.pem").exists()
    assert (daemon.state_dir / "certs" / "edge-token.key").stat().st_mode & 0o077 == 0

    def new_device(*flags: str) -> tuple[str, str]:
        name = daemon.json("device", "add", "--model", "8841", "--line", "1000", *flags)["name"]
        return name, daemon.json("code", "show", name)["code"].replace("-", "")

    # Not allowed remotely: refused, and the code stays good for the LAN.
    name, code = new_device()
    assert daemon.json("device", "show", name)["allow_remote"] is False
    refused = activate(base, mic_a, code)
    assert (refused.status, refused.json()["error"]) == (400, "invalid_grant")
    assert daemon.cli("device", "set", name).returncode != 0  # nothing to set
    assert daemon.json("device", "set", name, "--allow-remote")["allow_remote"] is True

    answer = activate(base, mic_a, code)
    assert answer.status == 200, answer.body
    token = answer.json()["access_token"]
    sep_a = f"SEP{MAC_A}"
    assert get_config(base, f"{sep_a}.cnf.xml", mic_a, token).status == 200
    bearer = ("Authorization", f"Bearer {token}")
    assert sip_register(sip_port, mic_a, authorization=bearer)[0] == 200
    shown = daemon.json("device", "show", sep_a)
    assert [r["transport"] for r in shown["registrations"]] == ["tls"]

    revoked = daemon.json("device", "revoke-tokens", sep_a)
    assert revoked["token_generation"] == shown["token_generation"] + 1
    assert daemon.json("device", "show", sep_a)["registrations"] == []
    assert get_config(base, f"{sep_a}.cnf.xml", mic_a, token).status == 401
    assert sip_register(sip_port, mic_a, authorization=bearer)[0] == 401

    # Re-onboarding by blanking the MAC ends the tokens too.
    _, code_b = new_device("--allow-remote")
    token_b = activate(base, mic_b, code_b).json()["access_token"]
    sep_b = f"SEP{MAC_B}"
    assert get_config(base, f"{sep_b}.cnf.xml", mic_b, token_b).status == 200
    daemon.json("device", "set-mac", sep_b, "--blank")
    assert get_config(base, f"{sep_b}.cnf.xml", mic_b, token_b).status == 401

    # The emulated phone end to end: activation domain, config through the edge, SIP/TLS.
    mic_c = certs.write_mic(tmp_path / "c", certs.issue_mic(lab, model="8841", mac=MAC_C))
    _, code_c = new_device("--allow-remote")
    booted = run_cli(
        "phone", "boot", "--activation-domain", base, "--model", "8841", "--mac", MAC_C,
        "--mic", str(mic_c[0]), "--mic-key", str(mic_c[1]), "--code", code_c, "--timeout", "10",
        timeout=120,
    )  # fmt: skip
    assert booted.returncode == 0, booted.stdout + booted.stderr
    assert "REGISTER over TLS with the bearer token: 200" in booted.stdout
    shown_c = daemon.json("device", "show", f"SEP{MAC_C}")
    assert shown_c["state"] == "active"
    assert [r["transport"] for r in shown_c["registrations"]] == ["tls"]
    again = run_cli(
        "phone", "boot", "--activation-domain", base, "--model", "8841", "--mac", MAC_C,
        "--mic", str(mic_c[0]), "--mic-key", str(mic_c[1]), "--code", code_c, "--timeout", "10",
        timeout=120,
    )  # fmt: skip
    assert again.returncode == 4, again.stdout + again.stderr  # the code is used: rejected

    log = daemon.log()
    assert code not in log and code_b not in log and code_c not in log
    assert token not in log and token_b not in log
