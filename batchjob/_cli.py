"""The command line: a thin shell over :func:`batchjob.run_job`.

Every argparse builder is here. The modules that do the work (pandas, pyarrow, aiohttp, rich)
are imported only by the command that needs them, so ``batchjob --help`` is quick; the
sandbox is its own program (``python -m batchjob.sandbox``), to which ``batchjob sandbox``
hands its arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

from batchjob._config import (
    DEFAULT_REDIRECT_URI,
    ENV_VARS,
    SCOPE,
    TOKEN_URL_ENV,
    JobConfig,
    load_config,
)
from batchjob._errors import BatchjobError, ConfigError, ExitCode

if TYPE_CHECKING:
    from batchjob._tokens import ManagedTokenSource
    from batchjob.run import RunResult

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_folder(name: str) -> Path:
    """``sample_data`` or ``configs``: the checkout's, else the installed copy (pyproject's
    data-files put them under <prefix>/share/batchjob)."""
    for folder in (REPO_ROOT / name, Path(sysconfig.get_path("data")) / "share/batchjob" / name):
        if folder.is_dir():
            return folder
    raise ConfigError(f"cannot find batchjob's {name} folder: reinstall batchjob")


#: What `run` reads, as the reader's suffix lists say (tests/test_layout.py checks they agree).
INPUT_TYPES = ".csv .tsv .txt (comma, semicolon or tab) and .xlsx .xlsm .xlsb .xls .ods"

_RUN_EPILOG = """\
exit codes:
  0    every key undone (for --dry-run: every row valid); skipped rows do not count
  1    finished, but some key not undone: read the failed-rows file
  2    usage, configuration or input error; nothing was sent
  3    stopped early: the API cannot be reached, no event found, daily quota or
       daily_budget, token rejected, forbidden, --max-requests spent, nothing but 429s
       for a long stretch, the run store down, or an internal error: the keys left are
       pending (rerun later, or --pending)
  129/130/143  interrupted by SIGHUP / SIGINT / SIGTERM: rerun with --resume

environment:
  CC_ACCESS_TOKEN      an access token (wins over a token file)
  CC_TOKEN_FILE        a token file to use and refresh; CC_CLIENT_ID its app's client id
  CC_CLIENT_SECRET     the app's client secret, if it has one
  CC_BASE_URL, CC_TOKEN_URL, BATCHJOB_RATE, BATCHJOB_BATCH_SIZE, BATCHJOB_CONCURRENCY,
  BATCHJOB_MAX_REQUESTS, BATCHJOB_LOG_FORMAT, BATCHJOB_LOG_LEVEL, BATCHJOB_KEY_PATTERN,
  BATCHJOB_STATE, BATCHJOB_API_KEY, BATCHJOB_DAILY_BUDGET: settings (see
  `batchjob config init` for every setting and its default)

precedence: command line > environment > --config file > built-in defaults
"""


def _installed_version() -> str:
    import batchjob

    return str(batchjob.__version__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchjob",
        description="Reverse Constant Contact event ticket check-ins in bulk.",
    )
    parser.add_argument("--version", action="version", version=f"batchjob {_installed_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="undo check-ins for the ticket keys in CSV/Excel files",
        description="Undo check-ins for every ticket key in the input files and write a "
        "per-key report. The access token comes from CC_ACCESS_TOKEN (never an argument).",
        epilog=_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "inputs",
        nargs="*",
        type=Path,
        metavar="INPUT",
        help=f"input files: {INPUT_TYPES} (none with --pending: just what is left)",
    )
    add_common_run_arguments(run)
    run.add_argument("--event-id", help="event for input files that have no event column")
    run.add_argument(
        "--key-pattern",
        metavar="REGEX",
        help="keys must fully match this (RE2) regular expression (env BATCHJOB_KEY_PATTERN)",
    )
    run.add_argument(
        "--include-hidden-rows",
        action="store_true",
        default=None,
        help="send rows hidden or filtered out in a spreadsheet (default: skipped)",
    )
    run.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN",
        help="continue --report's run; or run RUN from the store, on any machine, with or "
        "without its input files",
    )
    add_store_arguments(run)
    run.add_argument(
        "--again",
        action="store_true",
        default=None,
        help="send rows an earlier run already did (default: reported skipped, not sent)",
    )
    run.add_argument(
        "--pending",
        action="store_true",
        default=None,
        help="add every key earlier runs left unfinished (with no INPUT: just those)",
    )
    run.add_argument(
        "--action",
        choices=("undo", "check-in"),
        help="undo the keys' check-ins (default), or check them in (the reverse)",
    )
    revert = commands.add_parser(
        "revert",
        help="check in again the keys a run undid (a new run)",
        description="Check in exactly the keys RUN reported undone that no later run has "
        "touched, as a new run with its own report. The API cannot tell whether a ticket was "
        "checked in before RUN undid it: a ticket RUN undid that was not checked in will be "
        "after this. Look first with --dry-run.",
    )
    revert.add_argument("run_id", metavar="RUN", help="the run to revert (its id, or a prefix)")
    add_common_run_arguments(revert)
    add_store_arguments(revert)

    add_runs_parser(commands)

    # Listed for --help; main() hands everything after "sandbox" to the sandbox's own parser.
    commands.add_parser(
        "sandbox", help="serve the local sandbox API (batchjob sandbox --help)", add_help=False
    )

    auth = commands.add_parser("auth", help="get the first token pair (needs a browser once)")
    add_auth_arguments(auth)

    demo = commands.add_parser("demo", help="run the job on sample_data/ against the sandbox")
    demo.add_argument("--sample-dir", type=Path, help="default: the sample data batchjob ships")
    demo.add_argument("--report", type=Path, help="where the demo writes its report")

    config = commands.add_parser("config", help="write a commented settings file to start from")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    init = config_commands.add_parser(
        "init", help="write every setting with its default and what it does (a TOML file)"
    )
    init.add_argument("path", type=Path, help="the file to write (never overwritten)")
    init.add_argument(
        "--example",
        choices=("default", "nightly"),
        default="default",
        help="default: every setting; nightly: a commented scheduled-run example",
    )
    return parser


def add_common_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of every command that sends: ``run`` and ``revert``."""
    parser.add_argument(
        "--report", type=Path, help="outcome CSV (default reports/undo-check-in-<UTC>.csv)"
    )
    parser.add_argument(
        "--failed-rows", type=Path, help="rows to retry (default <report>.failed.csv)"
    )
    parser.add_argument("--config", type=Path, help="TOML settings file (see configs/default.toml)")
    parser.add_argument("--base-url", help="API base URL (env CC_BASE_URL)")
    # Numbers are only parsed here: load_config checks every setting, whatever its origin.
    parser.add_argument("--rate", type=float, help="requests per second, at most (4)")
    parser.add_argument("--batch-size", type=int, help="keys per request, at most (100)")
    parser.add_argument("--concurrency", type=int, help="requests in flight, at most (4)")
    parser.add_argument(
        "--token-file", type=Path, help="token file to use and refresh (env CC_TOKEN_FILE)"
    )
    parser.add_argument("--client-id", help="OAuth client id for refreshing (env CC_CLIENT_ID)")
    parser.add_argument("--max-requests", type=int, help="spend at most this many requests")
    parser.add_argument(
        "--dry-run", action="store_true", default=None, help="plan only, send nothing"
    )
    parser.add_argument(
        "--log-format", choices=("console", "json"), help="default: console on a terminal"
    )
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning"), help="debug logs every request"
    )
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=None,
        help="never draw the progress bar (default: drawn on a terminal only)",
    )
    parser.add_argument(
        "--summary-json", type=Path, help="write the run's record as JSON (docs/summary-json.md)"
    )


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state",
        metavar="PATH|none",
        help="the run store (env BATCHJOB_STATE; default: one file per user, see docs/store.md)",
    )


def add_runs_parser(commands: Any) -> None:
    """``batchjob runs``, ``runs show RUN``, ``runs report RUN --out PATH`` (batchjob._history)."""
    runs = commands.add_parser(
        "runs",
        help="list the runs the run store recorded; show one; write its report again",
        description="List recent runs, newest first. `runs show RUN` shows one run, `runs report "
        "RUN --out PATH` writes its report again (docs/store.md, History commands).",
    )
    runs.add_argument("--limit", type=int, default=20, help="list at most N runs (default 20)")
    _add_history_options(runs, None, False)
    sub = runs.add_subparsers(dest="runs_command", metavar="SUBCOMMAND")
    show = sub.add_parser("show", help="one run: every field, counts by event")
    report = sub.add_parser("report", help="write a run's report CSV again, from the store")
    for parser in (show, report):
        parser.add_argument("run_id", metavar="RUN", help="a run id, or the start of one")
    report.add_argument("--out", type=Path, required=True, help="the CSV file to write")
    report.add_argument("--force", action="store_true", help="replace --out if it exists")
    prune = sub.add_parser(
        "prune",
        help="drop old runs' report rows and plans (skips and carry-over are kept)",
        description="Drop the report rows and plans of finished runs that started more than "
        "DAYS days ago, to keep the store small. What earlier runs did stays (rows are still "
        "skipped, pending keys still carried over); the pruned runs stay listed, but their "
        "reports cannot be written again, and they cannot be resumed or reverted.",
    )
    prune.add_argument(
        "--older-than", type=float, required=True, metavar="DAYS", help="age in days, 0 or more"
    )
    _add_history_options(show, argparse.SUPPRESS, argparse.SUPPRESS)
    _add_history_options(report, argparse.SUPPRESS, None)
    _add_history_options(prune, argparse.SUPPRESS, None)


def _add_history_options(parser: argparse.ArgumentParser, default: Any, json: Any) -> None:
    # A subcommand's defaults are SUPPRESS: `runs --state X show RUN` keeps X.
    if json is not None:
        parser.add_argument("--json", action="store_true", default=json, help="print JSON")
    parser.add_argument(
        "--state",
        metavar="PATH|none",
        default=default,
        help="the run store (env BATCHJOB_STATE; default: one file per user, see docs/store.md)",
    )
    parser.add_argument(
        "--config", type=Path, default=default, help="TOML settings file (its state setting)"
    )


def _cmd_config_init(args: argparse.Namespace) -> int:
    source = shared_folder("configs") / f"{args.example}.toml"
    try:
        # "x": a new file only; never a write through a link or over someone's settings.
        with args.path.open("x", encoding="utf-8") as out:
            out.write(source.read_text(encoding="utf-8"))
    except FileExistsError:
        raise ConfigError(f"{args.path} already exists; choose another path") from None
    except OSError as exc:
        raise ConfigError(f"{args.path}: cannot write it: {exc.strerror or exc}") from None
    _say(f"wrote {args.path} (from {source.name}); use it with --config {args.path}", sys.stdout)
    return ExitCode.OK


class _Output(io.TextIOBase):
    """stdout or stderr of a run, whose reader may vanish (a closed terminal, an ssh drop).

    Once a write fails, output goes to /dev/null instead: losing log lines is better than
    losing the run, whose report and exit code are what matter.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            self.stream.write(text)
        except OSError:
            self._lost()
        return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError:
            self._lost()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def _lost(self) -> None:
        # Over the file descriptor itself, so that whatever else writes there (rich's
        # refresh thread, Python's flush at exit) stops failing too.
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)
        with contextlib.suppress(OSError, ValueError):
            self.stream.flush()  # the unwritten rest goes to /dev/null now


def _tolerant(stream: TextIO) -> TextIO:
    return cast(TextIO, _Output(stream))


def _say(text: str, stream: TextIO) -> None:
    out = _tolerant(stream)
    out.write(text + "\n")
    out.flush()


def add_auth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = parser.description or (
        "Get the first token pair for unattended runs and write the token file: guides the "
        "OAuth2 authorization code flow with PKCE (one browser visit), or imports a refresh "
        "token read from stdin."
    )
    client_id, token_file = ENV_VARS["client_id"], ENV_VARS["token_file"]
    parser.add_argument("--client-id", help=f"the app's client id (env {client_id})")
    parser.add_argument(
        "--token-file", type=Path, help=f"where to write the tokens (env {token_file})"
    )
    parser.add_argument(
        "--redirect-uri",
        default=DEFAULT_REDIRECT_URI,
        help=f"one of the app's redirect URIs (default {DEFAULT_REDIRECT_URI})",
    )
    parser.add_argument(
        "--authorize-url", help="authorize endpoint (default: the token URL's sibling)"
    )
    parser.add_argument("--token-url", help=f"token endpoint (env {TOKEN_URL_ENV})")
    parser.add_argument("--scope", default=SCOPE, help=f"scopes to ask for (default {SCOPE!r})")
    parser.add_argument(
        "--import-refresh-token",
        action="store_true",
        help="read a refresh token from stdin instead of the browser flow",
    )


#: Options ``run`` has that ``revert`` does not; given as None there.
_RUN_ONLY = (
    "inputs",
    "event_id",
    "key_pattern",
    "include_hidden_rows",
    "resume",
    "action",
    "again",
    "pending",
)
_COMMON = (
    "report",
    "failed_rows",
    "base_url",
    "rate",
    "batch_size",
    "concurrency",
    "token_file",
    "client_id",
    "max_requests",
    "dry_run",
    "log_format",
    "log_level",
    "progress",
    "summary_json",
    "state",
)


#: What ``--resume VALUE`` takes for a run id (or the start of one): anything else is an input
#: file that argparse happened to put after ``--resume``.
_RUN_ID = re.compile(r"\d{8}(-[0-9]{0,6}(-[0-9a-f]{0,4})?)?")


def _config_from(args: argparse.Namespace, **overrides: Any) -> JobConfig:
    cli = {name: getattr(args, name, None) for name in (*_COMMON, *_RUN_ONLY)}
    if isinstance(cli["resume"], str):
        if _RUN_ID.fullmatch(cli["resume"]):
            cli["resume_run"], cli["resume"] = cli["resume"], None
        else:
            cli["inputs"] = [Path(cli["resume"]), *(cli["inputs"] or [])]
            cli["resume"] = True
    if cli["inputs"] is not None:
        cli["inputs"] = tuple(cli["inputs"])
    return load_config(cli=cli | overrides, config_file=args.config)


async def _run(config: JobConfig, tokens: ManagedTokenSource | None = None) -> RunResult:
    """Run with logging, progress and signals set up for a person or a scheduler."""
    from rich.console import Console

    from batchjob._logging import Redactor, make_logger
    from batchjob._progress import ProgressBar
    from batchjob._tokens import token_source_from_env
    from batchjob.run import StopRequest, install_signal_handlers, run_job

    redactor = Redactor()
    err = _tolerant(sys.stderr)
    show_progress = config.progress if config.progress is not None else sys.stderr.isatty()
    bar = ProgressBar(Console(file=err)) if show_progress else None
    log = make_logger(
        log_format=config.log_format,
        level=config.log_level,
        redactor=redactor,
        stream=cast(TextIO, bar.log_stream()) if bar is not None else err,
    )
    if tokens is None and not config.dry_run:
        tokens = token_source_from_env(config, os.environ, on_new_secret=redactor.add, log=log)
    for secret in tokens.secrets() if tokens is not None else ():
        redactor.add(secret)
    stop = StopRequest()
    remove = install_signal_handlers(stop)
    try:
        return await run_job(
            config,
            tokens=tokens,
            log=log,
            progress=bar,
            stop=stop,
            redactor=redactor,
        )
    finally:
        try:
            if tokens is not None:
                # Waits for a refresh in flight, so a rotated refresh token reaches the file.
                # The signal handlers stay until then: a Ctrl-C or a hangup now would kill
                # the process between the answer and the save, and lose the new pair.
                await tokens.close()
        finally:
            remove()


def _cmd_run(args: argparse.Namespace) -> int:
    config = _config_from(args)
    from batchjob.run import run_to_end

    result = run_to_end(_run(config))
    _say(result.summary(), sys.stdout)
    return result.exit_code


def _cmd_revert(args: argparse.Namespace) -> int:
    # pending off: a nightly config's "pending = true" is about undo runs, not this one.
    config = _config_from(args, revert=args.run_id, action="check-in", pending=False)
    _say(
        f"revert {args.run_id}: checks in again the keys that run undid and no later run "
        "touched. The API cannot tell whether a ticket was checked in before that run: a "
        "ticket it undid that was not checked in will be checked in after this."
        + (" (dry run: nothing is sent)" if config.dry_run else ""),
        sys.stderr,
    )
    from batchjob.run import run_to_end

    result = run_to_end(_run(config))
    _say(result.summary(), sys.stdout)
    return result.exit_code


def _display(path: Path) -> Path:
    cwd = Path.cwd()
    return path.relative_to(cwd) if path.is_relative_to(cwd) else path


def _cmd_demo(args: argparse.Namespace) -> int:
    from batchjob._tokens import Secret, StaticToken
    from batchjob.sandbox import Sandbox, World

    sample = _display((args.sample_dir or shared_folder("sample_data")).resolve())
    inputs = sorted(p for p in sample.iterdir() if p.suffix in {".csv", ".xlsx"})

    async def demo() -> RunResult:
        world = World.from_json(sample / "sandbox_world.json")
        async with Sandbox(world) as sandbox:
            print(f"sandbox API at {sandbox.base_url} (4 requests/s, like the real one)")
            config = JobConfig(
                inputs=tuple(inputs),
                report=args.report,
                base_url=sandbox.base_url,
                log_format="console",
            )
            return await _run(config, StaticToken(Secret(sandbox.access_token)))

    print("inputs: " + ", ".join(str(p) for p in inputs))
    from batchjob.run import run_to_end

    result = run_to_end(demo())
    print(result.summary())
    # The sample data holds bad rows on purpose, so "finished, some keys not undone" is success.
    return (
        ExitCode.OK if result.exit_code in (ExitCode.OK, ExitCode.INCOMPLETE) else result.exit_code
    )


def main(argv: Sequence[str] | None = None) -> int:
    # The command's own process: Arrow's system allocator (pyarrow is not imported yet). With
    # the store's writer thread beside the loop, mimalloc's per-thread heaps held a 1,000,000-
    # key run at 1094 MiB and 5.0 s; the system allocator at 807 MiB and 3.9 s (bench row N2).
    # A library caller keeps its own choice, as does anyone who sets the variable.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sandbox"]:
        from batchjob.sandbox import main_sandbox

        return main_sandbox(argv[1:], prog="batchjob sandbox")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "revert":
            return _cmd_revert(args)
        if args.command == "demo":
            return _cmd_demo(args)
        if args.command == "config":
            return _cmd_config_init(args)
        if args.command == "runs":
            from batchjob._history import run_history_command

            return run_history_command(args, stdout=_tolerant(sys.stdout))
        from batchjob._auth import run_auth_command

        return run_auth_command(args)
    except BatchjobError as exc:
        _say(f"batchjob: error: {exc}", sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        return ExitCode.SIGINT
    except Exception as exc:
        # A bug or an environment failure (disk full...). Not exit 1, which schedulers may
        # treat as a normal night: the journal, if any, still holds every outcome so far.
        _say(
            f"batchjob: internal error: {type(exc).__name__}: {exc}\n"
            "what was done so far is in the run store (or, with --state none, the report's "
            ".journal file): rerun with --resume",
            sys.stderr,
        )
        return ExitCode.STOPPED


if __name__ == "__main__":
    sys.exit(main())
