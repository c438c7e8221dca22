"""Retention settings: read from [registry] and [tvs], held to bounds, wired to timers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from callboard.daemon.config import ConfigError, load_config
from callboard.daemon.service import (
    ATTEMPTS_PRUNE_INTERVAL,
    FEED_PRUNE_INTERVAL,
    CallboardService,
)
from callboard.daemon.shared_throttle import DAY
from twisted.application.internet import TimerService
from twisted.internet import reactor


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "callboard.toml"
    path.write_text(text)
    return path


def test_the_defaults_keep_a_hundred_thousand_rows_an_hour_and_thirty_days() -> None:
    config = load_config(None)
    assert config.registry.feed_keep_rows == 100_000
    assert config.registry.feed_keep_seconds == 3600.0
    assert config.attempts.days == 30.0


def test_the_keys_are_read_from_their_sections(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[registry]\nfeed_keep_rows = 5000\nfeed_keep_seconds = 600\n"
        "[tvs]\nattempts_retention_days = 7\n",
    )
    config = load_config(path)
    assert (config.registry.feed_keep_rows, config.registry.feed_keep_seconds) == (5000, 600.0)
    assert config.attempts.days == 7.0


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[registry]\nfeed_keep_rows = 0\n", "registry.feed_keep_rows"),
        ("[registry]\nfeed_keep_seconds = 30\n", "registry.feed_keep_seconds"),
        # Ten polls at least: a live follower must never fall behind the kept rows.
        ("[registry]\nfeed_interval = 60\nfeed_keep_seconds = 300\n", "registry.feed_keep_seconds"),
        ("[tvs]\nattempts_retention_days = 0.5\n", "tvs.attempts_retention_days"),
        ('[tvs]\nattempts_retention_days = "a month"\n', "tvs.attempts_retention_days"),
    ],
)
def test_out_of_bounds_values_are_refused_naming_the_key(
    tmp_path: Path, text: str, key: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_config(path)
    assert str(path) in str(err.value)


def timers(service: CallboardService) -> dict[Any, float]:
    return {
        child.call[0]: child.step  # type: ignore[attr-defined]
        for child in service
        if isinstance(child, TimerService)
    }


@pytest_twisted.ensureDeferred
async def test_the_daemon_prunes_the_feed_and_the_attempts_periodically(tmp_path: Path) -> None:
    ports = ("tftp", "http", "tvs", "sip", "sip_tls", "https")
    config = load_config(
        None,
        {
            "state_dir": str(tmp_path / "state"),
            **{f"network.{name}_port": 0 for name in ports},
            "registry.feed_keep_rows": 1000,
            "tvs.attempts_retention_days": 2,
        },
    )
    service = CallboardService(config, reactor)
    service.startService()
    try:
        found = timers(service)
        assert found[service.registry.prune_feed] == FEED_PRUNE_INTERVAL
        assert found[service.throttle_sync.prune] == ATTEMPTS_PRUNE_INTERVAL
        assert service.registry.settings.feed_keep_rows == 1000
        assert service.throttle_sync.retention == 2 * DAY
        assert await service.registry.prune_feed() == 0  # a new registry: nothing is due
        assert await service.throttle_sync.prune() == 0
    finally:
        await service.stopService()
