"""Where the bearer token comes from.

Tokens are secrets: they live in :class:`Secret` wrappers whose repr and str never show them,
and nothing here logs them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Secret:
    """A string that does not print itself."""

    value: str

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"


class StaticToken:
    """A token from CC_ACCESS_TOKEN: nothing to refresh, a 401 stops the run."""

    def __init__(self, token: Secret) -> None:
        self._token = token

    async def token(self) -> str:
        return self._token.value

    async def refresh(self, rejected: str) -> str | None:
        return None

    def secrets(self) -> tuple[str, ...]:
        return (self._token.value,)
