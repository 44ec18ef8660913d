"""The release as a user gets it: a wheel that serves on its own, installs from exact, hashed versions.

The wheel is built from a copy of the checkout (a build leaves build/ and *.egg-info behind, and a
stale build/ could leak old files into the next wheel), installed into a plain venv in a temp folder
with the dependencies held to requirements.lock, and started from there with the checkout out of
sys.path (``python -I``, cwd elsewhere).
"""

from __future__ import annotations

import configparser
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import ROOT, SECRET, free_port, start, stop, wait_for

LOCK = ROOT / "requirements.lock"
MYSQL_LOCK = ROOT / "requirements-mysql.lock"
# What setuptools says when its configuration leaves something out or is deprecated
# (BuildBackendWarning, SetuptoolsDeprecationWarning, ...); pip's own "WARNING:" lines are not it.
SETUPTOOLS_WARNING = re.compile(r"\b\w+Warning\b")
NOT_SOURCE = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis", "test-artefacts"}
# What a development checkout holds at run time and a release must never ship.
RUNTIME_LEFTOVERS = [
    "demo/data/demo.sqlite3",
    "demo/data/media/ab/cd.jpg",
    "demo/log/demo.log",
    "demo/conf/__pycache__/settings.cpython-311.pyc",
]


def run(*command: str | Path, cwd: Path) -> str:
    """Run ``command`` without the PYTHONPATH the suite may run under (pip would see the checkout)."""
    environ = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=environ, capture_output=True, text=True, timeout=300, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def shipped_files() -> set[str]:
    """Every file of the package in the checkout (what the server or an operator may need)."""
    package = ROOT / "demo"
    return {
        path.relative_to(ROOT).as_posix()
        for path in package.rglob("*")
        if path.is_file()
        and "__pycache__" not in path.parts
        and path.relative_to(package).parts[0] not in {"data", "log"}
    }


def copy_of_checkout(target: Path) -> Path:
    def not_source(folder: str, names: list[str]) -> set[str]:
        skipped = {name for name in names if name in NOT_SOURCE or name.endswith(".egg-info")}
        if Path(folder) == ROOT / "demo":
            skipped |= {"data", "log"}
        return skipped

    shutil.copytree(ROOT, target, ignore=not_source)
    for leftover in RUNTIME_LEFTOVERS:
        (target / leftover).parent.mkdir(parents=True, exist_ok=True)
        (target / leftover).write_text("left by a development server")
    return target


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_of_checkout(tmp_path_factory.mktemp("checkout") / "demo")


def plain_venv(folder: Path) -> Path:
    """A venv without pip (the suite's pip installs into it) nor the system's packages; its python."""
    run(sys.executable, "-m", "venv", "--without-pip", folder, cwd=folder.parent)
    return folder / "bin" / "python"


def test_a_wheel_installed_outside_the_checkout_serves_readyz_and_installs_without_warnings(source, tmp_path):
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp_path / "dist", source, cwd=tmp_path)
    [wheel] = (tmp_path / "dist").glob("demo-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        contents = {name for name in archive.namelist() if name.startswith("demo/")}
    assert shipped_files() <= contents, sorted(shipped_files() - contents)
    assert not contents & set(RUNTIME_LEFTOVERS)

    venv = tmp_path / "venv"
    python = plain_venv(venv)
    # The wheel's dependencies come from the lock: the same versions, their hashes checked.
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (tmp_path / "wheel.txt").write_text(f"demo @ {wheel.as_uri()} --hash=sha256:{digest}\n")
    installed = run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "-q",
        "-r",
        tmp_path / "wheel.txt",
        "-c",
        LOCK,
        cwd=tmp_path,
    )
    assert not SETUPTOOLS_WARNING.search(built + installed), built + installed
    where = run(python, "-I", "-c", "import demo; print(demo.__file__)", cwd=tmp_path)
    assert where.strip().startswith(str(venv)), where

    port = free_port()
    proc = start(
        tmp_path,
        f"--port={port}",
        "--log_dir=",
        f"--media_root={tmp_path / 'media'}",
        f"--database_url=sqlite:///{tmp_path / 'demo.sqlite3'}",
        env={"DEMO_COOKIE_SECRET": SECRET},
        command=[str(python), "-I", "-m", "demo.main"],
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/readyz", proc, timeout=30)
    finally:
        stop(proc)


def test_an_editable_install_as_make_does_prints_no_setuptools_warning(source, tmp_path):
    python = plain_venv(tmp_path / "venv")
    installed = run(
        sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "-e", source, cwd=tmp_path
    )
    assert not SETUPTOOLS_WARNING.search(installed), installed
    where = run(
        python,
        "-I",
        "-c",
        "import importlib.util; print(importlib.util.find_spec('demo.migrations.env').origin)",
        cwd=tmp_path,
    )
    assert where.strip() == str(source / "demo" / "migrations" / "env.py")


# -- the locks ----------------------------------------------------------------------------------------


def locked(lock: Path) -> dict[str, tuple[str, list[str]]]:
    """``{name: (version pinned with ==, [hashes])}`` for every entry of a pip requirements file."""
    text = re.sub(r"\\\n", " ", lock.read_text())
    entries: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        requirement, *options = re.split(r"\s+(?=--)", line)
        parsed = Requirement(requirement)
        pins = [spec.version for spec in parsed.specifier if spec.operator == "=="]
        assert len(pins) == 1 and len(parsed.specifier) == 1, f"{lock.name}: {parsed} is not pinned with =="
        hashes = [option.split("=", 1)[1] for option in options if option.startswith("--hash=sha256:")]
        assert hashes, f"{lock.name}: {parsed.name} has no --hash"
        entries[canonicalize_name(parsed.name)] = (pins[0], hashes)
    return entries


def declared(*extras: str) -> list[Requirement]:
    """The requirements setup.cfg declares: install_requires and the given extras."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    blocks = [config["options"]["install_requires"]] + [config["options.extras_require"][e] for e in extras]
    return [
        Requirement(line.strip())
        for block in blocks
        for line in block.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


@pytest.mark.parametrize(
    ("lock", "extras"), [(LOCK, ("test",)), (MYSQL_LOCK, ("test", "mysql"))], ids=["base", "mysql"]
)
def test_the_lock_pins_every_declared_dependency_within_its_range_with_hashes(lock, extras):
    entries = locked(lock)
    for requirement in declared(*extras):
        name = canonicalize_name(requirement.name)
        assert name in entries, f"{lock.name} does not pin {requirement} (run `make lock`)"
        version, _ = entries[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{lock.name} pins {name}=={version}, outside setup.cfg's {requirement} (run `make lock`)"
        )


def test_the_mysql_lock_is_the_base_lock_plus_mysqlclient():
    base, mysql = locked(LOCK), locked(MYSQL_LOCK)
    assert set(mysql) - set(base) == {"mysqlclient"} and set(base) <= set(mysql)
    assert {name: mysql[name][0] for name in base} == {name: version for name, (version, _) in base.items()}


def test_make_installs_from_the_locks_only():
    recipe = run("make", "-n", "-B", ".venv/.installed-stamp", cwd=ROOT)
    installs = [line for line in recipe.splitlines() if "pip install" in line]
    assert any("--require-hashes -r $lock" in line for line in installs), recipe
    assert "lock=requirements-mysql.lock" in recipe and "lock=requirements.lock" in recipe, recipe
    assert any("--no-deps -e ." in line for line in installs), recipe
    # Nothing else is installed by name or range: only pip itself is upgraded.
    others = [line for line in installs if "--require-hashes" not in line and "--no-deps" not in line]
    assert all(line.endswith("--upgrade pip") for line in others), others
    assert "make test" in (ROOT / ".ci" / "run").read_text()
