"""``callboard phone storm``: bulk-imported BAT phones, exported codes, many phones at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from callboard.phone.storm import StormReport, read_bat_codes, sequential_macs
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
