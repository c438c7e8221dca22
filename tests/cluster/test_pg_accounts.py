"""The web's users and tokens on PostgreSQL: written through the store's own connection."""

from __future__ import annotations

import pytest_twisted
from callboard.daemon.registry.accounts import AccountStore, ApiToken, User
from callboard.daemon.registry.pgstore import PostgreSQLStore
from twisted.internet import reactor

NOW = 1_800_000_000.0


@pytest_twisted.ensureDeferred
async def test_users_and_tokens_round_trip_through_the_pg_store(pg_dsn: str) -> None:
    store = PostgreSQLStore(pg_dsn, listen=False)
    try:
        accounts = AccountStore(store, lambda: NOW, reactor)
        await accounts.put_user(User("al", "Al", created_at=NOW, updated_at=NOW))
        await accounts.put_user(User("al", "Al B.", is_admin=True, created_at=NOW, updated_at=NOW))
        await accounts.put_token(ApiToken("ops", "d" * 64, user_name="al", created_at=NOW))
        await accounts.put_user(User("bo", created_at=NOW, updated_at=NOW))
        await accounts.delete_user("bo")
    finally:
        await store.close()
    again = PostgreSQLStore(pg_dsn, listen=False)
    try:
        reloaded = AccountStore(again, lambda: NOW, reactor)
        assert list(reloaded.users) == ["al"]
        assert (reloaded.users["al"].display_name, reloaded.users["al"].is_admin) == ("Al B.", True)
        assert reloaded.tokens["ops"].user_name == "al"
        await reloaded.delete_user("al")  # and the tokens acting as them
        assert reloaded.tokens == {}
    finally:
        await again.close()
