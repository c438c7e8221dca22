"""Prometheus metrics: label rules, then /metrics scraped over real loopback with curl."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from callboard.daemon.metrics import (
    FILE_KINDS,
    TRANSFER_BUCKETS,
    TRANSFER_OUTCOMES,
    TRANSFER_PROTOCOLS,
    CallboardMetrics,
    file_kind,
    http_outcome,
    metrics_site,
    sip_code,
    transfer_outcome,
)
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.utils import getProcessOutputAndValue

CURL = shutil.which("curl") or "/usr/bin/curl"

# -- label functions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("XMLDefault.cnf.xml", "xmldefault"),
        ("/XMLDefault.cnf.xml", "xmldefault"),
        ("xmldefault.cnf.xml.sgn", "xmldefault"),
        ("SEP00AABBCCDDEE.cnf.xml", "sep_config"),
        ("/SEP00aabbccddee.cnf.xml?x=1", "sep_config"),
        ("SEP00AABBCCDDEE.cnf.xml.sgn", "sep_config"),
        ("BAT00AABBCCDDEE.cnf.xml", "sep_config"),
        ("SEPDefault.cnf", "sep_config"),
        ("ITLSEP00AABBCCDDEE.tlv", "itl"),
        ("ITLFile.tlv", "itl"),
        ("CTLSEP00AABBCCDDEE.tlv", "itl"),
        ("ext_ITLSEP00AABBCCDDEE.tlv", "itl"),
        ("sip88xx.14-2-1-0001-14.loads", "firmware"),
        ("firmware/kern88xx.14-2-1-0001-14.sbn", "firmware"),
        ("dsp3905.sb2", "firmware"),
        ("English_United_States/be-sip.jar", "other"),
        ("SEP00AABBCCDD.cnf.xml", "other"),  # not a MAC: not a device config
        ("Desktops/320x212x12/List.xml", "other"),
        ("", "other"),
    ],
)
def test_file_kind(name: str, kind: str) -> None:
    assert file_kind(name) == kind
    assert kind in FILE_KINDS


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("ok", "ok"),
        ("timeout", "timeout"),
        ("deadline", "timeout"),
        ("client error 8", "aborted"),
        ("client error 0", "aborted"),
        ("error 1", "not_found"),
        ("error 2", "refused"),
        ("error 0", "refused"),
        ("read error", "error"),
        ("illegal operation", "error"),
    ],
)
def test_transfer_outcome(reason: str, label: str) -> None:
    assert transfer_outcome(reason) == label


def test_http_outcome_and_sip_code() -> None:
    assert [http_outcome(s) for s in (200, 206, 304, 404, 403, 405, 416, 500, 503)] == [
        "ok", "ok", "ok", "not_found", "refused", "refused", "refused", "error", "error",
    ]  # fmt: skip
    codes = [sip_code(c) for c in (200, 401, 423, 99, 700)]
    assert codes == ["200", "401", "423", "other", "other"]


def test_repeated_transfers_count_in_the_same_children_and_the_cache_stays_bounded() -> None:
    m = CallboardMetrics(process=False)
    get = m.registry.get_sample_value
    for _ in range(3):
        m.record_transfer("tftp", "SEP00AABBCCDDEE.cnf.xml", "ok", 0.02, size=100)
    m.record_transfer("tftp", "sep00aabbccddee.cnf.xml", "timeout", 0.5)
    for port in range(5000):  # names are the clients' choice
        m.record_transfer("tftp", f"junk{port}", "not_found", 0.001)
    m.record_transfer("tftp", "SEP00AABBCCDDEE.cnf.xml", "ok", 0.02, size=100)
    labels = {"protocol": "tftp", "kind": "sep_config"}
    assert get("callboard_transfers_total", {**labels, "outcome": "ok"}) == 4
    assert get("callboard_transfers_total", {**labels, "outcome": "timeout"}) == 1
    assert get("callboard_transfer_bytes_total", labels) == 400
    assert get("callboard_transfer_duration_seconds_count", labels) == 5
    other = {"protocol": "tftp", "kind": "other", "outcome": "not_found"}
    assert get("callboard_transfers_total", other) == 5000
    assert len(m._transfer_children) <= 4096
    m.record_transfer("tftp", "x" * 10_000, "not_found", 0.001)  # too long to be remembered
    assert get("callboard_transfers_total", other) == 5001
    assert not any(len(name) > 256 for _, name, _ in m._transfer_children)


def _reference_transfers(events: list[tuple[str, str, str, float, int]]) -> bytes:
    """The transfer families as prometheus_client's Counter and Histogram children give them."""
    registry = CollectorRegistry()
    labels = ["protocol", "kind"]
    doc = "File transfers (TFTP and HTTP) by protocol, file kind and outcome."
    transfers = Counter("callboard_transfers_total", doc, [*labels, "outcome"], registry=registry)
    doc = "Bytes sent in file transfers (acknowledged, for TFTP)."
    sent = Counter("callboard_transfer_bytes_total", doc, labels, registry=registry)
    duration = Histogram(
        "callboard_transfer_duration_seconds",
        "How long file transfers took, from request to last byte.",
        labels,
        buckets=TRANSFER_BUCKETS,
        registry=registry,
    )
    for protocol in ("tftp", "http"):
        for kind in FILE_KINDS:
            sent.labels(protocol, kind)
            for outcome in TRANSFER_OUTCOMES:
                transfers.labels(protocol, kind, outcome)
    for protocol, name, outcome, seconds, size in events:
        proto = protocol if protocol in TRANSFER_PROTOCOLS else "other"
        kind = file_kind(name)
        transfers.labels(proto, kind, outcome if outcome in TRANSFER_OUTCOMES else "other").inc()
        if size > 0:
            sent.labels(proto, kind).inc(size)
        duration.labels(proto, kind).observe(max(seconds, 0.0))
    return generate_latest(registry)


def test_transfer_families_expose_exactly_what_prometheus_client_children_would() -> None:
    events = [
        ("tftp", "SEP00AABBCCDDEE.cnf.xml", "ok", 0.02, 1500),
        ("tftp", "SEP00AABBCCDDEE.cnf.xml", "aborted", 0.01, 0),
        ("http", "/XMLDefault.cnf.xml", "ok", 0.003, 4000),
        ("tftp", "sip88xx.loads", "ok", 42.0, 10_000_000),
        ("https", "ITLFile.tlv", "ok", 0.005, 300),  # exactly on a bucket bound
        ("tftp", "x", "timeout", 700.0, 0),  # past the last bound: +Inf only
        ("tftp", "y", "ok", -1.0, 10),  # a clock step: counted as 0 s
        ("gopher", "x", "weird", 1.0, 0),
    ]
    ours = CallboardMetrics(process=False)
    for protocol, name, outcome, seconds, size in events:
        ours.record_transfer(protocol, name, outcome, seconds, size)

    def transfer_lines(text: bytes) -> list[str]:
        lines = [
            re.sub(r"_created(\{.*\})? .*", r"_created\1 T", line)
            for line in text.decode().splitlines()
            if re.match(r"(# \w+ )?callboard_transfer", line)
        ]
        assert lines
        return lines

    assert transfer_lines(generate_latest(ours.registry)) == transfer_lines(
        _reference_transfers(events)
    )


def test_tftp_reasons_as_given_count_as_their_labels_would() -> None:
    """The TFTP hook (``record_tftp_transfer``, remembered per reason) == the labelled call."""
    reasons = ["ok", "timeout", "deadline", "client error 8", "client error 0", "error 1"]
    reasons += ["error 2", "read error", "illegal operation", "shutdown", " OK "]
    names = ["SEP00AABBCCDDEE.cnf.xml", "sip88xx.loads", "x" * 300, "ITLFile.tlv"]
    events = [
        (name, reason, seconds, size)
        for name in names
        for reason in reasons
        for seconds, size in ((0.02, 1500), (-1.0, 0), (700.0, 10))
    ]
    ours, labelled = CallboardMetrics(process=False), CallboardMetrics(process=False)
    for _ in range(2):  # the second time from the remembered series
        for name, reason, seconds, size in events:
            ours.record_tftp_transfer(name, reason, seconds, size)
            labelled.record_transfer("tftp", name, transfer_outcome(reason), seconds, size)

    def transfer_lines(metrics: CallboardMetrics) -> list[str]:
        text = generate_latest(metrics.registry).decode()
        return [
            re.sub(r"_created(\{.*\})? .*", r"_created\1 T", line)
            for line in text.splitlines()
            if line.startswith("callboard_transfer")
        ]

    assert transfer_lines(ours) == transfer_lines(labelled)
    get = ours.registry.get_sample_value
    labels = {"protocol": "tftp", "kind": "sep_config"}
    assert get("callboard_transfers_total", {**labels, "outcome": "not_found"}) == 6
    assert get("callboard_transfers_total", {**labels, "outcome": "timeout"}) == 12


# -- scraped over loopback ---------------------------------------------------------------------


@pytest.fixture
def metrics() -> CallboardMetrics:
    m = CallboardMetrics(version="1.2.3")
    m.record_transfer("tftp", "SEP00AABBCCDDEE.cnf.xml", "ok", 0.02, size=1500)
    m.record_transfer("tftp", "SEP00AABBCCDDEE.cnf.xml", transfer_outcome("client error 8"), 0.01)
    m.record_transfer("http", "/XMLDefault.cnf.xml", http_outcome(200), 0.003, size=4000)
    m.record_transfer("tftp", "sip88xx.loads", "ok", 42.0, size=10_000_000)
    m.record_transfer("gopher", "x", "weird", 1.0)
    m.tvs_connection_opened()
    m.tvs_connection_opened()
    m.tvs_connection_closed()
    m.record_tvs_request(0x81, 0)  # ACTIVATE_REQUEST answered ACTIVATED
    m.record_tvs_request(0x81, 3)  # … RATE_LIMITED
    m.record_tvs_request("verify", "not_trusted")
    m.record_tvs_request(0x55, 9)
    m.record_activation()
    m.record_lockout("device")
    m.record_lockout("00:AA:BB:CC:DD:EE")
    m.record_register(401)
    m.record_register(200)
    m.record_register(200)
    m.record_admin_change("device.add")
    m.record_admin_change("device.add SEP00AABBCCDDEE")
    m.watch(
        codes_outstanding=lambda: 7,
        registrations=lambda: 3,
        devices_by_state=lambda: {"active": 2, "awaiting-activation": 5},
    )
    return m


@pytest.fixture
def url(metrics: CallboardMetrics) -> Iterator[str]:
    endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
    port = pytest_twisted.blockon(endpoint.listen(metrics_site(metrics.registry)))
    yield f"http://127.0.0.1:{port.getHost().port}"
    pytest_twisted.blockon(port.stopListening())


async def curl(*args: str) -> tuple[str, str, int]:
    d = getProcessOutputAndValue(CURL, ("-sS", "--max-time", "20", *args), env=dict(os.environ))
    d.addTimeout(30, reactor)
    out, err, code = await d
    return out.decode(), err.decode(), code


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


@pytest_twisted.ensureDeferred
async def test_scrape_with_curl(url: str) -> None:
    out, err, code = await curl("-D", "-", f"{url}/metrics")
    assert code == 0, err
    head, _, body = out.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200")
    assert "content-type: text/plain; version=0.0.4" in head.lower()
    found = samples(body)
    t = "callboard_transfers_total"
    assert value(found, t, protocol="tftp", kind="sep_config", outcome="ok") == 1
    assert value(found, t, protocol="tftp", kind="sep_config", outcome="aborted") == 1
    assert value(found, t, protocol="http", kind="xmldefault", outcome="ok") == 1
    assert value(found, t, protocol="tftp", kind="firmware", outcome="ok") == 1
    assert value(found, t, protocol="other", kind="other", outcome="other") == 1
    assert value(found, t, protocol="http", kind="itl", outcome="timeout") == 0  # pre-created
    assert value(found, "callboard_transfer_bytes_total", protocol="tftp", kind="firmware") == 1e7
    h = "callboard_transfer_duration_seconds"
    assert value(found, f"{h}_bucket", protocol="tftp", kind="firmware", le="30.0") == 0
    assert value(found, f"{h}_bucket", protocol="tftp", kind="firmware", le="60.0") == 1
    assert value(found, f"{h}_sum", protocol="tftp", kind="sep_config") == pytest.approx(0.03)
    assert value(found, "callboard_tvs_connections_total") == 2
    assert value(found, "callboard_tvs_connections_open") == 1
    r = "callboard_tvs_requests_total"
    assert value(found, r, command="activate", status="activated") == 1
    assert value(found, r, command="activate", status="rate_limited") == 1
    assert value(found, r, command="verify", status="not_trusted") == 1
    assert value(found, r, command="other", status="other") == 1
    assert value(found, "callboard_activations_total") == 1
    assert value(found, "callboard_throttle_lockouts_total", scope="device") == 1
    assert value(found, "callboard_throttle_lockouts_total", scope="source") == 0
    assert value(found, "callboard_throttle_lockouts_total", scope="other") == 1
    assert value(found, "callboard_sip_register_responses_total", code="200") == 2
    assert value(found, "callboard_sip_register_responses_total", code="401") == 1
    assert value(found, "callboard_admin_changes_total", action="device.add") == 1
    assert value(found, "callboard_admin_changes_total", action="other") == 1
    assert value(found, "callboard_activation_codes_outstanding") == 7
    assert value(found, "callboard_sip_registrations") == 3
    assert value(found, "callboard_devices", state="active") == 2
    assert value(found, "callboard_devices", state="awaiting-activation") == 5
    assert value(found, "callboard_devices", state="provisioned") == 0
    assert value(found, "callboard_build_info", version="1.2.3") == 1
    # Process metrics come with it (the collector reads /proc).
    assert value(found, "process_resident_memory_bytes") > 0
    assert value(found, "process_open_fds") > 0
    assert any(name == "python_info" for name, _ in found)
    # Bounded cardinality: no MAC or device name made it into any label.
    assert "AABBCCDDEE" not in body.upper()


@pytest_twisted.ensureDeferred
async def test_names_follow_prometheus_conventions(url: str) -> None:
    out, err, code = await curl(f"{url}/metrics")
    assert code == 0, err
    for family in text_string_to_metric_families(out):
        if not family.name.startswith("callboard_"):
            continue
        if family.type == "counter":
            # The parser strips _total from counter family names; every sample keeps it.
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        else:
            assert not family.name.endswith("_total"), family.name
        assert "_milliseconds" not in family.name and "_kilobytes" not in family.name


@pytest_twisted.ensureDeferred
async def test_openmetrics_when_asked(url: str) -> None:
    out, err, code = await curl(
        "-D", "-", "-H", "Accept: application/openmetrics-text; version=1.0.0", f"{url}/metrics"
    )
    assert code == 0, err
    head, _, body = out.partition("\r\n\r\n")
    assert "application/openmetrics-text" in head.lower()
    assert body.rstrip().endswith("# EOF")


@pytest_twisted.ensureDeferred
async def test_other_paths(url: str) -> None:
    out, _, code = await curl("-o", "/dev/null", "-w", "%{http_code}", f"{url}/nothing")
    assert (code, out) == (0, "404")
    out, _, code = await curl(f"{url}/")
    assert code == 0 and "/metrics" in out
    out, _, code = await curl("-I", f"{url}/metrics")
    assert code == 0 and out.startswith("HTTP/1.1 200")


def test_each_daemon_has_its_own_registry() -> None:
    first, second = CallboardMetrics(), CallboardMetrics()  # would collide in one registry
    first.record_activation()
    assert first.registry.get_sample_value("callboard_activations_total") == 1
    assert second.registry.get_sample_value("callboard_activations_total") == 0
    assert REGISTRY.get_sample_value("callboard_activations_total") is None
