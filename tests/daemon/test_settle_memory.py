"""Once started, the daemon sets its long-lived objects apart from the cyclic collector and
returns the C heap's free pages (``settle_memory``, called by the runner after start-up)."""

from __future__ import annotations

import gc

from callboard.daemon.runner import settle_memory


def test_settle_memory_freezes_what_exists_and_trims_without_failing() -> None:
    kept = [object() for _ in range(10)]
    try:
        settle_memory()
        assert gc.get_freeze_count() >= len(kept)
    finally:
        gc.unfreeze()
