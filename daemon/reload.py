"""SIGHUP: apply a re-read configuration to the running daemon, or refuse it whole.

The new configuration has already been loaded and validated (a bad one never gets here: the
runner logs the key it refuses and keeps the running one). This module diffs it against the
running configuration key by key and sorts every change into one of two kinds:

- **hot**: applied in place, without dropping a transfer, a TLS session or a registration
  (protocol settings objects are replaced where the protocol reads them per request; the
  templates and the manufacturing trust store are read again);
- **restart**: listen addresses, ports, endpoints, the state directory, keys and the like. These
  are reported ("needs a restart") and left as they are running: never half-applied.

Everything that can fail (templates, trust store) is read before anything is changed, so a
reload either applies all of its hot changes or none.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from callboard.protocols.settings import config_keys
from callboard.protocols.tvs.activation import Throttle

from . import certs
from .config import SECTIONS, Config
from .logs import get_logger

log = get_logger("callboard.reload")

_TOP_LEVEL_HOT = frozenset({"shutdown_grace"})
_TOP_LEVEL: tuple[str, ...] = (
    "state_dir", "tftp_root", "admin_socket", "demo", "log_level", "log_format", "workers",
)  # fmt: skip
# Keys of hot sections that are still read only at start (marked "needs a restart").
_RESTART_KEYS = frozenset(
    {
        "tftp.receive_buffer",
        "registry.feed_interval_seconds",
        "registry.feed_interval",
        "tvs.key_type",
        "tvs.itl_hash",
        "sip.realm",
        "sip.nonce_secret",
        "sip.nonce_lifetime",
        "sip.digest_algorithms",
        "sip.sweep_interval",
    }
)
# (section, Config attribute) pairs applied in place; every other attribute needs a restart.
_HOT_ATTRIBUTES = frozenset(
    {
        ("tftp", "tftp"),
        ("tvs", "tvs"),
        ("tvs", "trust"),
        ("registry", "registry"),
        ("sip", "sip"),
        ("sip", "provisioning"),
    }
)


def changed_keys(old: Config, new: Config) -> list[tuple[str, str, str]]:
    """Every changed key as (config key, Config attribute, settings attribute)."""
    changes: list[tuple[str, str, str]] = []
    for name in (*_TOP_LEVEL, *_TOP_LEVEL_HOT):
        if getattr(old, name) != getattr(new, name):
            changes.append((name, "", name))
    for section, classes in SECTIONS.items():
        for attribute, cls in classes:
            before, after = getattr(old, attribute), getattr(new, attribute)
            for key, attr in config_keys(cls).items():
                if getattr(before, attr) != getattr(after, attr):
                    changes.append((f"{section}.{key}", attribute, attr))
    if old.provisioning.loads != new.provisioning.loads:
        changes.append(("loads", "provisioning", "loads"))
    return changes


def needs_restart(key: str, attribute: str) -> bool:
    if not attribute:
        return key not in _TOP_LEVEL_HOT
    section = key.split(".", 1)[0] if key != "loads" else "sip"
    return (section, attribute) not in _HOT_ATTRIBUTES or key in _RESTART_KEYS


def effective(old: Config, new: Config, restart: list[tuple[str, str, str]]) -> Config:
    """``new`` with every restart-only change put back to what is running."""
    result = new
    for _key, attribute, attr in restart:
        if not attribute:
            result = replace(result, **{attr: getattr(old, attr)})
        else:
            part = replace(
                getattr(result, attribute), **{attr: getattr(getattr(old, attribute), attr)}
            )
            result = replace(result, **{attribute: part})
    return result


def apply_reload(service: Any, new: Config) -> bool:
    """Apply ``new``'s hot changes to ``service`` (a running CallboardService)."""
    old: Config = service.config
    changes = changed_keys(old, new)
    restart = [c for c in changes if needs_restart(c[0], c[1])]
    target = effective(old, new, restart)
    # Read what can fail first: nothing changes unless all of it is good.
    try:
        service.tree.reload_templates(target.state_dir / "templates")
    except (OSError, ValueError) as exc:
        log.error("reload refused: a template is broken; keeping the running ones", error=str(exc))
        return False
    try:
        trust = certs.load_trust_store(target.manufacturing_trust_path)
    except Exception as exc:
        log.error(
            "reload refused: the manufacturing trust store cannot be read; keeping the old one",
            setting="tvs.manufacturing_trust",
            error=str(exc),
        )
        return False
    _apply(service, target)
    service.tvs.set_trust(trust)
    log.info("manufacturing trust store reloaded", certificates=len(trust))
    service.config = target
    for key, _attribute, _attr in restart:
        log.warning("configuration change needs a restart; not applied", setting=key)
    applied = [key for key, attribute, _ in changes if not needs_restart(key, attribute)]
    log.info(
        "configuration reloaded",
        config=new.source,
        applied=applied,
        needs_restart=[key for key, _, _ in restart],
        trust_certificates=len(trust),
    )
    if not len(trust):
        log.warning(
            "the manufacturing trust store is empty: no phone can activate",
            directory=str(target.manufacturing_trust_path),
        )
    return True


def _apply(service: Any, config: Config) -> None:
    """Replace the settings objects the protocols read per request."""
    if getattr(service, "tftp", None) is not None:
        service.tftp.settings = config.tftp
    tvs = service.tvs.tvs
    tvs.settings = config.tvs
    tvs.handler.settings = config.tvs
    retune_throttles(service, config)
    service.registry.settings = config.registry
    service.registrar.settings = config.sip
    p = config.provisioning
    service.tree.advertise(
        replace(
            service.tree.settings,
            register_expires=p.register_expires,
            keepalive_expires=p.keepalive_expires,
            transport=p.transport,
            loads=dict(p.loads),
        )
    )


def retune_throttles(service: Any, config: Config) -> None:
    """The TVS throttles' limits from the new settings (their strikes and lockouts stay), and
    the window the shared budget reads back from the registry's ``attempts``."""
    handler = service.tvs.tvs.handler
    tvs = config.tvs
    _retune(handler.throttle, tvs.throttle_budget, config)
    _retune(handler.source_throttle, tvs.throttle_source_budget or tvs.throttle_budget, config)
    sync = getattr(service, "throttle_sync", None)
    if sync is not None:
        sync.window = tvs.throttle_window


def _retune(store: Any, budget: int, config: Config) -> None:
    inner = _in_memory(store)
    if inner is not None:
        s = config.tvs
        inner.budget = budget
        inner.window = s.throttle_window
        inner.base_lockout = s.throttle_base_lockout
        inner.max_lockout = s.throttle_max_lockout


def _in_memory(store: Any) -> Throttle | None:
    """The in-memory :class:`Throttle` behind a store's wrappers: the metrics' (``_inner``)
    and the shared budget's (``local``)."""
    for _ in range(4):
        if isinstance(store, Throttle):
            return store
        store = getattr(store, "_inner", None) or getattr(store, "local", None)
    return None


__all__ = ["apply_reload", "changed_keys", "effective", "needs_restart", "retune_throttles"]
