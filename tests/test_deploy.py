"""docs/deploy.md: its recipes are checked with the tools this machine has.

Code blocks are found by their info string (```ini title=batchjob.service). A check whose tool
is missing (systemd-analyze, kubectl, dash, bash; PyYAML, which is not a dependency) is
skipped; none needs the network, a running systemd, a cron daemon or a cluster.

Conventions of the page these tests rely on: an inline code span that starts with ``--`` is a
``batchjob run`` option; a ``batchjob run|revert|auth|runs|config`` command anywhere in code is
parsed by batchjob's own argument parser.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import importlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from batchjob._cli import build_parser
from batchjob._config import JobConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "deploy.md"
NIGHTLY = ROOT / "configs" / "nightly.toml"
#: Where the unit and the cron line expect the checkout: the repository stands in for it.
CHECKOUT = "/srv/batchjob"

#: Settings being added beside docs/deploy.md: checked once batchjob knows them.
NEW_SETTINGS = ("daily_budget", "api_key")
#: What the page says about them, checked once they exist.
NEW_SETTING_DEFAULTS: Mapping[str, object] = {"daily_budget": 10000}
SUBCOMMANDS = ("run", "revert", "auth", "runs", "config")

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
KUBECTL = shutil.which("kubectl")


def _shells() -> list[tuple[str, list[str]]]:
    """POSIX shells to run the page's scripts with: /bin/sh, dash, and bash as /bin/sh."""
    found: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for name, program, flags in (
        ("sh", "/bin/sh", []),
        ("dash", "dash", []),
        ("bash", "bash", ["--posix"]),
    ):
        path = shutil.which(program)
        if path is None or os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        found.append((name, [path, *flags]))
    return found


SHELLS = _shells()
SHELL_IDS = [name for name, _ in SHELLS]


def _run(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 (programs found by shutil.which; arguments are ours)
        list(argv),
        cwd=cwd,
        env=None if env is None else dict(env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# --- the page's blocks ------------------------------------------------------------------------

_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S
)
_SPAN = re.compile(r"`([^`\n]+)`")


@dataclasses.dataclass(frozen=True)
class Block:
    lang: str
    title: str | None
    body: str
    line: int  # of the block's first body line in docs/deploy.md


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def blocks() -> list[Block]:
    text = _doc()
    found = []
    for m in _FENCE.finditer(text):
        info = m["info"].split()
        title = next((w.split("=", 1)[1] for w in info[1:] if w.startswith("title=")), None)
        indent = len(m["indent"])
        body = "".join(line[indent:] for line in m["body"].splitlines(keepends=True))
        line = text.count("\n", 0, m.start()) + 2
        found.append(Block(info[0] if info else "", title, body, line))
    return found


def block(title: str) -> Block:
    matches = [b for b in blocks() if b.title == title]
    assert len(matches) == 1, f"docs/deploy.md needs one block titled {title}, has {len(matches)}"
    return matches[0]


def inline_spans() -> list[tuple[int, str]]:
    """Inline code spans outside fenced blocks, with their line numbers."""
    text = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), _doc())
    return [(text.count("\n", 0, m.start()) + 1, m[1]) for m in _SPAN.finditer(text)]


# --- batchjob commands on the page ------------------------------------------------------------

_INVOCATION = re.compile(
    r"(?<![\w.-])batchjob\s+(?P<sub>" + "|".join(SUBCOMMANDS) + r")(?![\w-])(?P<rest>.*)"
)
_SUBSTITUTION = re.compile(r"\$\$?\([^()]*\)")  # $(date -u +%F), or $$(...) in a unit file
_END = re.compile(r"[;&|<>`)]| #")


@dataclasses.dataclass(frozen=True)
class Command:
    line: int
    argv: tuple[str, ...]  # from the subcommand on

    @property
    def sub(self) -> str:
        return self.argv[0]


def _logical_lines(text: str, first_line: int) -> Iterator[tuple[int, str]]:
    """Lines with backslash continuations joined, each with the number of its first line."""
    pending: list[str] = []
    start = first_line
    for number, line in enumerate(text.splitlines(), first_line):
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        yield start, " ".join([*pending, line])
        pending = []
    if pending:
        yield start, " ".join(pending)


def commands_in(text: str, first_line: int = 1) -> list[Command]:
    found = []
    for number, line in _logical_lines(text, first_line):
        line = _SUBSTITUTION.sub("SUBST", line)
        for m in _INVOCATION.finditer(line):
            rest = _END.split(m["rest"], maxsplit=1)[0]
            words = [w.strip("'\"") for w in rest.split()]
            found.append(Command(number, (m["sub"], *(w for w in words if w))))
    return found


def doc_commands() -> list[Command]:
    found = []
    for b in blocks():
        found += commands_in(b.body, b.line)
    for number, span in inline_spans():
        found += commands_in(span, number)
    return found


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("batchjob's parser has no subcommands")


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """The option strings ``--help`` lists, exactly (argparse would accept a prefix)."""
    return {s for action in parser._actions for s in action.option_strings}


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(list(argv))
    except SystemExit:
        pytest.fail(f"batchjob {' '.join(argv)}: {err.getvalue().strip()}")


def resume_takes_a_run() -> bool:
    """Whether ``--resume RUN`` (being added) is known: --resume then takes a value."""
    args = build_parser().parse_args(["run", "--resume", "RUN"])
    return bool(args.resume == "RUN")


def _resume_value(argv: Sequence[str]) -> str | None:
    if "--resume" not in argv:
        return None
    at = argv.index("--resume") + 1
    return argv[at] if at < len(argv) and not argv[at].startswith("-") else None


COMMANDS = doc_commands()


def test_the_page_has_the_recipes() -> None:
    titles = {b.title for b in blocks()}
    for title in (
        "batchjob.service",
        "batchjob.timer",
        "crontab",
        "batchjob-pvc.yaml",
        "batchjob-config.yaml",
        "batchjob-cronjob.yaml",
    ):
        assert title in titles
    assert {c.sub for c in COMMANDS} >= {"run", "auth"}


@pytest.mark.parametrize("command", COMMANDS, ids=[f"line{c.line}-{c.sub}" for c in COMMANDS])
def test_batchjob_commands_parse(command: Command) -> None:
    """Every ``batchjob`` command on the page: options that exist, with values they take."""
    subs = _subparsers(build_parser())
    if command.sub not in subs:
        pytest.skip(f"`batchjob {command.sub}` is not in this batchjob yet")
    if "--help" in command.argv:
        return  # `batchjob run --help`: argparse would print it and exit
    resume = _resume_value(command.argv) if command.sub == "run" else None
    if resume is not None and not resume_takes_a_run():
        pytest.skip("`batchjob run --resume RUN` is not in this batchjob yet")
    args = _parse(command.argv)
    options = _options(subs[command.sub])
    for word in command.argv:
        if word.startswith("--"):
            assert word.split("=", 1)[0] in options, f"line {command.line}: {word}"
    if resume is not None:
        assert args.resume == resume


def test_inline_options_are_run_options() -> None:
    run = _subparsers(build_parser())["run"]
    spans = [(n, s) for n, s in inline_spans() if s.startswith("--")]
    assert spans, "the page names no option in an inline code span"
    for number, span in spans:
        name = span.split()[0].split("=", 1)[0]
        assert name in _options(run), f"line {number}: `{span}` is not a `batchjob run` option"
        assert name in run.format_help()


def test_inline_resume_run_form() -> None:
    spans = [s for _, s in inline_spans() if re.fullmatch(r"--resume \S+", s)]
    assert spans, "the page should name `--resume RUN`"
    if not resume_takes_a_run():
        pytest.skip("`batchjob run --resume RUN` is not in this batchjob yet")
    for span in spans:
        assert _parse(["run", *span.split()]).resume == span.split()[1]


def test_environment_variables_are_batchjobs() -> None:
    help_text = _subparsers(build_parser())["run"].format_help()
    names = set(re.findall(r"\b(?:CC|BATCHJOB)_[A-Z_]+\b", _doc()))
    assert "BATCHJOB_STATE" in names
    for name in sorted(names):
        assert name in help_text, f"{name} is not in `batchjob run --help`"


# --- settings -----------------------------------------------------------------------------------

_FIELDS = {f.name for f in dataclasses.fields(JobConfig)}


def _known_settings_only(toml: str) -> str:
    """``toml`` without the settings being added that this batchjob does not know yet."""
    for name in NEW_SETTINGS:
        if name not in _FIELDS:
            toml = re.sub(rf"(?m)^{name}\s*=.*\n?", "", toml)
    return toml


def config_from(toml: str, tmp_path: Path, name: str = "config.toml") -> JobConfig:
    path = tmp_path / name
    path.write_text(_known_settings_only(toml), encoding="utf-8")
    return load_config(cli={}, config_file=path, environ={})


def configmap_toml() -> str:
    configmap = manifest("batchjob-config.yaml")
    return str(configmap["data"]["nightly.toml"])


def toml_blocks() -> list[Block]:
    return [b for b in blocks() if b.lang == "toml"]


def test_toml_blocks_are_settings_batchjob_reads(tmp_path: Path) -> None:
    """batchjob's reader refuses unknown settings: every name and value on the page is real."""
    assert toml_blocks()
    for b in toml_blocks():
        config_from(b.body, tmp_path)


def test_configmap_settings_are_settings_batchjob_reads(tmp_path: Path) -> None:
    config = config_from(configmap_toml(), tmp_path)
    assert config.pending
    assert config.token_file == Path("/var/lib/batchjob/token.json")


@pytest.mark.parametrize("name", NEW_SETTINGS)
def test_settings_being_added(name: str, tmp_path: Path) -> None:
    """``daily_budget`` and ``api_key``: skipped until batchjob knows them, then checked."""
    texts = [b.body for b in toml_blocks()]
    with contextlib.suppress(pytest.skip.Exception):
        texts.append(configmap_toml())
    assert any(re.search(rf"(?m)^{name}\s*=", t) for t in texts), f"no TOML block sets {name}"
    if name not in _FIELDS:
        pytest.skip(f"{name} is not a JobConfig setting yet")
    for text in texts:
        if re.search(rf"(?m)^{name}\s*=", text):
            value = tomllib.loads(text)[name]
            assert getattr(config_from(text, tmp_path), name) == value
    if name in NEW_SETTING_DEFAULTS:
        assert getattr(JobConfig(), name) == NEW_SETTING_DEFAULTS[name]


# --- systemd ------------------------------------------------------------------------------------


def unit(title: str) -> dict[str, dict[str, list[str]]]:
    """A unit file's settings: section -> key -> values, continuation lines joined."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for _, line in _logical_lines(block(title).body, 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(span: str) -> float:
    """A systemd time span ("60s", "1min 30s", "4h", "90") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "hr": 3600, "d": 86400}
    total = 0.0
    for number, name in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        total += float(number) * units[name]
    return total


def nightly() -> JobConfig:
    return load_config(cli={}, config_file=NIGHTLY, environ={})


def _under(path: str, folders: Sequence[str]) -> bool:
    return any(PurePosixPath(path).is_relative_to(f) for f in folders)


def test_service_settings() -> None:
    service = unit("batchjob.service")["Service"]
    assert service["Type"] == ["oneshot"]
    assert "1" in " ".join(service["SuccessExitStatus"]).split()
    assert seconds(service["TimeoutStopSec"][-1]) > nightly().grace_period
    assert seconds(service["TimeoutStartSec"][-1]) > 0
    assert service["ProtectSystem"] == ["strict"]
    assert all(not f.startswith("-") for f in service["EnvironmentFile"])  # a missing file fails


def test_service_writes_only_where_it_may() -> None:
    """Under ProtectSystem=strict, every path batchjob writes is in a writable folder."""
    service = unit("batchjob.service")["Service"]
    writable = [f"/var/lib/{d}" for v in service.get("StateDirectory", []) for d in v.split()]
    writable += [p.lstrip("-+") for v in service.get("ReadWritePaths", []) for p in v.split()]
    [command] = [c for c in commands_in(service["ExecStart"][0]) if c.sub == "run"]
    args = _parse(command.argv)
    config = Path(str(args.config))
    assert not config.is_absolute(), "the unit's --config is relative to WorkingDirectory"
    assert service["WorkingDirectory"] == [CHECKOUT]
    settings = load_config(cli={}, config_file=ROOT / config, environ={})
    environment = dict(v.split("=", 1) for v in service.get("Environment", []))
    written = [str(args.report), environment.get("CC_TOKEN_FILE") or str(settings.token_file)]
    if settings.summary_json is not None:
        written.append(str(settings.summary_json))
    if "://" not in settings.state and settings.state.lower() not in ("none", "default"):
        written.append(settings.state)  # an SQLite file, with its -wal and -shm beside it
    for path in written:
        assert _under(path, writable), f"{path} is not under {writable}"


def test_timer_settings() -> None:
    timer = unit("batchjob.timer")["Timer"]
    assert timer["Persistent"] == ["true"]
    assert timer["OnCalendar"]


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_units_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify``: any warning about the units (an unknown key, a value that
    does not parse, a missing ExecStart binary) fails. ExecStart is /bin/sh, which exists; the
    batchjob path inside its quoted command, User= and EnvironmentFile= are not checked."""
    assert SYSTEMD_ANALYZE is not None
    names = ["batchjob.service", "batchjob.timer"]
    for name in names:
        (tmp_path / name).write_text(block(name).body, encoding="utf-8")
    done = _run([SYSTEMD_ANALYZE, "verify", "--man=no", *names], cwd=tmp_path)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 0, output
    assert "batchjob" not in output, output


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_timer_calendar_parses() -> None:
    assert SYSTEMD_ANALYZE is not None
    for spec in unit("batchjob.timer")["Timer"]["OnCalendar"]:
        done = _run([SYSTEMD_ANALYZE, "calendar", spec])
        assert done.returncode == 0, done.stderr


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_service_exposure(tmp_path: Path) -> None:
    """The hardening, as ``systemd-analyze security`` rates it offline: at most 2.5 of 10."""
    assert SYSTEMD_ANALYZE is not None
    (tmp_path / "batchjob.service").write_text(block("batchjob.service").body, encoding="utf-8")
    argv = [SYSTEMD_ANALYZE, "security", "--offline=true", "--threshold=25", "batchjob.service"]
    done = _run(argv, cwd=tmp_path)
    if "offline" in done.stderr and "unrecognized" in done.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr


# --- cron ---------------------------------------------------------------------------------------

_CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_CRON_NAMES: tuple[dict[str, int], ...] = (
    {},
    {},
    {},
    {m: i for i, m in enumerate(_MONTHS, 1)},
    {d: i for i, d in enumerate(_DAYS)},
)


def cron_field_ok(field: str, index: int) -> bool:
    low, high = _CRON_RANGES[index]
    names = _CRON_NAMES[index]

    def value(text: str) -> int:
        number = names.get(text.lower(), None)
        return int(text) if number is None else number

    for item in field.split(","):
        spec, _, step = item.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            return False
        try:
            if spec == "*":
                continue
            first, _, last = spec.partition("-")
            a, b = value(first), value(last) if last else value(first)
        except ValueError:
            return False
        if not (low <= a <= b <= high):
            return False
    return True


def cron_jobs() -> list[tuple[list[str], str]]:
    """The job lines of the crontab block: (the five schedule fields, the command)."""
    jobs = []
    for line in block("crontab").body.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if re.match(r"[A-Za-z_][A-Za-z0-9_]*\s*=", line):
            continue  # SHELL=/bin/sh, MAILTO=...
        fields = line.split(None, 5)
        assert len(fields) == 6, f"not a crontab job line: {line}"
        jobs.append((fields[:5], fields[5]))
    return jobs


def test_cron_schedule_fields() -> None:
    jobs = cron_jobs()
    assert jobs
    for fields, command in jobs:
        for index, field in enumerate(fields):
            assert cron_field_ok(field, index), f"crontab field {index + 1}: {field!r}"
        # cron makes an unescaped % a line break: the command must write \%.
        assert re.search(r"(?<!\\)%", command) is None, command


def shell_command(command: str) -> str:
    """What cron hands /bin/sh: ``\\%`` becomes ``%``."""
    return command.replace("\\%", "%")


@pytest.mark.parametrize(("shell_name", "shell"), SHELLS, ids=SHELL_IDS)
def test_cron_command_syntax(shell_name: str, shell: list[str]) -> None:
    for _, command in cron_jobs():
        done = _run([*shell, "-n", "-c", shell_command(command)])
        assert done.returncode == 0, f"{shell_name}: {done.stderr}"


_STUB_BATCHJOB = """#!/bin/sh
printf '%s\\n' "$@" > {dir}/args
printf '%s' "${{CC_CLIENT_ID:-}}" > {dir}/client_id
printf '%s' "${{CC_TOKEN_FILE:-}}" > {dir}/token_file
exit "${{STUB_EXIT:-0}}"
"""
_STUB_MAIL = """#!/bin/sh
{{ printf '%s\\n' "$*"; cat; }} >> {dir}/mail
"""


def _executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(0o755)


def _today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


@pytest.mark.parametrize(("shell_name", "shell"), SHELLS, ids=SHELL_IDS)
@pytest.mark.parametrize("case", ["0", "1", "2", "3", "143", "no-env-file", "no-batchjob"])
def test_cron_line_alerts_on_2_and_above(
    tmp_path: Path, shell_name: str, shell: list[str], case: str
) -> None:
    """The cron line, run with a stub batchjob and a stub mail in a temporary tree."""
    [(_, command)] = cron_jobs()
    places = {
        CHECKOUT: tmp_path / "app",
        "/etc/batchjob/env": tmp_path / "etc" / "env",
        "/var/lib/batchjob": tmp_path / "state",
        "/var/log/batchjob": tmp_path / "log",
        "/srv/exports": tmp_path / "exports",
    }
    script = shell_command(command)
    for real, test in places.items():
        assert real in script
        script = script.replace(real, str(test))
    for folder in ("state", "log", "exports", "etc"):
        (tmp_path / folder).mkdir()
    for name in ("door-scans-a.csv", "door-scans-b.csv"):
        (tmp_path / "exports" / name).write_text("event_id,Barcode\n", encoding="utf-8")
    if case != "no-batchjob":
        _executable(tmp_path / "app/.venv/bin/batchjob", _STUB_BATCHJOB.format(dir=tmp_path))
    else:
        (tmp_path / "app").mkdir()
    _executable(tmp_path / "bin/mail", _STUB_MAIL.format(dir=tmp_path))
    if case != "no-env-file":
        code = case if case.isdigit() else "0"
        env_file = f"CC_CLIENT_ID=test-client\nSTUB_EXIT={code}\n"
        (tmp_path / "etc/env").write_text(env_file, encoding="utf-8")
    before = _today()
    done = _run(
        [*shell, "-c", script],
        cwd=tmp_path,
        env={"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    after = _today()
    assert done.returncode in (0, 1), done.stderr
    mail = tmp_path / "mail"
    expected = {"no-env-file": 2, "no-batchjob": 127}.get(case) or int(case)
    if expected <= 1:
        assert not mail.exists(), f"{shell_name}: mail for exit {expected}"
    else:
        assert f"exit {expected}" in mail.read_text(encoding="utf-8"), shell_name
    if case.isdigit():
        args = (tmp_path / "args").read_text(encoding="utf-8").splitlines()
        assert args[:3] == ["run", "--config", "configs/nightly.toml"]
        report = args[args.index("--report") + 1]
        state = tmp_path / "state"
        assert report in (f"{state}/undo-{before}.csv", f"{state}/undo-{after}.csv")
        assert sorted(a for a in args if a.endswith(".csv") and "exports" in a) == [
            str(tmp_path / "exports" / "door-scans-a.csv"),
            str(tmp_path / "exports" / "door-scans-b.csv"),
        ]
        assert (tmp_path / "client_id").read_text(encoding="utf-8") == "test-client"
        assert (tmp_path / "token_file").read_text(encoding="utf-8") == f"{state}/token.json"


# --- shell blocks -------------------------------------------------------------------------------


@pytest.mark.parametrize(("shell_name", "shell"), SHELLS, ids=SHELL_IDS)
def test_shell_blocks_parse(shell_name: str, shell: list[str]) -> None:
    scripts = [b for b in blocks() if b.lang == "sh" and b.title]
    assert scripts
    for b in scripts:
        done = _run([*shell, "-n", "-c", b.body])
        assert done.returncode == 0, f"{b.title} ({shell_name}): {done.stderr}"


# --- Kubernetes ---------------------------------------------------------------------------------


def _pyyaml() -> Any:
    try:
        return importlib.import_module("yaml")
    except ImportError:
        return None


def manifest(title: str) -> dict[str, Any]:
    """A YAML block, read by PyYAML if installed, else by ``kubectl label --local`` (offline,
    no schema: only a parse)."""
    return copy.deepcopy(_manifest(block(title).body))


@functools.cache
def _manifest(text: str) -> dict[str, Any]:
    yaml = _pyyaml()
    if yaml is not None:
        loaded = yaml.safe_load(text)
        assert isinstance(loaded, dict)
        return loaded
    if KUBECTL is None:
        pytest.skip("neither PyYAML nor kubectl is installed: nothing here reads YAML")
    return _kubectl_untyped(text)


def _kubectl_json(argv: Sequence[str], text: str) -> dict[str, Any]:
    assert KUBECTL is not None
    done = _run([KUBECTL, *argv, "-f", "-", "-o", "json"], stdin=text)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    assert isinstance(loaded, dict)
    return loaded


def _kubectl_untyped(text: str) -> dict[str, Any]:
    # Removing a label that is not there changes nothing but an empty "labels" map.
    return _kubectl_json(["label", "--local", "deploy-doc-check-"], text)


def _kubectl_typed(text: str) -> dict[str, Any]:
    """Decoded into kubectl's own Go types (a wrong type fails; an unknown field vanishes)."""
    loaded = _kubectl_json(["set", "serviceaccount", "--local", "deploy-doc-check"], text)
    pod = loaded["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod.pop("serviceAccountName") == "deploy-doc-check"
    pod.pop("serviceAccount", None)
    return loaded


def missing_from(given: Any, decoded: Any, where: str = "") -> list[str]:
    """What of ``given`` is not in ``decoded`` (which may hold more: defaults, nulls)."""
    if isinstance(given, dict):
        if not isinstance(decoded, dict):
            return [where or "."]
        lost = []
        for key, value in given.items():
            if key in decoded:
                lost += missing_from(value, decoded[key], f"{where}.{key}")
            elif value not in ({}, [], None):
                lost.append(f"{where}.{key}")
        return lost
    if isinstance(given, list):
        if not isinstance(decoded, list) or len(decoded) != len(given):
            return [where]
        return [
            lost
            for i, (g, d) in enumerate(zip(given, decoded, strict=True))
            for lost in missing_from(g, d, f"{where}[{i}]")
        ]
    return [] if given == decoded else [f"{where}: {given!r} became {decoded!r}"]


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_cronjob_decodes_into_kubectls_types() -> None:
    """Offline, kubectl cannot validate against a server's schema (``create --dry-run=client``
    needs the API server's discovery); its own batch/v1 types are the schema here."""
    text = block("batchjob-cronjob.yaml").body
    untyped = _kubectl_untyped(text)
    assert missing_from(untyped, _kubectl_typed(text)) == []


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_kubectl_typed_check_catches_a_typo() -> None:
    """The check above can fail: a misspelt field vanishes from the decoded object."""
    text = block("batchjob-cronjob.yaml").body.replace("concurrencyPolicy:", "concurencyPolicy:")
    assert missing_from(_kubectl_untyped(text), _kubectl_typed(text)) == [".spec.concurencyPolicy"]


@pytest.mark.skipif(KUBECTL is None or _pyyaml() is None, reason="needs kubectl and PyYAML")
def test_pyyaml_and_kubectl_read_the_same() -> None:
    for title in ("batchjob-pvc.yaml", "batchjob-config.yaml", "batchjob-cronjob.yaml"):
        text = block(title).body
        by_pyyaml, by_kubectl = manifest(title), _kubectl_untyped(text)
        assert missing_from(by_pyyaml, by_kubectl) == missing_from(by_kubectl, by_pyyaml) == []


def cronjob() -> dict[str, Any]:
    return manifest("batchjob-cronjob.yaml")


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return spec


def main_container() -> dict[str, Any]:
    [container] = pod_spec()["containers"]
    assert isinstance(container, dict)
    return container


def container_script(container: Mapping[str, Any]) -> str:
    assert container["command"] == ["/bin/sh", "-c"]
    [script] = container["args"]
    return str(script)


def test_cronjob_schedule_and_policies(tmp_path: Path) -> None:
    job = cronjob()
    assert job["kind"] == "CronJob"
    spec = job["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    fields = spec["schedule"].split()
    assert len(fields) == 5
    assert all(cron_field_ok(f, i) for i, f in enumerate(fields))
    job_spec = spec["jobTemplate"]["spec"]
    assert job_spec["backoffLimit"] >= 0
    assert job_spec["activeDeadlineSeconds"] > 0
    assert job_spec["podReplacementPolicy"] == "Failed"
    fail_job = [r for r in job_spec["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    exits = {c for r in fail_job for c in r["onExitCodes"]["values"]}
    assert {2, 3} <= exits and 1 not in exits
    assert all(r["onExitCodes"]["containerName"] == main_container()["name"] for r in fail_job)
    pod = pod_spec()
    assert pod["restartPolicy"] == "Never"
    grace = config_from(configmap_toml(), tmp_path).grace_period
    assert pod["terminationGracePeriodSeconds"] > grace


def test_cronjob_security_and_resources() -> None:
    pod = pod_spec()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        for name in ("PGPASSWORD", "CC_CLIENT_SECRET", "CC_ACCESS_TOKEN", "BATCHJOB_STATE"):
            for variable in container.get("env", []):
                if variable["name"] == name:
                    assert "secretKeyRef" in variable["valueFrom"], name
    variables = {v["name"]: v for v in main_container()["env"]}
    assert "secretKeyRef" in variables["BATCHJOB_STATE"]["valueFrom"]
    resources = main_container()["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]


def _mounts(container: Mapping[str, Any]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """mountPath -> (the mount, its volume)."""
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in container["volumeMounts"]}


def _mount_of(path: str, mounts: Mapping[str, tuple[dict[str, Any], dict[str, Any]]]) -> str:
    found = [m for m in mounts if PurePosixPath(path).is_relative_to(m)]
    assert found, f"{path} is on the read-only root file system"
    return max(found, key=len)


def test_cronjob_volumes(tmp_path: Path) -> None:
    """Exports read-only; token file, report and last-run.json on the writable PVC; the
    --config path is the ConfigMap's key."""
    container = main_container()
    mounts = _mounts(container)
    script = container_script(container)
    [command] = [c for c in commands_in(script) if c.sub == "run"]
    args = _parse(command.argv)
    exports = [str(p) for p in args.inputs]
    for path in exports:
        mount, volume = mounts[_mount_of(path, mounts)]
        assert mount.get("readOnly") is True
        assert volume["persistentVolumeClaim"].get("readOnly") is True
    config = config_from(configmap_toml(), tmp_path)
    assert config.summary_json is not None
    for path in (str(config.token_file), str(config.summary_json), str(args.report)):
        mount, volume = mounts[_mount_of(path, mounts)]
        assert not mount.get("readOnly"), path
        claim = volume["persistentVolumeClaim"]["claimName"]
        assert claim == manifest("batchjob-pvc.yaml")["metadata"]["name"], path
    config_path = PurePosixPath(str(args.config))
    mount, volume = mounts[str(config_path.parent)]
    configmap = manifest("batchjob-config.yaml")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_path.name in configmap["data"]
    assert mount.get("readOnly") is True
    assert "/tmp" in mounts and "emptyDir" in mounts["/tmp"][1]


def test_dockerfile_user_matches_the_pod() -> None:
    users = re.findall(r"(?m)^USER\s+(\d+)", block("Dockerfile").body)
    assert users == [str(pod_spec()["securityContext"]["runAsUser"])]


# --- the container's wrapper script, run --------------------------------------------------------

#: A stand-in for batchjob. With STUB_WAIT it runs (at most 10 s) until SIGTERM, then takes
#: 0.2 s of "grace period" before it exits 143, as batchjob does.
_STUB_RUN = """#!/bin/sh
printf '%s\\n' "$@" > {dir}/args
if [ -n "${{STUB_WAIT:-}}" ]; then
  trap 'echo TERM >> {dir}/signals; sleep 0.2; : > {dir}/finished; exit 143' TERM
  echo $$ > {dir}/started
  i=0
  while [ $i -lt 500 ]; do sleep 0.02; i=$((i + 1)); done
  exit 99
fi
exit "${{STUB_EXIT:-0}}"
"""


def _wrapper_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    _executable(tmp_path / "bin/batchjob", _STUB_RUN.format(dir=tmp_path))
    return {
        "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
        "POD_NAME": "batchjob-nightly-x7k2p",
    } | extra


@pytest.mark.parametrize(("shell_name", "shell"), SHELLS, ids=SHELL_IDS)
@pytest.mark.parametrize(("batchjob_exit", "pod_exit"), [(0, 0), (1, 0), (2, 2), (3, 3)])
def test_wrapper_exit_codes(
    tmp_path: Path, shell_name: str, shell: list[str], batchjob_exit: int, pod_exit: int
) -> None:
    script = container_script(main_container())
    env = _wrapper_env(tmp_path, STUB_EXIT=str(batchjob_exit))
    before = _today()
    done = _run([*shell, "-c", script], env=env)
    assert done.returncode == pod_exit, f"{shell_name}: {done.stderr}"
    args = (tmp_path / "args").read_text(encoding="utf-8").splitlines()
    assert args[:3] == ["run", "--config", "/etc/batchjob/nightly.toml"]
    reports = {f"/var/lib/batchjob/undo-{d}-batchjob-nightly-x7k2p.csv" for d in (before, _today())}
    assert args[args.index("--report") + 1] in reports


@pytest.mark.parametrize(("shell_name", "shell"), SHELLS, ids=SHELL_IDS)
def test_wrapper_passes_sigterm_on_once_and_waits(
    tmp_path: Path, shell_name: str, shell: list[str]
) -> None:
    script = container_script(main_container())
    env = _wrapper_env(tmp_path, STUB_WAIT="1")
    started = tmp_path / "started"
    # No pipes: a stub left running would hold them open and hang communicate().
    wrapper = subprocess.Popen(  # noqa: S603 (a shell found by shutil.which, our script)
        [*shell, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not started.exists() or not started.read_text(encoding="utf-8").strip():
            assert wrapper.poll() is None, f"{shell_name}: the wrapper ended first"
            assert time.monotonic() < deadline, "the stub batchjob never started"
            time.sleep(0.01)
        wrapper.send_signal(signal.SIGTERM)
        rc = wrapper.wait(timeout=10)
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait()
        if started.exists() and not (tmp_path / "finished").exists():
            with contextlib.suppress(ValueError, OSError):  # the stub, if the wrapper left it
                os.kill(int(started.read_text(encoding="utf-8")), signal.SIGKILL)
    assert rc == 143, shell_name
    assert (tmp_path / "finished").exists(), f"{shell_name}: exited before batchjob finished"
    assert (tmp_path / "signals").read_text(encoding="utf-8").split() == ["TERM"]


@pytest.mark.parametrize(("shell_name", "shell"), SHELLS, ids=SHELL_IDS)
@pytest.mark.parametrize("token_exists", [True, False])
def test_seed_token_init_container(
    tmp_path: Path, shell_name: str, shell: list[str], token_exists: bool
) -> None:
    [init] = pod_spec()["initContainers"]
    script = container_script(init)
    state, seed = tmp_path / "state", tmp_path / "seed"
    for real, test in (("/var/lib/batchjob", state), ("/run/secrets/batchjob-seed", seed)):
        assert real in script
        script = script.replace(real, str(test))
    state.mkdir()
    seed.mkdir()
    (seed / "refresh_token").write_text("seed-refresh-token\n", encoding="utf-8")
    if token_exists:
        (state / "token.json").write_text("{}", encoding="utf-8")
    stub = "#!/bin/sh\nprintf '%s\\n' \"$@\" > {dir}/args\ncat > {dir}/stdin\n"
    _executable(tmp_path / "bin/batchjob", stub.format(dir=tmp_path))
    done = _run([*shell, "-c", script], env={"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"})
    assert done.returncode == 0, f"{shell_name}: {done.stderr}"
    if token_exists:
        assert not (tmp_path / "args").exists()
        return
    args = (tmp_path / "args").read_text(encoding="utf-8").splitlines()
    assert args == ["auth", "--import-refresh-token", "--token-file", f"{state}/token.json"]
    assert (tmp_path / "stdin").read_text(encoding="utf-8") == "seed-refresh-token\n"
