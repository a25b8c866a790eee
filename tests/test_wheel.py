"""What `pip install batchjob` gives someone with no checkout: the wheel, installed into a
fresh virtual environment, runs --version, the demo and a dry run from an empty folder.

Offline: the wheel is built without build isolation, installed with --no-index, and its
dependencies come from this environment's site-packages through a .pth file.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 (our own interpreter and programs)
        [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the built wheel installed; returns its bin folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                "-w", tmp / "dist", ROOT)  # fmt: skip
    assert built.returncode == 0, built.stderr
    # No setuptools deprecation screed (a license table instead of an SPDX string made ~100).
    assert "deprecat" not in (built.stdout + built.stderr).lower()
    wheel = next((tmp / "dist").glob("batchjob-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        assert "batchjob/py.typed" in archive.namelist()  # type hints for users
    venv.create(tmp / "venv", with_pip=True)
    bin_dir = tmp / "venv" / "bin"
    site = run(bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
    # The dependencies, not batchjob: this environment's editable install is not on that path.
    (Path(site.stdout.strip()) / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    done = run(bin_dir / "python", "-m", "pip", "install", "--no-deps", "--no-index", wheel)
    assert done.returncode == 0, done.stderr
    return bin_dir


def test_the_installed_command_knows_its_version(installed: Path, tmp_path: Path) -> None:
    done = run(installed / "batchjob", "--version", cwd=tmp_path)
    assert done.stdout.strip() == f"batchjob {version('batchjob')}", done.stderr


def test_the_demo_runs_from_the_installed_wheel_with_no_checkout(
    installed: Path, tmp_path: Path
) -> None:
    done = run(installed / "batchjob", "demo", "--report", tmp_path / "demo.csv", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "undone 81" in done.stdout
    # It ran the installed package and its installed sample data, not this checkout's.
    assert str(ROOT) not in done.stdout + done.stderr


def test_a_dry_run_and_config_init_work_from_the_installed_wheel(
    installed: Path, tmp_path: Path
) -> None:
    init = run(installed / "batchjob", "config", "init", "settings.toml", cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    assert "grace_period" in (tmp_path / "settings.toml").read_text()
    sample = ROOT / "sample_data" / "registrants-export.csv"
    done = run(installed / "batchjob", "run", sample, "--config", "settings.toml", "--dry-run",
               "--report", "r.csv", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 1, done.stderr  # the sample holds invalid rows on purpose
    assert (tmp_path / "r.csv").exists()
