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
    packages = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert packages == {"coordinator", "coordinator.api", "coordinator.serving",
                        "coordinator.cluster", "worker", "protos"}
    # every package directory is installed (a new one must be listed too)
    found = {".".join(p.parent.relative_to(ROOT).parts) for top in ("coordinator", "worker",
             "protos") for p in (ROOT / top).rglob("__init__.py")}
    assert found == packages, found ^ packages


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, re.S)
    demo, tests = blocks[0].strip(), blocks[1].strip()
    assert "coordinator serve --demo" in demo and "pip install ." in demo
    ci = (ROOT / ".ci" / "run").read_text()
    for step in tests.split("&&")[2:]:  # after making and entering the venv
        assert step.strip().replace("pip install", "pip install -q") in ci, step


def _imports(folders: list[str]) -> set[str]:
    """Top-level modules imported anywhere in these folders (inside functions too)."""
    import ast

    out = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    out |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    out.add(node.module.split(".")[0])
    return out


def _declared(lines: list[str]) -> set[str]:
    return {Requirement(line).name.lower().replace("_", "-") for line in lines}


def _distributions(modules: set[str]) -> dict[str, set[str]]:
    """Module -> the installed distributions that provide it (standard library left out)."""
    import sys
    from importlib.metadata import packages_distributions

    provided = packages_distributions()
    # this project's packages, and the helper modules beside the tests (conftest, lab, ...)
    local = {"coordinator", "worker", "protos"} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    return {m: {d.lower().replace("_", "-") for d in provided.get(m, [m])} for m in modules
            if m not in sys.stdlib_module_names and m not in local and not m.startswith("test")
            and not m.startswith("bench") and m != "__future__"}


def test_every_imported_package_is_declared():
    """What the packages import is in `dependencies`; what the tests import is there or in
    the `test` extra (a fresh `pip install` must not rely on what another package pulls in)."""
    runtime = _declared(PYPROJECT["project"]["dependencies"])
    # protos/build.py regenerates the committed gRPC code: a developer's tool, in the test extra
    runtime_imports = _imports(["coordinator", "worker", "protos"]) - {"grpc_tools"}
    for module, dists in _distributions(runtime_imports).items():
        assert dists & runtime, f"{module} ({', '.join(dists)}) is imported but not declared"
    test = runtime | _declared(PYPROJECT["project"]["optional-dependencies"]["test"])
    for module, dists in _distributions(_imports(["tests"])).items():
        assert dists & test, f"tests import {module} ({', '.join(dists)}), not in the test extra"


def test_mlx_lm_is_bounded_to_the_versions_tested():
    """The worker uses mlx-lm's model classes and caches directly: a minor release may change
    them, so the dependency stops below the next one, and the installed one is inside it."""
    from importlib.metadata import version

    from packaging.version import Version

    (req,) = [Requirement(d) for d in PYPROJECT["project"]["dependencies"]
              if Requirement(d).name == "mlx-lm"]
    assert str(req.specifier) in ("<0.33,>=0.32", ">=0.32,<0.33"), req.specifier
    assert Version(version("mlx-lm")) in req.specifier
