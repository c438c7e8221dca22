"""TFTP 1 KB transfers/s with the C load generator: Callboard, atftpd and dnsmasq, same run.

Every server runs inside a network namespace this script creates (dnsmasq serves TFTP only on
port 69), each at its default log level writing its log to a file: Callboard as ``callboard
serve`` (the real daemon, its TFTP wiring and logging), atftpd 0.8.0 and dnsmasq 2.90. The
load is ``tftpload.c`` (one non-blocking socket per transfer, one epoll loop; build it with
``gcc -O2 -o /tmp/tftpload ../shared/tools/tftpload.c``; never copied into this repository)
with 64 transfers in flight over 64 loopback source addresses. Runs are interleaved (each round
runs every server once) so the shared machine's load falls on all of them alike.

Printed: core count, versions, ``uptime`` before each round, every run (transfers/s, errors,
server CPU per transfer, generator CPU %), medians and ratios, and the generator's ceiling: two
generator processes (half the transfers each) against the fastest server. With
``--profile`` a last Callboard run is sampled with ``py-spy record`` and its top frames shown.
With ``--workers N`` (N > 1) a second Callboard, ``callboard serve --workers N`` (the
supervisor and its N worker processes sharing the TFTP port through ``SO_REUSEPORT``), runs
next to the one-worker daemon in every round; its CPU is the sum over the supervisor and its
workers, and its ratios against one worker and the reference servers are printed. With
``--baseline PYTHONPATH`` another tree of Callboard runs next to it (``baseline``), and with
both options that tree also runs with N workers (``baseline-wN``): the same-run A/B of a change,
whose server CPU per transfer is printed as a ratio (of the medians, and round by round).
Bounded: each run lasts ``--seconds`` (≤ 30), at most 9 runs. Needs root (namespaces).

    python bench/tftp_c_load.py [--seconds 4] [--runs 3] [--profile] [--workers 2] \
        [--baseline DIR] [--only callboard-w2,baseline-w2,dnsmasq]
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

FILE = "bench1k.bin"
SIZE = 1024
NETNS = f"cbtftp{os.getpid()}"
CALLBOARD_PORT = 6969
ATFTPD_PORT = 6970
BASELINE_PORT = 6968
WORKERS_PORT = 6967
BASELINE_WORKERS_PORT = 6966
DNSMASQ_PORT = 69  # the only port dnsmasq serves TFTP on
CALLBOARD = [sys.executable, "-m", "callboard.daemon.main"]
TICKS = os.sysconf("SC_CLK_TCK")


def netns(*cmd: str) -> list[str]:
    return ["ip", "netns", "exec", NETNS, *cmd]


def process_tree(pid: int) -> list[int]:
    """The process and its live descendants (a supervisor and its workers), from /proc."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children[ppid].append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], ()))
    return tree


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process and its live descendants (all threads), from /proc."""
    user = system = 0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user, system = user + int(fields[11]), system + int(fields[12])
    return user / TICKS, system / TICKS


def run_delay(pid: int) -> float:
    """Seconds the process's threads have waited for a CPU while runnable (schedstat).

    Threads that have exited are not counted (atftpd's per-transfer threads): for the
    single-threaded servers this is the whole of it.
    """
    total = 0
    for member in process_tree(pid):
        try:
            tasks = list(Path(f"/proc/{member}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                total += int((task / "schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return total / 1e9


@dataclass
class Server:
    name: str
    port: int
    command: list[str]
    version: str
    log: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    runs: list[Run] = field(default_factory=list)
    notify: socket.socket | None = None  # READY=1 from a callboard daemon (sd_notify)

    def start(self) -> None:
        env = self.env
        if self.name.startswith(("callboard", "baseline")):
            # Wait for READY=1 (sent once every worker is ready), not only for one answer:
            # with workers, the first answer may come from worker 0 alone.
            path = self.log.with_suffix(".notify")
            path.unlink(missing_ok=True)
            self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.notify.bind(str(path))
            env = {**(env or os.environ), "NOTIFY_SOCKET": str(path)}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(netns(*self.command), stdout=out, stderr=out, env=env)

    def wait_notified(self, timeout: float = 90.0) -> None:
        if self.notify is None:
            return
        self.notify.settimeout(timeout)
        while b"READY=1" not in self.notify.recv(4096):
            pass

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@dataclass
class Run:
    tps: float
    transfers: int
    errors: int
    server_cpu_ms: float  # server CPU per transfer
    server_sys_share: float  # of which in the kernel
    server_busy: float  # server CPU as a share of one core
    runq_wait: float  # share of the run the server's live threads waited for a CPU
    generator_cpu: float  # generator CPU as a share of one core


def tftpload(binary: str, port: int, seconds: float, conc: int, sources: int) -> list[str]:
    return netns(
        binary, "-H", "127.0.0.1", "-p", str(port), "-f", FILE, "-s", str(SIZE),
        "-c", str(conc), "-S", str(sources), "-d", str(seconds), "-r", "1000",
    )  # fmt: skip


def parse(line: str) -> dict[str, float]:
    return {k: float(v) for k, v in (p.split("=", 1) for p in line.split() if "=" in p)}


def load(server: Server, binary: str, seconds: float, generators: int, conc: int) -> Run:
    """``generators`` tftpload processes, ``conc`` transfers in flight in all."""
    before = cpu_seconds(server.pid)
    waited = run_delay(server.pid)
    started = time.monotonic()
    procs = []
    for _ in range(generators):
        procs.append(
            subprocess.Popen(
                tftpload(binary, server.port, seconds, conc // generators, 64 // generators),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 30)
        results.append(parse(out.strip().splitlines()[-1]))
    after = cpu_seconds(server.pid)
    waited = run_delay(server.pid) - waited
    wall = time.monotonic() - started
    user, system = after[0] - before[0], after[1] - before[1]
    server_cpu = user + system
    transfers = int(sum(r["transfers"] for r in results))
    return Run(
        tps=sum(r["tps"] for r in results),
        transfers=transfers,
        errors=int(sum(r["errors"] for r in results)),
        server_cpu_ms=1000 * server_cpu / max(transfers, 1),
        server_sys_share=system / server_cpu if server_cpu else 0.0,
        server_busy=server_cpu / wall,
        runq_wait=waited / wall,
        generator_cpu=0.0,  # set by the caller from RUSAGE_CHILDREN (see ChildCPU)
    )


class ChildCPU:
    """Generator CPU: RUSAGE_CHILDREN grows by what each waited-for generator used."""

    def __init__(self) -> None:
        self.last = self._now()

    @staticmethod
    def _now() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    def since_last(self) -> float:
        now = self._now()
        spent, self.last = now - self.last, now
        return spent


def wait_ready(port: int, binary: str, timeout: float = 30.0) -> None:
    """Until the server answers an RRQ for the file in the namespace (via tftpload -n 1)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = subprocess.run(
            netns(binary, "-p", str(port), "-f", FILE, "-n", "1", "-d", "1"),
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if "transfers=1 errors=0" in probe.stdout:
            return
        time.sleep(0.2)
    raise SystemExit(f"server on port {port} did not answer in {timeout}s")


def version_of(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).strip().splitlines()[0]


def callboard_version() -> str:
    import twisted
    from callboard.daemon.main import package_version

    python = platform.python_version()
    return f"callboard {package_version()} (Python {python}, Twisted {twisted.__version__})"


def callboard_serve(
    work: Path, root: Path, name: str, port: int, log_level: str | None, workers: int = 1
) -> list[str]:
    state = work / f"{name}-state"
    state.mkdir()
    shutil.copytree(root, state / "tftp")
    serve = [
        *CALLBOARD, "serve", "--state-dir", str(state), "--listen-address", "127.0.0.1",
        "--tftp-port", str(port), "--http-port", "0", "--tvs-port", "0",
        "--sip-port", "0", "--sip-tls-port", "0", "--https-port", "0",
    ]  # fmt: skip
    if workers > 1:
        serve += ["--workers", str(workers)]
    return serve + (["--log-level", log_level] if log_level else [])


def make_servers(
    work: Path, root: Path, log_level: str | None, baseline: str | None, workers: int = 1
) -> list[Server]:
    serve = callboard_serve(work, root, "callboard", CALLBOARD_PORT, log_level)
    servers = [
        Server("callboard", CALLBOARD_PORT, serve, callboard_version(), work / "callboard.log"),
    ]
    if workers > 1:
        name = f"callboard-w{workers}"
        serve = callboard_serve(work, root, name, WORKERS_PORT, log_level, workers)
        servers.append(Server(name, WORKERS_PORT, serve,
                              f"{callboard_version()}, --workers {workers}",
                              work / f"{name}.log"))  # fmt: skip
    if baseline:
        # Another tree of Callboard (say, the commit before a change), interleaved with the
        # rest: the before/after comparison shares the machine's load like the ratios do.
        serve = callboard_serve(work, root, "baseline", BASELINE_PORT, log_level)
        env = {**os.environ, "PYTHONPATH": baseline}
        servers.append(Server("baseline", BASELINE_PORT, serve, f"callboard from {baseline}",
                              work / "baseline.log", env))  # fmt: skip
        if workers > 1:  # and the same tree with the same workers: the A/B of the scale-out
            name = f"baseline-w{workers}"
            serve = callboard_serve(work, root, name, BASELINE_WORKERS_PORT, log_level, workers)
            servers.append(Server(name, BASELINE_WORKERS_PORT, serve,
                                  f"callboard from {baseline}, --workers {workers}",
                                  work / f"{name}.log", env))  # fmt: skip
    servers += [
        Server(
            "atftpd",
            ATFTPD_PORT,
            [
                "atftpd",
                "--daemon",
                "--no-fork",
                "--port",
                str(ATFTPD_PORT),
                "--bind-address",
                "127.0.0.1",
                "--logfile",
                str(work / "atftpd-own.log"),
                "--maxthread",
                "200",
                "--user",
                "root.root",
                str(root),
            ],
            version_of(["atftpd", "--version"]),
            work / "atftpd.log",
        ),
        Server(
            "dnsmasq",
            DNSMASQ_PORT,
            [
                "dnsmasq",
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--port=0",
                "--enable-tftp",
                f"--tftp-root={root}",
                "--interface=lo",
                "--bind-interfaces",
                "--tftp-max=1000",
                "--user=root",
                "--pid-file",
                f"--log-facility={work / 'dnsmasq-own.log'}",
            ],
            version_of(["dnsmasq", "--version"]),
            work / "dnsmasq.log",
        ),
    ]
    return servers


def worker_spread(state: Path, key: str) -> str:
    """What each worker served, from ``callboard status --json`` (worker 0 asks the rest)."""
    import json

    out = subprocess.run(
        [*CALLBOARD, "--admin-socket", str(state / "admin.sock"), "status", "--json"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    try:
        workers = json.loads(out.stdout)["workers"]
        return ", ".join(f"worker {w['index']}: {w['served'][key]}" for w in workers)
    except (ValueError, KeyError, TypeError):
        return f"unknown ({out.stderr.strip()[-200:]})"


def profile(server: Server, binary: str, seconds: float, top: int, keep: str | None) -> None:
    """py-spy record during one run; the frames with most samples (self and total).

    ``keep``: a directory to leave the raw samples in (``<server>.raw``), for a closer look.
    """
    raw = Path(tempfile.mkstemp(suffix=".txt")[1])
    spy = subprocess.Popen(
        ["py-spy", "record", "--format", "raw", "-r", "200", "-d", str(int(seconds) + 1),
         "-p", str(server.pid), "-o", str(raw), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.5)
    run = load(server, binary, seconds, 1, 64)
    spy.wait(timeout=seconds + 60)
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        samples += n
        # "function (file:line)" -> "function (file)": one entry per function
        frames = [frame.rsplit(":", 1)[0] + ")" for frame in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    if keep:
        kept = Path(keep) / f"{server.name}.raw"
        shutil.move(raw, kept)
        print(f"\nraw py-spy samples of {server.name}: {kept}")
    else:
        raw.unlink()
    print(f"\npy-spy record -r 200 --nonblocking on {server.name} during a {seconds:g}s run "
          f"({run.tps:.0f}/s), {samples} samples")  # fmt: skip
    print("  self %  function")
    for frame, n in own.most_common(top):
        print(f"  {100 * n / max(samples, 1):5.1f}  {frame}")
    print("  total % function (below the reactor loop, which holds ~all samples)")
    inner = [(f, n) for f, n in total.most_common() if n < 0.85 * samples]
    for frame, n in inner[:top]:
        print(f"  {100 * n / max(samples, 1):5.1f}  {frame}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tftpload", default="/tmp/tftpload")
    parser.add_argument("--log-level", default=None, help="callboard's (default: its default)")
    parser.add_argument("--only", default="", help="comma-separated server names to run")
    parser.add_argument("--profile", action="store_true", help="py-spy a last callboard run")
    parser.add_argument(
        "--profile-keep", metavar="DIR", help="with --profile: keep the raw samples in DIR"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="also run `callboard serve --workers N` (N > 1) next to the one-worker daemon",
    )
    parser.add_argument(
        "--baseline",
        metavar="PYTHONPATH",
        help="also run the callboard importable from this PYTHONPATH (e.g. an older commit)",
    )
    args = parser.parse_args()
    if not 1 <= args.seconds <= 30 or not 1 <= args.runs <= 9 or not 1 <= args.workers <= 8:
        parser.error("--seconds must be 1..30, --runs 1..9 and --workers 1..8")
    if os.geteuid() != 0:
        parser.error("needs root (network namespace, reference servers)")
    if not os.access(args.tftpload, os.X_OK):
        parser.error(f"{args.tftpload}: build it from ../shared/tools/tftpload.c first")

    work = Path(tempfile.mkdtemp(prefix="tftp-c-load-"))
    work.chmod(0o755)
    root = work / "root"
    root.mkdir(mode=0o755)
    (root / FILE).write_bytes(bytes(range(256)) * (SIZE // 256))
    (root / FILE).chmod(0o644)
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    servers: list[Server] = []
    try:
        subprocess.run(netns("ip", "link", "set", "lo", "up"), check=True)
        servers = make_servers(work, root, args.log_level, args.baseline, args.workers)
        if args.only:
            servers = [s for s in servers if s.name in args.only.split(",")]
        print(f"cores: {os.cpu_count()}  kernel: {platform.release()}")
        print(f"load generator: {args.tftpload} (tftpload.c), 64 in flight, "
              f"64 source addresses, {SIZE}-byte file, {args.seconds:g}s per run")  # fmt: skip
        for server in servers:
            print(f"  {server.name}: {server.version}")
            server.start()
        for server in servers:
            server.wait_notified()
            wait_ready(server.port, args.tftpload)
        cpu = ChildCPU()
        for round_ in range(1, args.runs + 1):
            print(f"round {round_}: uptime: {version_of(['uptime']).split('load', 1)[-1]}")
            for server in servers:
                cpu.since_last()
                run = load(server, args.tftpload, args.seconds, 1, 64)
                run.generator_cpu = cpu.since_last() / args.seconds
                server.runs.append(run)
                print(f"  {server.name:12} {run.tps:8.0f}/s  errors={run.errors:<3} "
                      f"server {run.server_cpu_ms:.3f} ms CPU/transfer "
                      f"({100 * run.server_sys_share:.0f}% sys; busy {100 * run.server_busy:.0f}% "
                      f"of a core, waited {100 * run.runq_wait:.0f}% for one)  "
                      f"generator {100 * run.generator_cpu:.0f}% of a core")  # fmt: skip
        medians = {s.name: statistics.median(r.tps for r in s.runs) for s in servers}
        print("\nmedians (transfers/s):")
        for server in servers:
            cpu_ms = statistics.median(r.server_cpu_ms for r in server.runs)
            errors = sum(r.errors for r in server.runs)
            print(f"  {server.name:12} {medians[server.name]:8.0f}  "
                  f"({cpu_ms:.3f} ms server CPU/transfer, {errors} errors)")  # fmt: skip
        ours = [name for name in medians if name.startswith("callboard")]
        for name in ours:
            refs = ("callboard", "baseline", f"baseline-w{args.workers}", "atftpd", "dnsmasq")
            for ref in refs:
                if ref in medians and ref != name:
                    ratio = medians[name] / medians[ref]
                    print(f"  {name} / {ref}: {ratio:.2f}")
        by_name = {s.name: s for s in servers}
        workers = f"-w{args.workers}"
        for name, before in (
            ("callboard", "baseline"),
            ("callboard" + workers, "baseline" + workers),
        ):
            if name in by_name and before in by_name:  # the same-run A/B of a change
                after_ms = [r.server_cpu_ms for r in by_name[name].runs]
                before_ms = [r.server_cpu_ms for r in by_name[before].runs]
                paired = " / ".join(
                    f"{a / b:.2f}" for a, b in zip(after_ms, before_ms, strict=True)
                )
                ratio = statistics.median(after_ms) / statistics.median(before_ms)
                print(f"  {name} server CPU per transfer / {before}'s: {ratio:.2f} "
                      f"(medians; round by round {paired})")  # fmt: skip
        for server in servers:
            if server.name.startswith(("callboard-w", "baseline-w")):
                print(f"  {server.name} transfers served per worker (SO_REUSEPORT spread): "
                      f"{worker_spread(work / f'{server.name}-state', 'transfers')}")  # fmt: skip
        fastest = max(servers, key=lambda s: medians[s.name])
        cpu.since_last()
        split = load(fastest, args.tftpload, args.seconds, 2, 64)
        split_cpu = cpu.since_last() / args.seconds
        print(f"\ngenerator ceiling: 2 generator processes x 32 in flight against "
              f"{fastest.name}: {split.tps:.0f}/s, errors={split.errors} "
              f"(one generator: {medians[fastest.name]:.0f}/s; generators used "
              f"{100 * split_cpu:.0f}% of a core in all)")  # fmt: skip
        if args.profile:
            for server in servers:
                if server.name in ("callboard", "baseline"):  # one process: py-spy it
                    profile(server, args.tftpload, args.seconds, 15, args.profile_keep)
    finally:
        for server in servers:
            server.stop()
            if server.notify is not None:
                server.notify.close()
        subprocess.run(["ip", "netns", "delete", NETNS], check=False)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(10)
    sys.exit(main())
