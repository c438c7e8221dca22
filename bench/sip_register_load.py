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

With ``--at RATE --baseline PYTHONPATH`` it measures no ceiling: the real daemon (one process,
``--devices`` imported) answers ``--seconds`` of REGISTERs at that fixed rate, this tree and
the baseline's in turn, ``--runs`` times, and prints the daemon's CPU per answered REGISTER and
the ratio of the medians (a rate both can sustain compares their cost within one run), with
sipp's own CPU at each step to show the generator is far from its limit.

With ``--workers N`` the Callboard side is the real daemon instead of the bare registrar:
``callboard serve`` with one worker and ``callboard serve --workers N`` (the supervisor and
its workers sharing the SIP port through ``SO_REUSEPORT``), each started once with
``--devices`` phones imported (``callboard import``, no activation code), at its default log
level, measured in every run next to Kamailio and the generator ceiling. Every server then
gets ``bench/sipp/register_devices.xml``: each call registers one of the imported devices
(an injection file of MAC;number rows, starting where the last probe stopped, so a probe
mostly refreshes other phones than the one before), with the contact parameters the daemon's
policy checks. The kernel spreads UDP over the workers by a hash of the client's address and
port, so one sipp socket would land on one worker: the load goes out from ``--sipp-processes``
sipp processes, each with ``-t un`` (a socket, hence a source port, per call) by default
(``--transport``); what each worker answered is read from ``callboard status`` and printed.

    python bench/sip_register_load.py --workers 2 [--devices 20000] [--sipp-processes 2]

With ``--floor`` every run also measures the cheapest REGISTER responder Python on Twisted can
be (``serve_floor``: copy five header lines into a 200; no parsing, policy, binding or log):
what separates Callboard from that floor is our code, what separates the floor from Kamailio
is the language and the reactor.

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
DEVICES_SCENARIO = ROOT / "bench" / "sipp" / "register_devices.xml"
CALLBOARD = [sys.executable, "-m", "callboard.daemon.main"]
MAX_RATE = 60_000
MODEL = "8841"
FD_BUDGET = 16_000  # sockets in flight for all sipp processes together (ulimit -n is 20,000)
TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live descendants (a supervisor and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        member = todo.pop()
        todo.extend(children.get(member, ()))
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICKS


def mac_of(i: int) -> str:
    return f"00AC{i:08X}"


def dn_of(i: int) -> str:
    return str(2_000_000 + i)


@dataclass
class Load:
    """How sipp loads a server: scenario, imported devices to register, processes, transport."""

    scenario: Path = SCENARIO
    devices: int = 0  # > 0: calls register these devices (an injection file per process)
    processes: int = 1
    transport: str = "u1"
    offset: int = 0  # the next device row: each probe goes on where the last one stopped

    def injection(self, path: Path, calls: int) -> list[str]:
        """sipp arguments for ``calls`` REGISTERs of the next devices (none without devices)."""
        if not self.devices:
            return []
        rows = ["SEQUENTIAL"]
        for _ in range(calls):
            i = self.offset % self.devices
            rows.append(f"{mac_of(i)};{dn_of(i)};")
            self.offset += 1
        path.write_text("\n".join(rows) + "\n")
        return ["-inf", str(path)]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def serve_floor(port: int, processes: int = 1) -> None:
    """The floor of any Python registrar on Twisted: each REGISTER answered 200 by copying its
    Via, From, To (plus a tag), Call-ID, CSeq and Contact lines, with no parsing, no policy, no
    binding kept and no logging. What this process spends per REGISTER is the cost of the
    reactor, the two system calls and a few string operations: no real registrar in Python
    on Twisted can be cheaper.

    ``processes`` > 1: that many such processes (this one and forked children, before the
    reactor is imported) share the port through ``SO_REUSEPORT``, as ``--workers`` do.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if processes > 1:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    for _ in range(processes - 1):
        if os.fork() == 0:  # a child: its own socket in the same reuse group
            sock.close()
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("127.0.0.1", port))
            break
    sock.setblocking(False)
    from twisted.internet import reactor
    from twisted.internet.protocol import DatagramProtocol

    copied = (b"via:", b"from:", b"call-id:", b"cseq:", b"contact:")

    class Floor(DatagramProtocol):
        def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
            head = datagram.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
            lines = [b"SIP/2.0 200 OK"]
            for line in head[1:]:
                lowered = line[:9].lower()
                if lowered.startswith(copied):
                    lines.append(line)
                elif lowered.startswith(b"to:"):
                    lines.append(line + b";tag=floor")
            lines.append(b"Content-Length: 0\r\n\r\n")
            self.transport.write(b"\r\n".join(lines), addr)

    reactor.adoptDatagramPort(sock.fileno(), socket.AF_INET, Floor())  # type: ignore[attr-defined]
    sock.close()  # the reactor holds its own duplicate
    reactor.run()  # type: ignore[attr-defined]


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


def run_step(port: int, rate: int, seconds: float, workdir: Path, load: Load | None = None) -> Step:
    """One probe: ``load.processes`` sipp processes sharing the rate and the calls."""
    load = load or Load()
    calls = max(100, int(rate * seconds)) // load.processes * load.processes
    share = calls // load.processes
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    start = time.monotonic()
    for n in range(load.processes):
        stat = workdir / f"stat_{port}_{rate}_{n}.csv"
        stat.unlink(missing_ok=True)
        per_rate = rate / load.processes
        args = [
            "sipp", f"127.0.0.1:{port}", "-sf", str(load.scenario), "-t", load.transport,
            "-i", "127.0.0.1", "-p", str(free_udp_port()), "-r", f"{per_rate:g}",
            "-m", str(share), "-l", str(max(int(per_rate * 3), 1000)),
            "-timeout", f"{int(seconds * 3 + 15)}s",
            "-trace_stat", "-stf", str(stat), "-fd", "1", "-nostdin", "-timeout_error",
            *load.injection(workdir / f"devices_{n}.csv", share),
        ]  # fmt: skip
        if load.transport == "un":  # a socket per call in flight: stay under the fd limit
            limit = str(min(max(int(per_rate * 3), 1000), FD_BUDGET // load.processes))
            args += ["-max_socket", limit, "-l", limit]
        procs.append((subprocess.Popen(args, cwd=workdir, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL), stat))  # fmt: skip
    ok = failed = retrans = 0
    cpu_s = 0.0
    elapsed = 0.0
    for proc, stat in procs:
        _, _, usage = os.wait4(proc.pid, 0)
        proc.returncode = 0
        cpu_s += usage.ru_utime + usage.ru_stime
        took = time.monotonic() - start
        if stat.exists():
            with stat.open() as f:
                rows = list(csv.reader(f, delimiter=";"))
            if len(rows) >= 2:
                head, last = rows[0], rows[-1]
                col = {name: i for i, name in enumerate(head)}
                ok += int(last[col["SuccessfulCall(C)"]])
                failed += int(last[col["FailedCall(C)"]])
                retrans += int(last[col["Retransmissions(C)"]])
                # sipp's own clock, first call to last answer (its start-up is not the server's)
                began = float(last[col["StartTime"]].split()[-1])
                ended = float(last[col["CurrentTime"]].split()[-1])
                took = min(took, max(ended - began, 1e-3))
        elapsed = max(elapsed, took)
    cpu = cpu_s / elapsed if elapsed > 0 else 0.0
    return Step(rate, calls, ok, failed, retrans, ok / elapsed if elapsed > 0 else 0.0, cpu)


@dataclass
class Ceiling:
    rate: float  # highest achieved rate of a clean step
    offered: int  # the offered rate of that step
    failed_at: int  # the lowest offered rate that failed (0: none did)
    sipp_cpu: float  # sipp's CPU use during that step
    steps: int
    server_cpu_ms: float = 0.0  # server CPU per answered REGISTER over the whole search


def sustained(
    port: int,
    step: int,
    resolution: int,
    seconds: float,
    workdir: Path,
    name: str,
    load: Load | None = None,
    pid: int | None = None,
) -> Ceiling:
    """Coarse climb until a step fails, then bisect to ``resolution``."""
    best: Step | None = None
    steps = answered = 0
    cpu_before = tree_cpu(pid) if pid else 0.0

    def probe(rate: int) -> bool:
        nonlocal best, steps
        nonlocal answered
        result = run_step(port, rate, seconds, workdir, load)
        steps += 1
        answered += result.ok
        print(
            f"  {name:12s} rate {rate:6d}/s: ok {result.ok}/{result.calls} failed {result.failed} "
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
    cpu_ms = 1000 * (tree_cpu(pid) - cpu_before) / max(answered, 1) if pid else 0.0
    if best is None:
        return Ceiling(0.0, 0, high, 0.0, steps, cpu_ms)
    return Ceiling(best.achieved, best.rate, high, best.sipp_cpu, steps, cpu_ms)


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


def measure_callboard(
    step: int,
    resolution: int,
    seconds: float,
    workdir: Path,
    mode: str = "--serve",
    load: Load | None = None,
    processes: int = 1,
) -> Ceiling:
    """The bare registrar (``--serve``) or the Python floor (``--serve-floor``, in
    ``processes`` processes sharing the port)."""
    port = free_udp_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, mode, str(port), "--floor-processes", str(processes)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
    )
    name = "callboard" if mode == "--serve" else f"floor{processes}"
    try:
        wait_udp(port)
        return sustained(port, step, resolution, seconds, workdir, name, load, proc.pid)
    finally:
        stop(proc)


def measure_kamailio(
    step: int, resolution: int, seconds: float, workdir: Path, load: Load | None = None
) -> Ceiling:
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
        return sustained(port, step, resolution, seconds, workdir, "kamailio", load, proc.pid)
    finally:
        stop(proc)


def measure_generator(
    step: int, resolution: int, seconds: float, workdir: Path, load: Load | None = None
) -> Ceiling:
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
        return sustained(port, step, resolution, seconds, workdir, "sipp", load)
    finally:
        stop(proc)


class Daemon:
    """``callboard serve [--workers N]`` on loopback with ``devices`` phones imported."""

    def __init__(
        self, workdir: Path, workers: int, devices: int, pythonpath: str | None = None
    ) -> None:
        self.name = f"callboard-w{workers}"
        self.base = workdir / self.name
        self.base.mkdir()
        self.state = self.base / "state"
        self.workers = workers
        self.devices = devices
        # The tree the daemon and its CLI import (None: as this process does).
        self.env = dict(os.environ)
        if pythonpath is not None:
            self.env["PYTHONPATH"] = pythonpath
        self.port = free_udp_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> None:
        """Start, wait for READY=1 (every worker ready), import the phones, wait for answers."""
        notify_path = self.base / "notify.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        command = [
            *CALLBOARD, "serve", "--state-dir", str(self.state), "--listen-address", "127.0.0.1",
            "--tftp-port", "0", "--http-port", "0", "--tvs-port", "0", "--https-port", "0",
            "--sip-port", str(self.port), "--sip-tls-port", "0",
        ]  # fmt: skip
        if self.workers > 1:
            command += ["--workers", str(self.workers)]
        with (self.base / "daemon.log").open("ab") as log:
            self.proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=dict(self.env, NOTIFY_SOCKET=str(notify_path)),
            )
        try:
            notify.settimeout(timeout)
            while b"READY=1" not in notify.recv(4096):
                pass
        finally:
            notify.close()
        rows = ["mac,model,description,user,directory_number,display_name,requires_activation"]
        rows += [
            f"{mac_of(i)},{MODEL},bench {i},,{dn_of(i)},Phone {i},false"
            for i in range(self.devices)
        ]
        phones = self.base / "phones.csv"
        phones.write_text("\n".join(rows) + "\n")
        self.cli("import", str(phones))
        time.sleep(1.0)  # every worker follows the store's change feed within 0.2 s
        wait_udp(self.port)

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [*CALLBOARD, "--admin-socket", str(self.state / "admin.sock"), *args],
            capture_output=True, text=True, timeout=300, check=False, env=self.env,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"callboard {' '.join(args)}: {out.stderr.strip()[-2000:]}")
        return out.stdout

    def spread(self) -> str:
        """REGISTER answers per worker so far (``callboard status``: workers[].served)."""
        import json

        status = json.loads(self.cli("status", "--json"))
        workers = status.get("workers") or []
        if not workers:
            return f"one process: {status['counters'].get('sip_register', '?')} REGISTERs"
        return ", ".join(
            f"worker {w['index']}: {w['served']['sip_register_responses']}" for w in workers
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


def _version(args: list[str]) -> str:
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    return (out.stdout + out.stderr).strip().splitlines()[0] if out.stdout + out.stderr else "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--serve-floor", type=int, help=argparse.SUPPRESS)
    ap.add_argument(
        "--floor",
        action="store_true",
        help="also measure the cheapest possible Python/Twisted responder (copies 5 headers)",
    )
    ap.add_argument("--floor-processes", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--step", type=int, default=2000, help="coarse rate step, per second")
    ap.add_argument("--resolution", type=int, default=250, help="bisect down to this, per second")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each rate step")
    ap.add_argument("--runs", type=int, default=3, help="repeat and take medians")
    ap.add_argument("--no-generator", action="store_true", help="skip the sipp-vs-sipp ceiling")
    ap.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="measure the real daemon with 1 and with N workers instead of the bare registrar",
    )
    ap.add_argument("--devices", type=int, default=20_000, help="phones imported (--workers)")
    ap.add_argument(
        "--sipp-processes", type=int, default=2, help="sipp processes per probe (--workers)"
    )
    ap.add_argument(
        "--transport", choices=("u1", "un"), default="un", help="sipp UDP mode (--workers)"
    )
    ap.add_argument(
        "--at",
        type=int,
        metavar="RATE",
        help="instead of ceilings: the real daemon's CPU per answered REGISTER at this fixed rate "
        "(one process, --devices imported), this tree and --baseline alternately, --runs times",
    )
    ap.add_argument("--baseline", metavar="PYTHONPATH", help="the tree --at compares with")
    opts = ap.parse_args()
    if opts.serve:
        serve(opts.serve)
        return 0
    if opts.serve_floor:
        serve_floor(opts.serve_floor, opts.floor_processes)
        return 0
    if shutil.which("sipp") is None:
        print("sipp not found (Debian package sip-tester)", file=sys.stderr)
        return 2
    if not (1 <= opts.runs <= 5 and 0 < opts.seconds <= 10 and 100 <= opts.resolution <= opts.step):
        ap.error("--runs 1..5, --seconds up to 10, 100 <= --resolution <= --step")
    if opts.at is not None:
        if not (100 <= opts.at <= 20_000 and opts.baseline and 100 <= opts.devices <= 200_000):
            ap.error("--at 100..20000 needs --baseline; --devices 100..200000")
        return main_fixed_rate(opts)
    if opts.workers:
        if not (2 <= opts.workers <= 8 and 1 <= opts.sipp_processes <= 8):
            ap.error("--workers 2..8, --sipp-processes 1..8")
        if not 100 <= opts.devices <= 200_000:
            ap.error("--devices 100..200000")
        return main_workers(opts)
    print(
        f"cores: {os.cpu_count()}; {_version(['sipp', '-v'])}; "
        f"{_version(['/usr/sbin/kamailio', '-v'])}; Python {sys.version.split()[0]}"
    )
    args = (opts.step, opts.resolution, opts.seconds)
    found: dict[str, list[Ceiling]] = {"callboard": [], "kamailio": [], "sipp": [], "floor": []}
    loads: list[str] = []
    with tempfile.TemporaryDirectory(prefix="sipbench") as tmp:
        work = Path(tmp)
        for i in range(opts.runs):
            print(f"run {i + 1}/{opts.runs} (load {os.getloadavg()})", file=sys.stderr)
            found["callboard"].append(measure_callboard(*args, work))
            if opts.floor:
                found["floor"].append(measure_callboard(*args, work, "--serve-floor"))
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
        "floor": "Python floor (Twisted, copies 5 headers, 1 process)",
    }
    print("| server | sustained REGISTER/s, zero failures (median) | runs | first failing offered "
          "rate | server CPU per REGISTER | sipp CPU at the ceiling |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for key, values in found.items():
        if values:
            print(f"| {names[key]} | {med(v.rate for v in values):.0f} | "
                  f"{', '.join(f'{v.rate:.0f}' for v in values)} | "
                  f"{', '.join(str(v.failed_at) for v in values)} | "
                  f"{med(v.server_cpu_ms for v in values):.3f} ms | "
                  f"{med(v.sipp_cpu for v in values):.2f} |")  # fmt: skip
    c = med(v.rate for v in found["callboard"])
    k = med(v.rate for v in found["kamailio"])
    print(f"\nratio Callboard/Kamailio: {c / k:.2f}" if k else "\nKamailio rate is 0")
    if found["floor"] and k:
        f = med(v.rate for v in found["floor"])
        print(f"ratio Python floor/Kamailio: {f / k:.2f}; Callboard/Python floor: {c / f:.2f}")
    print(f"load averages after each run: {', '.join(loads)}")
    return 0


def main_fixed_rate(opts: argparse.Namespace) -> int:
    """The daemon's CPU per answered REGISTER at ``--at`` per second, this tree against
    ``--baseline``, interleaved; a fixed rate below both ceilings compares the cost of a
    REGISTER in one run where ceilings would compare the box's mood."""
    print(f"cores: {os.cpu_count()}; {_version(['sipp', '-v'])}; Python {sys.version.split()[0]}")
    load = Load(DEVICES_SCENARIO, opts.devices, 1, opts.transport)
    trees = {"this tree": os.environ.get("PYTHONPATH"), "baseline": opts.baseline}
    cost: dict[str, list[float]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="sipbench") as tmp:
        for i in range(opts.runs):
            for name, pythonpath in trees.items():
                work = Path(tmp) / f"{i}-{name.replace(' ', '-')}"
                work.mkdir()
                daemon = Daemon(work, 1, opts.devices, pythonpath)
                daemon.start()
                try:
                    before = tree_cpu(daemon.pid)
                    step = run_step(daemon.port, opts.at, opts.seconds, work, load)
                    used = tree_cpu(daemon.pid) - before
                finally:
                    daemon.stop()
                if step.failed or not step.ok:
                    print(f"run {i + 1} {name}: {step.failed} of {step.calls} failed", flush=True)
                    return 1
                cost[name].append(used / step.ok * 1000)
                print(
                    f"run {i + 1} {name}: {step.ok}/{step.calls} answered at {opts.at}/s, "
                    f"{cost[name][-1]:.3f} ms CPU per REGISTER, sipp {step.sipp_cpu:.2f} of a "
                    f"core (load {_uptime()})",
                    flush=True,
                )
    now, then = (statistics.median(cost[name]) for name in trees)
    print(f"median of {opts.runs}: this tree {now:.3f} ms, baseline {then:.3f} ms per REGISTER; "
          f"this tree / baseline: {now / then:.2f}")  # fmt: skip
    return 0


def main_workers(opts: argparse.Namespace) -> int:
    """The real daemon with 1 and N workers, Kamailio and the generator, interleaved."""
    print(
        f"cores: {os.cpu_count()}; {_version(['sipp', '-v'])}; "
        f"{_version(['/usr/sbin/kamailio', '-v'])}; Python {sys.version.split()[0]}"
    )
    load = Load(DEVICES_SCENARIO, opts.devices, opts.sipp_processes, opts.transport)
    print(
        f"load: {opts.sipp_processes} sipp processes per probe, -t {opts.transport}, "
        f"{opts.devices} imported devices, {opts.seconds:g} s per probe, steps of {opts.step}/s "
        f"bisected to {opts.resolution}/s",
        flush=True,
    )
    args = (opts.step, opts.resolution, opts.seconds)
    with tempfile.TemporaryDirectory(prefix="sipbench") as tmp:
        work = Path(tmp)
        daemons = [Daemon(work, 1, opts.devices), Daemon(work, opts.workers, opts.devices)]
        found: dict[str, list[Ceiling]] = {d.name: [] for d in daemons}
        floors = {"python floor": 1, f"python floor x{opts.workers}": opts.workers}
        found |= {"kamailio": [], "sipp": []} | {name: [] for name in floors}
        loads: list[str] = []
        try:
            for daemon in daemons:
                started = time.monotonic()
                daemon.start()
                print(f"{daemon.name}: started with {opts.devices} devices imported in "
                      f"{time.monotonic() - started:.1f} s", flush=True)  # fmt: skip
            for i in range(opts.runs):
                print(f"run {i + 1}/{opts.runs} (uptime: {_uptime()})", flush=True)
                for daemon in daemons:
                    found[daemon.name].append(
                        sustained(daemon.port, *args, work, daemon.name, load, daemon.pid)
                    )
                found["kamailio"].append(measure_kamailio(*args, work, load))
                for name, processes in (floors if opts.floor else {}).items():
                    found[name].append(
                        measure_callboard(*args, work, "--serve-floor", load, processes)
                    )
                if not opts.no_generator:
                    found["sipp"].append(measure_generator(*args, work, load))
                loads.append(_uptime())
                print(f"run {i + 1}: " + ", ".join(
                    f"{k} {v[-1].rate:.0f}/s (offered {v[-1].offered}, failed at "
                    f"{v[-1].failed_at}, sipp CPU {v[-1].sipp_cpu:.2f}, server "
                    f"{v[-1].server_cpu_ms:.3f} ms CPU/REGISTER)"
                    for k, v in found.items() if v
                ) + f"; uptime {loads[-1]}", flush=True)  # fmt: skip
            for daemon in daemons:
                print(f"{daemon.name} REGISTER answers per worker (SO_REUSEPORT spread): "
                      f"{daemon.spread()}")  # fmt: skip
        finally:
            for daemon in daemons:
                daemon.stop()
    med = statistics.median
    print("| server | sustained REGISTER/s, zero failures (median) | runs | first failing offered "
          "rate | server CPU per REGISTER | sipp CPU at the ceiling |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for key, values in found.items():
        if values:
            print(f"| {key} | {med(v.rate for v in values):.0f} | "
                  f"{', '.join(f'{v.rate:.0f}' for v in values)} | "
                  f"{', '.join(str(v.failed_at) for v in values)} | "
                  f"{med(v.server_cpu_ms for v in values):.3f} ms | "
                  f"{med(v.sipp_cpu for v in values):.2f} |")  # fmt: skip
    rates = {k: med(v.rate for v in values) for k, values in found.items() if values}
    many = daemons[1].name
    for ours in (many, daemons[0].name):
        for ref in (daemons[0].name, "kamailio", *floors):
            if ref != ours and rates.get(ref):
                print(f"ratio {ours}/{ref}: {rates[ours] / rates[ref]:.2f}")
    print(f"uptime after each run: {'; '.join(loads)}")
    return 0


def _uptime() -> str:
    out = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout
    return out.strip().split("load average:")[-1].strip()


if __name__ == "__main__":
    sys.exit(main())
