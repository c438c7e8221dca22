"""Signed files (``<name>.sgn``) for the provisioning tree: signed off the reactor, cached.

A phone whose trust list holds a TFTP-role certificate asks for ``<name>.sgn`` for every file
(cisco-protocols.md sections 2 and 16). Each answer is the unsigned file behind a header
signed with the CCM+TFTP RSA key (:mod:`callboard.protocols.tvs.sgn`). The RSA signature is
the slow step, so it runs in a small thread pool, never on the reactor thread, and each
signed file is kept until the unsigned file changes: a boot storm asking for the same file
costs one signature, and phones asking at the same moment share it.

The cache key is the ``.sgn`` name plus a content key the caller chooses: a digest of the
rendered bytes (configs), or the identity of the file on disk (device, inode, size, times).
Entries are evicted least recently used beyond a byte budget.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from callboard.protocols.filesource import DiskBody
from callboard.protocols.tvs import sgn
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from .logs import get_logger

log = get_logger("callboard.signing")

Job = Callable[[], bytes]
Runner = Callable[[Job], "Deferred[bytes]"]

DEFAULT_CACHE_BYTES = 64 * 1024 * 1024
SIGNING_THREADS = 2


def content_key(data: bytes) -> bytes:
    """The cache key of rendered bytes: equal bytes, equal key (SHA-256, microseconds)."""
    return hashlib.sha256(data).digest()


def header_name(name: str) -> str:
    """The base name written into FILENAME: ``Desktops/320x196x4/List.xml`` → ``List.xml``.

    usecallmanager's ``sgnfile`` names a file by its base name unless told otherwise, and a
    file signed once is served under whatever folder the phone asks for it.
    """
    return name.replace("\\", "/").rsplit("/", 1)[-1]


@dataclass
class SigningCounters:
    signed: int = 0  # RSA signatures made
    cache_hits: int = 0  # answers from the cache (or from a signature already under way)
    failures: int = 0


class SgnSigner(Service):
    """Sign files as ``.sgn`` with one RSA certificate; cached, deduplicated, off the reactor.

    ``run`` performs a job off the reactor thread (default: a thread pool of
    :data:`SIGNING_THREADS` started with this service); tests pass one that runs inline.
    ``now`` gives the header's TIMESTAMP.
    """

    def __init__(
        self,
        certificate: x509.Certificate,
        key: rsa.RSAPrivateKey,
        reactor: Any,
        now: Callable[[], float],
        *,
        run: Runner | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.certificate = certificate
        self._key = key
        self._reactor = reactor
        self._now = now
        self._pool: ThreadPool | None = None
        self._run = run or self._in_pool
        self._cache: OrderedDict[tuple[str, Hashable], bytes] = OrderedDict()
        self._cache_size = 0
        self._cache_limit = cache_bytes
        self._in_flight: dict[tuple[str, Hashable], list[Deferred[bytes]]] = {}
        self.counters = SigningCounters()

    # -- service ----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=SIGNING_THREADS, name="sgn-signing")
        self._pool.start()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._pool is not None:
            self._pool.stop()
            self._pool = None

    def _in_pool(self, job: Job) -> Deferred[bytes]:
        if self._pool is None:
            raise RuntimeError("the signing service is not running")
        return deferToThreadPool(self._reactor, self._pool, job)

    # -- signing ----------------------------------------------------------------------------

    def sign_bytes(self, name: str, data: bytes) -> bytes | Deferred[bytes]:
        """``<name>.sgn`` of rendered ``data``: the cached bytes now, else a Deferred."""
        key = (header_name(name), content_key(data))
        hit = self._lookup(key)
        return hit if hit is not None else self._start(key, lambda: data)

    def sign_disk(self, name: str, body: DiskBody) -> bytes | Deferred[bytes]:
        """``<name>.sgn`` of a file on disk; ``body`` is read (off the reactor) and closed."""
        try:
            key = (header_name(name), ("disk", *body.identity()))
        except OSError:
            body.close()
            raise
        hit = self._lookup(key)
        if hit is not None:
            body.close()
            return hit

        def read() -> bytes:
            try:
                return body.read_at(0, body.size)
            finally:
                body.close()

        return self._start(key, read)

    def _lookup(self, key: tuple[str, Hashable]) -> bytes | Deferred[bytes] | None:
        """The cached file, or a Deferred on the signature already under way, or None."""
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            self.counters.cache_hits += 1
            return cached
        waiting = self._in_flight.get(key)
        if waiting is None:
            return None
        self.counters.cache_hits += 1
        d: Deferred[bytes] = Deferred()
        waiting.append(d)
        return d

    def _start(self, key: tuple[str, Hashable], load: Job) -> Deferred[bytes]:
        first: Deferred[bytes] = Deferred()
        self._in_flight[key] = [first]
        filename, timestamp = key[0], int(self._now())
        certificate, private_key = self.certificate, self._key

        def job() -> bytes:
            # Everything slow happens here, in the worker thread: reading, signing, checking.
            return sgn.build_signed(load(), filename, certificate, private_key, timestamp)

        try:
            running = self._run(job)
        except Exception:
            self._in_flight.pop(key, None)
            raise
        running.addBoth(self._settle, key)
        return first

    def _settle(self, result: bytes | Failure, key: tuple[str, Hashable]) -> None:
        waiting = self._in_flight.pop(key, [])
        if isinstance(result, bytes):
            self.counters.signed += 1
            self._remember(key, result)
            for d in waiting:
                d.callback(result)
            return
        self.counters.failures += 1
        log.error("signing failed", file=key[0], error=result.getErrorMessage())
        for d in waiting:
            d.errback(result)

    def _remember(self, key: tuple[str, Hashable], data: bytes) -> None:
        if len(data) > self._cache_limit:
            return
        old = self._cache.pop(key, None)
        if old is not None:
            self._cache_size -= len(old)
        self._cache[key] = data
        self._cache_size += len(data)
        while self._cache_size > self._cache_limit:
            _, evicted = self._cache.popitem(last=False)
            self._cache_size -= len(evicted)
