"""The admin CLI against a running daemon on a temporary socket: what an admin does."""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from callboard.daemon.admin.csvio import unguard_cell
from support.harness import CALLBOARD, run_cli

OTHER_WRITER = """
import sys, time
from pathlib import Path
from twisted.internet import defer, task
from callboard.daemon.registry.registry import DeviceSpec, Registry
from callboard.daemon.registry.store import SQLiteStore

async def add(reactor):
    store = SQLiteStore(Path(sys.argv[1]), reactor)
    try:
        spec = DeviceSpec(model="8841", description=sys.argv[2], owner_user=sys.argv[3])
        print((await Registry(store, time.time).add_device(spec)).name)
    finally:
        await store.close()

task.react(lambda reactor: defer.ensureDeferred(add(reactor)))
"""


def other_writer_adds(daemon: Any, description: str, user: str) -> dict[str, Any]:
    """Add a device from another process (its own store on the daemon's database); return
    its code as the daemon shows it once the change feed has brought the device in."""
    database = str(daemon.state_dir / "callboard.sqlite3")
    result = subprocess.run(
        [sys.executable, "-c", OTHER_WRITER, database, description, user],
        capture_output=True,
        text=True,
        timeout=60,
    )
    name = ok(result).strip()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if daemon.cli("device", "show", name).returncode == 0:
            return {"name": name, **daemon.json("code", "show", name)}
        time.sleep(0.1)
    raise AssertionError(f"the daemon never saw {name}")


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def fails(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode != 0, result.stdout
    message = result.stderr.strip()
    assert message.count("\n") == 0 or "line" in message, message
    for word in words:
        assert word in message, message
    return message


def test_add_show_list_and_codes(daemon: Any) -> None:
    # A device's user must be a known user.
    fails(daemon.cli("device", "add", "--model", "8841", "--user", "alice"), "no user named")
    ok(daemon.cli("user", "add", "alice"))
    added = daemon.json(
        "device", "add", "--model", "8841", "--line", "1001:Alice Example", "--user", "alice"
    )
    name = added["name"]
    assert name.startswith("BAT") and added["state"] == "awaiting-activation"
    code = added["activation_code"]["code"]
    assert len(code.replace("-", "")) == 16

    listing = ok(daemon.cli("device", "list"))
    assert name in listing and "awaiting-activation" in listing and "1001" in listing
    shown = daemon.json("device", "show", name)
    assert shown["lines"][0]["display_name"] == "Alice Example"
    assert shown["user"] == "alice" and shown["bound_to"] == "model:8841"
    assert "code" not in shown["activation_code"]  # device show does not reveal the digits

    assert daemon.json("code", "show", name)["code"] == code
    new = daemon.json("code", "generate", name)
    assert new["code"] != code and new["state"] == "issued"
    released = daemon.json("code", "release", name)
    assert released["state"] == "released"
    fails(daemon.cli("code", "release", name), "no outstanding")


def test_set_mac_renames_and_blank_makes_a_new_bat(daemon: Any) -> None:
    name = daemon.json("device", "add", "--model", "8851", "--no-require-activation")["name"]
    sep = daemon.json("device", "set-mac", name, "00:1a:2b:3c:4d:5e")
    assert sep["name"] == "SEP001A2B3C4D5E" and sep["state"] == "provisioned"
    bat = daemon.json("device", "set-mac", "sep001a2b3c4d5e", "--blank")
    assert bat["name"].startswith("BAT") and bat["name"] != name
    fails(daemon.cli("device", "set-mac", bat["name"]), "--blank")
    other = daemon.json("device", "add", "--model", "8841", "--mac", "001A2B3C4D5F")
    fails(daemon.cli("device", "set-mac", bat["name"], "001A2B3C4D5F"), "already")
    ok(daemon.cli("device", "delete", other["name"]))
    fails(daemon.cli("device", "show", other["name"]), "no device")


def test_bad_input_is_one_line_and_non_zero(daemon: Any) -> None:
    fails(daemon.cli("device", "add", "--model", "7960"), "unsupported model")
    fails(daemon.cli("device", "add", "--model", "8841", "--mac", "xyz"), "invalid MAC")
    daemon.json("device", "add", "--model", "8841", "--mac", "001122334455")
    fails(daemon.cli("device", "add", "--model", "8841", "--mac", "00-11-22-33-44-55"))
    fails(daemon.cli("defaults", "set", "9999", "--onboarding", "autoregistration"), "9999")


def test_defaults_decide_whether_a_code_is_issued(daemon: Any) -> None:
    table = daemon.json("defaults", "show")
    assert {row["model"] for row in table} >= {"7811", "8832NR", "8865NR"}
    assert all(row["onboarding"] == "activation-code" for row in table)
    assert {r["model"]: r["model_id"] for r in table}["8841"] == "683"
    ok(daemon.cli("defaults", "set", "7821", "--onboarding", "autoregistration"))
    auto = daemon.json("device", "add", "--model", "7821")
    assert auto["requires_activation"] is False and auto["activation_code"] is None
    forced = daemon.json("device", "add", "--model", "7821", "--require-activation")
    assert forced["requires_activation"] is True


def test_import_all_or_nothing_reports_every_bad_line(daemon: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "model,mac,directory_number,display_name,requires_activation\n"
        "8841,001122334401,1001,One,\n"
        "8841,not-a-mac,1002,Two,\n"
        "9999,001122334403,1003,Three,\n"
        '8841,001122334401,1004,"Dup, MAC",\n'
        "8841,001122334405,1005,Five,maybe\n"
    )
    result = daemon.cli("import", str(bad))
    assert result.returncode != 0
    for line in (3, 4, 5, 6):
        assert f"line {line}:" in result.stderr, result.stderr
    assert "line 2:" not in result.stderr
    assert daemon.json("device", "list") == []

    good = tmp_path / "good.csv"
    good.write_text(
        "mac,model,description,user,directory_number,display_name,requires_activation\n"
        ",8841,lobby,,2001,Lobby,\n"
        "00aabbccdd01,8851,desk,bob,2002,Bob,false\n"
    )
    fails(daemon.cli("import", str(good)), "--dummy-mac")
    fails(daemon.cli("import", str(good), "--dummy-mac"), "line 3:", "no user named 'bob'")
    assert daemon.json("device", "list") == []
    ok(daemon.cli("user", "add", "bob"))
    assert json.loads(ok(daemon.cli("import", str(good), "--dummy-mac", "--json")))["imported"] == 2
    names = {d["name"]: d for d in daemon.json("device", "list")}
    assert "SEP00AABBCCDD01" in names and names["SEP00AABBCCDD01"]["state"] == "provisioned"
    assert any(n.startswith("BAT") for n in names)


def test_codes_export_round_trip_with_hostile_cells(daemon: Any, tmp_path: Path) -> None:
    hostile = '=HYPERLINK("http://evil.example/","x")'
    hostile_user = "+cmd|' /C calc'!A0"
    # No such user can be made, nor named on a device through the admin API...
    fails(daemon.cli("user", "add", hostile_user), "invalid user name")
    fails(daemon.cli("device", "add", "--model", "8841", "--user", hostile_user), "no user named")
    # ...but a device may carry one from elsewhere (another writer of the database, older
    # data): the export still guards the cell.
    added = other_writer_adds(daemon, hostile, hostile_user)
    export = tmp_path / "codes.csv"
    ok(daemon.cli("codes", "export", str(export)))
    assert stat.S_IMODE(export.stat().st_mode) == 0o600
    with export.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1
    row = rows[0]
    assert row["device"] == added["name"]
    assert row["description"] == "'" + hostile
    assert row["user"].startswith("'+")
    assert row["activation_code"] == added["code"]
    assert len(row["activation_code"].split("-")) == 4
    # The guarded cell reads back as the original text.
    assert unguard_cell(row["description"]) == hostile


def test_admin_socket_and_state_are_owner_only(daemon: Any) -> None:
    assert stat.S_IMODE(daemon.socket.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE(daemon.state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((daemon.state_dir / "callboard.sqlite3").stat().st_mode) == 0o600


def test_admin_changes_are_logged_without_codes(daemon: Any) -> None:
    added = daemon.json("device", "add", "--model", "8841")
    daemon.json("code", "generate", added["name"])
    code = daemon.json("code", "show", added["name"])["code"]
    log = daemon.log()
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    actions = [e.get("action") for e in entries if e.get("event") == "admin change"]
    assert "device.add" in actions and "code.generate" in actions
    assert all("actor_uid" in e for e in entries if e.get("event") == "admin change")
    for digits in (code, code.replace("-", "")):
        assert digits not in log


def test_socket_lookup_order(daemon: Any) -> None:
    env = {**os.environ, "CALLBOARD_ADMIN_SOCKET": str(daemon.socket)}
    via_env = subprocess.run(
        [*CALLBOARD, "device", "list", "--json"], capture_output=True, text=True, env=env
    )
    assert via_env.returncode == 0 and json.loads(via_env.stdout) == []
    via_state_dir = run_cli("--state-dir", str(daemon.state_dir), "device", "list", "--json")
    assert via_state_dir.returncode == 0
    missing = run_cli("--admin-socket", "/nonexistent/admin.sock", "device", "list")
    assert missing.returncode != 0 and "is the daemon running" in missing.stderr


def test_registry_survives_a_daemon_restart(daemon_factory: Any, tmp_path: Path) -> None:
    first = daemon_factory()
    added = first.json("device", "add", "--model", "8841", "--line", "1001:Keep Me")
    code = first.json("code", "show", added["name"])["code"]
    first.json("defaults", "set", "7821", "--onboarding", "autoregistration")
    assert first.stop() == 0
    second = daemon_factory(state_dir=first.state_dir)
    shown = second.json("device", "show", added["name"])
    assert shown["lines"][0]["display_name"] == "Keep Me"
    assert second.json("code", "show", added["name"])["code"] == code
    defaults = {row["model"]: row["onboarding"] for row in second.json("defaults", "show")}
    assert defaults["7821"] == "autoregistration"


def test_certs_init_honours_the_global_state_dir(tmp_path: Path) -> None:
    result = run_cli("--state-dir", str(tmp_path / "st"), "certs", "init")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "st" / "certs" / "tvs.pem").exists()
    keys = sorted(p.name for p in (tmp_path / "st" / "certs").glob("*.key"))
    assert keys == ["ccm-tftp.key", "https-tftp.key", "sast.key", "tvs.key"]
    assert all(
        stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (tmp_path / "st" / "certs").glob("*.key")
    )


def test_the_sample_import_file_imports(daemon: Any) -> None:
    sample = Path(__file__).parents[2] / "configs" / "import-sample.csv"
    ok(daemon.cli("user", "add", "jdoe"))  # the sample's one user
    assert daemon.json("import", str(sample), "--dummy-mac")["imported"] == 3
    states = {d["model"]: d["state"] for d in daemon.json("device", "list")}
    assert states == {
        "8841": "awaiting-activation",
        "8851": "awaiting-activation",
        "7821": "provisioned",
    }


SECOND_WRITER = """
import sys
from pathlib import Path

from callboard.daemon.registry.registry import DeviceSpec, Registry
from callboard.daemon.registry.store import SQLiteStore
from twisted.internet import defer, task


async def main(reactor):
    store = SQLiteStore(Path(sys.argv[1]), reactor)
    registry = Registry(store, reactor.seconds)
    await registry.add_device(DeviceSpec(model="8841", mac=sys.argv[2], description="elsewhere"))
    await store.close()


task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
"""


def test_a_second_process_writing_the_database_reaches_the_daemon(daemon: Any) -> None:
    """Another process (a future worker or node) writes; the daemon's view follows the feed."""
    database = daemon.state_dir / "callboard.sqlite3"
    writer = subprocess.run(
        [sys.executable, "-c", SECOND_WRITER, str(database), "00AABBCC0001"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert writer.returncode == 0, writer.stderr
    deadline = time.monotonic() + 15
    while True:
        shown = daemon.cli("device", "show", "SEP00AABBCC0001", "--json")
        if shown.returncode == 0:
            break
        assert time.monotonic() < deadline, shown.stderr
        time.sleep(0.2)
    device = json.loads(shown.stdout)
    assert device["description"] == "elsewhere" and device["state"] == "awaiting-activation"
    # The daemon can act on it: its code, written by the other process, is there too.
    assert len(daemon.json("code", "show", "SEP00AABBCC0001")["code"]) == 19
