"""TFTP load generator: Callboard's TFTPService against tftpd-hpa and atftpd, same run.

Measures (a) small-config (1 KB) transfers per second with 64 clients in flight and
(b) MB/s for a 4 MB file (blksize 1468, windowsize 1 and 16, 4 transfers in flight).
Loopback only, bounded in time; the servers run as separate processes. Needs root for the
reference servers (they drop privileges themselves). Not a test.

    python bench/tftp_load.py [--seconds 5] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import selectors
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

SMALL = "SEP001122334455.cnf.xml"
BIG = "firmware.loads"
HOST = "127.0.0.1"

SERVER_CODE = """
import sys
from twisted.internet import epollreactor
epollreactor.install()
from twisted.internet import reactor
from callboard.protocols.filesource import DirectorySource
from callboard.protocols.tftp.server import TFTPService, TFTPSettings
# All load clients share 127.0.0.1, so the per-client cap (default 64, meant for one phone)
# is raised here; a lingering final ACK would otherwise make the 65th RRQ "busy".
settings = TFTPSettings(max_transfers_per_client=4096)
service = TFTPService(DirectorySource(sys.argv[1]), ["127.0.0.1"], int(sys.argv[2]), settings)
service.startService()
reactor.run()
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def rrq(name: str, options: dict[str, str]) -> bytes:
    parts = [name, "octet"] + [x for kv in options.items() for x in kv]
    return b"\x00\x01" + b"".join(p.encode() + b"\x00" for p in parts)


@dataclass
class Session:
    """One client transfer driven by the selector loop (RFC 7440-aware receiver)."""

    sock: socket.socket
    server: tuple[str, int]
    request: bytes
    blksize: int
    windowsize: int
    tid: tuple[str, int] | None = None
    expected: int = 1  # next block number wanted (absolute)
    received: int = 0
    in_window: int = 0
    last_send: bytes = b""
    deadline: float = 0.0
    tries: int = 0
    started: float = field(default_factory=time.monotonic)

    def start(self) -> None:
        self.send(self.request, self.server)

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        self.last_send = data
        self.deadline = time.monotonic() + 0.5
        self.sock.sendto(data, addr)

    def on_datagram(self, data: bytes, addr: tuple[str, int]) -> bool | None:
        """True when finished, False on failure, None to continue."""
        if self.tid is None:
            self.tid = addr
        elif addr != self.tid:
            return None
        op = data[1]
        if op == 6:  # OACK: use what the server agreed (tftpd-hpa 5.2 has no windowsize)
            if self.expected == 1 and self.received == 0:
                fields = data[2:].split(b"\x00")
                agreed = dict(zip(fields[0::2], fields[1::2], strict=False))
                self.blksize = int(agreed.get(b"blksize", 512))
                self.windowsize = int(agreed.get(b"windowsize", 1))
                self.send(b"\x00\x04\x00\x00", addr)
            return None
        if op == 5:
            return False
        if op != 3:
            return None
        block = struct.unpack_from("!H", data, 2)[0]
        if block != self.expected & 0xFFFF:
            # a gap or a duplicate: ACK what we have in order (RFC 7440)
            self.in_window = 0
            self.send(struct.pack("!HH", 4, (self.expected - 1) & 0xFFFF), addr)
            return None
        payload = len(data) - 4
        self.received += payload
        self.expected += 1
        self.in_window += 1
        last = payload < self.blksize
        if last or self.in_window >= self.windowsize:
            self.in_window = 0
            self.send(struct.pack("!HH", 4, block), addr)
        return True if last else None

    def on_timeout(self) -> bool:
        self.tries += 1
        if self.tries > 6:
            return False
        self.send(self.last_send, self.tid or self.server)
        return True


def drive(
    port: int, name: str, options: dict[str, str], concurrency: int, seconds: float
) -> tuple[int, int, int, float]:
    """Keep ``concurrency`` transfers in flight for ``seconds``: (ok, failed, bytes, elapsed)."""
    blksize = int(options.get("blksize", 512))
    window = int(options.get("windowsize", 1))
    request = rrq(name, options)
    selector = selectors.DefaultSelector()
    ok = failed = total = 0
    live: dict[socket.socket, Session] = {}

    def launch() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        sock.bind((HOST, 0))
        sock.setblocking(False)
        session = Session(sock, (HOST, port), request, blksize, window)
        live[sock] = session
        selector.register(sock, selectors.EVENT_READ, session)
        session.start()

    def retire(session: Session) -> None:
        selector.unregister(session.sock)
        session.sock.close()
        del live[session.sock]

    started = time.monotonic()
    stop = started + seconds
    for _ in range(concurrency):
        launch()
    next_sweep = time.monotonic() + 0.1
    while live:
        now = time.monotonic()
        for key, _ in selector.select(timeout=0.05):
            session: Session = key.data
            sock = session.sock
            while True:
                try:
                    data, addr = sock.recvfrom(70000)
                except BlockingIOError:
                    break
                result = session.on_datagram(data, addr)
                if result is None:
                    continue
                if result:
                    ok += 1
                    total += session.received
                else:
                    failed += 1
                retire(session)
                if time.monotonic() < stop:
                    launch()
                break
        if now >= next_sweep:
            next_sweep = now + 0.1
            for session in list(live.values()):
                if now > session.deadline and not session.on_timeout():
                    failed += 1
                    retire(session)
                    if time.monotonic() < stop:
                        launch()
    return ok, failed, total, time.monotonic() - started


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait until it answers
            ok, _, _, _ = drive(self.port, SMALL, {}, 1, 0.0)
            if ok:
                return self
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not start")

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def is_hpa(binary: str) -> bool:
    """Debian's atftpd also installs /usr/sbin/in.tftpd; make sure this one is tftpd-hpa."""
    try:
        out = subprocess.run([binary, "-V"], capture_output=True, timeout=5, check=False)
    except OSError:
        return False
    return b"tftp-hpa" in out.stdout + out.stderr


def servers(root: str, hpa: str) -> list[Server]:
    out = []
    port = free_port()
    out.append(Server("callboard", [sys.executable, "-c", SERVER_CODE, root, str(port)], port))
    if is_hpa(hpa):
        port = free_port()
        out.append(Server("tftpd-hpa", [hpa, "-L", "-a", f"{HOST}:{port}", "-s", root], port))
    else:
        print(f"{hpa} is not tftpd-hpa; pass --hpa-binary (skipping it)", file=sys.stderr)
    if shutil.which("atftpd"):
        port = free_port()
        argv = ["atftpd", "--daemon", "--no-fork", "--port", str(port), "--bind-address", HOST]
        argv += ["--logfile", "/dev/null", "--maxthread", "200", root]
        out.append(Server("atftpd", argv, port))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--runs", type=int, default=3, help="median of this many")
    parser.add_argument("--hpa-binary", default="/usr/sbin/in.tftpd", help="tftpd-hpa's in.tftpd")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="tftpbench")
    os.chmod(root, 0o755)
    with open(os.path.join(root, SMALL), "wb") as f:
        f.write(b"<device>" + b"x" * 1000 + b"</device>\n")
    with open(os.path.join(root, BIG), "wb") as f:
        f.write(os.urandom(4 * 1024 * 1024))
    for name in (SMALL, BIG):
        os.chmod(os.path.join(root, name), 0o644)
    cases = [
        ("1 KB transfers/s, 64 in flight", SMALL, {}, 64),
        ("4 MB MB/s, 4 in flight, window 1", BIG, {"blksize": "1468"}, 4),
        ("4 MB MB/s, 4 in flight, window 16", BIG, {"blksize": "1468", "windowsize": "16"}, 4),
    ]
    results: dict[str, list[str]] = {}
    figures: dict[tuple[str, str], float] = {}
    try:
        for server in servers(root, args.hpa_binary):
            with server:
                for label, name, options, concurrency in cases:
                    samples, failures = [], 0
                    for _ in range(args.runs):
                        ok, failed, total, elapsed = drive(
                            server.port, name, options, concurrency, args.seconds
                        )
                        failures += failed
                        rate = ok / elapsed if name == SMALL else total / elapsed / 1e6
                        samples.append(rate)
                    median = statistics.median(samples)
                    figures[(server.name, label)] = median
                    note = f" ({failures} failed)" if failures else ""
                    results.setdefault(label, []).append(f"{server.name} {median:.0f}{note}")
                    print(f"{server.name:10} {label}: {median:.1f}{note}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    names = [s.name for s in servers(root, args.hpa_binary)]
    print()
    print("| measure | " + " | ".join(names) + " | callboard / best reference |")
    print("|---" * (len(names) + 2) + "|")
    for label, *_ in cases:
        row = [figures.get((n, label), 0.0) for n in names]
        best = max(row[1:], default=0.0)
        ratio = f"{row[0] / best:.2f}" if best else "n/a"
        print(f"| {label} | " + " | ".join(f"{v:.0f}" for v in row) + f" | {ratio} |")


if __name__ == "__main__":
    main()
