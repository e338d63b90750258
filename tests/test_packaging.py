"""Packaging: one `pip install .` on macOS and Linux, the console scripts, README and CI agree."""

from __future__ import annotations

import re
import tomllib

from conftest import ROOT
from packaging.requirements import Requirement

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MAC = {"sys_platform": "darwin", "platform_machine": "arm64"}
LINUX = {"sys_platform": "linux", "platform_machine": "x86_64"}


def _picked(env: dict[str, str]) -> dict[str, Requirement]:
    """The dependencies pip installs on a platform, by name (with extras)."""
    out = {}
    for line in PYPROJECT["project"]["dependencies"]:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            out[req.name + "".join(f"[{e}]" for e in sorted(req.extras))] = req
    return out


def test_one_install_picks_metal_mlx_on_macs_and_the_cpu_build_on_linux():
    mac, linux = _picked(MAC), _picked(LINUX)
    assert "mlx" in mac and "mlx[cpu]" not in mac
    assert "mlx[cpu]" in linux and "mlx" not in linux
    for name in ("mlx-lm", "grpcio", "protobuf", "zeroconf", "prometheus-client"):
        assert name in mac and name in linux, name


def test_console_scripts_packages_and_python():
    project = PYPROJECT["project"]
    assert project["requires-python"] == ">=3.11"
    assert project["scripts"] == {"coordinator": "coordinator.cli:main",
                                  "worker": "worker.cli:main"}
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == {"coordinator", "worker", "protos"}


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, re.S)
    demo, tests = blocks[0].strip(), blocks[1].strip()
    assert "coordinator serve --demo" in demo and "pip install ." in demo
    ci = (ROOT / ".ci" / "run").read_text()
    for step in tests.split("&&")[2:]:  # after making and entering the venv
        assert step.strip().replace("pip install", "pip install -q") in ci, step
