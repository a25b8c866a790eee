"""One typed configuration object, and how it is assembled.

Precedence, highest first: command line > environment > config file > built-in defaults.
Secrets (tokens, client secret) are not part of the configuration: they come from the
environment or a token file, so that a config object can be logged or printed safely.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from batchjob._inputs import ColumnAliases, canonical_event_id

DEFAULT_BASE_URL = "https://api.cc.email/v3"
DEFAULT_TOKEN_URL = "https://authz.constantcontact.com/oauth2/default/v1/token"  # noqa: S105

LogFormat = Literal["console", "json"]


class ConfigError(ValueError):
    """A setting is missing, malformed or unsafe. Exit code 2."""


@dataclass(frozen=True)
class JobConfig:
    """Everything a run needs except secrets. Build with :func:`load_config` or directly."""

    inputs: tuple[Path, ...] = ()
    report: Path | None = None  # None: reports/undo-check-in-<UTC timestamp>.csv
    failed_rows: Path | None = None  # None: <report stem>.failed.csv beside the report
    base_url: str = DEFAULT_BASE_URL
    token_url: str = DEFAULT_TOKEN_URL
    rate: float = 4.0  # requests per second, the ceiling for adaptive pacing
    batch_size: int = 100  # keys per request, at most
    concurrency: int = 4  # requests in flight, at most
    event_id: str | None = None  # for input files that have no event column
    dry_run: bool = False
    resume: bool = False
    max_requests: int | None = None  # the most requests this run may spend
    log_format: LogFormat | None = None  # None: console on a terminal, json otherwise
    log_level: str = "info"
    progress: bool | None = None  # None: on a terminal only
    columns: ColumnAliases = field(default_factory=ColumnAliases)
    connect_timeout: float = 10.0
    request_timeout: float = 30.0
    retry_max_tries: int = 6
    retry_max_time: float = 120.0
    retry_base: float = 0.5  # seconds; exponential backoff with full jitter starts here
    retry_cap: float = 30.0  # seconds; no single backoff wait is longer
    token_file: Path | None = None
    client_id: str | None = None
    grace_period: float = 10.0  # seconds in-flight requests get after SIGINT/SIGTERM

    def __post_init__(self) -> None:
        _check_positive("rate", self.rate)
        _check_positive("batch_size", self.batch_size)
        _check_positive("concurrency", self.concurrency)
        _check_positive("connect_timeout", self.connect_timeout)
        _check_positive("request_timeout", self.request_timeout)
        _check_positive("retry_max_tries", self.retry_max_tries)
        if self.max_requests is not None and self.max_requests < 0:
            raise ConfigError(f"max_requests must be 0 or more, not {self.max_requests}")
        if self.log_format not in (None, "console", "json"):
            raise ConfigError(f"log_format must be console or json, not {self.log_format!r}")
        if self.resume and self.report is None:
            raise ConfigError("--resume needs --report: the report of the run to continue")
        if self.resume and self.dry_run:
            raise ConfigError("--dry-run cannot --resume: a dry run never replaces a report")
        if self.event_id is not None and canonical_event_id(self.event_id) is None:
            raise ConfigError(f"event_id {self.event_id!r} is not a UUID (--event-id)")
        check_url_is_safe("base_url", self.base_url)
        check_url_is_safe("token_url", self.token_url)

    def report_path(self, now: datetime | None = None) -> Path:
        if self.report is not None:
            return self.report
        stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
        return Path("reports") / f"undo-check-in-{stamp}.csv"

    def failed_rows_path(self, report: Path) -> Path:
        if self.failed_rows is not None:
            return self.failed_rows
        return report.with_name(f"{report.stem}.failed.csv")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be greater than 0, not {value}")


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url_is_safe(name: str, url: str) -> None:
    """Refuse to send a bearer token in clear text anywhere but this machine."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and is_loopback_host(parts.hostname):
        return
    raise ConfigError(
        f"{name} {url!r} is not allowed: use https://, or http:// only to a loopback host "
        "(the token would otherwise travel in clear text)"
    )


# --- assembling a config from file, environment and command line ---------------------------

_FIELDS = {f.name: f for f in dataclasses.fields(JobConfig)}
_PATH_FIELDS = {"report", "failed_rows", "token_file"}
_INT_FIELDS = {"batch_size", "concurrency", "max_requests", "retry_max_tries"}
_FLOAT_FIELDS = {
    "rate",
    "connect_timeout",
    "request_timeout",
    "retry_max_time",
    "retry_base",
    "retry_cap",
    "grace_period",
}
_BOOL_FIELDS = {"dry_run", "resume", "progress"}
_STR_FIELDS = {"base_url", "token_url", "event_id", "log_format", "log_level", "client_id"}
#: Settings a config file may hold (inputs and resume belong to one run, not to a file).
_FILE_FIELDS = (_PATH_FIELDS | _INT_FIELDS | _FLOAT_FIELDS | _BOOL_FIELDS | _STR_FIELDS) - {
    "resume"
}

#: Environment variables, by setting. CC_* follow Constant Contact's own naming.
ENV_VARS: Mapping[str, str] = {
    "base_url": "CC_BASE_URL",
    "token_url": "CC_TOKEN_URL",
    "token_file": "CC_TOKEN_FILE",
    "client_id": "CC_CLIENT_ID",
    "rate": "BATCHJOB_RATE",
    "batch_size": "BATCHJOB_BATCH_SIZE",
    "concurrency": "BATCHJOB_CONCURRENCY",
    "max_requests": "BATCHJOB_MAX_REQUESTS",
    "log_format": "BATCHJOB_LOG_FORMAT",
    "log_level": "BATCHJOB_LOG_LEVEL",
}


def _coerce(name: str, value: Any, origin: str) -> Any:
    try:
        if name in _PATH_FIELDS:
            return Path(str(value))
        if name in _INT_FIELDS:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if name in _FLOAT_FIELDS:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if name in _BOOL_FIELDS:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(value)
        if name in _STR_FIELDS:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except ValueError:
        raise ConfigError(f"{origin}: {name} = {value!r} is not a valid value") from None
    raise ConfigError(f"{origin}: unknown setting {name!r}")


def read_config_file(path: Path) -> dict[str, Any]:
    """Settings from a TOML file, checked and typed; unknown keys are an error (typos)."""
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    settings: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "columns":
            settings["columns"] = _columns_from(path, value)
        elif name in _FILE_FIELDS:
            settings[name] = _coerce(name, value, str(path))
        else:
            known = ", ".join(sorted(_FILE_FIELDS | {"columns"}))
            raise ConfigError(f"{path}: unknown setting {name!r}; known settings: {known}")
    return settings


def _columns_from(path: Path, value: Any) -> ColumnAliases:
    defaults = ColumnAliases()
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: [columns] must be a table")
    extra: dict[str, tuple[str, ...]] = {}
    for name, names in value.items():
        if name not in ("event_id", "order_ticket_key"):
            raise ConfigError(
                f"{path}: [columns] knows event_id and order_ticket_key, not {name!r}"
            )
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{path}: [columns] {name} must be a list of column names")
        extra[name] = (*names, *getattr(defaults, name))
    return dataclasses.replace(defaults, **extra)


def read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for name, var in ENV_VARS.items():
        value = environ.get(var)
        if value:
            settings[name] = _coerce(name, value, f"environment {var}")
    return settings


def load_config(
    *,
    cli: Mapping[str, Any],
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> JobConfig:
    """Merge defaults < config file < environment < command line into one JobConfig.

    ``cli`` holds only the options the user actually gave (None values are ignored).
    """
    settings: dict[str, Any] = {}
    if config_file is not None:
        settings.update(read_config_file(config_file))
    settings.update(read_environment(os.environ if environ is None else environ))
    settings.update({k: v for k, v in cli.items() if v is not None})
    unknown = set(settings) - set(_FIELDS)
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
    try:
        return JobConfig(**settings)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
