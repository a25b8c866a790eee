"""What a user gets from `pip install`: a version from the package metadata, and type hints."""

from __future__ import annotations

from importlib.metadata import version

import pytest

import batchjob
from batchjob._cli import main


def test_the_version_is_the_installed_distribution_s() -> None:
    assert batchjob.__version__ == version("batchjob")


def test_batchjob_version_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"batchjob {version('batchjob')}"
