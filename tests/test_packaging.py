"""The package installs as one namespace: a wheel built from the tracked files puts only ``repdyn``
into a fresh environment, and every subpackage imports from another folder (the editable install
would hide a subpackage left off the explicit list in pyproject.toml)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

CHECK = """
import importlib, pkgutil, sys
import repdyn, repdyn.analysis.similarity
names = [m.name for m in pkgutil.walk_packages(repdyn.__path__, "repdyn.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
assert {"repdyn.cli", "repdyn.core.files", "repdyn.model.backbone", "repdyn.study.claims"} <= set(names), names
assert not any(".tests" in n or ".bench" in n for n in names), names
for generic in ("training", "probe", "analysis", "commands", "cli", "core", "model", "study"):
    try:
        importlib.import_module(generic)
    except ImportError:
        continue
    raise SystemExit(f"installing repdyn made a top-level {generic!r} importable")
print(len(names))
"""


def _run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def test_wheel_installs_one_namespace_that_imports_from_anywhere(tmp_path):
    src = tmp_path / "src"
    for rel in subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split():
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
         tmp_path)
    (wheel,) = wheels.glob("repdyn-*.whl")

    # a fresh venv that sees this environment's third-party packages through a path entry (not a
    # site dir, so this environment's editable finder for repdyn is not loaded)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip())
    before = set(os.listdir(site))
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
         tmp_path)
    added = {n for n in set(os.listdir(site)) - before if not n.startswith("__pycache__")}
    assert {n for n in added if not n.endswith(".dist-info")} == {"repdyn"}, added
    assert not (site / "repdyn" / "__init__.py").exists()  # the root is not a package of its own
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert int(_run([str(py), "-c", CHECK], elsewhere, env).strip()) > 40
    assert "layer-grid" in _run([str(py), "-m", "repdyn", "--help"], elsewhere, env)
    assert "layer-grid" in _run([str(venv / "bin" / "probe"), "--help"], elsewhere, env)


def test_torchrun_runs_the_package_as_a_module(tmp_path):
    """`torchrun -m repdyn ...` (the README's multi-GPU form) starts the CLI in every rank."""
    from tests.launch import free_port

    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(free_port()), "-m", "repdyn", "train", "--help"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("Usage:") == 2  # one help text per rank
