"""Benchmark: full mutual-TLS handshakes + one ACTIVATE per connection, per second.

Compares Callboard's TVS listener (separate process) with ``openssl s_server -Verify 1`` using
the same certificates, in the same run; reports the ratio and the server CPU per handshake
(utime+stime from /proc/<pid>/stat). Loopback only, bounded in count and time.

    python bench/tvs_handshake.py [--count 1500] [--clients 2] [--runs 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from callboard.daemon import certs
from callboard.protocols.tvs.codec import ActivateRequest, DeviceName

MODEL, MAC = "8841", "00AABBCCDDEE"
CODE = "1234567812345678"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _wait_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on {port} did not start")


def serve(state: str, trust_dir: str, port: int) -> None:
    """Run Callboard's TVS listener (child process) with an authority that always activates."""
    from callboard.protocols.tvs.activation import Redemption, TVSSettings
    from callboard.protocols.tvs.server import make_tvs_factory
    from twisted.internet import endpoints, reactor
    from twisted.internet.defer import Deferred, succeed
    from twisted.logger import globalLogBeginner

    class AlwaysActivate:
        def redeem(
            self, *, mac: str, model: str, code: str, mic_sha256: str
        ) -> Deferred[Redemption]:
            return succeed(Redemption(True, f"SEP{mac}", "activated"))

    globalLogBeginner.beginLoggingTo([lambda _event: None], redirectStandardIO=False)
    server = certs.load_server_certs(state)
    factory = make_tvs_factory(
        server.tvs.cert,
        server.tvs.key,
        certs.load_trust_store(trust_dir),
        AlwaysActivate(),
        server.itl_records(),
        TVSSettings(throttle_budget=10**9, max_connections=4096),
        reactor,  # type: ignore[arg-type]
    )
    endpoints.serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1:backlog=1024").listen(
        factory
    )
    reactor.run()  # type: ignore[attr-defined]


def _client_worker(port: int, n: int, mic: tuple[str, str], payload: bytes, q: mp.Queue) -> None:  # type: ignore[type-arg]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(mic[0], mic[1])
    ok = 0
    for _ in range(n):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with ctx.wrap_socket(raw) as tls:
                    tls.sendall(payload)
                    if tls.recv(4096):
                        ok += 1
        except OSError:
            pass
    q.put(ok)


def _drive(port: int, pid: int, count: int, clients: int, mic: tuple[str, str], payload: bytes):  # type: ignore[no-untyped-def]
    q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    per = count // clients
    procs = [
        mp.Process(target=_client_worker, args=(port, per, mic, payload, q)) for _ in range(clients)
    ]
    cpu0 = _cpu_seconds(pid)
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    ok = sum(q.get(timeout=300) for _ in procs)
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - t0
    cpu = _cpu_seconds(pid) - cpu0
    return ok / elapsed, cpu / max(ok, 1) * 1000, ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=1500)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--serve", nargs=3, metavar=("STATE", "TRUST", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], args.serve[1], int(args.serve[2]))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        server = certs.init_certs(base / "state")
        lab = certs.make_lab_ca("ec")
        certs.write_lab_ca(base / "lab", lab)
        mic_paths = certs.write_mic(base / "mic", certs.issue_mic(lab, model=MODEL, mac=MAC))
        mic = (str(mic_paths[0]), str(mic_paths[1]))
        cafile = base / "cafile.pem"
        cafile.write_bytes(
            (base / "lab" / "lab-root.pem").read_bytes()
            + (base / "lab" / "lab-ca.pem").read_bytes()
        )
        frame = ActivateRequest(1, DeviceName(MODEL, MAC), CODE).encode()
        tvs_pem = base / "state" / "certs" / "tvs.pem"
        tvs_key = base / "state" / "certs" / "tvs.key"
        _ = server

        results: dict[str, list[tuple[float, float, int]]] = {"callboard": [], "openssl": []}
        for _run in range(args.runs):
            port = _free_port()
            cb = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--serve",
                    str(base / "state"),
                    str(base / "lab"),
                    str(port),
                ],
            )
            try:
                _wait_port(port, time.monotonic() + 20)
                _drive(port, cb.pid, 50, 1, mic, frame)  # warm-up
                results["callboard"].append(
                    _drive(port, cb.pid, args.count, args.clients, mic, frame)
                )
            finally:
                cb.terminate()
                cb.wait(10)

            port = _free_port()
            ossl = subprocess.Popen(
                [
                    "openssl",
                    "s_server",
                    "-accept",
                    f"127.0.0.1:{port}",
                    "-Verify",
                    "1",
                    "-cert",
                    str(tvs_pem),
                    "-key",
                    str(tvs_key),
                    "-CAfile",
                    str(cafile),
                    "-rev",
                    "-quiet",
                    "-no_ticket",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
            )
            try:
                _wait_port(port, time.monotonic() + 20)
                _drive(port, ossl.pid, 50, 1, mic, frame + b"\n")
                results["openssl"].append(
                    _drive(port, ossl.pid, args.count, args.clients, mic, frame + b"\n")
                )
            finally:
                ossl.terminate()
                ossl.wait(10)

    def med(name: str, i: int) -> float:
        return statistics.median(r[i] for r in results[name])

    cb_rate, os_rate = med("callboard", 0), med("openssl", 0)
    print(
        f"handshakes+request per connection, {args.count} per run, {args.clients} client "
        f"processes, median of {args.runs} runs"
    )
    print("| server | conn/s | server CPU ms/handshake | completed |")
    print("|---|---|---|---|")
    for name in ("callboard", "openssl"):
        done = sum(r[2] for r in results[name])
        total = args.count * args.runs
        print(f"| {name} | {med(name, 0):.0f} | {med(name, 1):.2f} | {done}/{total} |")
    print(f"ratio callboard/openssl: {cb_rate / os_rate:.2f}x")
    print("raw:", {k: [(round(a), round(b, 2), c) for a, b, c in v] for k, v in results.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
