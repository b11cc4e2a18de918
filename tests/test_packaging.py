"""The installed package: `llm/` ships as `diffalign.llm`, and every sub-package is in the wheel."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of what the build reads: setuptools builds in the source tree's ``build/``,
    where two pytest-xdist workers building at once collide (and a stale folder would leak into the wheel)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("diffalign", "llm"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
        ],
        check=True,
    )
    return next(out.glob("diffalign-*.whl"))


def test_every_package_folder_is_in_the_wheel(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    package_dirs = {path.parent for path in (ROOT / "diffalign").rglob("__init__.py")}
    expected = {"diffalign/" + str(d.relative_to(ROOT / "diffalign")) + "/__init__.py" for d in package_dirs}
    expected = {name.replace("/./", "/") for name in expected} | {"diffalign/llm/__init__.py"}
    assert expected <= set(names), sorted(expected - set(names))
    assert not any(name.startswith("llm/") for name in names)  # no top-level `llm` module to clash on PyPI


def test_installed_wheel_imports_diffalign_llm(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
    )
    code = "import diffalign.llm, diffalign.losses; print(diffalign.llm.__file__)"
    # Run outside the repository so the source tree cannot be imported instead of the installed wheel.
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(target / "diffalign" / "llm")
