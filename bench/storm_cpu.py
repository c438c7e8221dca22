"""Benchmark: the daemon's CPU per onboarded phone against one ``openssl s_server`` handshake.

Each run, alternating, in one invocation: (a) a fresh ``callboard serve`` (default log level,
lab manufacturing CA as its trust store) and one ``callboard phone storm --provision`` of N
phones through the whole path (trust list, XMLDefault, TVS ACTIVATE over mutual TLS, SEP
config, REGISTER), the daemon's CPU (utime+stime from /proc) counted from the moment the storm
starts booting (after its bulk import) to its end; (b) ``openssl s_server -Verify 1`` with the
daemon's own TVS certificate and the same lab chain, N mutual-TLS handshakes (one small request
each, from the same MIC), its CPU per handshake. Prints the core count, the openssl version,
each run, the medians and the ratio. Loopback only, bounded in count and time.

    python bench/storm_cpu.py [--phones 2000] [--concurrency 64] [--processes 2] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from callboard.daemon import certs
from callboard.protocols.tvs.codec import ActivateRequest, DeviceName
from tvs_handshake import _drive as drive_handshakes
from tvs_handshake import _free_port, _wait_port

CALLBOARD = [sys.executable, "-m", "callboard.daemon.main"]
MAX_PHONES = 100_000
LAST = re.compile(r"^phones=(\d+) ok=(\d+) failed=(\d+) phones_per_s=([0-9.]+) ")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_daemon(state: Path, lab: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    log = open(state.parent / "daemon.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [*CALLBOARD, "serve", "--state-dir", str(state), "--listen-address", "127.0.0.1",
         "--tftp-port", "0", "--http-port", "0", "--tvs-port", "0", "--sip-port", "0",
         "--sip-tls-port", "0", "--manufacturing-trust", str(lab)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited {proc.returncode}")
        out = subprocess.run(
            [*CALLBOARD, "--admin-socket", str(state / "admin.sock"), "status", "--json"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if out.returncode == 0:
            status = json.loads(out.stdout)
            ports = {k: int(status[k][0].rsplit(":", 1)[1]) for k in ("http", "tftp")}
            return proc, ports
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("daemon did not start")


def storm_run(
    base: Path, lab: Path, phones: int, concurrency: int, processes: int, run: int
) -> tuple[float, float, int, str]:
    """One fresh daemon, one storm: (phones/s, daemon CPU ms per phone, failures, last line)."""
    state = base / f"state{run}"
    proc, ports = start_daemon(state, lab)
    try:
        storm = subprocess.Popen(
            [*CALLBOARD, "phone", "storm", "--provision", "--count", str(phones),
             "--model", "8841", "--lab-ca", str(lab), "--server", "127.0.0.1",
             "--admin-socket", str(state / "admin.sock"), "--http-port", str(ports["http"]),
             "--tftp-port", str(ports["tftp"]), "--transport", "http",
             "--concurrency", str(concurrency), "--processes", str(processes),
             "--mic-cache", str(base / "mics"), "--first-mac", f"0A{run:02X}00000000",
             "--timeout", "60", "--time-limit", "1800"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert storm.stdout is not None
        cpu0, last = None, ""
        for line in storm.stdout:
            if cpu0 is None and re.match(r"^storm: \d+ phone\(s\) of model", line):
                cpu0 = cpu_seconds(proc.pid)  # provisioning done: booting starts
            if line.strip():
                last = line.strip()
        storm.wait(timeout=1900)
        cpu = cpu_seconds(proc.pid) - (cpu0 or 0.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    match = LAST.match(last)
    if not match:
        raise RuntimeError(f"storm ended without its report: {last!r}")
    ok, failed, rate = int(match[2]), int(match[3]), float(match[4])
    return rate, cpu / max(ok, 1) * 1000, failed, last


def openssl_run(base: Path, lab: Path, tvs: tuple[Path, Path], count: int) -> tuple[float, float]:
    """(handshakes/s, server CPU ms per handshake) of ``openssl s_server -Verify 1``."""
    cafile = base / "cafile.pem"
    cafile.write_bytes((lab / "lab-root.pem").read_bytes() + (lab / "lab-ca.pem").read_bytes())
    mic_paths = certs.write_mic(
        base / "bench-mic",
        certs.issue_mic(certs.load_lab_ca(lab), model="8841", mac="00AABBCCDDEE"),
    )
    mic = (str(mic_paths[0]), str(mic_paths[1]))
    frame = ActivateRequest(1, DeviceName("8841", "00AABBCCDDEE"), "1234567812345678").encode()
    port = _free_port()
    ossl = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-Verify", "1",
         "-cert", str(tvs[0]), "-key", str(tvs[1]), "-CAfile", str(cafile),
         "-rev", "-quiet", "-no_ticket"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_port(port, time.monotonic() + 20)
        drive_handshakes(port, ossl.pid, 50, 1, mic, frame + b"\n")  # warm-up
        rate, cpu_ms, _ok = drive_handshakes(port, ossl.pid, count, 2, mic, frame + b"\n")
    finally:
        ossl.terminate()
        ossl.wait(10)
    return rate, cpu_ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--phones", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--handshakes", type=int, default=2000)
    args = ap.parse_args()
    if not 1 <= args.phones <= MAX_PHONES or not 1 <= args.runs <= 10:
        ap.error(f"--phones must be 1..{MAX_PHONES}, --runs 1..10")
    version = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout
    print(f"cores: {os.cpu_count()}; {version.strip()}; load average {os.getloadavg()}")
    storms: list[tuple[float, float, int, str]] = []
    ossl: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="callboard-stormcpu-") as tmp:
        base = Path(tmp)
        lab = base / "lab"
        certs.write_lab_ca(lab, certs.make_lab_ca("ec"))
        for run in range(args.runs):
            storms.append(storm_run(base, lab, args.phones, args.concurrency, args.processes, run))
            print(f"run {run + 1} storm:   {storms[-1][3]} daemon_cpu_ms_per_phone="
                  f"{storms[-1][1]:.2f}", flush=True)  # fmt: skip
            tvs = (
                base / f"state{run}" / "certs" / "tvs.pem",
                base / f"state{run}" / "certs" / "tvs.key",
            )
            ossl.append(openssl_run(base, lab, tvs, args.handshakes))
            print(f"run {run + 1} openssl: {ossl[-1][0]:.0f} handshakes/s, "
                  f"{ossl[-1][1]:.2f} ms CPU per handshake", flush=True)  # fmt: skip
    rate = statistics.median(s[0] for s in storms)
    cpu = statistics.median(s[1] for s in storms)
    ocpu = statistics.median(o[1] for o in ossl)
    failed = sum(s[2] for s in storms)
    print(
        f"storm of {args.phones} at {args.concurrency} in flight, {args.processes} client "
        f"process(es), median of {args.runs}: {rate:.1f} phones/s, daemon CPU {cpu:.2f} ms "
        f"per phone, {failed} failed phone(s) in all runs"
    )
    print(f"openssl s_server -Verify 1: {ocpu:.2f} ms CPU per handshake (median)")
    print(f"ratio daemon CPU per phone / openssl CPU per handshake: {cpu / ocpu:.2f}x")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
