"""Prometheus metrics: what the daemon counts, and the ``/metrics`` resource that serves them.

Every metric lives in a registry of the daemon's own (never ``prometheus_client.REGISTRY``),
so two service trees in one process (tests) do not collide, and nothing a library registers
globally leaks into the exposition. Names follow Prometheus conventions: ``callboard_`` prefix,
``_total`` on counters, base units (seconds, bytes).

Labels are bounded: every label value passes through a function that maps anything unexpected
to ``other``. No label ever carries a MAC, a device name, a code or an address; per-device
stories are in the logs (``device=SEP…``), not in metrics.

Scrapes are rendered on the reactor thread (the resource here), not on a thread pool as
``prometheus_client.twisted.MetricsResource`` does: the callback gauges read the live
registry and registrar, which belong to the reactor.
"""

from __future__ import annotations

import bisect
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping

import prometheus_client.metrics
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from twisted.web import http, pages, server
from twisted.web.resource import Resource

OTHER = "other"

FILE_KINDS = ("xmldefault", "sep_config", "itl", "firmware", OTHER)
TRANSFER_PROTOCOLS = ("tftp", "http", "https")
TRANSFER_OUTCOMES = ("ok", "not_found", "refused", "timeout", "aborted", "error")
TVS_COMMANDS = ("verify", "activate")
TVS_STATUSES = (
    "trusted",
    "not_trusted",
    "activated",
    "rejected",
    "certificate_not_accepted",
    "rate_limited",
    "malformed",
)
LOCKOUT_SCOPES = ("device", "source")
ADMIN_ACTIONS = (
    "device.add",
    "device.delete",
    "device.set-mac",
    "device.require-activation",
    "code.generate",
    "code.release",
    "defaults.set",
    "import",
)
DEVICE_STATES = ("provisioned", "awaiting-activation", "active")

# From a few milliseconds (XMLDefault on a LAN) to ten minutes (firmware over TFTP).
TRANSFER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# -- label functions ------------------------------------------------------------------------

_XMLDEFAULT = re.compile(r"^xmldefault\.cnf\.xml(\.sgn)?$")
_SEP_CONFIG = re.compile(
    r"^(sep|bat)[0-9a-f]{12}\.cnf\.xml(\.sgn|\.enc\.sgn)?$|^sepdefault\.cnf(\.xml)?$"
)
_TRUST_LIST = re.compile(r"^(ext_)?(itl|ctl)(file|sep[0-9a-f]{12})\.tlv$")
_FIRMWARE_SUFFIXES = (".loads", ".sbn", ".sb2", ".zz", ".bin", ".img", ".pkg", ".zup", ".cop")


def file_kind(name: str) -> str:
    """The bounded kind of a requested file: xmldefault, sep_config, itl, firmware or other.

    ``name`` is what the phone asked for (a TFTP file name or an HTTP path; a leading
    directory, a query or the case do not matter). ``itl`` covers both trust lists (ITL and
    CTL files); ``firmware`` is anything with a firmware image suffix (``.loads``, ``.sbn``,
    ``.sb2``, ``.zz``, ``.bin``, ``.img``, ``.pkg``, ``.zup``, ``.cop``).
    """
    base = name.split("?", 1)[0].replace("\\", "/").rsplit("/", 1)[-1].lower()
    if _XMLDEFAULT.match(base):
        return "xmldefault"
    if _SEP_CONFIG.match(base):
        return "sep_config"
    if _TRUST_LIST.match(base):
        return "itl"
    if base.endswith(_FIRMWARE_SUFFIXES):
        return "firmware"
    return OTHER


def transfer_outcome(reason: str) -> str:
    """A TFTP outcome or refusal (as the TFTP server logs it) as a bounded label.

    ``ok``; ``timeout`` and ``deadline`` are ``timeout``; ``client error N`` (the phone gave
    up, often on purpose after reading ``tsize``) is ``aborted``; a refusal ``error 1`` is
    ``not_found``, other refusals ``refused``; anything else ``error``.
    """
    text = reason.strip().lower()
    if text == "ok":
        return "ok"
    if text in ("timeout", "deadline"):
        return "timeout"
    if text.startswith("client error"):
        return "aborted"
    if text == "error 1":
        return "not_found"
    if re.fullmatch(r"error \d+", text):
        return "refused"
    return "error"


def http_outcome(status: int) -> str:
    """An HTTP status as a transfer outcome (2xx/304 ok, 404 not_found, 4xx refused, 5xx error)."""
    if 200 <= status < 300 or status == 304:
        return "ok"
    if status == 404:
        return "not_found"
    if 400 <= status < 500:
        return "refused"
    return "error"


def sip_code(code: int) -> str:
    """A SIP response code as a label (``"200"``, ``"401"``…); out of range: ``other``."""
    return str(code) if 100 <= code <= 699 else OTHER


def _bounded(value: str, allowed: Iterable[str]) -> str:
    return value if value in allowed else OTHER


def tvs_command(command: int | str) -> str:
    """``verify`` or ``activate`` from a TVS command (request or response code, or name)."""
    if isinstance(command, str):
        return _bounded(command, TVS_COMMANDS)
    return {0x01: "verify", 0x02: "verify", 0x81: "activate", 0x82: "activate"}.get(
        int(command), OTHER
    )


def tvs_status(command: str, status: int | str) -> str:
    """A TVS response status as its name (codec ``VerifyStatus`` / ``ActivateStatus``)."""
    if isinstance(status, str):
        return _bounded(status, TVS_STATUSES)
    names = {
        "verify": ("trusted", "not_trusted"),
        "activate": (
            "activated",
            "rejected",
            "certificate_not_accepted",
            "rate_limited",
            "malformed",
        ),
    }.get(command, ())
    index = int(status)
    return names[index] if 0 <= index < len(names) else OTHER


# -- the metrics ----------------------------------------------------------------------------


class _DevicesByState(Collector):
    """``callboard_devices{state}``, read from the registry at scrape time."""

    def __init__(self) -> None:
        self.source: Callable[[], Mapping[str, int]] | None = None

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "callboard_devices", "Devices in the registry, by state.", labels=["state"]
        )
        counts = dict(self.source()) if self.source is not None else {}
        for state in DEVICE_STATES:
            family.add_metric([state], float(counts.pop(state, 0)))
        if counts:
            family.add_metric([OTHER], float(sum(counts.values())))
        yield family


class _KindSeries:
    """One (protocol, kind): bytes sent and the duration histogram's non-cumulative buckets."""

    __slots__ = ("buckets", "bytes", "created", "labels", "observed", "seconds", "sent")

    def __init__(self, protocol: str, kind: str) -> None:
        self.labels = {"protocol": protocol, "kind": kind}
        self.created = time.time()
        self.bytes = 0
        self.buckets = [0] * len(TRANSFER_BOUNDS)
        self.seconds = 0.0
        # Each series is exported from its creation (the pre-created bytes series) or from
        # its first use, as a Counter's or Histogram's child would be.
        self.sent = False
        self.observed = False


class _TransferCounts(Collector):
    """The transfer families, counted in plain ints and exported at scrape time.

    Same names, labels, samples and order as ``Counter``/``Histogram`` children would give
    (``callboard_transfers_total``, ``callboard_transfer_bytes_total``,
    ``callboard_transfer_duration_seconds``), without their lock and method chain per
    increment: four per transfer. Transfers are counted and scraped on the reactor thread.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], list[float]] = {}  # [count, created]
        self.kinds: dict[tuple[str, str], _KindSeries] = {}
        self.observed: list[_KindSeries] = []  # in the order of their first observation

    def count(self, protocol: str, kind: str, outcome: str) -> list[float]:
        cell = self.counts.get((protocol, kind, outcome))
        if cell is None:
            cell = self.counts[(protocol, kind, outcome)] = [0, time.time()]
        return cell

    def by_kind(self, protocol: str, kind: str) -> _KindSeries:
        series = self.kinds.get((protocol, kind))
        if series is None:
            series = self.kinds[(protocol, kind)] = _KindSeries(protocol, kind)
        return series

    def observed_first(self, series: _KindSeries) -> None:
        series.observed = True
        self.observed.append(series)

    def collect(self) -> Iterable[Metric]:
        transfers = Metric(
            "callboard_transfers",
            "File transfers (TFTP and HTTP) by protocol, file kind and outcome.",
            "counter",
        )
        for (protocol, kind, outcome), (count, created) in list(self.counts.items()):
            labels = {"protocol": protocol, "kind": kind, "outcome": outcome}
            _counter_samples(transfers, labels, count, created)
        sent = Metric(
            "callboard_transfer_bytes",
            "Bytes sent in file transfers (acknowledged, for TFTP).",
            "counter",
        )
        duration = Metric(
            "callboard_transfer_duration_seconds",
            "How long file transfers took, from request to last byte.",
            "histogram",
        )
        for series in list(self.kinds.values()):
            if series.sent:
                _counter_samples(sent, series.labels, series.bytes, series.created)
        for series in list(self.observed):
            _histogram_samples(duration, series.labels, series)
        return [transfers, sent, duration]


def _counter_samples(metric: Metric, labels: dict[str, str], value: float, created: float) -> None:
    metric.add_sample(metric.name + "_total", labels, float(value))
    if _CREATED:
        metric.add_sample(metric.name + "_created", labels, created)


def _histogram_samples(metric: Metric, labels: dict[str, str], series: _KindSeries) -> None:
    name = metric.name
    total = 0.0
    for le, count in zip(_LE, series.buckets, strict=True):
        total += count
        metric.add_sample(name + "_bucket", {**labels, "le": le}, total)
    metric.add_sample(name + "_count", labels, total)
    metric.add_sample(name + "_sum", labels, series.seconds)
    if _CREATED:
        metric.add_sample(name + "_created", labels, series.created)


# As prometheus_client's own metrics do (PROMETHEUS_DISABLE_CREATED_SERIES turns them off).
_CREATED: bool = getattr(prometheus_client.metrics, "_use_created", True)
TRANSFER_BOUNDS = (*TRANSFER_BUCKETS, math.inf)
_LE = tuple(floatToGoString(bound) for bound in TRANSFER_BOUNDS)  # type: ignore[no-untyped-call]
_TransferChildren = tuple[list[float], _KindSeries]
_TRANSFER_CHILDREN_CACHE = 4096
_REMEMBERED_NAME = 256
# The first field of a remembered key holding a TFTP reason as the server gives it ("error 1",
# "client error 8"...), not a label: apart from record_transfer's (protocol, name, label).
_TFTP_REASON = "tftp reason"


class CallboardMetrics:
    """Every Callboard metric, in a registry of its own, with bounded ``record_*`` methods."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        version: str = "",
        process: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        Gauge(
            "callboard_build_info",
            "Always 1; the version is in the label.",
            ["version"],
            registry=r,
        ).labels(version or "unknown").set(1)
        self._transfer_counts = _TransferCounts()
        r.register(self._transfer_counts)
        self.tvs_connections = Counter(
            "callboard_tvs_connections_total", "TVS connections accepted.", registry=r
        )
        self.tvs_connections_open = Gauge(
            "callboard_tvs_connections_open", "TVS connections open now.", registry=r
        )
        self.tvs_requests = Counter(
            "callboard_tvs_requests_total",
            "TVS requests answered, by command and response status.",
            ["command", "status"],
            registry=r,
        )
        self.activations = Counter(
            "callboard_activations_total",
            "Activation codes redeemed (devices activated through TVS).",
            registry=r,
        )
        self.lockouts = Counter(
            "callboard_throttle_lockouts_total",
            "Throttle lockouts after repeated failed activations, by what was locked.",
            ["scope"],
            registry=r,
        )
        self.register_responses = Counter(
            "callboard_sip_register_responses_total",
            "Responses to SIP REGISTER, by status code.",
            ["code"],
            registry=r,
        )
        self.admin_changes = Counter(
            "callboard_admin_changes_total",
            "Changes made through the admin API, by action.",
            ["action"],
            registry=r,
        )
        self.codes_outstanding = Gauge(
            "callboard_activation_codes_outstanding",
            "Activation codes issued and neither used nor expired.",
            registry=r,
        )
        self.registrations = Gauge(
            "callboard_sip_registrations",
            "SIP registrations (bindings) current now.",
            registry=r,
        )
        self._devices = _DevicesByState()
        r.register(self._devices)
        # Every bounded combination starts at zero, so rate() and absent() behave from the
        # first scrape instead of when a label value first occurs.
        for protocol in ("tftp", "http"):
            for kind in FILE_KINDS:
                self._transfer_counts.by_kind(protocol, kind).sent = True  # exported at 0
                for outcome in TRANSFER_OUTCOMES:
                    self._transfer_counts.count(protocol, kind, outcome)
        for scope in LOCKOUT_SCOPES:
            self.lockouts.labels(scope)
        # The series a transfer counts in, per (protocol, name asked, outcome): a boot storm
        # asks for the same few names thousands of times, and finding the file kind costs
        # more than the counting itself.
        self._transfer_children: dict[tuple[str, str, str], _TransferChildren] = {}

    # -- events ---------------------------------------------------------------------------

    def record_transfer(
        self, protocol: str, name: str, outcome: str, seconds: float, size: int = 0
    ) -> None:
        """One finished transfer; ``outcome`` from :func:`transfer_outcome`/:func:`http_outcome`."""
        key = (protocol, name, outcome)
        children = self._transfer_children.get(key)
        if children is None:
            children = self._children_for(key, protocol, name, outcome)
        self._add_transfer(children, seconds, size)

    def record_tftp_transfer(self, name: str, reason: str, seconds: float, size: int) -> None:
        """TFTP's ``on_transfer_end`` itself: :meth:`record_transfer` for the reason as given.

        The series are remembered per (name, reason as the server gives it), so the reason is
        mapped to its label (:func:`transfer_outcome`) once, not once per transfer.
        """
        key = (_TFTP_REASON, name, reason)
        children = self._transfer_children.get(key)
        if children is None:
            children = self._children_for(key, "tftp", name, transfer_outcome(reason))
        self._add_transfer(children, seconds, size)

    def _add_transfer(self, children: _TransferChildren, seconds: float, size: int) -> None:
        count, series = children
        count[0] += 1
        if size > 0:
            series.bytes += size
            series.sent = True
        if seconds < 0.0:
            seconds = 0.0
        series.buckets[bisect.bisect_left(TRANSFER_BOUNDS, seconds)] += 1
        series.seconds += seconds
        if not series.observed:
            self._transfer_counts.observed_first(series)

    def _children_for(
        self, key: tuple[str, str, str], protocol: str, name: str, outcome: str
    ) -> _TransferChildren:
        """Find the series once and remember them under ``key`` (forgetting all past a bound)."""
        proto = _bounded(protocol, TRANSFER_PROTOCOLS)
        kind = file_kind(name)
        counts = self._transfer_counts
        children = (
            counts.count(proto, kind, _bounded(outcome, TRANSFER_OUTCOMES)),
            counts.by_kind(proto, kind),
        )
        cache = self._transfer_children
        if len(name) > _REMEMBERED_NAME:
            return children  # names are the clients' choice: the memory stays bounded
        if len(cache) >= _TRANSFER_CHILDREN_CACHE:
            cache.clear()
        cache[key] = children
        return children

    def tvs_connection_opened(self) -> None:
        self.tvs_connections.inc()
        self.tvs_connections_open.inc()

    def tvs_connection_closed(self) -> None:
        self.tvs_connections_open.dec()

    def record_tvs_request(self, command: int | str, status: int | str) -> None:
        name = tvs_command(command)
        self.tvs_requests.labels(name, tvs_status(name, status)).inc()

    def record_activation(self) -> None:
        self.activations.inc()

    def record_lockout(self, scope: str) -> None:
        self.lockouts.labels(_bounded(scope, LOCKOUT_SCOPES)).inc()

    def record_register(self, code: int) -> None:
        self.register_responses.labels(sip_code(code)).inc()

    def record_admin_change(self, action: str) -> None:
        self.admin_changes.labels(_bounded(action, ADMIN_ACTIONS)).inc()

    # -- values read at scrape time ---------------------------------------------------------

    def watch(
        self,
        *,
        codes_outstanding: Callable[[], float] | None = None,
        registrations: Callable[[], float] | None = None,
        devices_by_state: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        """Gauges computed when scraped, from the live registry and registrar."""
        if codes_outstanding is not None:
            self.codes_outstanding.set_function(codes_outstanding)
        if registrations is not None:
            self.registrations.set_function(registrations)
        if devices_by_state is not None:
            self._devices.source = devices_by_state


# -- exposition -----------------------------------------------------------------------------


class MetricsResource(Resource):
    """``/metrics``: the text format, or OpenMetrics when the scraper asks for it."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._registry = registry

    def render_GET(self, request: server.Request) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        body = encoder(self._registry)
        request.setHeader(b"Content-Type", content_type.encode())
        request.setHeader(b"Content-Length", str(len(body)).encode())
        return body


class _Root(Resource):
    def getChild(self, path: bytes, request: server.Request) -> Resource:
        return pages.notFound()  # type: ignore[return-value]


class _Index(Resource):
    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"Callboard: metrics are at /metrics\n"


class _QuietSite(server.Site):
    """No access log: a scrape every few seconds is not news."""

    def log(self, request: http.Request) -> None:
        pass


def metrics_resource(registry: CollectorRegistry) -> Resource:
    """The resource tree: ``/metrics`` and a one-line index at ``/``; anything else 404."""
    root = _Root()  # type: ignore[no-untyped-call]
    root.putChild(b"", _Index())  # type: ignore[no-untyped-call]
    root.putChild(b"metrics", MetricsResource(registry))
    return root


def metrics_site(registry: CollectorRegistry, timeout: float = 60.0) -> server.Site:
    """The ``Site`` to listen on for ``--metrics-port`` (plain HTTP)."""
    site = _QuietSite(metrics_resource(registry), timeout=timeout)  # type: ignore[no-untyped-call]
    site.displayTracebacks = False
    site.noisy = False
    return site
