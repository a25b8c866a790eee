"""Shared fixtures: a real sandbox API on a loopback port, and a PostgreSQL server of the
session's own for the store tests that need one (tests/pg_support.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from batchjob.sandbox import Faults, Sandbox, SandboxSettings, World
from tests.pg_support import (
    pg_server,
    postgres_url,
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_sessionfinish,
    pytest_terminal_summary,
)

__all__ = [
    "pg_server",
    "postgres_url",
    "pytest_collection_modifyitems",
    "pytest_configure",
    "pytest_sessionfinish",
    "pytest_terminal_summary",
]


@pytest.fixture
def world() -> World:
    return World.generate(3, 200, seed=11)


@pytest.fixture
async def sandbox(world: World) -> AsyncIterator[Sandbox]:
    settings = SandboxSettings(rate=400.0, burst=20.0, daily_quota=None, seed=5)
    async with Sandbox(world, settings, Faults()) as sb:
        yield sb


@pytest.fixture(autouse=True)
def own_run_store(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every test gets a run store of its own at the default location (XDG_STATE_HOME), so
    runs are recorded as a user's would be, and never in the home of whoever runs the tests."""
    state_home = tmp_path_factory.mktemp("xdg-state")
    monkeypatch.setenv("XDG_STATE_HOME", str(state_home))
    monkeypatch.setenv("LOCALAPPDATA", str(state_home))
    monkeypatch.delenv("BATCHJOB_STATE", raising=False)
