"""Memory and scale: 100,000 devices, 100,000 current SIP bindings, import and start time.

Not a test. For each size N (default 25,000, 50,000 and 100,000), in a fresh state dir:

1. starts ``callboard serve`` on loopback (a fixed free SIP UDP port, everything else port 0)
   and times ``callboard import`` of N rows (SEP phones with MACs, one line each, needing no
   activation code) end to end, as a user runs it: CSV parse, admin API, validation, one
   durable SQLite transaction;
2. stops the daemon and times a restart with N devices, from ``exec`` to ``READY=1`` on the
   ``NOTIFY_SOCKET`` the bench hands it (the systemd readiness message, sent once every
   listener is bound and the registry is loaded) and to the first SIP answer (an OPTIONS on
   UDP), ``--restarts`` times;
3. registers every phone once (one REGISTER per device over UDP from this process, with the
   Cisco contact parameters the policy checks, ``--window`` in flight, retransmitted after
   1 s, at most 4 tries) and reads the daemon's resident memory (VmRSS from /proc) before,
   just after, and 36 s after (when the registrar no longer keeps its answers for
   retransmissions: RFC 3261 Timer J), so the memory per device and per binding can be read
   off the sizes.

Prints the core count, the load average with each figure, medians over ``--runs``, and a
Markdown table for docs/BENCHMARKS.md. Bounded: at most 200,000 devices, loopback only.

    python bench/scale_100k.py [--sizes 25000,50000,100000] [--runs 1] [--restarts 3]
        [--devices-only]
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CALLBOARD = [sys.executable, "-m", "callboard.daemon.main"]
MAX_DEVICES = 200_000
MODEL, MODEL_ID = "8841", "683"
LINGER = 36.0  # > the registrar's 32 s transaction linger (RFC 3261 Timer J) + a sweep


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def free_sip_port() -> int:
    """A port free for both UDP and TCP: the daemon listens for SIP on both. A UDP-only probe
    once handed out a port whose TCP side was still held (TIME-WAIT of an earlier bench)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP")


def mac_of(i: int) -> str:
    return f"00AB{i:08X}"


def dn_of(i: int) -> str:
    return str(1_000_000 + i)


def write_csv(path: Path, rows: int) -> None:
    lines = ["mac,model,description,user,directory_number,display_name,requires_activation"]
    lines += [f"{mac_of(i)},{MODEL},desk {i},,{dn_of(i)},Phone {i},false" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Daemon:
    """``callboard serve`` with a notify socket of our own, so READY=1 can be timed."""

    def __init__(self, base: Path, sip_port: int) -> None:
        self.base = base
        self.state = base / "state"
        self.sip_port = sip_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify_path = base / "notify.sock"

    def start(self, timeout: float = 120) -> tuple[float, float, float]:
        """Start; return (seconds to READY=1, to the first SIP answer, CPU seconds at READY)."""
        self.notify_path.unlink(missing_ok=True)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(self.notify_path))
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path))
        log = open(self.base / "daemon.log", "ab")  # noqa: SIM115 - handed to the child
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [*CALLBOARD, "serve", "--state-dir", str(self.state), "--listen-address",
             "127.0.0.1", "--tftp-port", "0", "--http-port", "0", "--tvs-port", "0",
             "--sip-port", str(self.sip_port), "--sip-tls-port", "0", "--https-port", "0"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        log.close()
        ready = answered = cpu = None
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        options = _options(self.sip_port, probe.getsockname()[1])
        deadline = started + timeout
        try:
            while (ready is None or answered is None) and time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    tail = (self.base / "daemon.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{tail}")
                if answered is None:
                    probe.sendto(options, ("127.0.0.1", self.sip_port))
                readable, _, _ = select.select([notify, probe], [], [], 0.01)
                for sock in readable:
                    data = sock.recv(65536)
                    if sock is notify and b"READY=1" in data and ready is None:
                        ready = time.monotonic() - started
                        cpu = cpu_seconds(self.proc.pid)
                    if sock is probe and answered is None:
                        answered = time.monotonic() - started
        finally:
            notify.close()
            probe.close()
        if ready is None or answered is None or cpu is None:
            raise RuntimeError("daemon did not become ready")
        return ready, answered, cpu

    def cli(self, *args: str) -> tuple[float, float]:
        """Run the CLI; (wall seconds, CPU seconds of the daemon and the CLI together)."""
        assert self.proc is not None
        started, daemon_cpu = time.monotonic(), cpu_seconds(self.proc.pid)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(
            [*CALLBOARD, "--admin-socket", str(self.state / "admin.sock"), *args],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"callboard {' '.join(args)}: {out.stderr.strip()[-2000:]}")
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cli_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return time.monotonic() - started, cpu_seconds(self.proc.pid) - daemon_cpu + cli_cpu

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=120)
        self.proc = None


def _options(port: int, local: int) -> bytes:
    return (
        f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bKprobe{time.monotonic_ns()};rport\r\n"
        "From: <sip:probe@127.0.0.1>;tag=1\r\nTo: <sip:probe@127.0.0.1>\r\n"
        "Call-ID: probe\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _register(i: int, port: int, local: int, attempt: int) -> bytes:
    mac, dn = mac_of(i), dn_of(i)
    return (
        f"REGISTER sip:127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bK{i}x{attempt};rport\r\n"
        f"From: <sip:{dn}@127.0.0.1>;tag={i}\r\n"
        f"To: <sip:{dn}@127.0.0.1>\r\n"
        f"Call-ID: {i}@scale\r\n"
        "CSeq: 101 REGISTER\r\n"
        f"Contact: <sip:{dn}@127.0.0.1:{local};transport=udp>"
        f';+sip.instance="<urn:uuid:00000000-0000-0000-0000-{mac}>"'
        f';+u.sip!devicename.ccm.cisco.com="SEP{mac}"'
        f';+u.sip!model.ccm.cisco.com="{MODEL_ID}"\r\n'
        "Expires: 3600\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def register_all(port: int, count: int, window: int, time_limit: float = 600) -> tuple[int, float]:
    """One REGISTER per device, ``window`` in flight; (number answered 200, seconds)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", 0))
    local = sock.getsockname()[1]
    target = ("127.0.0.1", port)
    pending: dict[int, tuple[float, int]] = {}  # index -> (sent at, attempt)
    ok = refused = given_up = 0
    nxt = 0
    started = time.monotonic()
    try:
        while (nxt < count or pending) and time.monotonic() - started < time_limit:
            now = time.monotonic()
            while nxt < count and len(pending) < window:
                sock.sendto(_register(nxt, port, local, 0), target)
                pending[nxt] = (now, 0)
                nxt += 1
            readable, _, _ = select.select([sock], [], [], 0.05)
            while readable:
                try:
                    data = sock.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                status = data[8:11]
                start = data.find(b"\r\nCall-ID: ") + 11
                index = int(data[start : data.find(b"@", start)])
                if status == b"100" or index not in pending:
                    continue
                del pending[index]
                if status == b"200":
                    ok += 1
                else:
                    refused += 1
                    if refused <= 3:
                        print(data.split(b"\r\n\r\n")[0].decode(), file=sys.stderr)
            now = time.monotonic()
            for index, (sent, attempt) in list(pending.items()):
                if now - sent > 1.0:
                    if attempt >= 3:
                        del pending[index]
                        given_up += 1
                    else:
                        sock.sendto(_register(index, port, local, attempt + 1), target)
                        pending[index] = (now, attempt + 1)
    finally:
        sock.close()
    if refused or given_up:
        print(f"  REGISTER: {refused} refused, {given_up} unanswered", file=sys.stderr)
    return ok, time.monotonic() - started


@dataclass
class Result:
    size: int
    import_s: list[float] = field(default_factory=list)
    import_cpu: list[float] = field(default_factory=list)
    ready_cpu: list[float] = field(default_factory=list)
    ready_s: list[float] = field(default_factory=list)
    answer_s: list[float] = field(default_factory=list)
    rss_start: list[float] = field(default_factory=list)
    rss_bound: list[float] = field(default_factory=list)
    rss_settled: list[float] = field(default_factory=list)
    bound: list[int] = field(default_factory=list)
    register_rate: list[float] = field(default_factory=list)
    loads: list[str] = field(default_factory=list)


def one_run(
    size: int, restarts: int, window: int, result: Result, *, register: bool = True
) -> None:
    with tempfile.TemporaryDirectory(prefix="callboard-scale-") as tmp:
        base = Path(tmp)
        csv_path = base / "phones.csv"
        write_csv(csv_path, size)
        daemon = Daemon(base, free_sip_port())
        daemon.start()
        try:
            took, cpu = daemon.cli("import", str(csv_path))
            result.import_s.append(took)
            result.import_cpu.append(cpu)
            print(f"  {size}: import {took:.2f} s, {cpu:.2f} s CPU ({load()})", flush=True)
        finally:
            daemon.stop()
        for _ in range(restarts):
            ready, answered, cpu = daemon.start()
            result.ready_s.append(ready)
            result.ready_cpu.append(cpu)
            result.answer_s.append(answered)
            print(f"  {size}: start to READY {ready:.2f} s ({cpu:.2f} s CPU), first SIP answer "
                  f"{answered:.2f} s, "
                  f"RSS {rss_mb(daemon.proc.pid):.0f} MB ({load()})", flush=True)  # type: ignore[union-attr]  # fmt: skip
            daemon.stop()
        daemon.start()
        try:
            pid = daemon.proc.pid  # type: ignore[union-attr]
            time.sleep(1.0)
            result.rss_start.append(rss_mb(pid))
            if not register:
                result.loads.append(load())
                print(f"  {size}: RSS {result.rss_start[-1]:.0f} MB with devices only "
                      f"({load()})", flush=True)  # fmt: skip
                return
            ok, seconds = register_all(daemon.sip_port, size, window)
            time.sleep(1.0)
            result.rss_bound.append(rss_mb(pid))
            time.sleep(LINGER)  # the registrar's answers for retransmissions are dropped
            result.rss_settled.append(rss_mb(pid))
            result.bound.append(ok)
            result.register_rate.append(ok / seconds)
            result.loads.append(load())
            print(f"  {size}: {ok}/{size} bound in {seconds:.1f} s; RSS {result.rss_start[-1]:.0f}"
                  f" MB with devices only, {result.rss_bound[-1]:.0f} MB with bindings, "
                  f"{result.rss_settled[-1]:.0f} MB {LINGER:.0f} s later "
                  f"({load()})", flush=True)  # fmt: skip
        finally:
            daemon.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sizes", default="25000,50000,100000")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--window", type=int, default=200, help="REGISTERs in flight")
    ap.add_argument(
        "--devices-only",
        action="store_true",
        help="skip the REGISTERs: import, restarts and the RSS with devices only",
    )
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if not all(1 <= s <= MAX_DEVICES for s in sizes) or not 1 <= args.runs <= 5:
        ap.error(f"sizes must be 1..{MAX_DEVICES}, --runs 1..5")
    version = subprocess.run([*CALLBOARD, "--version"], capture_output=True, text=True)
    print(f"cores: {os.cpu_count()}; {version.stdout.strip()}; Python {sys.version.split()[0]};"
          f" {load()}")  # fmt: skip
    results = {size: Result(size) for size in sizes}
    for run in range(args.runs):
        for size in sizes:  # interleaved: every size in each run
            print(f"run {run + 1}/{args.runs}, {size} devices", flush=True)
            one_run(size, args.restarts, args.window, results[size], register=not args.devices_only)
    med = statistics.median
    print()
    if args.devices_only:
        print("| devices | import (CPU) | start → READY (CPU) | RSS, devices only | load |")
        print("|---|---|---|---|---|")
        for r in results.values():
            print(f"| {r.size:,} | {med(r.import_s):.2f} s ({med(r.import_cpu):.2f} s) | "
                  f"{med(r.ready_s):.2f} s ({med(r.ready_cpu):.2f} s) | "
                  f"{med(r.rss_start):.0f} MB | {r.loads[-1]} |")  # fmt: skip
        return 0
    print(
        "| devices | import (CPU) | start → READY (CPU) | start → first SIP answer |"
        " RSS, devices only | RSS, + one binding each | same, 36 s later | bindings |"
        " REGISTER/s while binding | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results.values():
        print(f"| {r.size:,} | {med(r.import_s):.2f} s ({med(r.import_cpu):.2f} s) | "
              f"{med(r.ready_s):.2f} s ({med(r.ready_cpu):.2f} s) | "
              f"{med(r.answer_s):.2f} s | {med(r.rss_start):.0f} MB | {med(r.rss_bound):.0f} MB | "
              f"{med(r.rss_settled):.0f} MB | "
              f"{min(r.bound):,} | {med(r.register_rate):.0f} | {r.loads[-1]} |")  # fmt: skip
    failed = any(min(r.bound) < r.size for r in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
