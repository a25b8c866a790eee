"""The package's shape, as a newcomer relies on it: the public API, imports that go one way
(read -> plan -> send -> record -> run), and a command line that starts quickly."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import batchjob

PACKAGE = Path(batchjob.__file__).parent

#: Each unit's place in the pipeline. A unit may import units of a lower rank only (or its
#: own modules); the CLI may load the sandbox, but only inside the commands that need it.
RANK = {
    "_errors": 0,
    "_portable": 0,
    "_model": 0,
    "_cells": 0,
    "_logging": 0,
    "_config": 1,
    "_tokens": 2,
    "read": 3,
    "plan": 4,
    "send": 5,
    "record": 6,
    "store": 6,
    "run": 7,
    "_progress": 7,
    "_auth": 8,
    "_history": 8,
    "sandbox": 8,
    "_cli": 9,
    "__init__": 10,
    "__main__": 10,
}

PUBLIC_API = {
    "REPORT_COLUMNS",
    "Action",
    "BatchjobError",
    "ColumnAliases",
    "ConfigError",
    "ExitCode",
    "FileTokenSource",
    "InputError",
    "JobConfig",
    "Outcome",
    "RawResponse",
    "ReportError",
    "RunResult",
    "Secret",
    "StaticToken",
    "StopRequest",
    "TokenEndpointError",
    "TokenError",
    "TokenSource",
    "Transport",
    "TransportError",
    "UsageError",
    "__version__",
    "load_config",
    "run_job",
    "run_job_sync",
}


def _unit(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else path.stem


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported batchjob unit, whether the import is at module level) for each import."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("batchjob."):
            found.append((str(node.module).split(".")[1], id(node) in top))
    return found


def test_the_public_api_is_exactly_what_the_readme_promises() -> None:
    assert set(batchjob.__all__) == PUBLIC_API
    for name in batchjob.__all__:
        assert getattr(batchjob, name) is not None, name


def test_every_error_batchjob_raises_on_purpose_has_one_base() -> None:
    for name in ("ConfigError", "InputError", "ReportError", "TokenError", "TokenEndpointError"):
        assert issubclass(getattr(batchjob, name), batchjob.BatchjobError), name
    for name in ("ConfigError", "InputError", "ReportError"):
        assert issubclass(getattr(batchjob, name), batchjob.UsageError), name


def test_imports_go_one_way_through_the_pipeline() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(path)
        for imported, top_level in _imports(path):
            if imported == unit:
                continue
            lazy_sandbox = unit == "_cli" and imported == "sandbox" and not top_level
            if RANK[imported] >= RANK[unit] and not lazy_sandbox:
                wrong.append(f"{path.relative_to(PACKAGE)} imports batchjob.{imported}")
    assert wrong == []


def test_every_module_is_placed_in_the_pipeline() -> None:
    units = {_unit(path) for path in PACKAGE.rglob("*.py")}
    assert units <= set(RANK), units - set(RANK)


def _modules_loaded(code: str) -> set[str]:
    out = subprocess.run(  # noqa: S603 (our own interpreter and code)
        [sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return set(out.split())


def test_help_loads_none_of_the_heavy_modules() -> None:
    loaded = _modules_loaded(
        "import contextlib, io, sys\n"
        "from batchjob._cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['run', '--help'])"
    )
    heavy = {"pandas", "pyarrow", "numpy", "aiohttp", "aiohttp.web", "rich", "python_calamine"}
    assert heavy & loaded == set()
    assert not [m for m in loaded if "sandbox" in m]


def test_importing_batchjob_loads_no_sandbox() -> None:
    loaded = _modules_loaded("import batchjob")
    assert not [m for m in loaded if "sandbox" in m]
    assert "pandas" not in loaded


def test_the_help_names_every_file_type_the_reader_takes() -> None:
    from batchjob._cli import INPUT_TYPES
    from batchjob.read import CSV_SUFFIXES, EXCEL_SUFFIXES

    assert set(INPUT_TYPES.replace("(", " ").split()) >= CSV_SUFFIXES | EXCEL_SUFFIXES


def test_every_option_of_every_command_says_what_it_does() -> None:
    import argparse

    from batchjob._cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    silent = [
        f"{name} {'/'.join(action.option_strings) or action.dest}"
        for name, command in commands.items()
        for action in command._actions
        if action.help is None and not isinstance(action, argparse._SubParsersAction)
    ]
    assert silent == []
