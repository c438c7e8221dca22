"""Benchmark: a boot storm of emulated phones against a real ``callboard serve``.

Starts the daemon as a subprocess on loopback (port 0 everywhere, a lab manufacturing CA as its
trust store, all in a temp state dir), bulk-imports N BAT phones with ``callboard import
--dummy-mac``, exports their codes with ``callboard codes export``, issues one lab MIC per phone
up front, then boots the N phones in this process's reactor, ``--concurrency`` at a time, through
the whole path: ITL → XMLDefault → TVS ACTIVATE (mutual TLS with the MIC) → SEP config →
REGISTER. Reports phones onboarded per second, failures, p50/p95 time per phone and the daemon's
CPU per phone. CUCM documents about one phone per second.

    python bench/boot_storm.py [--phones 1000] [--concurrency 64] [--runs 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from callboard.daemon import certs
from callboard.phone.boot import BootOptions, PhoneIdentity
from callboard.phone.storm import StormReport, read_bat_codes, run_storm, sequential_macs
from twisted.internet import defer, task

CALLBOARD = [sys.executable, "-m", "callboard.daemon.main"]
MAX_PHONES = 20_000
MODEL = "8841"


def _cli(socket: Path, *args: str) -> str:
    out = subprocess.run(
        [*CALLBOARD, "--admin-socket", str(socket), *args],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"callboard {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_daemon(state: Path, trust: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    log = open(state.parent / "daemon.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [*CALLBOARD, "serve", "--state-dir", str(state), "--listen-address", "127.0.0.1",
         "--tftp-port", "0", "--http-port", "0", "--tvs-port", "0", "--sip-port", "0",
         "--sip-tls-port", "0", "--manufacturing-trust", str(trust), "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    socket = state / "admin.sock"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited {proc.returncode}")
        if socket.exists():
            with contextlib.suppress(RuntimeError):
                return proc, json.loads(_cli(socket, "status", "--json"))
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("daemon did not start")


def one_run(phones: int, concurrency: int, workdir: Path) -> tuple[StormReport, float, float]:
    """One fresh daemon, one storm; returns the report, MIC issue time and daemon CPU seconds."""
    state, trust = workdir / "state", workdir / "lab"
    lab = certs.make_lab_ca()
    certs.write_lab_ca(trust, lab)
    proc, status = start_daemon(state, trust)
    try:
        socket = state / "admin.sock"
        http_port = int(status["http"][0].rsplit(":", 1)[1])
        rows = ["mac,model,description,user,directory_number,display_name,requires_activation"]
        rows += [f",{MODEL},storm {i},,{100000 + i},Storm {i},true" for i in range(phones)]
        (workdir / "import.csv").write_text("\n".join(rows) + "\n")
        _cli(socket, "import", str(workdir / "import.csv"), "--dummy-mac")
        _cli(socket, "codes", "export", str(workdir / "codes.csv"))
        codes = read_bat_codes((workdir / "codes.csv").read_text(), MODEL)
        assert len(codes) == phones, len(codes)

        started = time.monotonic()
        identities = []
        for mac, code in zip(sequential_macs("0A0000000000", phones), codes, strict=True):
            mic = certs.issue_mic(lab, model=MODEL, mac=mac)
            identities.append(
                PhoneIdentity(mac=mac, model=MODEL, mic_cert=mic.cert, mic_key=mic.key, code=code)
            )
        issue_time = time.monotonic() - started

        options = BootOptions(transport="http", http_port=http_port, timeout=60)
        reports: list[StormReport] = []
        cpu_before = _cpu_seconds(proc.pid)

        async def storm(reactor: Any) -> None:
            reports.append(
                await run_storm(
                    reactor, identities, ["127.0.0.1"], options, concurrency=concurrency
                )
            )

        with contextlib.suppress(SystemExit):
            task.react(lambda reactor: defer.Deferred.fromCoroutine(storm(reactor)), [])
        cpu = _cpu_seconds(proc.pid) - cpu_before
        devices = json.loads(_cli(socket, "device", "list", "--json"))
        active = sum(d["state"] == "active" and d["name"].startswith("SEP") for d in devices)
        if active != reports[0].onboarded:
            raise RuntimeError(f"registry shows {active} active, storm says {reports[0].onboarded}")
        return reports[0], issue_time, cpu
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--phones", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    if not 1 <= args.phones <= MAX_PHONES:
        ap.error(f"--phones must be 1..{MAX_PHONES}")
    # task.react can run only once per process: each extra run is a fresh interpreter.
    if args.runs > 1:
        rates = []
        for _ in range(args.runs):
            out = subprocess.run(
                [sys.executable, __file__, "--phones", str(args.phones),
                 "--concurrency", str(args.concurrency)],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            print(out.stdout, end="")
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                return 1
            rates.append(float(out.stdout.split("RATE=")[1].split()[0]))
        print(f"median of {args.runs}: {statistics.median(rates):.1f} phones/s ({rates})")
        return 0
    with tempfile.TemporaryDirectory(prefix="callboard-storm-") as tmp:
        report, issue_time, cpu = one_run(args.phones, args.concurrency, Path(tmp))
    print(f"MICs issued up front: {args.phones} in {issue_time:.2f} s")
    print(report.summary())
    print(
        f"daemon CPU: {cpu:.2f} s, {cpu / max(1, report.onboarded) * 1000:.2f} ms per phone; "
        f"RATE={report.rate:.1f}"
    )
    for device, reason in report.failures[:10]:
        print(f"  failed {device}: {reason}")
    return 0 if not report.failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
