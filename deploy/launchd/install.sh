#!/bin/bash
# Install Shardline's launchd jobs on this Mac from the templates beside this script.
# Usage: deploy/launchd/install.sh [options] [worker] [coordinator]   (--help for the options)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)

usage() {
    cat <<'EOF'
usage: install.sh [options] [worker] [coordinator]

Fills in the plist templates, copies them to ~/Library/LaunchAgents and loads them with
`launchctl bootstrap gui/<uid>` (a loaded copy is booted out first). They start at every
login and restart whenever they exit; logs in ~/Library/Logs/shardline/.

  --bin DIR            the directory holding the `worker` and `coordinator` scripts
                       (default: where `worker` is on PATH, else this checkout's .venv/bin)
  --name NAME          the worker's name (default: this Mac's LocalHostName)
  --model M            the coordinator's model: a directory or a Hugging Face repo id
  --min-workers N      the coordinator plans once N workers are found (default 1)
  --secret-file F      the cluster secret, the same file on every Mac
                       (default ~/.shardline-secret; make it with `openssl rand -hex 32`)
  --no-secret          run without a cluster secret
  --api-key-file F     the coordinator's API key file (clients send it as a Bearer token)
  --worker-args "..."  more `worker serve` flags, e.g. "--memory 20GiB --cluster lab"
  --coordinator-args "..."  more `coordinator serve` flags, e.g. "--workers a.local:50061"
  --daemon             install as LaunchDaemons in /Library/LaunchDaemons instead (asks for
                       sudo): they start at boot without anyone logging in, run as you, and
                       need no Local Network permission
  --wired-limit-mb N   also install a LaunchDaemon that sets `sysctl iogpu.wired_limit_mb=N`
                       at every boot (and now); asks for sudo
  --uninstall          boot out and remove the named jobs (both kinds) instead
  --dry-run            render the plists and print what would be done, change nothing
EOF
}

roles=()
bin=""
name=""
model=""
min_workers=1
secret_file=""
no_secret=0
api_key_file=""
worker_args=""
coordinator_args=""
daemon=0
wired_mb=""
uninstall=0
dry_run=0
while [ $# -gt 0 ]; do
    case "$1" in
        worker|coordinator) roles+=("$1") ;;
        --bin) bin=$2; shift ;;
        --name) name=$2; shift ;;
        --model) model=$2; shift ;;
        --min-workers) min_workers=$2; shift ;;
        --secret-file) secret_file=$2; shift ;;
        --no-secret) no_secret=1 ;;
        --api-key-file) api_key_file=$2; shift ;;
        --worker-args) worker_args=$2; shift ;;
        --coordinator-args) coordinator_args=$2; shift ;;
        --daemon) daemon=1 ;;
        --wired-limit-mb) wired_mb=$2; shift ;;
        --uninstall) uninstall=1 ;;
        --dry-run) dry_run=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
fail() { echo "install.sh: $*" >&2; exit 2; }
[ ${#roles[@]} -gt 0 ] || [ -n "$wired_mb" ] || { usage >&2; exit 2; }

# whose jobs: yours; under sudo, those of the user who ran sudo
me=$(id -un)
user=$me
sudo=sudo
if [ "$(id -u)" = 0 ]; then
    sudo=""
    if [ -n "${SUDO_USER:-}" ]; then user=$SUDO_USER; fi
fi
uid=$(id -u "$user")

# run (or, with --dry-run, print) a command
run() {
    if [ "$dry_run" = 1 ]; then
        echo "would run: $*"
    else
        "$@"
    fi
}
as_root() {
    if [ -n "$sudo" ]; then run sudo "$@"; else run "$@"; fi
}

if [ -z "$bin" ]; then
    if command -v worker >/dev/null 2>&1; then
        bin=$(dirname "$(command -v worker)")
    elif [ -x "$here/../../.venv/bin/worker" ]; then
        bin="$here/../../.venv/bin"
    elif [ ${#roles[@]} -gt 0 ] && [ "$uninstall" = 0 ]; then
        fail "no worker script on PATH: pass --bin DIR (e.g. ~/shardline/.venv/bin)"
    fi
fi
if [ -n "$bin" ]; then
    bin=$(cd "$bin" && pwd)
fi
python=""
for candidate in "$bin/python3" "$bin/python" "$(command -v python3 || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then python=$candidate; break; fi
done
[ -n "$python" ] || fail "no python3 to render the plists with (looked in $bin and on PATH)"
if [ "$user" = "$me" ]; then
    home=$HOME
else
    home=$("$python" -c 'import pwd, sys; print(pwd.getpwnam(sys.argv[1]).pw_dir)' "$user")
fi

absolute() {  # an absolute path for $1 (~ is the user's home)
    case "$1" in
        "~"/*) echo "$home/${1#"~"/}" ;;
        /*) echo "$1" ;;
        *) echo "$PWD/$1" ;;
    esac
}

agents="$home/Library/LaunchAgents"
daemons=/Library/LaunchDaemons

# boot out a loaded job and wait until launchd has let it go (a bootstrap right after a
# bootout can fail while the old one is still stopping)
bootout() {  # domain label
    local domain=$1 label=$2 _
    if [ "$dry_run" = 1 ]; then
        echo "would boot out $domain/$label if it is loaded"
        return 0
    fi
    # the system domain needs root: ask for it only where this script installed a daemon
    if [ "$domain" = system ]; then
        [ -e "$daemons/$label.plist" ] || return 0
        launchd_as() { as_root "$@"; }
    else
        launchd_as() { "$@"; }
    fi
    if launchd_as launchctl print "$domain/$label" >/dev/null 2>&1; then
        launchd_as launchctl bootout "$domain/$label" || true
        for _ in $(seq 20); do
            launchd_as launchctl print "$domain/$label" >/dev/null 2>&1 || return 0
            sleep 0.5
        done
    fi
    return 0
}

remove() {  # label: boot out and delete both kinds of install
    local label=$1
    bootout "gui/$uid" "$label"
    [ -e "$agents/$label.plist" ] && run rm -f "$agents/$label.plist"
    bootout system "$label"
    [ -e "$daemons/$label.plist" ] && as_root rm -f "$daemons/$label.plist"
    return 0
}

if [ "$uninstall" = 1 ]; then
    for role in "${roles[@]}"; do remove "com.shardline.$role"; done
    [ -n "$wired_mb" ] && remove com.shardline.wired-limit
    exit 0
fi

# check the settings before touching anything
[ -z "$name" ] && name=$(scutil --get LocalHostName 2>/dev/null || hostname -s)
for role in "${roles[@]}"; do
    [ -x "$bin/$role" ] || fail "no $role script in $bin (pass --bin DIR)"
done
case " ${roles[*]} " in
    *" coordinator "*) [ -n "$model" ] || fail "the coordinator needs --model DIR_OR_REPO" ;;
esac
[[ "$min_workers" =~ ^[1-9][0-9]*$ ]] || fail "--min-workers: a positive number, not $min_workers"
[ -z "$wired_mb" ] || [[ "$wired_mb" =~ ^[1-9][0-9]*$ ]] \
    || fail "--wired-limit-mb: a number of MiB, not $wired_mb"
if [ "$no_secret" = 1 ]; then
    secret_file=""
else
    secret_file=$(absolute "${secret_file:-~/.shardline-secret}")
    if [ ${#roles[@]} -gt 0 ] && [ ! -r "$secret_file" ]; then
        fail "no cluster secret at $secret_file: make it once (openssl rand -hex 32 >" \
            "$secret_file; chmod 600 $secret_file) and copy the same file to every Mac," \
            "or pass --secret-file F or --no-secret"
    fi
fi
[ -z "$api_key_file" ] || api_key_file=$(absolute "$api_key_file")

rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT
render() {  # template label daemon(0|1) [extra args]: fill in $rendered/label.plist
    SL_EXTRA=${4:-} SL_BIN=$bin SL_HOME=$home SL_NAME=$name SL_MODEL=$model SL_MIN_WORKERS=$min_workers \
    SL_SECRET_FILE=$secret_file SL_WIRED_LIMIT_MB=$wired_mb SL_API_KEY_FILE=$api_key_file \
    SL_USER=$user "$python" - "$1" "$rendered/$2.plist" "$3" <<'EOF'
import os
import plistlib
import shlex
import sys

template, out, as_daemon = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
env = os.environ
values = {f"__{key}__": env[f"SL_{key}"] for key in
          ("BIN", "HOME", "NAME", "MODEL", "MIN_WORKERS", "SECRET_FILE", "WIRED_LIMIT_MB")}


def fill(value):
    if isinstance(value, str):
        for key, new in values.items():
            value = value.replace(key, new)
        return value
    if isinstance(value, list):
        return [fill(v) for v in value]
    if isinstance(value, dict):
        return {k: fill(v) for k, v in value.items()}
    return value


with open(template, "rb") as f:
    job = plistlib.load(f)
args = job["ProgramArguments"]
if "--secret-file" in args and not env["SL_SECRET_FILE"]:
    i = args.index("--secret-file")
    del args[i:i + 2]
if job["Label"] == "com.shardline.coordinator" and env["SL_API_KEY_FILE"]:
    args += ["--api-key-file", env["SL_API_KEY_FILE"]]
args += shlex.split(env["SL_EXTRA"])
job = fill(job)
if as_daemon and job["Label"] != "com.shardline.wired-limit":
    job["UserName"] = env["SL_USER"]  # a LaunchDaemon runs as root unless told
left = [key for key in values if key in plistlib.dumps(job).decode()]
if left:
    sys.exit(f"install.sh: {template} still holds {', '.join(left)}")
with open(out, "wb") as f:
    plistlib.dump(job, f)
EOF
    if command -v plutil >/dev/null 2>&1; then plutil -lint -s "$rendered/$2.plist"; fi
}

install_job() {  # label kind(agent|daemon)
    local label=$1 kind=$2 file
    if [ "$kind" = daemon ]; then
        # only one of the two kinds may run (they would share the ports)
        bootout "gui/$uid" "$label"
        [ -e "$agents/$label.plist" ] && run rm -f "$agents/$label.plist"
        bootout system "$label"
        file="$daemons/$label.plist"
        as_root install -m 644 -o root -g wheel "$rendered/$label.plist" "$file"
        as_root launchctl enable "system/$label"
        as_root launchctl bootstrap system "$file"
    else
        bootout system "$label"
        [ -e "$daemons/$label.plist" ] && as_root rm -f "$daemons/$label.plist"
        bootout "gui/$uid" "$label"
        file="$agents/$label.plist"
        run mkdir -p "$agents"
        run install -m 644 "$rendered/$label.plist" "$file"
        run launchctl enable "gui/$uid/$label"
        run launchctl bootstrap "gui/$uid" "$file"
    fi
    if [ "$dry_run" = 1 ]; then
        echo "would install $file:"
        cat "$rendered/$label.plist"
    else
        echo "installed and loaded $label ($file)"
    fi
}

kind=agent
[ "$daemon" = 1 ] && kind=daemon
for role in "${roles[@]}"; do
    extra=$worker_args
    [ "$role" = coordinator ] && extra=$coordinator_args
    render "$here/com.shardline.$role.plist" "com.shardline.$role" "$daemon" "$extra"
done
if [ -n "$wired_mb" ]; then
    render "$here/com.shardline.wired-limit.plist" com.shardline.wired-limit 1
fi
if [ ${#roles[@]} -gt 0 ]; then
    # launchd opens the log files but does not make their folder; the cache dir is the user's
    if [ -n "$sudo" ]; then
        run mkdir -p "$home/Library/Logs/shardline" "$home/Library/Caches/shardline"
    else
        run install -d -o "$user" "$home/Library/Logs/shardline" "$home/Library/Caches/shardline"
    fi
fi
if [ -n "$wired_mb" ]; then
    install_job com.shardline.wired-limit daemon
fi
for role in "${roles[@]}"; do
    install_job "com.shardline.$role" "$kind"
done
if [ ${#roles[@]} -gt 0 ] && [ "$kind" = agent ] && [ "$dry_run" = 0 ]; then
    echo "logs: $home/Library/Logs/shardline/. macOS may now ask whether python may find" \
        "devices on your local network: allow it, or mDNS finds nothing (docs/deploy.md)"
fi
