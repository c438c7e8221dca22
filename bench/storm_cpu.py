"""Benchmark: the daemon's CPU per onboarded phone against one ``openssl s_server`` handshake.

Each run, alternating, in one invocation: (a) a fresh ``callboard serve`` (default log level,
lab manufacturing CA as its trust store) and one ``callboard phone storm --provision`` of N
phones through the whole path (trust list, XMLDefault, TVS ACTIVATE over mutual TLS, SEP
config, REGISTER), the daemon's CPU (utime+stime from /proc) counted from the moment the storm
starts booting (after its bulk import) to its end, and its main (reactor) thread's alone
(the rest is the store thread's and other helpers'); (b) ``openssl s_server -Verify 1`` with the
daemon's own TVS certificate and the same lab chain, N mutual-TLS handshakes (one small request
each, from the same MIC), its CPU per handshake. Prints the core count, the openssl version,
each run, the medians and the ratio. Loopback only, bounded in count and time.

``--baseline PYTHONPATH`` runs, after each storm, the same storm against a daemon that imports
Callboard from elsewhere (``''``: the installed package), so a change is measured against the
code before it in the same run, storm for storm. ``--baseline-parts phone`` takes the phones'
code (the storm command) from there instead, and this tree's daemon; ``both`` takes both.

``--concurrency 64,512`` measures several in-flight levels, interleaved within each run (storm
at 64, openssl, storm at 512, openssl, ...). The load generator's own CPU (the storm command and
its client processes, from ``wait4``) is reported per phone, with the rate it could sustain on
this machine's cores if it were the only limit (its ceiling). ``--profile SECONDS`` samples the
daemon with ``py-spy record --pid PID -r 200 -d SECONDS --format raw --nonblocking`` once
booting starts (first run of each level) and prints the hottest frames.

    python bench/storm_cpu.py [--phones 2000] [--concurrency 64[,512]] [--processes 2] [--runs 3]
        [--profile 12 [--profile-out DIR]] [--baseline PYTHONPATH] [--workers 1[,2]] [--no-reuse]

``--no-reuse`` storms this tree's daemon a second time with ``phone storm --no-reuse`` (every
fetch on a new connection with a full TLS handshake, where the phones otherwise keep their
HTTP connection and keep or resume their HTTPS one), so both figures come from one run.

``--workers 1,2`` (issue 12) storms a ``callboard serve --workers 2`` daemon too, right before
each storm of the first count, and reports its phones/s against it; the daemon's CPU is then
the supervisor's and its workers' together.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from callboard.daemon import certs
from callboard.protocols.tvs.codec import ActivateRequest, DeviceName
from tvs_handshake import _drive as drive_handshakes
from tvs_handshake import _free_port, _wait_port

CALLBOARD = [sys.executable, "-m", "callboard.daemon.main"]
MAX_PHONES = 100_000
LAST = re.compile(r"^phones=(\d+) ok=(\d+) failed=(\d+) phones_per_s=([0-9.]+) ")


def cpu_seconds(pid: int, stat: str = "") -> float:
    """utime+stime of a process (or, with ``stat``, of the file named: one thread's)."""
    fields = Path(stat or f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reactor_cpu_seconds(pid: int) -> float:
    """The CPU of a process's main thread (the reactor's; the store and other threads not)."""
    try:
        return cpu_seconds(pid, f"/proc/{pid}/task/{pid}/stat")
    except OSError:
        return 0.0


def daemon_env(pythonpath: str | None) -> dict[str, str] | None:
    """The daemon's environment: ours, or ours with PYTHONPATH set (``""``: removed)."""
    if pythonpath is None:
        return None
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def start_daemon(
    state: Path, lab: Path, pythonpath: str | None = None, workers: int = 1
) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    log = open(state.parent / "daemon.log", "ab")  # noqa: SIM115 - handed to the child
    # HTTPS has no ephemeral port of its own (phones are told 6971 unless the storm says
    # otherwise): a free one, so that runs side by side (or another daemon) do not collide.
    https = _free_port()
    proc = subprocess.Popen(
        [*CALLBOARD, "serve", "--state-dir", str(state), "--listen-address", "127.0.0.1",
         "--tftp-port", "0", "--http-port", "0", "--tvs-port", "0", "--sip-port", "0",
         "--sip-tls-port", "0", "--https-port", str(https), "--manufacturing-trust", str(lab),
         *(["--workers", str(workers)] if workers > 1 else [])],
        stdout=log, stderr=subprocess.STDOUT, env=daemon_env(pythonpath),
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
            return proc, {**ports, "https": https}
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("daemon did not start")


@dataclass
class StormResult:
    rate: float
    daemon_cpu_ms: float  # per onboarded phone
    failed: int
    last: str
    generator_cpu_ms: float  # the storm command and its client processes, per phone
    profile: Path | None
    reactor_cpu_ms: float = 0.0  # the daemon's main thread alone, per phone (one process)


def storm_run(
    base: Path, lab: Path, phones: int, concurrency: int, processes: int, run: int,
    profile: float = 0.0, pythonpath: str | None = None, tag: str = "", workers: int = 1,
    phone_flags: tuple[str, ...] = (), baseline_parts: str = "daemon",
) -> StormResult:  # fmt: skip
    """One fresh daemon, one storm; ``pythonpath`` (when given) is where the code of
    ``baseline_parts`` comes from: the daemon's, the phones' (the storm command) or both.

    ``phone_flags`` go to ``callboard phone storm`` as they are (``--no-reuse``).
    """
    state = base / f"state{run}-{concurrency}{tag}"
    daemon_code = pythonpath if baseline_parts in ("daemon", "both") else None
    phone_code = pythonpath if baseline_parts in ("phone", "both") else None
    proc, ports = start_daemon(state, lab, daemon_code, workers)
    spy: subprocess.Popen[bytes] | None = None
    raw = base / f"profile-{concurrency}-{run}{tag}.raw"
    try:
        storm = subprocess.Popen(
            [*CALLBOARD, "phone", "storm", "--provision", "--count", str(phones),
             "--model", "8841", "--lab-ca", str(lab), "--server", "127.0.0.1",
             "--admin-socket", str(state / "admin.sock"), "--http-port", str(ports["http"]),
             "--tftp-port", str(ports["tftp"]), "--https-port", str(ports["https"]),
             "--transport", "http",
             "--concurrency", str(concurrency), "--processes", str(processes),
             "--mic-cache", str(base / "mics"),
             "--first-mac", f"{_mac_prefix(tag)}{run:02X}{concurrency:04X}0000",
             "--timeout", "60", "--time-limit", "1800", *phone_flags],
            stdout=subprocess.PIPE, text=True, env=daemon_env(phone_code),
        )  # fmt: skip
        assert storm.stdout is not None
        cpu0, gen0, reactor0, last = None, 0.0, 0.0, ""
        for line in storm.stdout:
            if cpu0 is None and re.match(r"^storm: \d+ phone\(s\) of model", line):
                cpu0 = _tree_cpu(proc.pid)  # provisioning done: booting starts
                reactor0 = reactor_cpu_seconds(proc.pid)
                gen0 = _tree_cpu(storm.pid)
                if profile:
                    spy = subprocess.Popen(
                        ["py-spy", "record", "--pid", str(proc.pid), "-r", "200", "-d",
                         str(round(profile)), "--format", "raw", "-o", str(raw), "--nonblocking"],
                        stdout=subprocess.DEVNULL, stderr=(base / "py-spy.log").open("ab"),
                    )  # fmt: skip
            if line.strip():
                last = line.strip()
        _, _, usage = os.wait4(storm.pid, 0)  # its own CPU and its reaped client processes'
        storm.returncode = 0
        cpu = _tree_cpu(proc.pid) - (cpu0 or 0.0)  # a supervisor's workers included
        reactor = reactor_cpu_seconds(proc.pid) - reactor0 if workers == 1 else 0.0
        generator = usage.ru_utime + usage.ru_stime - gen0 if cpu0 is not None else 0.0
        if spy is not None:
            spy.wait(timeout=max(60.0, profile * 3))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    match = LAST.match(last)
    if not match:
        raise RuntimeError(f"storm ended without its report: {last!r}")
    ok, failed, rate = int(match[2]), int(match[3]), float(match[4])
    return StormResult(
        rate, cpu / max(ok, 1) * 1000, failed, last, generator / max(ok, 1) * 1000,
        raw if spy is not None and raw.exists() else None, reactor / max(ok, 1) * 1000,
    )  # fmt: skip


def _mac_prefix(tag: str) -> str:
    """Each kind of storm its own MAC range (the MIC cache is shared between them)."""
    return {"": "0A", "-no-reuse": "0C"}.get(tag, "0B")


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live descendants (the storm's client processes)."""
    total = 0.0
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            total += cpu_seconds(current)
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        todo.extend(int(c) for c in children)
    return total


def hot_spots(raw: Path, top: int = 40) -> list[str]:
    """The frames with the most samples, inclusive then self, from py-spy's raw output.

    Frames every sample passes through (the reactor loop, the interpreter's entry) say
    nothing: only frames under 60% inclusive are listed.
    """
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        frames = stack.split(";")
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    total = max(total, 1)
    shown = [(f, n) for f, n in inclusive.most_common() if n / total < 0.6][:top]
    return (
        ["inclusive:"]
        + [f"{n / total * 100:5.1f}% {frame}" for frame, n in shown]
        + ["self:"]
        + [f"{n / total * 100:5.1f}% {frame}" for frame, n in own.most_common(15)]
    )


def openssl_run(
    base: Path, lab: Path, pair: tuple[Path, Path], count: int, *, mutual: bool = True
) -> tuple[float, float]:
    """(handshakes/s, server CPU ms per handshake) of ``openssl s_server``: with ``-Verify 1``
    (the TVS's mutual handshake: the phone shows its MIC) or, ``mutual=False``, without asking
    for a certificate (the phone's first HTTPS 6971 connection, on the EC certificate)."""
    cafile = base / "cafile.pem"
    cafile.write_bytes((lab / "lab-root.pem").read_bytes() + (lab / "lab-ca.pem").read_bytes())
    mic_paths = certs.write_mic(
        base / "bench-mic",
        certs.issue_mic(certs.load_lab_ca(lab), model="8841", mac="00AABBCCDDEE"),
    )
    mic = (str(mic_paths[0]), str(mic_paths[1]))
    frame = ActivateRequest(1, DeviceName("8841", "00AABBCCDDEE"), "1234567812345678").encode()
    port = _free_port()
    verify = ["-Verify", "1", "-CAfile", str(cafile)] if mutual else []
    ossl = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", *verify,
         "-cert", str(pair[0]), "-key", str(pair[1]), "-rev", "-quiet", "-no_ticket"],
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
    ap.add_argument("--concurrency", default="64", help="one or more, comma-separated")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--handshakes", type=int, default=2000)
    ap.add_argument("--profile", type=int, default=0, help="py-spy seconds (first run)")
    ap.add_argument(
        "--baseline", metavar="PYTHONPATH", default=None,
        help="also storm a daemon importing callboard from this PYTHONPATH ('' = the installed "
        "package), right after each storm, and print its CPU per phone next to ours",
    )  # fmt: skip
    ap.add_argument(
        "--baseline-parts", choices=("daemon", "phone", "both"), default="daemon",
        help="what the baseline storm takes from --baseline: the daemon (default; the phones "
        "are this tree's), the phones (the daemon is this tree's), or both",
    )  # fmt: skip
    ap.add_argument(
        "--no-reuse", action="store_true",
        help="also storm with `phone storm --no-reuse` (a new connection and a full TLS "
        "handshake per fetch) right after each storm, this tree's daemon",
    )  # fmt: skip
    ap.add_argument(
        "--profile-out", metavar="DIR", type=Path,
        help="copy py-spy's raw profiles here (the temporary directory goes at the end)",
    )  # fmt: skip
    ap.add_argument(
        "--workers", default="1", help="daemon worker processes; a list (1,2) also storms a "
        "daemon with each further count right before the first one's storm",
    )  # fmt: skip
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    worker_counts = [int(w) for w in args.workers.split(",")]
    by_workers: dict[tuple[int, int], list[StormResult]] = collections.defaultdict(list)
    if not 1 <= args.phones <= MAX_PHONES or not 1 <= args.runs <= 10:
        ap.error(f"--phones must be 1..{MAX_PHONES}, --runs 1..10")
    version = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout
    cores = os.cpu_count() or 1
    print(f"cores: {cores}; {version.strip()}; load average {os.getloadavg()}")
    storms: dict[int, list[StormResult]] = {c: [] for c in levels}
    baseline: dict[int, list[StormResult]] = {c: [] for c in levels}
    no_reuse: dict[int, list[StormResult]] = {c: [] for c in levels}
    ossl: list[tuple[float, float]] = []
    ossl_https: list[tuple[float, float]] = []  # the phone's other full handshake (6971)
    loads: list[str] = []
    with tempfile.TemporaryDirectory(prefix="callboard-stormcpu-") as tmp:
        base = Path(tmp)
        lab = base / "lab"
        certs.write_lab_ca(lab, certs.make_lab_ca("ec"))
        for run in range(args.runs):
            for level in levels:  # interleaved: each storm next to an openssl measurement
                for workers in worker_counts[1:]:  # the same storm on a --workers N daemon
                    multi = storm_run(
                        base, lab, args.phones, level, args.processes, run,
                        tag=f"-w{workers}", workers=workers,
                    )  # fmt: skip
                    by_workers[(level, workers)].append(multi)
                    print(f"run {run + 1} storm at {level}, --workers {workers}: {multi.last} "
                          f"daemon_cpu_ms_per_phone={multi.daemon_cpu_ms:.2f} "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
                result = storm_run(
                    base, lab, args.phones, level, args.processes, run,
                    args.profile if run == 0 else 0.0, workers=worker_counts[0],
                )  # fmt: skip
                storms[level].append(result)
                print(f"run {run + 1} storm at {level}: {result.last} daemon_cpu_ms_per_phone="
                      f"{result.daemon_cpu_ms:.2f} reactor_thread_cpu_ms_per_phone="
                      f"{result.reactor_cpu_ms:.2f} generator_cpu_ms_per_phone="
                      f"{result.generator_cpu_ms:.2f} (load {os.getloadavg()[0]:.1f})",
                      flush=True)  # fmt: skip
                if args.profile and run == 0 and result.profile is None:
                    print("py-spy wrote nothing:", (base / "py-spy.log").read_text()[-500:])
                if result.profile is not None:
                    if args.profile_out is not None:
                        args.profile_out.mkdir(parents=True, exist_ok=True)
                        shutil.copy(result.profile, args.profile_out)
                    print(f"py-spy, daemon, storm at {level} (inclusive share of samples):")
                    print("\n".join("    " + line for line in hot_spots(result.profile)))
                if args.no_reuse:
                    plain = storm_run(
                        base, lab, args.phones, level, args.processes, run,
                        tag="-no-reuse", phone_flags=("--no-reuse",),
                    )  # fmt: skip
                    no_reuse[level].append(plain)
                    print(f"run {run + 1} storm at {level}, phones --no-reuse: {plain.last} "
                          f"daemon_cpu_ms_per_phone={plain.daemon_cpu_ms:.2f} "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
                if args.baseline is not None:
                    before = storm_run(
                        base, lab, args.phones, level, args.processes, run,
                        pythonpath=args.baseline, tag="-baseline",
                        baseline_parts=args.baseline_parts,
                    )  # fmt: skip
                    baseline[level].append(before)
                    print(f"run {run + 1} baseline storm at {level}: {before.last} "
                          f"daemon_cpu_ms_per_phone={before.daemon_cpu_ms:.2f} "
                          f"reactor_thread_cpu_ms_per_phone={before.reactor_cpu_ms:.2f} "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
                state_certs = base / f"state{run}-{level}" / "certs"
                tvs = (state_certs / "tvs.pem", state_certs / "tvs.key")
                ossl.append(openssl_run(base, lab, tvs, args.handshakes))
                https = (state_certs / "https-tftp.pem", state_certs / "https-tftp.key")
                ossl_https.append(openssl_run(base, lab, https, args.handshakes, mutual=False))
                loads.append(f"{os.getloadavg()[0]:.1f}")
                print(f"run {run + 1} openssl: {ossl[-1][0]:.0f} handshakes/s, "
                      f"{ossl[-1][1]:.2f} ms CPU per handshake; HTTPS (EC, no client "
                      f"certificate): {ossl_https[-1][1]:.2f} ms (load {loads[-1]})",
                      flush=True)  # fmt: skip
    ocpu = statistics.median(o[1] for o in ossl)
    failed = 0
    print(f"openssl s_server -Verify 1: {ocpu:.2f} ms CPU per handshake (median of {len(ossl)})")
    hcpu = statistics.median(o[1] for o in ossl_https)
    print(f"openssl s_server, HTTPS 6971's EC certificate, no client certificate: {hcpu:.2f} ms "
          f"CPU per handshake; the phone's two full handshakes (TVS + HTTPS) in openssl: "
          f"{ocpu + hcpu:.2f} ms = {(ocpu + hcpu) / ocpu:.2f}x one TVS handshake")  # fmt: skip
    for level, results in storms.items():
        rate = statistics.median(r.rate for r in results)
        cpu = statistics.median(r.daemon_cpu_ms for r in results)
        gen = statistics.median(r.generator_cpu_ms for r in results)
        failed += sum(r.failed for r in results)
        ceiling = 1000 / gen * min(cores, args.processes + 1) if gen else 0.0
        print(
            f"storm of {args.phones} at {level} in flight, {args.processes} client process(es), "
            f"median of {args.runs}: {rate:.1f} phones/s, daemon CPU {cpu:.2f} ms per phone "
            f"(reactor thread {statistics.median(r.reactor_cpu_ms for r in results):.2f}), "
            f"{sum(r.failed for r in results)} failed; generator CPU {gen:.2f} ms per phone "
            f"(its ceiling on {cores} cores: ~{ceiling:.0f} phones/s); "
            f"ratio daemon CPU per phone / openssl CPU per handshake: {cpu / ocpu:.2f}x; "
            f"/ openssl CPU for both of the phone's handshakes: {cpu / (ocpu + hcpu):.2f}x"
        )
        for workers in worker_counts[1:]:
            multi = by_workers[(level, workers)]
            failed += sum(r.failed for r in multi)
            mrate = statistics.median(r.rate for r in multi)
            print(
                f"  --workers {workers} at {level} in flight, median of {args.runs}: "
                f"{mrate:.1f} phones/s ({mrate / rate:.2f}x {worker_counts[0]} worker(s)), "
                f"daemon CPU {statistics.median(r.daemon_cpu_ms for r in multi):.2f} ms per "
                f"phone, {sum(r.failed for r in multi)} failed"
            )
        if no_reuse[level]:
            plain = statistics.median(r.daemon_cpu_ms for r in no_reuse[level])
            failed += sum(r.failed for r in no_reuse[level])
            print(
                f"phones --no-reuse at {level} in flight, median of {args.runs}: daemon CPU "
                f"{plain:.2f} ms per phone ({plain / ocpu:.2f}x openssl); reuse / no reuse: "
                f"{cpu / plain:.2f}"
            )
        if baseline[level]:
            before = statistics.median(r.daemon_cpu_ms for r in baseline[level])
            failed += sum(r.failed for r in baseline[level])
            print(
                f"baseline ({args.baseline_parts} from {args.baseline or 'installed package'}) "
                f"at {level} in flight, median "
                f"of {args.runs}: daemon CPU {before:.2f} ms per phone (reactor thread "
                f"{statistics.median(r.reactor_cpu_ms for r in baseline[level]):.2f}; "
                f"{before / ocpu:.2f}x openssl); this tree / baseline: {cpu / before:.2f}"
            )
    print(f"load averages (1 min) after each openssl run: {', '.join(loads)}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
