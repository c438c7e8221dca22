"""Running a storm: in this process, or spread over several client processes, with progress.

One Python process boots a few hundred phones per second at most (client TLS, ITL signature
checks, XML parsing in one thread), so ``--processes P`` splits the phones over P workers,
each its own reactor, and merges their records into one :class:`StormReport`. A worker is
``python -m callboard.phone.storm_run SPEC``: it loads its phones, says ``ready``, waits for
``go`` on stdin (so that the clock starts when every worker can boot), prints ``progress
DONE FAILED`` lines while it runs, ``finished`` when its phones are done, then writes its
records to the file the spec names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from twisted.internet import defer, task

from .boot import BootOptions, PhoneIdentity
from .storm import PhoneRecord, StormReport, load_cached_phone, run_storm

ProgressFn = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class PhoneSpec:
    """One phone to boot: its cached MIC file, MAC, model and code."""

    mic_path: str
    mac: str
    model: str
    code: str | None


@dataclasses.dataclass(frozen=True)
class StormSpec:
    servers: tuple[str, ...]
    options: BootOptions
    concurrency: int
    time_limit: float
    activation_domain: str | None = None  # remote activation at this edge instead of the LAN


class Progress:
    """The live progress line: rewritten in place on a terminal, a plain line now and then
    otherwise."""

    def __init__(self, total: int, out: IO[str], *, tty: bool | None = None) -> None:
        self.total = total
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.every = 0.2 if self.tty else 2.0
        self.started = time.monotonic()
        self._last = 0.0
        self._shown = False

    def update(self, done: int, failed: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        line = (
            f"storm: {done}/{self.total} phones done, {failed} failed, "
            f"{rate:.1f} phones/s, {elapsed:.1f} s"
        )
        if self.tty:
            self.out.write("\r\x1b[K" + line)
        else:
            self.out.write(line + "\n")
        self.out.flush()
        self._shown = True

    def close(self) -> None:
        if self.tty and self._shown:
            self.out.write("\n")
            self.out.flush()


def load_phones(phones: Sequence[PhoneSpec]) -> list[PhoneIdentity]:
    """Every phone's identity from its cached MIC, before the clock starts.

    What is loaded by then (modules, the identities) lives as long as the storm: frozen, so
    that the cyclic collector does not walk it again on each full collection of a storm's
    Deferreds and connections.
    """
    identities = [
        load_cached_phone(Path(p.mic_path), mac=p.mac, model=p.model, code=p.code) for p in phones
    ]
    gc.freeze()
    return identities


def storm_in_process(
    phones: Sequence[PhoneSpec], spec: StormSpec, progress: ProgressFn | None
) -> StormReport:
    """Boot every phone in this process's reactor (``task.react``: once per process)."""
    identities = load_phones(phones)
    counts = [0, 0]
    reports: list[StormReport] = []

    def counted(record: PhoneRecord) -> None:
        counts[0] += 1
        counts[1] += not record.ok

    async def main(reactor: Any) -> None:
        ticker = None
        if progress is not None:
            ticker = task.LoopingCall(lambda: progress(counts[0], counts[1]))
            ticker.clock = reactor
            ticker.start(0.2, now=False)
        try:
            report = await run_storm(
                reactor, identities, spec.servers, spec.options,
                concurrency=spec.concurrency, on_record=counted, time_limit=spec.time_limit,
                activation_domain=spec.activation_domain,
            )  # fmt: skip
        finally:
            if ticker is not None:
                ticker.stop()
        reports.append(report)

    with contextlib.suppress(SystemExit):
        task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)), [])
    if not reports:
        raise RuntimeError("the storm did not finish")
    return reports[0]


# Several processes ---------------------------------------------------------------------------


def storm_in_processes(
    phones: Sequence[PhoneSpec],
    spec: StormSpec,
    processes: int,
    progress: ProgressFn | None,
) -> StormReport:
    """Spread the phones over ``processes`` workers (concurrency split evenly); merge."""
    processes = max(1, min(processes, len(phones)))
    chunks = [list(phones[i::processes]) for i in range(processes)]
    per_worker = max(1, -(-spec.concurrency // processes))
    with tempfile.TemporaryDirectory(prefix="callboard-storm-") as tmp:
        workers = [
            _Worker.start(Path(tmp) / f"worker{i}", chunk, spec, per_worker)
            for i, chunk in enumerate(chunks)
        ]
        try:
            return _drive(workers, spec.time_limit, progress)
        finally:
            for worker in workers:
                worker.stop()


class _Worker:
    def __init__(self, proc: subprocess.Popen[bytes], out: Path) -> None:
        self.proc = proc
        self.out = out
        self.done = 0
        self.failed = 0
        self.ready = False
        self.finished = False
        self.eof = False
        self._buffer = b""

    @classmethod
    def start(
        cls, base: Path, phones: list[PhoneSpec], spec: StormSpec, concurrency: int
    ) -> _Worker:
        spec_path, out = base.with_suffix(".json"), base.with_suffix(".out.json")
        body = {
            "servers": list(spec.servers),
            "options": dataclasses.asdict(spec.options),
            "concurrency": concurrency,
            "time_limit": spec.time_limit,
            "activation_domain": spec.activation_domain,
            "phones": [dataclasses.asdict(p) for p in phones],
            "out": str(out),
        }
        fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds codes
        with os.fdopen(fd, "w") as fh:
            json.dump(body, fh)
        proc = subprocess.Popen(
            [sys.executable, "-m", "callboard.phone.storm_run", str(spec_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        return cls(proc, out)

    def read(self) -> bool:
        """Take what the worker wrote and act on each whole line; False at end of file."""
        assert self.proc.stdout is not None
        data = os.read(self.proc.stdout.fileno(), 65536)
        if not data:
            self.eof = True
            return False
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self.handle(line.decode(errors="replace"))
        return True

    def handle(self, line: str) -> None:
        words = line.split()
        if words[:1] == ["ready"]:
            self.ready = True
        elif words[:1] == ["progress"] and len(words) == 3:
            self.done, self.failed = int(words[1]), int(words[2])
        elif words[:1] == ["finished"]:
            self.finished = True

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def records(self) -> list[PhoneRecord]:
        return [PhoneRecord.from_json(r) for r in json.loads(self.out.read_text())]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def _drive(workers: list[_Worker], time_limit: float, progress: ProgressFn | None) -> StormReport:
    selector = selectors.DefaultSelector()
    for worker in workers:
        assert worker.proc.stdout is not None
        selector.register(worker.proc.stdout, selectors.EVENT_READ, worker)
    # Loading MICs takes a few seconds for a big storm; booting is bounded by time_limit.
    deadline = time.monotonic() + 600
    started: float | None = None
    finished_at = 0.0
    try:
        while not all(w.eof for w in workers):
            if time.monotonic() > deadline:
                raise RuntimeError("storm workers ran past their time limit")
            for key, _ in selector.select(timeout=0.2):
                reader: _Worker = key.data
                if not reader.read():
                    selector.unregister(key.fileobj)
                    if not reader.finished:
                        raise RuntimeError(
                            f"a storm worker stopped early (exit {reader.proc.wait()})"
                        )
            if started is None and all(w.ready for w in workers):
                for w in workers:
                    w.go()
                started = time.monotonic()
                deadline = started + time_limit + 120
            if started is not None and not finished_at and all(w.finished for w in workers):
                finished_at = time.monotonic()
            if progress is not None:
                progress(sum(w.done for w in workers), sum(w.failed for w in workers))
    finally:
        selector.close()
    for worker in workers:
        if worker.proc.wait() != 0 or not worker.finished:
            raise RuntimeError(f"a storm worker failed (exit {worker.proc.returncode})")
    assert started is not None
    records = [r for w in workers for r in w.records()]
    return StormReport.of(records, (finished_at or time.monotonic()) - started)


# The worker process --------------------------------------------------------------------------


def worker_main(spec_path: str) -> int:
    body = json.loads(Path(spec_path).read_text())
    spec = StormSpec(
        servers=tuple(body["servers"]),
        options=BootOptions(**body["options"]),
        concurrency=int(body["concurrency"]),
        time_limit=float(body["time_limit"]),
        activation_domain=body.get("activation_domain"),
    )
    phones = [PhoneSpec(**p) for p in body["phones"]]
    identities = load_phones(phones)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    counts = [0, 0]
    reports: list[StormReport] = []

    def counted(record: PhoneRecord) -> None:
        counts[0] += 1
        counts[1] += not record.ok

    def tell() -> None:
        print(f"progress {counts[0]} {counts[1]}", flush=True)

    async def main(reactor: Any) -> None:
        ticker = task.LoopingCall(tell)
        ticker.clock = reactor
        ticker.start(0.2, now=False)
        try:
            report = await run_storm(
                reactor, identities, spec.servers, spec.options,
                concurrency=spec.concurrency, on_record=counted, time_limit=spec.time_limit,
                activation_domain=spec.activation_domain,
            )  # fmt: skip
        finally:
            ticker.stop()
        reports.append(report)

    with contextlib.suppress(SystemExit):
        task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)), [])
    tell()
    print("finished", flush=True)
    Path(body["out"]).write_text(json.dumps([r.to_json() for r in reports[0].records]))
    return 0


if __name__ == "__main__":
    raise SystemExit(worker_main(sys.argv[1]))
