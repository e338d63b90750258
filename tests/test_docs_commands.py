"""Every command in the deploy guides runs here, is checked, or is listed as not runnable here."""

from __future__ import annotations

import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from test_deploy import PROGRAMS, UNITS, exec_start, parse_cli, read_unit

GUIDES = [ROOT / "docs" / "deploy.md", ROOT / "docs" / "linux-gpu.md"]

# Programs the guides run that cannot run here, and why. A command of any other program fails
# the test until it is run below or listed here.
NOT_RUN = {
    "python3": "makes a virtualenv: .ci/run installs Shardline the same way",
    "pip": "installs Shardline: .ci/run does the same",
    "openssl": "makes a random secret; the tests make their own",
    "chmod": "sets the mode of the secret made the line before",
    "scp": "copies to another Mac",
    "install": "copies into /etc (the files copied exist: checked below)",
    "systemd-sysusers": "needs root on a systemd host; tests/test_deploy.py checks the file",
    "systemctl": "needs systemd as init; systemd-analyze verify checks the units "
                 "(tests/test_deploy.py)",
    "journalctl": "needs systemd as init",
    "sudoedit": "edits a file in /etc by hand",
    "sysctl": "macOS only (iogpu.wired_limit_mb)",
    "pmset": "macOS only",
    "open": "macOS only: opens a browser",
    "curl": "needs a running coordinator (tests/test_http_api.py asks /health)",
    "docker": "needs a Docker daemon; tests/test_deploy_containers.py lints the Dockerfile "
              "and the "
              "compose file, and `worker`/`coordinator` command lines after the image are "
              "parsed here",
    "kubectl": "needs a Kubernetes cluster; tests/test_deploy_containers.py builds the "
               "kustomizations "
               "(kubectl kustomize) and validates them against the Kubernetes schemas",
}
# Subcommands of worker/coordinator that are parsed here but not run, and why; the others
# (`coordinator certs`, `worker cache`) run for real in a temporary directory.
PARSED_ONLY = {
    ("worker", "serve"): "serves until stopped: tests/test_health.py and tests/test_service.py "
                         "run workers",
    ("coordinator", "serve"): "needs a model and workers: tests/test_service.py runs it",
    ("worker", "health"): "needs a running worker: tests/test_health.py runs it",
    ("coordinator", "health"): "needs a running coordinator: tests/test_health.py runs it",
    ("coordinator", "status"): "needs a running coordinator: tests/test_serve_cli.py runs it",
    ("coordinator", "generate"): "needs a running coordinator: tests/test_serve_cli.py runs it",
    ("coordinator", "plan"): "needs the model's files (a download)",
}
RUN = {("coordinator", "certs"), ("worker", "cache")}
SHELL = {"sh", "bash", "shell"}
KNOWN_ENV = {"SHARDLINE_SECRET", "SHARDLINE_API_KEY", "SHARDLINE_MODEL",
             "SHARDLINE_WORKER_ARGS", "SHARDLINE_COORDINATOR_ARGS"}


@dataclass
class Block:
    lang: str
    text: str
    where: str


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file (indented ones in lists too)."""
    out = []
    text = path.read_text()
    for m in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", text, re.M | re.S):
        line = text[:m.start()].count("\n") + 1
        out.append(Block(m.group(2), textwrap.dedent(m.group(3)), f"{path.name}:{line}"))
    return out


def commands(text: str) -> list[list[str]]:
    """Simple commands of a shell block: continuation lines joined, comments, `$(...)`,
    redirections, `VAR=value` prefixes and `sudo` dropped, split at && || ; |."""
    out: list[list[str]] = []
    for line in text.replace("\\\n", " ").splitlines():
        line = re.sub(r"\$\([^()]*\)", "SUBST", line)
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
        lex.whitespace_split = True
        lex.commenters = "#"
        current: list[str] = []
        redirect = False
        for token in [*lex, ";"]:
            if token in ("&&", "||", ";", "|", "&"):
                words = current
                while words and (re.match(r"\w+=", words[0]) or words[0] == "sudo"):
                    words = words[1:]
                if words:
                    out.append(words)
                current = []
            elif token in (">", ">>", "<"):
                redirect = True
            elif redirect:
                redirect = False
            else:
                current.append(token)
    return out


def shell_commands() -> list[tuple[str, list[str]]]:
    return [(b.where, argv) for path in GUIDES for b in blocks(path) if b.lang in SHELL
            for argv in commands(b.text)]


def check_paths(argv: list[str], where: str) -> None:
    for word in argv:
        for path in re.findall(r"(?:^|=)((?:deploy|dashboards|docs)/[\w./*-]*\w)", word):
            assert list(ROOT.glob(path)), f"{where}: {path} is not in the repository"


def test_every_shell_command_in_the_guides_is_classified():
    found = shell_commands()
    assert len(found) > 40, found
    used = set()
    for where, argv in found:
        program = Path(argv[0]).name
        check_paths(argv, where)
        if program in PROGRAMS:
            parse_cli(argv, where)
            key = (program, argv[1])
            assert key in RUN or key in PARSED_ONLY, f"{where}: classify `{shlex.join(argv)}`"
        elif program == "docker" and argv[1] == "run":  # the command after the image
            start = next(i for i, w in enumerate(argv) if w in PROGRAMS)
            parse_cli(argv[start:], where)
            assert tuple(argv[start:start + 2]) in PARSED_ONLY, where
        elif program not in ("install.sh", "cd"):  # install.sh runs below; cd: the checkout
            assert program in NOT_RUN, f"{where}: `{shlex.join(argv)}`: run it in " \
                "tests/test_docs_commands.py or list it in NOT_RUN with the reason"
        used.add(program)
    assert set(NOT_RUN) <= used, f"NOT_RUN lists what no guide runs: {set(NOT_RUN) - used}"
    assert {k for k in PARSED_ONLY if k[0] in used} and used >= {"worker", "coordinator"}


def test_coordinator_certs_and_worker_cache_run_for_real(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "SHARDLINE_CACHE_DIR": str(tmp_path / "cache")}
    ran = set()
    for where, argv in shell_commands():
        key = (Path(argv[0]).name, argv[1] if len(argv) > 1 else "")
        if key not in RUN:
            continue
        args = parse_cli(argv, where)
        if key == ("coordinator", "certs"):
            argv = [*argv[:argv.index("--dir") + 1], str(tmp_path / "certs"),
                    *argv[argv.index("--dir") + 2:]]
        proc = subprocess.run([sys.executable, "-m", key[0], *argv[1:]], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{where}: {shlex.join(argv)}\n{proc.stderr}"
        if key == ("coordinator", "certs"):
            for host in args.hosts:
                assert (tmp_path / "certs" / f"{host}.crt").is_file(), (where, host)
        ran.add(key)
    assert ran == RUN


@pytest.fixture
def mac_home(tmp_path):
    """A home with the checkout's venv scripts and the secret, for install.sh --dry-run."""
    home = tmp_path / "home"
    venv = home / "shardline" / ".venv" / "bin"
    venv.mkdir(parents=True)
    for name in ("worker", "coordinator"):
        (venv / name).write_text("#!/bin/sh\nexit 0\n")
        (venv / name).chmod(0o755)
    (venv / "python3").symlink_to(sys.executable)
    (home / ".shardline-secret").write_text("0123456789abcdef0123456789abcdef\n")
    return home


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_install_sh_commands_render_plists_the_cli_accepts(mac_home):
    env = {**os.environ, "HOME": str(mac_home)}
    env.pop("SUDO_USER", None)
    ran = 0
    for where, argv in shell_commands():
        if Path(argv[0]).name != "install.sh":
            continue
        args = [str(mac_home) + w[1:] if w.startswith("~/") else w for w in argv[1:]]
        proc = subprocess.run(["bash", str(ROOT / argv[0]), *args, "--dry-run"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{where}: {shlex.join(argv)}\n{proc.stderr}"
        plists = re.findall(r"would install (\S+):\n(.*?</plist>)", proc.stdout, re.S)
        assert plists, proc.stdout
        for _, text in plists:
            program = plistlib.loads(text.encode())["ProgramArguments"]
            if Path(program[0]).name in PROGRAMS:
                parse_cli(program, f"{where}: the plist of {shlex.join(argv)}")
        ran += 1
    assert ran >= 3


def _lists(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _lists(value)
    elif isinstance(node, list):
        yield node
        for value in node:
            yield from _lists(value)


def test_yaml_and_env_blocks_hold_command_lines_the_cli_accepts(tmp_path):
    parsed = 0
    for path in GUIDES:
        for block in blocks(path):
            if block.lang in SHELL:
                continue
            assert block.lang in ("yaml", "ini"), f"{block.where}: classify ```{block.lang}"
            if block.lang == "ini":  # an EnvironmentFile of the systemd units
                env = dict(line.split("=", 1) for line in block.text.splitlines() if line)
                assert set(env) <= KNOWN_ENV, (block.where, set(env) - KNOWN_ENV)
                role = "worker" if "SHARDLINE_WORKER_ARGS" in env else "coordinator"
                unit = read_unit(UNITS[role])
                settings = dict(v.partition("=")[::2] for v in unit["Service"]["Environment"])
                argv = exec_start(unit, {**settings, **env})
                assert Path(argv[0]).name == role, argv
                parse_cli(argv, f"{block.where} in {UNITS[role].name}")
                parsed += 1
                continue
            for doc in yaml.safe_load_all(block.text):
                for items in _lists(doc):
                    if items and isinstance(items[0], str) and items[0] in PROGRAMS:
                        parse_cli([str(i) for i in items], block.where)
                        parsed += 1
                if isinstance(doc, dict) and "scrape_configs" in doc and shutil.which("promtool"):
                    config = tmp_path / "prometheus.yml"
                    config.write_text(block.text)
                    proc = subprocess.run(["promtool", "check", "config", str(config)],
                                          capture_output=True, text=True, timeout=60)
                    assert proc.returncode == 0, f"{block.where}: {proc.stdout}{proc.stderr}"
    assert parsed >= 4


def test_the_guides_exist_and_cover_their_ground():
    deploy, gpu = (p.read_text() for p in GUIDES)
    readme = (ROOT / "README.md").read_text()
    assert "docs/linux-gpu.md" in readme and "docs/deploy.md" in readme
    assert "(linux-gpu.md)" in deploy
    # a desk of Mac minis, from zero to Grafana, surviving a reboot
    minis = deploy[deploy.index("### A desk of Mac minis"):deploy.index("## Linux: systemd")]
    for needed in ("python3 -m venv", "openssl rand -hex 32", "install.sh --daemon",
                   "--wired-limit-mb", "coordinator", "--min-workers", "pmset -a autorestart 1",
                   "coordinator health", "docker compose -f deploy/compose.yaml up -d",
                   "localhost:3000", "restart: unless-stopped"):
        assert needed in minis, needed
    # Linux GPU nodes
    for needed in ("[cuda]", "systemctl enable --now shardline-worker", "--workers",
                   "coordinator certs", "--tls-cert", "worker health", "scrape_configs",
                   "dashboards/", "kubectl apply -k deploy/k8s/overlays/cuda", "nvidia.com/gpu"):
        assert needed in gpu, needed
