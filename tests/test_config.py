"""Settings: the documented defaults are the real ones, and precedence is as the README says."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest

from batchjob import ConfigError, JobConfig, load_config
from batchjob._cli import main
from batchjob._config import read_config_file
from tests.chaos_support import cli, cli_env

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_default_toml_documents_the_real_defaults() -> None:
    documented = read_config_file(CONFIGS / "default.toml")
    defaults = JobConfig()
    for name, value in documented.items():
        if name == "columns":
            continue
        assert getattr(defaults, name) == value, f"configs/default.toml is wrong about {name}"
    # Every setting a file may hold appears in it, set or commented out.
    text = (CONFIGS / "default.toml").read_text(encoding="utf-8")
    # config_file: where these came from, not a setting a file can hold.
    unsettable = {"inputs", "resume", "columns", "config_file", "again", "revert", "resume_run"}
    settable = {f.name for f in dataclasses.fields(JobConfig)} - unsettable
    missing = {name for name in settable if f"{name} =" not in text}
    assert not missing, f"configs/default.toml does not mention {sorted(missing)}"


def test_nightly_example_is_a_valid_config() -> None:
    settings = read_config_file(CONFIGS / "nightly.toml")
    config = JobConfig(**settings)
    assert config.log_format == "json" and config.max_requests == 3000


def test_command_line_beats_environment_beats_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'rate = 2.0\nbatch_size = 50\nconcurrency = 3\nbase_url = "https://a.example/v3"\n'
    )
    environ = {
        "BATCHJOB_RATE": "3",
        "BATCHJOB_BATCH_SIZE": "60",
        "CC_BASE_URL": "https://b.example/v3",
    }
    config = load_config(cli={"rate": 1.5, "batch_size": None}, config_file=path, environ=environ)
    assert config.rate == 1.5  # command line
    assert config.batch_size == 60  # environment
    assert config.concurrency == 3  # file
    assert config.base_url == "https://b.example/v3"
    assert config.retry_max_tries == JobConfig().retry_max_tries  # built-in default


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rate = 0\n", "rate"),
        ("batch_sise = 10\n", "unknown setting"),
        ('base_url = "http://api.example.com/v3"\n', "clear text"),
        ('event_id = "not-a-uuid"\n', "not a UUID"),
        ("rate = [1\n", "cannot read"),
    ],
)
def test_bad_config_files_are_refused_with_the_reason(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(cli={}, config_file=path, environ={})


# --- every setting is checked, wherever it came from ------------------------------------------

#: Numeric settings, values each refuses, and how a user can give it: a flag, an environment
#: variable (both only for some), a config file (all).
NUMBERS: dict[str, tuple[list[str], str | None, str | None]] = {
    "rate": (["inf", "nan", "-1", "0", "1e-300", "0.01", "2e6"], "--rate", "BATCHJOB_RATE"),
    "batch_size": (["inf", "nan", "-1", "0", "10001"], "--batch-size", "BATCHJOB_BATCH_SIZE"),
    "concurrency": (["inf", "nan", "-1", "0", "257"], "--concurrency", "BATCHJOB_CONCURRENCY"),
    "max_requests": (["inf", "nan", "-1", "2.5"], "--max-requests", "BATCHJOB_MAX_REQUESTS"),
    "connect_timeout": (["inf", "nan", "-1", "0", "3601"], None, None),
    "request_timeout": (["inf", "nan", "-1", "0", "3601"], None, None),
    "retry_max_tries": (["inf", "nan", "-1", "0", "101"], None, None),
    "retry_max_time": (["inf", "nan", "-1", "0", "3601"], None, None),
    "retry_base": (["inf", "nan", "-1", "0", "3601"], None, None),
    "retry_cap": (["inf", "nan", "-1", "0", "3601"], None, None),
    "grace_period": (["inf", "nan", "-1", "3601"], None, None),
}
EVENT = "07216444-4e3b-41ea-a3b8-5a418fce41f4"


def _cases() -> list[tuple[str, str, str]]:
    cases = []
    for name, (values, flag, var) in NUMBERS.items():
        for value in values:
            cases.append((name, value, "file"))
            if var is not None:
                cases.append((name, value, "env"))
            if flag is not None:
                cases.append((name, value, "flag"))
    return cases


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in list(os.environ):
        if var.startswith(("BATCHJOB_", "CC_")):
            monkeypatch.delenv(var)
    return monkeypatch


def _main(args: list[str]) -> int:
    """The real command line in this process; argparse's refusals exit by SystemExit."""
    try:
        return main(args)
    except SystemExit as exc:
        assert isinstance(exc.code, int)
        return exc.code


def _dry_run(tmp_path: Path, *extra: str) -> list[str]:
    inputs = tmp_path / "in.csv"
    inputs.write_text(f"event_id,order_ticket_key\n{EVENT},k1\n", encoding="utf-8")
    report = tmp_path / "reports" / f"r{len(list(tmp_path.glob('reports/*')))}.csv"
    return ["run", str(inputs), "--report", str(report), "--dry-run", "--no-progress", *extra]


@pytest.mark.parametrize(("name", "value", "origin"), _cases())
def test_every_numeric_setting_refuses_bad_values_naming_it_and_where_it_came_from(
    tmp_path: Path,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    value: str,
    origin: str,
) -> None:
    _, flag, var = NUMBERS[name]
    extra: list[str] = []
    if origin == "file":
        config = tmp_path / "c.toml"
        config.write_text(f"{name} = {value}\n", encoding="utf-8")
        extra, where = ["--config", str(config)], str(config)
    elif origin == "env":
        assert var is not None
        clean_env.setenv(var, value)
        where = var
    else:
        assert flag is not None
        extra, where = [flag, value], flag

    code = _main(_dry_run(tmp_path, *extra))

    err = capsys.readouterr().err
    assert code == 2, err
    assert where in err
    assert name in err or (flag is not None and flag in err)
    assert "internal error" not in err and "Traceback" not in err


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "other.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max_requests = 0\n", 0),
        ("grace_period = 0\n", 0),
        ("rate = 1000000\n", 0),
        ("retry_base = 30.0\nretry_cap = 30.0\n", 0),
        ('log_level = "WARNING"\n', 0),
    ],
)
def test_edge_values_that_make_sense_are_accepted(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, text: str, expected: int
) -> None:
    config = _file(tmp_path, text)
    assert _main(_dry_run(tmp_path, "--config", str(config))) == expected


@pytest.mark.parametrize(
    ("text", "env", "names"),
    [
        ('log_level = "trace"\n', {}, ["log_level", "trace", "debug, info, warning"]),
        ("", {"BATCHJOB_LOG_LEVEL": "trace"}, ["log_level", "BATCHJOB_LOG_LEVEL"]),
        ('log_format = "xml"\n', {}, ["log_format", "console, json"]),
        ("", {"BATCHJOB_LOG_FORMAT": "xml"}, ["log_format", "BATCHJOB_LOG_FORMAT"]),
        ("", {"BATCHJOB_RATE": "fast"}, ["rate", "BATCHJOB_RATE", "a number"]),
        ("", {"BATCHJOB_BATCH_SIZE": "1e3"}, ["batch_size", "whole number"]),
        ("dry_run = 2\n", {}, ["dry_run", "true or false"]),
        ('action = "redo"\n', {}, ["action", "redo", "undo, check-in", "c.toml"]),
        ("action = 1\n", {}, ["action", "a string"]),
        # Each fine alone, wrong together: both named, with where each came from.
        ("retry_base = 40.0\n", {}, ["retry_base", "retry_cap", "built-in default", "c.toml"]),
    ],
)
def test_other_bad_settings_are_refused_naming_setting_and_origin(
    tmp_path: Path,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
    env: dict[str, str],
    names: list[str],
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(text, encoding="utf-8")
    for var, value in env.items():
        clean_env.setenv(var, value)
    code = _main(_dry_run(tmp_path, "--config", str(config)))
    err = capsys.readouterr().err
    assert code == 2, err
    for name in names:
        assert name in err
    assert "Traceback" not in err


def test_library_callers_get_the_same_checks() -> None:
    for settings in (
        {"rate": math.inf},
        {"request_timeout": math.inf},
        {"retry_base": -1.0},
        {"grace_period": -5.0},
        {"log_level": "trace"},
        {"action": "check_in"},
        {"batch_size": True},
        {"retry_base": 2.0, "retry_cap": 1.0},
    ):
        with pytest.raises(ConfigError, match=next(iter(settings))):
            JobConfig(**settings)


async def test_infinite_rate_and_timeout_are_usage_errors_not_internal_ones(
    tmp_path: Path,
) -> None:
    """The issue's reproduction, as a user runs it: exit 3 "internal error" before."""
    inputs = tmp_path / "in.csv"
    inputs.write_text(f"event_id,order_ticket_key\n{EVENT},k1\n", encoding="utf-8")
    config = _file(tmp_path, "request_timeout = inf\n")
    # Port 9 (discard): nothing may be sent, and nothing listens there anyway.
    env = cli_env(CC_ACCESS_TOKEN="unused", CC_BASE_URL="http://127.0.0.1:9/v3")
    report = str(tmp_path / "r.csv")
    by_env = await cli("run", str(inputs), "--report", report, env=env | {"BATCHJOB_RATE": "inf"})
    by_file = await cli("run", str(inputs), "--report", report, "--config", str(config), env=env)
    assert (by_env.code, by_file.code) == (2, 2), by_env.err + by_file.err
    assert "rate = inf (environment variable BATCHJOB_RATE)" in by_env.err
    assert f"request_timeout = inf (config file {config})" in by_file.err
    assert not (tmp_path / "r.csv").exists()


# --- URLs a token may go to: read the way aiohttp (yarl) reads them, nothing ambiguous -----------

TRICKY_URLS = [
    "http://evil.com\\@127.0.0.1:9/v3",  # urllib: host 127.0.0.1; yarl: refuses or evil.com
    "http://127.0.0.1:9\\@evil.com/v3",
    "https://api.cc.email\\@evil.com/v3",
    "http://user:pass@127.0.0.1:9/v3",
    "https://token@api.cc.email/v3",
    "http://127.0.0.1%2f@evil.com/v3",  # yarl decodes the user to "127.0.0.1/"
    "http://127.0.0.1 @evil.com/v3",
    "http://127.0.0.1\t.evil.com/v3",  # urllib drops the tab: 127.0.0.1.evil.com
    "http://127.0.0.1\n/v3",
    "https://api.cc.email/v3\x00",
    " https://api.cc.email/v3",
    "https://аpi.cc.email/v3",  # a Cyrillic "а"
    "http://127.0.0.1#@evil.com/v3",
    "http://127.0.0.1?@evil.com/v3",
    "https://api.cc.email/v3#x",
    "https://api.cc.email/v3?x=1",
    "ftp://127.0.0.1/v3",
    "file:///etc/passwd",
    "127.0.0.1:9/v3",
    "//127.0.0.1/v3",
    "https:/api.cc.email/v3",
    "https://",
    "http://127.0.0.1:99999/v3",
    "http://127.0.0.1:port/v3",
    "http://api.example.com/v3",  # clear text to another machine
    "http://127.0.0.1.nip.io/v3",
    "http://localhost.evil.com/v3",
    "http://[::ffff:127.0.0.1]/v3",  # loopback only by a rule Python 3.11 does not apply
    "https://%61pi.cc.email/v3",
    "",
]
GOOD_URLS = [
    "https://api.cc.email/v3",
    "https://authz.constantcontact.com/oauth2/default/v1/token",
    "https://api.cc.email:443/v3",
    "https://10.1.2.3:8443/v3",
    "https://xn--e1afmkfd.xn--p1ai/v3",
    "http://127.0.0.1:8080/v3",
    "http://127.0.0.1/v3",
    "http://localhost/v3",
    "http://LOCALHOST:9/v3",
    "http://[::1]/v3",
    "http://[::1]:8080/oauth2/default/v1/token",
]


@pytest.mark.parametrize("url", TRICKY_URLS)
@pytest.mark.parametrize("name", ["base_url", "token_url"])
def test_ambiguous_or_unsafe_urls_are_refused(name: str, url: str) -> None:
    with pytest.raises(ConfigError, match=name):
        JobConfig(**{name: url})  # type: ignore[arg-type]


@pytest.mark.parametrize("url", GOOD_URLS)
@pytest.mark.parametrize("name", ["base_url", "token_url"])
def test_plain_https_and_loopback_http_urls_still_pass(name: str, url: str) -> None:
    assert getattr(JobConfig(**{name: url}), name) == url  # type: ignore[arg-type]


def test_the_backslash_url_is_refused_on_the_command_line_and_no_password_is_echoed(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _main(_dry_run(tmp_path, "--base-url", "http://evil.com\\@127.0.0.1:9/v3"))
    err = capsys.readouterr().err
    assert code == 2 and "base_url" in err and "--base-url" in err and "backslash" in err

    clean_env.setenv("CC_TOKEN_URL", "http://me:hunter2@127.0.0.1:9/token")
    code = _main(_dry_run(tmp_path))
    err = capsys.readouterr().err
    assert code == 2 and "token_url" in err and "CC_TOKEN_URL" in err
    assert "hunter2" not in err
