"""CPU per REGISTER of the daemon's registrar path, in one process, without sockets' noise.

Not a test. Builds what ``callboard serve`` builds for SIP (the registry of ``--devices``
imported phones, :class:`RegistryPolicy` wrapped in the IVR's ``BootstrapPolicy``, the
shared location service with its write-behind to an SQLite ``bindings`` table on its own
thread, the JSON log pipeline at info level into /dev/null) and feeds ``--count`` REGISTER
datagrams (each a first registration of an imported device, then ``--refreshes`` passes
refreshing them) through :class:`SIPDatagramProtocol` on a real UDP port whose replies go to
a socket nobody reads. The write-behind is flushed every ``--flush-every`` REGISTERs (the
daemon flushes every 0.5 s: 750 REGISTERs at 1,500/s) and waited for. Prints the process
CPU time (every thread) per REGISTER in microseconds, and the memory the bindings hold.

Run it from a checkout (``PYTHONPATH=build/typecheck`` for a worktree). ``--before PATH``
compares two trees in one sitting: it runs this tree and the one importable with
``PYTHONPATH=PATH`` (an empty PATH: the installed package, e.g. the editable main checkout)
turn about, ``--repeat`` times each in fresh processes, so both see the same machine::

    python bench/sip_register_cpu.py [--devices 20000] [--count 10000] [--repeat 3]
    PYTHONPATH=build/typecheck python bench/sip_register_cpu.py --count 5000 --before ""
"""

from __future__ import annotations

import argparse
import gc
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from callboard.daemon import ivr
from callboard.daemon.bindings import BindingsSync, SharedLocationService
from callboard.daemon.logs import configure_logging
from callboard.daemon.registry.bindings import open_binding_journal
from callboard.daemon.registry.engines import DATABASE_NAME
from callboard.daemon.registry.model import Device, Line
from callboard.daemon.registry.registry import Registry
from callboard.daemon.registry.store import Snapshot, SQLiteStore
from callboard.daemon.sip_policy import RegistryPolicy
from callboard.protocols.sip.registrar import Registrar, RegistrarSettings
from callboard.protocols.sip.transports import SIPDatagramProtocol
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred

MODEL = "8841"
MODEL_ID = "683"


def mac_of(i: int) -> str:
    return f"00AC{i:08X}"


def dn_of(i: int) -> str:
    return str(2_000_000 + i)


class _Devices:
    """A store whose snapshot is ``n`` imported phones (what ``callboard import`` makes)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def load(self) -> Snapshot:
        devices = [
            Device(id=f"d{i}", name=f"SEP{mac_of(i)}", model=MODEL, lines=(Line(dn_of(i)),))
            for i in range(self.n)
        ]
        return Snapshot(devices=devices)


class _ThreadReactor:
    """Enough of a reactor for the journal: results come back through a queue we drain."""

    def __init__(self) -> None:
        self.calls: queue.Queue[Any] = queue.Queue()

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        self.calls.put((f, args, kwargs))

    def wait(self, d: Deferred[Any]) -> None:
        while not d.called:
            f, args, kwargs = self.calls.get(timeout=10)
            f(*args, **kwargs)


def register(i: int, port: int, call: int, cseq: int) -> bytes:
    mac, dn = mac_of(i), dn_of(i)
    return (
        f"REGISTER sip:127.0.0.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-{call}-{i};rport\r\n"
        f"From: <sip:{dn}@127.0.0.1>;tag={call}SIPpTag00{i}\r\n"
        f"To: <sip:{dn}@127.0.0.1>\r\n"
        f"Call-ID: {call}-{i}@127.0.0.1\r\n"
        f"CSeq: {cseq} REGISTER\r\n"
        f"Max-Forwards: 70\r\n"
        f"User-Agent: Cisco-CP8841/sipp-load\r\n"
        f'Contact: <sip:{dn}@127.0.0.1:5060;transport=udp>;+sip.instance="<urn:uuid:'
        f'00000000-0000-0000-0000-{mac}>";+u.sip!devicename.ccm.cisco.com="SEP{mac}";'
        f'+u.sip!model.ccm.cisco.com="{MODEL_ID}"\r\n'
        f"Expires: 3600\r\n"
        f"Content-Length: 0\r\n\r\n"
    ).encode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=20_000)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--refreshes", type=int, default=1)
    parser.add_argument("--flush-every", type=int, default=750)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory", type=int, default=0, help="bindings for the memory figure")
    parser.add_argument(
        "--general",
        action="store_true",
        help="every REGISTER through the general pipeline (the lean path off), for an A/B "
        "of the two paths in one tree",
    )
    parser.add_argument(
        "--before",
        metavar="PYTHONPATH",
        help="compare with the tree this PYTHONPATH imports ('': the installed package)",
    )
    opts = parser.parse_args()
    if opts.before is not None:
        return compare(opts.before, opts.repeat)
    work = Path(tempfile.mkdtemp(prefix="regcpu"))
    configure_logging("info", open(os.devnull, "w"))  # noqa: SIM115
    clock = [1_800_000_000.0]
    now = lambda: clock[0]  # noqa: E731
    devices = max(opts.devices, opts.memory)
    registry = Registry(_Devices(devices), now)  # type: ignore[arg-type]
    SQLiteStore(work / DATABASE_NAME)  # creates the bindings table
    thread_reactor = _ThreadReactor()
    journal = open_binding_journal("", work, thread_reactor)  # type: ignore[arg-type]
    location = SharedLocationService()
    sync = BindingsSync(location, journal, "bench", now, global_reactor)
    policy = ivr.BootstrapPolicy(RegistryPolicy(registry, None), None)  # type: ignore[arg-type]
    lean = {"lean": False} if opts.general else {}
    registrar = Registrar(
        policy, RegistrarSettings(), now=now, wall_now=now, location=location, **lean
    )
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    port = sink.getsockname()[1]
    protocol = SIPDatagramProtocol(registrar)
    listening = global_reactor.listenUDP(0, protocol, interface="127.0.0.1")  # type: ignore[attr-defined]
    where = sys.modules[Registrar.__module__].__file__
    print(f"python {sys.version.split()[0]}, registrar from {where}")

    def feed(first: int, n: int, call: int, cseq: int) -> float:
        datagrams = [register(first + k, port, call, cseq) for k in range(n)]
        addr = ("127.0.0.1", port)
        start = time.process_time()
        for k, datagram in enumerate(datagrams, 1):
            protocol.datagramReceived(datagram, addr)
            if k % opts.flush_every == 0:
                thread_reactor.wait(sync.flush())
        thread_reactor.wait(sync.flush())
        clock[0] += 0.001
        return (time.process_time() - start) / n * 1e6

    first_us: list[float] = []
    refresh_us: list[float] = []
    for r in range(opts.repeat):
        base = (r * opts.count) % max(1, devices - opts.count + 1)
        first_us.append(feed(base, opts.count, r * 10 + 1, 1))
        for p in range(opts.refreshes):
            refresh_us.append(feed(base, opts.count, r * 10 + 2 + p, 2 + p))
        registrar.location.memory.__init__()  # type: ignore[attr-defined, misc]
        registrar._transactions.clear()
        sync._stored.clear()
        clock[0] += 3600
    print(
        f"first registrations: {statistics.median(first_us):.1f} us CPU per REGISTER "
        f"(runs {', '.join(f'{u:.1f}' for u in first_us)})"
    )
    if refresh_us:
        print(
            f"refreshes:           {statistics.median(refresh_us):.1f} us CPU per REGISTER "
            f"(runs {', '.join(f'{u:.1f}' for u in refresh_us)})"
        )
    if opts.memory:
        memory(opts.memory, protocol, registrar, port, lambda: thread_reactor.wait(sync.flush()))
    listening.stopListening()
    return 0


def compare(before: str, repeat: int) -> int:
    """This tree against ``before``, one fresh process each turn about; medians of each."""
    args = [*_without(_without(sys.argv[1:], "--before"), "--repeat"), "--repeat", "1"]
    trees = {"after": os.environ.get("PYTHONPATH"), "before": before or None}
    figures: dict[str, dict[str, list[float]]] = {t: {} for t in trees}
    for _ in range(repeat):
        for tree, path in trees.items():
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            if path:
                env["PYTHONPATH"] = path
            out = subprocess.run(
                [sys.executable, __file__, *args], env=env, capture_output=True, text=True
            )
            if out.returncode:
                print(out.stdout + out.stderr)
                return out.returncode
            for line in out.stdout.splitlines():
                if line.startswith("python "):
                    print(f"{tree}: {line}")
                name, sep, rest = line.partition(":")
                if sep and " us CPU" in rest:
                    figures[tree].setdefault(name, []).append(float(rest.split()[0]))
                elif line.startswith("memory:"):
                    print(f"{tree}: {line}")
    for name in figures["after"]:
        b, a = (statistics.median(figures[t][name]) for t in ("before", "after"))
        print(f"{name}: before {b:.1f} us, after {a:.1f} us CPU per REGISTER ({a / b:.2f}x)")
    return 0


def _without(args: list[str], option: str) -> list[str]:
    """``args`` less ``option`` and its value (``--option value`` or ``--option=value``)."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def memory(
    n: int,
    protocol: SIPDatagramProtocol,
    registrar: Registrar,
    port: int,
    flush: Callable[[], None],
) -> None:
    """Bytes held per binding after ``n`` first registrations (the write-behind flushed, so
    its record of what the table holds counts too), with and without the answers kept 32 s
    for UDP retransmissions."""
    registrar.location.memory.__init__()  # type: ignore[attr-defined, misc]
    registrar._transactions.clear()
    flush()
    datagrams = [register(i, port, 99, 1) for i in range(n)]
    addr = ("127.0.0.1", port)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for datagram in datagrams:
        protocol.datagramReceived(datagram, addr)
    flush()
    gc.collect()
    with_answers = tracemalloc.get_traced_memory()[0]
    answers = len(registrar._transactions)
    registrar._transactions.clear()
    gc.collect()
    bindings_only = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(
        f"memory: {(bindings_only - before) / n:.0f} B per binding, "
        f"{(with_answers - before) / n:.0f} B with its cached answer "
        f"({n} bindings, {answers} cached answers)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
