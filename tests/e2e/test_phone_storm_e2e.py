"""``callboard phone storm``: bulk-imported BAT phones, exported codes, many phones at once."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from callboard.phone.boot import Activate, Fetch, Register, Sleep
from callboard.phone.storm import (
    PhoneRecord,
    StormReport,
    read_bat_codes,
    reason_class,
    sequential_macs,
    step_of,
)
from e2e.phone_e2e_support import make_lab
from support.harness import Daemon, run_cli


def test_storm_onboards_every_imported_bat_phone(daemon_factory: Any, tmp_path: Path) -> None:
    lab_dir = tmp_path / "lab"
    make_lab(lab_dir)
    served: Daemon = daemon_factory("--manufacturing-trust", str(lab_dir))
    rows = ["mac,model,description,user,directory_number,display_name,requires_activation"]
    rows += [f",8841,storm {i},,{4000 + i},Storm {i},true" for i in range(24)]
    rows += [",7821,other model,,4999,Other,true"]  # a code the 8841 storm must not take
    csv_in = tmp_path / "import.csv"
    csv_in.write_text("\n".join(rows) + "\n")
    assert served.json("import", str(csv_in), "--dummy-mac")["imported"] == 25
    codes_csv = tmp_path / "codes.csv"
    served.cli("codes", "export", str(codes_csv))
    assert len(read_bat_codes(codes_csv.read_text(), "8841")) == 24

    result = run_cli(
        "phone", "storm", "--server", "127.0.0.1",
        "--http-port", str(served.port("http")), "--tftp-port", str(served.port("tftp")),
        "--model", "8841", "--codes", str(codes_csv), "--lab-ca", str(lab_dir),
        "--first-mac", "0A00000000FE", "--concurrency", "8", "--timeout", "10",
        "--mic-cache", str(tmp_path / "mics"),
        timeout=120,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    assert "24/24 phones onboarded" in result.stdout and "0 failure(s)" in result.stdout
    devices = served.json("device", "list")
    active = sorted(d["name"] for d in devices if d["state"] == "active")
    assert active == [f"SEP{mac}" for mac in sequential_macs("0A00000000FE", 24)]
    assert [d["model"] for d in devices if d["name"].startswith("BAT")] == ["7821"]


def test_report_percentiles_and_rate() -> None:
    report = StormReport(
        phones=4, onboarded=3, elapsed=1.5, durations=(0.1, 0.2, 0.4), failures=(("SEPX", "no"),)
    )
    assert report.rate == 2.0
    assert report.percentile(50) == 0.2 and report.percentile(95) == 0.4
    assert "3/4 phones onboarded" in report.summary() and "1 failure(s)" in report.summary()
    assert sequential_macs("0000000000FF", 2) == ["0000000000FF", "000000000100"]


LAST_LINE = re.compile(
    r"^phones=(\d+) ok=(\d+) failed=(\d+) phones_per_s=[0-9.]+ "
    r"p50_ms=[0-9.]+ p95_ms=[0-9.]+ p99_ms=[0-9.]+$"
)


def _storm(served: Daemon, lab_dir: Path, mics: Path, *extra: str) -> Any:
    return run_cli(
        "phone", "storm", "--provision", "--model", "8841", "--lab-ca", str(lab_dir),
        "--server", "127.0.0.1", "--admin-socket", str(served.socket),
        "--http-port", str(served.port("http")), "--tftp-port", str(served.port("tftp")),
        "--mic-cache", str(mics), "--timeout", "10", *extra,
        timeout=180,
    )  # fmt: skip


def test_provisioned_storm_over_two_processes(daemon_factory: Any, tmp_path: Path) -> None:
    lab_dir = tmp_path / "lab"
    make_lab(lab_dir)
    served: Daemon = daemon_factory("--manufacturing-trust", str(lab_dir))
    mics = tmp_path / "mics"

    result = _storm(
        served, lab_dir, mics, "--count", "20", "--processes", "2", "--concurrency", "8",
        "--first-mac", "0A0000000100",
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert LAST_LINE.match(lines[-1]), lines[-1]
    assert lines[-1].startswith("phones=20 ok=20 failed=0 ")
    assert "20 BAT device(s) added" in result.stdout and "20 issued, 0 reused" in result.stdout
    for step in ("trust list", "XMLDefault", "TVS activate", "SEP config", "REGISTER"):
        assert re.search(rf"^  {step} +[0-9.]+ +[0-9.]+ +[0-9.]+  \(20\)$", result.stdout, re.M)
    devices = served.json("device", "list")
    active = sorted(d["name"] for d in devices if d["state"] == "active")
    assert active == [f"SEP{mac}" for mac in sequential_macs("0A0000000100", 20)]
    assert len(list(mics.glob("*/8841-*.pem"))) == 20

    again = _storm(served, lab_dir, mics, "--count", "5", "--first-mac", "0A0000000200")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "5 issued" in again.stdout
    reused = _storm(served, lab_dir, mics, "--count", "3", "--first-mac", "0A0000000100")
    assert "0 issued, 3 reused" in reused.stdout


def test_storm_with_the_wrong_lab_ca_fails_every_phone(daemon_factory: Any, tmp_path: Path) -> None:
    trusted, other = tmp_path / "lab", tmp_path / "other-lab"
    make_lab(trusted)
    make_lab(other, name="Unknown Factory")
    served: Daemon = daemon_factory("--manufacturing-trust", str(trusted))

    result = _storm(served, other, tmp_path / "mics", "--count", "6", "--concurrency", "3")

    assert result.returncode == 1, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert LAST_LINE.match(last) and last.startswith("phones=6 ok=0 failed=6 "), last
    groups = re.findall(r"^ +(\d+)  ([^:]+): (.*)$", result.stdout, re.M)
    assert sum(int(n) for n, _, _ in groups) == 6, result.stdout
    assert {step for _, step, _ in groups} == {"TVS activate"}, groups
    assert all(reason.startswith("activation refused") for _, _, reason in groups), groups
    devices = served.json("device", "list")
    assert not any(d["state"] == "active" for d in devices)


def test_storm_refuses_a_target_off_loopback(tmp_path: Path) -> None:
    lab_dir = tmp_path / "lab"
    make_lab(lab_dir)
    result = run_cli(
        "phone", "storm", "--provision", "--count", "1", "--model", "8841",
        "--lab-ca", str(lab_dir), "--server", "192.0.2.1", "--admin-socket", "/nonexistent",
    )  # fmt: skip
    assert result.returncode == 2
    assert "loopback" in result.stderr
    over = run_cli(
        "phone", "storm", "--provision", "--count", "100001", "--model", "8841",
        "--lab-ca", str(lab_dir), "--server", "127.0.0.1",
    )  # fmt: skip
    assert over.returncode == 2 and "1..100000" in over.stderr


def test_steps_and_failure_groups() -> None:
    assert step_of(Fetch("CTLSEP0A0000000000.tlv")) == "trust list"
    assert step_of(Fetch("ITLFile.tlv")) == "trust list"
    assert step_of(Fetch("XMLDefault.cnf.xml")) == "XMLDefault"
    assert step_of(Fetch("SEP0A0000000000.cnf.xml")) == "SEP config"
    assert step_of(Sleep(0.5)) == "SEP config"
    assert step_of(Activate((), None)) == "TVS activate"
    assert step_of(Register(None)) == "REGISTER"  # type: ignore[arg-type]
    assert reason_class("SEP0A00000000FF onboarded") == "SEP<MAC> onboarded"
    records = [
        PhoneRecord("SEP1", True, 0.3, {"trust list": 0.1, "REGISTER": 0.2}),
        PhoneRecord("SEP0A0000000001", False, 1.0, {}, "TVS activate", "SEP0A0000000001 no"),
        PhoneRecord("SEP0A0000000002", False, 1.0, {}, "TVS activate", "SEP0A0000000002 no"),
        PhoneRecord("SEP0A0000000003", False, 1.0, {}, "REGISTER", "timeout"),
    ]
    report = StormReport.of(records, 2.0)
    assert report.failure_groups() == [
        ("TVS activate", "SEP<MAC> no", 2),
        ("REGISTER", "timeout", 1),
    ]
    lines = report.report_lines()
    assert lines[-1] == (
        "phones=4 ok=1 failed=3 phones_per_s=0.5 p50_ms=300.0 p95_ms=300.0 p99_ms=300.0"
    )
    assert report.step_times()["REGISTER"] == [0.2]
    assert PhoneRecord.from_json(records[1].to_json()) == records[1]


def test_provisioned_storm_activates_remotely_through_the_edge(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """``--activation-domain``: every phone activates at the edge (OAuth with its MIC), fetches
    its config through it and registers over SIP/TLS with its token; no TFTP, TVS or LAN."""
    lab_dir = tmp_path / "lab"
    make_lab(lab_dir)
    served: Daemon = daemon_factory(
        "--manufacturing-trust", str(lab_dir), "--edge-port", "0", "--sip-oauth-port", "0"
    )
    result = run_cli(
        "phone", "storm", "--provision", "--count", "5", "--model", "8841",
        "--lab-ca", str(lab_dir), "--admin-socket", str(served.socket),
        "--activation-domain", f"https://127.0.0.1:{served.port('edge')}",
        "--first-mac", "0A00000005A0", "--mic-cache", str(tmp_path / "mics"), "--timeout", "10",
        timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert LAST_LINE.match(last) and last.startswith("phones=5 ok=5 failed=0 "), last
    assert re.search(r"^  REGISTER +[0-9.]+ +[0-9.]+ +[0-9.]+  \(5\)$", result.stdout, re.M)
    for mac in sequential_macs("0A00000005A0", 5):
        shown = served.json("device", "show", f"SEP{mac}")
        assert shown["state"] == "active" and shown["allow_remote"] is True
        assert [r["transport"] for r in shown["registrations"]] == ["tls"]
