"""Settings: the documented defaults are the real ones, and precedence is as the README says."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from batchjob import ConfigError, JobConfig, load_config
from batchjob._config import read_config_file

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
    settable = {f.name for f in dataclasses.fields(JobConfig)} - {"inputs", "resume", "columns"}
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
