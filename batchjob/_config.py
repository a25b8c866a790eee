"""One typed configuration object, and how it is assembled.

Precedence, highest first: command line > environment > config file > built-in defaults.
Secrets (tokens, client secret) are not part of the configuration: they come from the
environment or a token file, so that a config object can be logged or printed safely.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal
from urllib.parse import urlsplit

from yarl import URL

from batchjob._errors import ConfigError
from batchjob._model import Action, ColumnAliases, canonical_event_id

DEFAULT_BASE_URL = "https://api.cc.email/v3"
#: What `batchjob auth` asks for: undo needs campaign_data; offline_access gives a refresh token.
SCOPE = "campaign_data offline_access"
DEFAULT_REDIRECT_URI = "https://localhost"
TOKEN_URL_ENV = "CC_TOKEN_URL"  # noqa: S105 (a variable name, not a secret)
DEFAULT_TOKEN_URL = "https://authz.constantcontact.com/oauth2/default/v1/token"  # noqa: S105

LogFormat = Literal["console", "json"]


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
    key_pattern: str | None = None  # a key must fully match this regular expression (RE2)
    include_hidden_rows: bool = False  # send rows hidden or filtered out in a spreadsheet
    dry_run: bool = False
    resume: bool = False
    max_requests: int | None = None  # the most requests this run may spend
    action: Action = Action.UNDO  # what each key's request asks: undo its check-in, or check in
    summary_json: Path | None = None  # the run's record as JSON (docs/summary-json.md)
    log_format: LogFormat | None = None  # None: console on a terminal, json otherwise
    log_level: str = "info"
    progress: bool | None = None  # None: on a terminal only
    columns: ColumnAliases = field(default_factory=ColumnAliases)
    connect_timeout: float = 10.0
    request_timeout: float = 30.0
    retry_max_tries: int = 6
    retry_max_time: float = 120.0
    unreachable_after: float = 60.0  # seconds with no HTTP answer before "cannot be reached"
    retry_base: float = 0.5  # seconds; exponential backoff with full jitter starts here
    retry_cap: float = 30.0  # seconds; no single backoff wait is longer
    token_file: Path | None = None
    client_id: str | None = None
    grace_period: float = 10.0  # seconds in-flight requests get after SIGINT/SIGTERM
    config_file: Path | None = None  # the settings file this was read from: never written
    # The run store (docs/store.md): "default" (one file per user), a path, or "none".
    state: str = "default"
    again: bool = False  # send rows an earlier run already did (default: reported skipped)
    pending: bool = False  # add every key earlier runs left unfinished
    identity: tuple[str, ...] = ("event_id", "order_ticket_key")  # what tells input rows apart
    revert: str | None = None  # the run whose undone keys this run checks in again
    resume_run: str | None = None  # --resume RUN: the stored run to continue (no inputs needed)
    # Runs on one API key share its limits through the store (docs/store.md): None names the
    # key by client_id, or else the API base URL (every run of this store on that API).
    api_key: str | None = None
    daily_budget: int = 10_000  # requests per API key per UTC day, across runs and machines
    lease_timeout: float = 30.0  # seconds after which a run's key lease, not renewed, is free

    def __post_init__(self) -> None:
        for name in _CHECKED:
            check_setting(name, getattr(self, name))
        # A caller (or a config file) may give the action as its text: keep the enum.
        object.__setattr__(self, "action", Action(self.action))
        for message, _ in relation_problems(self):
            raise ConfigError(message)
        if self.resume_run is not None:
            object.__setattr__(self, "resume", True)
        if self.resume and self.report is None and self.resume_run is None:
            raise ConfigError("--resume needs --report (or a run id): the run to continue")
        if self.resume and self.dry_run:
            raise ConfigError("--dry-run cannot --resume: a dry run never replaces a report")
        object.__setattr__(self, "identity", tuple(self.identity))
        no_store = self.state.strip().lower() == "none"
        if no_store and (self.pending or self.revert):
            what = "--pending" if self.pending else "revert"
            raise ConfigError(f"{what} needs the run store: state is none")
        if self.resume_run is not None and no_store:
            raise ConfigError("--resume RUN needs the run store: state is none")
        if self.revert is not None:
            if self.action != Action.CHECK_IN:
                raise ConfigError("revert checks keys in again: the action must be check-in")
            if self.inputs or self.pending or self.resume:
                raise ConfigError("revert takes its keys from the run it reverts, not from inputs")

    def report_path(self, now: datetime | None = None) -> Path:
        if self.report is not None:
            return self.report
        stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
        name = "check-in" if self.action == Action.CHECK_IN else "undo-check-in"
        return Path("reports") / f"{name}-{stamp}.csv"

    def failed_rows_path(self, report: Path) -> Path:
        if self.failed_rows is not None:
            return self.failed_rows
        return report.with_name(f"{report.stem}.failed.csv")


# --- what each setting may hold -------------------------------------------------------------


@dataclass(frozen=True)
class _Range:
    low: float
    high: float | None  # None: no upper bound
    low_included: bool = True
    whole: bool = False

    def problem(self, value: object) -> str | None:
        kinds: tuple[type, ...] = (int,) if self.whole else (int, float)
        if (
            not isinstance(value, bool)
            and isinstance(value, kinds)
            and math.isfinite(value)  # type: ignore[arg-type]
            and (value >= self.low if self.low_included else value > self.low)  # type: ignore[operator]
            and (self.high is None or value <= self.high)  # type: ignore[operator]
        ):
            return None
        what = "a whole number" if self.whole else "a number"
        low = f"from {_num(self.low)}" if self.low_included else f"greater than {_num(self.low)}"
        if self.high is None:
            return f"must be {what} {low}"
        high = f"to {_num(self.high)}" if self.low_included else f"and at most {_num(self.high)}"
        return f"must be {what} {low} {high}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


_HOUR = 3600.0
#: Ranges of the numeric settings. Upper bounds stop a typo (an extra zero, ``inf``) from
#: turning into a flood of requests or a run that never gives up; far above any real need.
RANGES: Mapping[str, _Range] = {
    # At least the pacer's floor (one request in 20 s), so a run always progresses; 1e6 is the
    # benchmarks' "unlimited".
    "rate": _Range(0.05, 1_000_000),
    "batch_size": _Range(1, 10_000, whole=True),
    "concurrency": _Range(1, 256, whole=True),
    "max_requests": _Range(0, None, whole=True),
    "connect_timeout": _Range(0, _HOUR, low_included=False),
    "request_timeout": _Range(0, _HOUR, low_included=False),
    "retry_max_tries": _Range(1, 100, whole=True),
    "retry_max_time": _Range(0, _HOUR, low_included=False),
    "unreachable_after": _Range(0, _HOUR, low_included=False),
    "retry_base": _Range(0, _HOUR, low_included=False),
    "retry_cap": _Range(0, _HOUR, low_included=False),
    "grace_period": _Range(0, _HOUR),  # 0: cancel requests in flight at once on a signal
    "daily_budget": _Range(1, 1_000_000_000, whole=True),
    "lease_timeout": _Range(1, _HOUR),
}
LOG_LEVELS = ("debug", "info", "warning")
LOG_FORMATS = ("console", "json")
_ACTIONS = tuple(a.value for a in Action)
#: Settings checked one by one, wherever they came from.
_CHECKED = (
    *RANGES,
    "log_level",
    "log_format",
    "event_id",
    "key_pattern",
    "base_url",
    "token_url",
    "action",
    "state",
    "identity",
)


def setting_problem(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for setting ``name``, or None when it is fine."""
    if name in RANGES:
        if name == "max_requests" and value is None:
            return None
        return RANGES[name].problem(value)
    if name == "log_level":
        ok = isinstance(value, str) and value.lower() in LOG_LEVELS
        return None if ok else f"must be one of {', '.join(LOG_LEVELS)}"
    if name == "log_format":
        ok = value is None or value in LOG_FORMATS
        return None if ok else f"must be one of {', '.join(LOG_FORMATS)}"
    if name == "action":
        ok = value in _ACTIONS
        return None if ok else f"must be one of {', '.join(_ACTIONS)}"
    if name == "event_id":
        ok = value is None or (isinstance(value, str) and canonical_event_id(value) is not None)
        return None if ok else "is not a UUID"
    if name in ("base_url", "token_url"):
        return url_problem(value)
    if name == "key_pattern":
        return None if value is None else key_pattern_problem(value)
    if name == "state":
        ok = isinstance(value, str) and value.strip() != "" and "\x00" not in value
        return None if ok else "must be a file path, or none"
    if name == "identity":
        return identity_problem(value)
    return None


#: Always part of a row's identity: naming them in ``identity`` changes nothing.
IDENTITY_BASE = ("event_id", "order_ticket_key")


def identity_problem(value: Any) -> str | None:
    if not isinstance(value, list | tuple) or not all(
        isinstance(n, str) and n.strip() for n in value
    ):
        return "must be a list of input column names"
    if len({n.strip().lower() for n in value}) != len(value):
        return "names a column twice"
    return None


def identity_extra(identity: tuple[str, ...]) -> tuple[str, ...]:
    """The columns of ``identity`` beside the event and key, which are always part of it."""
    return tuple(n for n in identity if n.strip().lower() not in IDENTITY_BASE)


def key_pattern_problem(value: Any) -> str | None:
    """A key pattern is RE2 syntax (pyarrow's): linear-time matching, no backreferences."""
    if not isinstance(value, str) or not value:
        return "must be a non-empty regular expression"
    import pyarrow as pa  # only when a pattern is set: --help stays light
    import pyarrow.compute as pc

    try:
        # Alone, not wrapped: "a)|(b" would otherwise pass, wrapped into "^(?:a)|(b)$".
        pc.match_substring_regex(pa.array([""]), value)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        return f"is not a valid regular expression (RE2 syntax): {str(exc).splitlines()[0]}"
    return None


def check_setting(name: str, value: Any, origin: str = "") -> None:
    """Raise :class:`ConfigError` naming the setting, the value and where it came from."""
    problem = setting_problem(name, value)
    if problem is not None:
        where = f" ({origin})" if origin else ""
        shown = display_url(value) if name.endswith("_url") and isinstance(value, str) else value
        raise ConfigError(f"{name} = {shown!r}{where} {problem}")


def relation_problems(config: Any) -> list[tuple[str, tuple[str, ...]]]:
    """Settings that are each fine but wrong together: (message, the settings involved)."""
    problems: list[tuple[str, tuple[str, ...]]] = []
    if config.retry_base > config.retry_cap:
        problems.append(
            (
                f"retry_base ({_num(config.retry_base)}) must not be more than retry_cap "
                f"({_num(config.retry_cap)}): the first backoff wait would exceed the longest",
                ("retry_base", "retry_cap"),
            )
        )
    return problems


# --- URLs a token may be sent to ------------------------------------------------------------

_PLAIN_HOST = re.compile(r"[a-z0-9.-]+\Z")
_RULE = (
    "use a plain https:// URL, or http:// only to a loopback host "
    "(the token would otherwise travel in clear text)"
)


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def display_url(url: str) -> str:
    """``url`` fit for a message: whatever precedes an ``@`` may be a password."""
    return re.sub(r"//[^/?#]*@", "//(not shown)@", url)


def url_problem(url: object) -> str | None:
    """Why ``url`` may not receive a bearer token (``is not allowed: <why>; <the rule>``).

    aiohttp reads a URL with yarl; anything yarl and urllib could read differently (and any
    part a token URL never needs) is refused rather than guessed at.
    """
    why = _url_problem(url)
    return None if why is None else f"is not allowed: it {why}; {_RULE}"


def _url_problem(url: object) -> str | None:
    if not isinstance(url, str) or not url:
        return "is empty"
    if any(not "!" <= c <= "~" for c in url):
        return "holds a space, a control or a non-ASCII character"
    if "\\" in url:
        return "holds a backslash (URL parsers disagree on what it means)"
    try:
        split = urlsplit(url)
        split_port = split.port
        parsed = URL(url)
    except ValueError as exc:
        return f"cannot be parsed ({exc})"
    scheme = split.scheme.lower()
    if scheme not in ("http", "https") or parsed.scheme != scheme:
        return "is neither https:// nor http://"
    if "@" in split.netloc or parsed.raw_user is not None or parsed.raw_password is not None:
        return "holds a user name or password (user:pass@)"
    if "?" in url or "#" in url:
        return "holds a query (?) or a fragment (#)"
    host, raw_host = split.hostname, parsed.raw_host
    if not host or not raw_host:
        return "has no host"
    if not _same_host(host, raw_host) or split_port != parsed.explicit_port:
        return f"names host {host!r} to urllib but {raw_host!r} to aiohttp (yarl)"
    if not (_is_ip(raw_host) or _PLAIN_HOST.match(raw_host)):
        return f"has host {raw_host!r}, not a plain host name or IP address"
    if scheme == "http" and not is_loopback_host(raw_host):
        return "is http:// to a host that is not this machine"
    return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return "%" not in host  # no IPv6 zone ids


def _same_host(a: str, b: str) -> bool:
    if _is_ip(a) and _is_ip(b):
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    return a.lower() == b.lower()


def check_url_is_safe(name: str, url: str, origin: str = "") -> None:
    """Refuse to send a bearer token in clear text anywhere but this machine, or anywhere
    ambiguous."""
    problem = url_problem(url)
    if problem is not None:
        where = f" ({origin})" if origin else ""
        raise ConfigError(f"{name} {display_url(url)!r}{where} {problem}")


# --- assembling a config from file, environment and command line ---------------------------

_FIELDS = {f.name: f for f in dataclasses.fields(JobConfig)}
_PATH_FIELDS = {"report", "failed_rows", "token_file", "summary_json"}
_INT_FIELDS = {"batch_size", "concurrency", "max_requests", "retry_max_tries", "daily_budget"}
_FLOAT_FIELDS = {
    "rate",
    "connect_timeout",
    "request_timeout",
    "retry_max_time",
    "unreachable_after",
    "retry_base",
    "retry_cap",
    "grace_period",
    "lease_timeout",
}
_BOOL_FIELDS = {"dry_run", "resume", "progress", "include_hidden_rows", "again", "pending"}
_STR_FIELDS = {
    "base_url",
    "token_url",
    "event_id",
    "log_format",
    "log_level",
    "client_id",
    "key_pattern",
}
_STR_FIELDS |= {"action", "state", "api_key"}
#: Settings a config file may hold (inputs, resume, again and revert belong to one run).
_FILE_FIELDS = (_PATH_FIELDS | _INT_FIELDS | _FLOAT_FIELDS | _BOOL_FIELDS | _STR_FIELDS) - {
    "resume",
    "again",
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
    "key_pattern": "BATCHJOB_KEY_PATTERN",
    "state": "BATCHJOB_STATE",
    "api_key": "BATCHJOB_API_KEY",
    "daily_budget": "BATCHJOB_DAILY_BUDGET",
}


def _coerce(name: str, value: Any, origin: str) -> Any:
    """``value`` as the type of setting ``name``, checked; ConfigError names ``origin``."""
    expected = "a valid value"
    try:
        if name in _PATH_FIELDS:
            return Path(str(value))
        if name in _INT_FIELDS:
            expected = "a whole number"
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            typed: Any = int(value)
        elif name in _FLOAT_FIELDS:
            expected = "a number"
            if isinstance(value, bool):
                raise ValueError(value)
            typed = float(value)
        elif name in _BOOL_FIELDS:
            expected = "true or false"
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(value)
        elif name in _STR_FIELDS:
            expected = "a string"
            if not isinstance(value, str):
                raise ValueError(value)
            typed = value
        else:
            raise ConfigError(f"{origin}: unknown setting {name!r}")
    except (ValueError, OverflowError):
        raise ConfigError(f"{name} = {value!r} ({origin}) must be {expected}") from None
    check_setting(name, typed, origin)
    return typed


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
        elif name == "incremental":
            settings.update(_incremental_from(path, value))
        elif name in _FILE_FIELDS:
            settings[name] = _coerce(name, value, f"config file {path}")
        else:
            known = ", ".join(sorted(_FILE_FIELDS | {"columns", "incremental"}))
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


def _incremental_from(path: Path, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: [incremental] must be a table")
    settings: dict[str, Any] = {}
    for name, item in value.items():
        if name != "identity":
            raise ConfigError(f"{path}: [incremental] knows identity, not {name!r}")
        check_setting("identity", item, f"config file {path}, [incremental]")
        settings["identity"] = tuple(item)
    return settings


def read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for name, var in ENV_VARS.items():
        value = environ.get(var)
        if value:
            settings[name] = _coerce(name, value, f"environment variable {var}")
    return settings


def load_config(
    *,
    cli: Mapping[str, Any],
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> JobConfig:
    """Merge defaults < config file < environment < command line into one JobConfig.

    ``cli`` holds only the options the user actually gave (None values are ignored). A bad
    setting is a :class:`ConfigError` that names it and where it came from.
    """
    settings: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if config_file is not None:
        from_file = read_config_file(config_file)
        settings.update(from_file)
        origins.update(dict.fromkeys(from_file, f"config file {config_file}"))
    from_env = read_environment(os.environ if environ is None else environ)
    settings.update(from_env)
    origins.update({name: f"environment variable {ENV_VARS[name]}" for name in from_env})
    given = {k: v for k, v in cli.items() if v is not None}
    unknown = (set(settings) | set(given)) - set(_FIELDS)
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
    for name, value in given.items():
        origins[name] = f"command line --{name.replace('_', '-')}"
        if name in _CHECKED:
            check_setting(name, value, origins[name])
    settings.update(given)
    # Not a JobConfig yet: its own check would raise without saying where values came from.
    merged = SimpleNamespace(**{n: settings.get(n, getattr(_DEFAULTS, n)) for n in RANGES})
    for message, names in relation_problems(merged):
        where = "; ".join(f"{n} from {origins.get(n, 'the built-in default')}" for n in names)
        raise ConfigError(f"{message} ({where})")
    if config_file is not None:
        settings["config_file"] = config_file
    try:
        return JobConfig(**settings)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


_DEFAULTS = JobConfig()
