"""Shared fixtures: a real sandbox API on a loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from batchjob.sandbox import Faults, Sandbox, SandboxSettings, World


@pytest.fixture
def world() -> World:
    return World.generate(3, 200, seed=11)


@pytest.fixture
async def sandbox(world: World) -> AsyncIterator[Sandbox]:
    settings = SandboxSettings(rate=400.0, burst=20.0, daily_quota=None, seed=5)
    async with Sandbox(world, settings, Faults()) as sb:
        yield sb
