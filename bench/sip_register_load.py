"""REGISTER load: Callboard's registrar against Kamailio, with sipp, in one run (loopback, UDP).

Not a test. For each server it finds the highest rate at which every REGISTER got its 200
(``bench/sipp/register_load.xml``: every call a new phone, a fresh AoR, Call-ID, contact and
device name, no retransmissions, a 2 s answer timeout): sipp's call rate climbs in coarse steps
(``--step``, each step ``--seconds`` long, so bounded in count) until a step fails, then the
interval between the last clean and the first failing rate is bisected down to
``--resolution`` (default 250/s). A step is clean when every REGISTER got its 200 and no
retransmission was seen; the figure is the highest *achieved* rate (answers / wall time) of a
clean step. Callboard runs in its own process (one reactor, allow-all policy, no auth,
logging discarded); Kamailio runs ``bench/kamailio/kamailio.cfg`` (registrar + usrloc in memory,
no auth, 2 UDP workers, 1 GiB shared memory: the 64 MiB default fills up at about 65 000
bindings and then every REGISTER fails). The load generator's own ceiling is found the same
way against sipp itself answering 200 (``bench/sipp/register_uas.xml``), and sipp's own CPU
use is reported at each server's ceiling. Each run measures the three in turn, fresh
processes each time; medians over ``--runs``. Everything listens on 127.0.0.1 only.

    python bench/sip_register_load.py [--runs 3] [--seconds 2] [--step 2000] [--resolution 250]

Prints the core count, versions, load averages and a Markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "bench" / "sipp" / "register_load.xml"
RESPONDER = ROOT / "bench" / "sipp" / "register_uas.xml"
KAMAILIO_CFG = ROOT / "bench" / "kamailio" / "kamailio.cfg"
MAX_RATE = 60_000


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def serve(port: int) -> None:
    """The Callboard side: one registrar on UDP, allow-all policy, no auth, no logging."""
    from callboard.protocols.sip.registrar import (
        PolicyDecision,
        Registrar,
        RegistrarSettings,
        RegistrationRequest,
    )
    from callboard.protocols.sip.transports import SIPRegistrarService
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    class AllowAll:
        def decide(self, request: RegistrationRequest) -> PolicyDecision:
            return PolicyDecision.allow(request.device_name)

    globalLogBeginner.beginLoggingTo([], discardBuffer=True, redirectStandardIO=False)
    registrar = Registrar(
        AllowAll(),
        RegistrarSettings(),
        now=reactor.seconds,  # type: ignore[attr-defined]
        wall_now=time.time,
    )
    svc = SIPRegistrarService(
        registrar, reactor, udp_port=port, tcp_port=None, tls_port=None, interface="127.0.0.1"
    )
    svc.startService()
    reactor.run()  # type: ignore[attr-defined]


@dataclass
class Step:
    rate: int
    calls: int
    ok: int
    failed: int
    retrans: int
    achieved: float
    sipp_cpu: float = 0.0  # sipp's own CPU seconds / wall seconds (1.0: one core busy)

    @property
    def clean(self) -> bool:
        return self.failed == 0 and self.retrans == 0 and self.ok == self.calls


def run_step(port: int, rate: int, seconds: float, workdir: Path) -> Step:
    calls = max(100, int(rate * seconds))
    stat = workdir / f"stat_{port}_{rate}.csv"
    stat.unlink(missing_ok=True)
    local = free_udp_port()
    args = [
        "sipp", f"127.0.0.1:{port}", "-sf", str(SCENARIO), "-t", "u1",
        "-i", "127.0.0.1", "-p", str(local), "-r", str(rate), "-m", str(calls),
        "-l", str(max(rate * 3, 1000)), "-timeout", f"{int(seconds * 3 + 15)}s",
        "-trace_stat", "-stf", str(stat), "-fd", "1", "-nostdin", "-timeout_error",
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(args, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    elapsed = time.monotonic() - start
    ok = failed = retrans = 0
    if stat.exists():
        with stat.open() as f:
            rows = list(csv.reader(f, delimiter=";"))
        if len(rows) >= 2:
            head, last = rows[0], rows[-1]
            col = {name: i for i, name in enumerate(head)}
            ok = int(last[col["SuccessfulCall(C)"]])
            failed = int(last[col["FailedCall(C)"]])
            retrans = int(last[col["Retransmissions(C)"]])
            # sipp's own clock, first call to last answer (its start-up is not the server's)
            began = float(last[col["StartTime"]].split()[-1])
            ended = float(last[col["CurrentTime"]].split()[-1])
            elapsed = min(elapsed, max(ended - began, 1e-3))
    cpu = (usage.ru_utime + usage.ru_stime) / elapsed if elapsed > 0 else 0.0
    return Step(rate, calls, ok, failed, retrans, ok / elapsed if elapsed > 0 else 0.0, cpu)


@dataclass
class Ceiling:
    rate: float  # highest achieved rate of a clean step
    offered: int  # the offered rate of that step
    failed_at: int  # the lowest offered rate that failed (0: none did)
    sipp_cpu: float  # sipp's CPU use during that step
    steps: int


def sustained(
    port: int, step: int, resolution: int, seconds: float, workdir: Path, name: str
) -> Ceiling:
    """Coarse climb until a step fails, then bisect to ``resolution``."""
    best: Step | None = None
    steps = 0

    def probe(rate: int) -> bool:
        nonlocal best, steps
        result = run_step(port, rate, seconds, workdir)
        steps += 1
        print(
            f"  {name:9s} rate {rate:6d}/s: ok {result.ok}/{result.calls} failed {result.failed} "
            f"retrans {result.retrans} achieved {result.achieved:8.0f}/s "
            f"sipp CPU {result.sipp_cpu:.2f}",
            file=sys.stderr,
        )
        clean = result.clean and result.achieved >= rate * 0.8
        if clean and (best is None or result.achieved > best.achieved):
            best = result
        return clean

    low, high = 0, 0
    rate = step
    while rate <= MAX_RATE:
        if not probe(rate):
            high = rate
            break
        low = rate
        rate += step
    while high and high - low > resolution:
        mid = (low + high) // 2 // resolution * resolution or resolution
        if mid <= low:
            break
        if probe(mid):
            low = mid
        else:
            high = mid
    if best is None:
        return Ceiling(0.0, 0, high, 0.0, steps)
    return Ceiling(best.achieved, best.rate, high, best.sipp_cpu, steps)


def wait_udp(port: int, timeout: float = 10.0) -> None:
    """Wait until an OPTIONS on the port gets an answer."""
    msg = (
        f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKw"
        f"{os.getpid()};rport\r\nFrom: <sip:w@127.0.0.1>;tag=1\r\nTo: <sip:w@127.0.0.1>\r\n"
        "Call-ID: wait\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(0.3)
        while time.monotonic() < deadline:
            s.sendto(msg, ("127.0.0.1", port))
            try:
                s.recvfrom(65536)
                return
            except TimeoutError:
                continue
    raise RuntimeError(f"nothing answers on udp 127.0.0.1:{port}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def measure_callboard(step: int, resolution: int, seconds: float, workdir: Path) -> Ceiling:
    port = free_udp_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_udp(port)
        return sustained(port, step, resolution, seconds, workdir, "callboard")
    finally:
        stop(proc)


def measure_kamailio(step: int, resolution: int, seconds: float, workdir: Path) -> Ceiling:
    port = free_udp_port()
    proc = subprocess.Popen(
        ["/usr/sbin/kamailio", "-f", str(KAMAILIO_CFG), "-DD", "-E", "-m", "1024",
         "-l", f"udp:127.0.0.1:{port}", "-w", str(workdir), "-P", str(workdir / "kam.pid")],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "kamailio.log").open("wb"),
    )  # fmt: skip
    try:
        wait_udp(port)
        return sustained(port, step, resolution, seconds, workdir, "kamailio")
    finally:
        stop(proc)


def measure_generator(step: int, resolution: int, seconds: float, workdir: Path) -> Ceiling:
    """sipp against sipp answering 200: the most the load generator can show."""
    port = free_udp_port()
    proc = subprocess.Popen(
        ["sipp", "-sf", str(RESPONDER), "-t", "u1", "-i", "127.0.0.1", "-p", str(port),
         "-nostdin"],
        cwd=workdir, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(1.0)
        return sustained(port, step, resolution, seconds, workdir, "sipp")
    finally:
        stop(proc)


def _version(args: list[str]) -> str:
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    return (out.stdout + out.stderr).strip().splitlines()[0] if out.stdout + out.stderr else "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--step", type=int, default=2000, help="coarse rate step, per second")
    ap.add_argument("--resolution", type=int, default=250, help="bisect down to this, per second")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each rate step")
    ap.add_argument("--runs", type=int, default=3, help="repeat and take medians")
    ap.add_argument("--no-generator", action="store_true", help="skip the sipp-vs-sipp ceiling")
    opts = ap.parse_args()
    if opts.serve:
        serve(opts.serve)
        return 0
    if shutil.which("sipp") is None:
        print("sipp not found (Debian package sip-tester)", file=sys.stderr)
        return 2
    if not (1 <= opts.runs <= 5 and 0 < opts.seconds <= 10 and 100 <= opts.resolution <= opts.step):
        ap.error("--runs 1..5, --seconds up to 10, 100 <= --resolution <= --step")
    print(
        f"cores: {os.cpu_count()}; {_version(['sipp', '-v'])}; "
        f"{_version(['/usr/sbin/kamailio', '-v'])}; Python {sys.version.split()[0]}"
    )
    args = (opts.step, opts.resolution, opts.seconds)
    found: dict[str, list[Ceiling]] = {"callboard": [], "kamailio": [], "sipp": []}
    loads: list[str] = []
    with tempfile.TemporaryDirectory(prefix="sipbench") as tmp:
        work = Path(tmp)
        for i in range(opts.runs):
            print(f"run {i + 1}/{opts.runs} (load {os.getloadavg()})", file=sys.stderr)
            found["callboard"].append(measure_callboard(*args, work))
            found["kamailio"].append(measure_kamailio(*args, work))
            if not opts.no_generator:
                found["sipp"].append(measure_generator(*args, work))
            loads.append("{:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg()))
            print(f"run {i + 1}: " + ", ".join(
                f"{k} {v[-1].rate:.0f}/s (offered {v[-1].offered}, failed at {v[-1].failed_at}, "
                f"sipp CPU {v[-1].sipp_cpu:.2f})" for k, v in found.items() if v
            ) + f"; load {loads[-1]}", flush=True)  # fmt: skip
    med = statistics.median
    names = {
        "callboard": "Callboard (Twisted, 1 process)",
        "kamailio": "Kamailio (2 UDP workers)",
        "sipp": "sipp answering 200 (generator ceiling)",
    }
    print("| server | sustained REGISTER/s, zero failures (median) | runs | first failing offered "
          "rate | sipp CPU at the ceiling |")  # fmt: skip
    print("|---|---|---|---|---|")
    for key, values in found.items():
        if values:
            print(f"| {names[key]} | {med(v.rate for v in values):.0f} | "
                  f"{', '.join(f'{v.rate:.0f}' for v in values)} | "
                  f"{', '.join(str(v.failed_at) for v in values)} | "
                  f"{med(v.sipp_cpu for v in values):.2f} |")  # fmt: skip
    c = med(v.rate for v in found["callboard"])
    k = med(v.rate for v in found["kamailio"])
    print(f"\nratio Callboard/Kamailio: {c / k:.2f}" if k else "\nKamailio rate is 0")
    print(f"load averages after each run: {', '.join(loads)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
