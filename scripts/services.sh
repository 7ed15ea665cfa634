#!/usr/bin/env bash
# Starts the servers the payload-store conformance suite runs against, each on
# a free loopback port: Redis (Debian's redis-server), a private PostgreSQL
# cluster in a temporary directory, and the moto S3-compatible server (PyPI);
# Ruby's Active Support (Debian's ruby-activesupport, no server), which the
# tests of the PatientHttp gem's encryption format run; and a Python venv with
# standardwebhooks (PyPI), which the Python example's test runs,
# schemathesis (PyPI), which the daemon's OpenAPI fuzz test runs, and the
# official openai SDK (PyPI), which the gateway's tests run; Sidekiq
# (Debian's ruby-sidekiq, no server of its own), which the Ruby example's
# test runs against the Redis above; and Chromium (Debian's chromium), the
# real browser the dashboard's test drives headless (with chromium-driver).
# Missing software is installed first; install output goes to log files.
# `bench-tools` installs what the gateway benchmark compares against and loads
# with (Debian's nginx and wrk); `start` does not, the tests need neither.
#
#   eval "$(scripts/services.sh start)"   # start (or reuse) them; prints `export` lines
#   eval "$(scripts/services.sh bench-tools)"  # install nginx and wrk; prints their `export` lines
#   scripts/services.sh env                # print the `export` lines of running services
#   scripts/services.sh status             # say what is running
#   scripts/services.sh stop               # stop everything `start` started
#   scripts/services.sh stop redis moto    # stop some of them (redis, postgres, moto)
#
# Only `export PATIENT_TEST_...=...` (and `PATIENT_BENCH_...`) lines go to
# stdout; progress goes to stderr.
# State (PIDs, data directories, logs) lives in $PATIENT_SERVICES_DIR
# (default: target/services in the repository).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${PATIENT_SERVICES_DIR:-$ROOT/target/services}"
PG_DATABASE="patient_test"

say() { printf 'services: %s\n' "$*" >&2; }
die() {
  say "error: $*"
  exit 1
}
now_ms() { date +%s%3N; }

# Runs a command as root (directly, or through sudo when not root).
as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo -n "$@"
  else
    die "need root to run: $*"
  fi
}

# A free TCP port on 127.0.0.1.
free_port() {
  if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
    return
  fi
  local port
  for _ in $(seq 1 200); do
    port=$((20000 + RANDOM % 12000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
  die "no free port found"
}

# Waits until something accepts connections on 127.0.0.1:$1 (up to $2 seconds).
wait_port() {
  local port=$1 seconds=${2:-30} i
  for ((i = 0; i < seconds * 10; i++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  return 1
}

# Whether the process $1 is alive and its command line mentions $2.
alive() {
  local pid=$1 name=$2
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$name"
}

APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install $* yourself"
  local log="$STATE/install.log"
  say "installing $* (log: $log)"
  export DEBIAN_FRONTEND=noninteractive
  if ! as_root apt-get install -y --no-install-recommends "$@" >>"$log" 2>&1; then
    if [ "$APT_UPDATED" -eq 0 ]; then
      APT_UPDATED=1
      as_root apt-get update >>"$log" 2>&1 || die "apt-get update failed (see $log)"
      as_root apt-get install -y --no-install-recommends "$@" >>"$log" 2>&1 ||
        die "apt-get install $* failed (see $log)"
    else
      die "apt-get install $* failed (see $log)"
    fi
  fi
}

# --- Redis -----------------------------------------------------------------

redis_running() {
  [ -f "$STATE/redis.port" ] && alive "$(cat "$STATE/redis.pid" 2>/dev/null || true)" redis-server
}

start_redis() {
  if redis_running; then
    say "redis already running on port $(cat "$STATE/redis.port")"
    return
  fi
  if ! command -v redis-server >/dev/null 2>&1; then
    apt_install redis-server
    # The package may start a system-wide server; this script does not use it.
  fi
  local port dir="$STATE/redis"
  port=$(free_port)
  mkdir -p "$dir"
  rm -f "$STATE/redis.pid"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$dir" --logfile "$STATE/redis.log" --pidfile "$STATE/redis.pid" \
    --daemonize yes </dev/null >>"$STATE/redis.log" 2>&1 || die "redis-server failed (see $STATE/redis.log)"
  wait_port "$port" 30 || die "redis did not start (see $STATE/redis.log)"
  local i
  for ((i = 0; i < 50; i++)); do
    [ -s "$STATE/redis.pid" ] && break
    sleep 0.1
  done
  echo "$port" >"$STATE/redis.port"
  say "redis on 127.0.0.1:$port"
}

stop_redis() {
  local pid
  pid=$(cat "$STATE/redis.pid" 2>/dev/null || true)
  if alive "$pid" redis-server; then
    kill "$pid" 2>/dev/null || true
    wait_gone "$pid"
    say "redis stopped"
  fi
  rm -rf "$STATE/redis.pid" "$STATE/redis.port" "$STATE/redis"
}

# --- PostgreSQL ------------------------------------------------------------

pg_bindir() {
  local initdb
  initdb=$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$initdb" ] && command -v initdb >/dev/null 2>&1; then
    initdb=$(command -v initdb)
  fi
  [ -n "$initdb" ] && dirname "$initdb"
}

# Runs a PostgreSQL command as the cluster's (non-root) owner.
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u "$PG_USER" -- "$@"
  else
    "$@"
  fi
}

pg_running() {
  [ -f "$STATE/postgres.port" ] && [ -f "$STATE/postgres.dir" ] &&
    alive "$(head -n 1 "$(cat "$STATE/postgres.dir")/data/postmaster.pid" 2>/dev/null || true)" postgres
}

start_postgres() {
  if pg_running; then
    say "postgresql already running on port $(cat "$STATE/postgres.port")"
    return
  fi
  local bin
  bin=$(pg_bindir || true)
  if [ -z "$bin" ]; then
    apt_install postgresql
    bin=$(pg_bindir || true)
    [ -n "$bin" ] || die "initdb not found after installing postgresql"
  fi
  PG_USER=$(id -un)
  if [ "$(id -u)" -eq 0 ]; then
    # PostgreSQL refuses to run as root.
    PG_USER=postgres
    id "$PG_USER" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$PG_USER"
  fi
  local port dir log
  port=$(free_port)
  # Under /tmp so that the non-root owner can reach it whatever the repository's permissions.
  dir=$(mktemp -d /tmp/patient-pg.XXXXXX)
  chmod 700 "$dir"
  [ "$(id -u)" -eq 0 ] && chown "$PG_USER" "$dir"
  echo "$dir" >"$STATE/postgres.dir"
  echo "$PG_USER" >"$STATE/postgres.user"
  log="$STATE/postgres.log"
  as_pg "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-sync >>"$log" 2>&1 ||
    die "initdb failed (see $log)"
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
    </dev/null >>"$log" 2>&1 || die "postgresql did not start (see $log and $dir/server.log)"
  as_pg "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres "$PG_DATABASE" >>"$log" 2>&1 ||
    die "createdb failed (see $log)"
  echo "$port" >"$STATE/postgres.port"
  say "postgresql on 127.0.0.1:$port (data in $dir)"
}

stop_postgres() {
  [ -f "$STATE/postgres.dir" ] || return 0
  local dir bin
  dir=$(cat "$STATE/postgres.dir")
  PG_USER=$(cat "$STATE/postgres.user" 2>/dev/null || id -un)
  bin=$(pg_bindir || true)
  if [ -n "$bin" ] && [ -f "$dir/data/postmaster.pid" ]; then
    as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >>"$STATE/postgres.log" 2>&1 || true
    say "postgresql stopped"
  fi
  case "$dir" in
    */patient-pg.*) rm -rf "$dir" ;;
  esac
  rm -f "$STATE/postgres.dir" "$STATE/postgres.user" "$STATE/postgres.port"
}

# --- moto (S3) -------------------------------------------------------------

# The moto S3 server, serving one request at a time: moto's S3 backend races
# when several requests write one key at once (500 "I/O operation on closed
# file"), which real S3 does not.
MOTO_SERVER='
import os, sys
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
host, port = sys.argv[1], int(sys.argv[2])
os.environ.setdefault("MOTO_PORT", str(port))
run_simple(host, port, DomainDispatcherApplication(create_backend_app), threaded=False)
'

# Sets MOTO_PY to a Python that has moto's server installed.
MOTO_PY=""
find_moto() {
  local venv="${XDG_CACHE_HOME:-$HOME/.cache}/patient-services/moto-venv" py
  for py in "$venv/bin/python" "$(command -v python3 || true)"; do
    if [ -x "$py" ] && "$py" -c 'import moto.moto_server.werkzeug_app, flask, werkzeug' >/dev/null 2>&1; then
      MOTO_PY=$py
      return 0
    fi
  done
  return 1
}

install_moto() {
  local venv="${XDG_CACHE_HOME:-$HOME/.cache}/patient-services/moto-venv"
  local log="$STATE/install.log"
  command -v python3 >/dev/null 2>&1 || apt_install python3
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install python3-venv python3-pip
  fi
  say "installing moto[server] into $venv (log: $log)"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv" >>"$log" 2>&1 || die "python3 -m venv failed (see $log)"
  "$venv/bin/pip" install --quiet "moto[server]" >>"$log" 2>&1 || die "pip install moto[server] failed (see $log)"
}

moto_running() {
  [ -f "$STATE/moto.port" ] && alive "$(cat "$STATE/moto.pid" 2>/dev/null || true)" moto_server
}

start_moto() {
  if moto_running; then
    say "moto already running on port $(cat "$STATE/moto.port")"
    return
  fi
  find_moto || {
    install_moto
    find_moto || die "moto's server not importable after installing it (see $STATE/install.log)"
  }
  local port
  port=$(free_port)
  # setsid: the server outlives this script and ignores the terminal's signals.
  setsid "$MOTO_PY" -c "$MOTO_SERVER" 127.0.0.1 "$port" </dev/null >>"$STATE/moto.log" 2>&1 &
  echo $! >"$STATE/moto.pid"
  wait_port "$port" 60 || die "moto did not start (see $STATE/moto.log)"
  # Answers S3 requests once its routes are loaded.
  local i
  for ((i = 0; i < 300; i++)); do
    if command -v curl >/dev/null 2>&1; then
      curl -fsS -o /dev/null "http://127.0.0.1:$port/" 2>/dev/null && break
    else
      break
    fi
    sleep 0.1
  done
  echo "$port" >"$STATE/moto.port"
  say "moto S3 on 127.0.0.1:$port"
}

stop_moto() {
  local pid
  pid=$(cat "$STATE/moto.pid" 2>/dev/null || true)
  if alive "$pid" moto_server; then
    kill "$pid" 2>/dev/null || true
    wait_gone "$pid"
    say "moto stopped"
  fi
  rm -f "$STATE/moto.pid" "$STATE/moto.port"
}

# Waits up to 10 s for process $1 to exit, then kills it.
wait_gone() {
  local pid=$1 i
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
}

# --- Active Support (Ruby) ---------------------------------------------------
# Not a server: the library the encryption-format tests run with `ruby -e`.

activesupport_installed() {
  command -v ruby >/dev/null 2>&1 &&
    ruby -e 'require "active_support"; require "active_support/message_encryptor"' >/dev/null 2>&1
}

ensure_activesupport() {
  if activesupport_installed; then
    say "ruby-activesupport already installed"
    return
  fi
  apt_install ruby-activesupport
  activesupport_installed || die "Active Support does not load after installing ruby-activesupport (see $STATE/install.log)"
  say "ruby-activesupport installed"
}

# --- Python packages the tests use ------------------------------------------
# A venv with `standardwebhooks` (the reference webhook verifier of the
# Python example), `schemathesis` (drives the daemon's OpenAPI document) and
# `openai` (the official SDK, pointed at the gateway with `base_url`); no
# server.
TOOLS_VENV="${XDG_CACHE_HOME:-$HOME/.cache}/patient-services/tools-venv"
SCHEMATHESIS_VERSION="4.32.5"
OPENAI_VERSION="3.57.0"

# The installed version of the Python distribution $1, empty when missing.
tool_version() {
  "$TOOLS_VENV/bin/python" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1" 2>/dev/null || true
}

tools_installed() {
  [ -x "$TOOLS_VENV/bin/python" ] && "$TOOLS_VENV/bin/python" -c 'import standardwebhooks, openai' >/dev/null 2>&1 &&
    [ -x "$TOOLS_VENV/bin/schemathesis" ] &&
    [ "$(tool_version schemathesis)" = "$SCHEMATHESIS_VERSION" ] &&
    [ "$(tool_version openai)" = "$OPENAI_VERSION" ]
}

ensure_python_tools() {
  if tools_installed; then
    say "python tools already installed"
    return
  fi
  local log="$STATE/install.log"
  command -v python3 >/dev/null 2>&1 || apt_install python3
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install python3-venv python3-pip
  fi
  say "installing standardwebhooks, schemathesis $SCHEMATHESIS_VERSION and openai $OPENAI_VERSION into $TOOLS_VENV (log: $log)"
  mkdir -p "$(dirname "$TOOLS_VENV")"
  [ -x "$TOOLS_VENV/bin/pip" ] || python3 -m venv "$TOOLS_VENV" >>"$log" 2>&1 || die "python3 -m venv failed (see $log)"
  "$TOOLS_VENV/bin/pip" install --quiet standardwebhooks "schemathesis==$SCHEMATHESIS_VERSION" \
    "openai==$OPENAI_VERSION" >>"$log" 2>&1 ||
    die "pip install standardwebhooks schemathesis openai failed (see $log)"
  tools_installed || die "standardwebhooks, schemathesis or openai missing after installing them (see $log)"
}

# --- Chromium (Debian's chromium, chromium-driver) for the dashboard's test -
# The test drives headless Chromium through chromedriver (WebDriver).
CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver

chromium_installed() {
  [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]
}

ensure_chromium() {
  if chromium_installed; then
    say "chromium already installed"
    return
  fi
  apt_install chromium chromium-driver
  chromium_installed || die "$CHROMIUM or $CHROMEDRIVER missing after installing chromium (see $STATE/install.log)"
}

# --- Sidekiq (Debian's ruby-sidekiq) for the Ruby example's test ------------
sidekiq_installed() {
  command -v sidekiq >/dev/null 2>&1 && ruby -e 'require "sidekiq"' >/dev/null 2>&1
}

ensure_sidekiq() {
  if sidekiq_installed; then
    say "ruby-sidekiq already installed"
    return
  fi
  apt_install ruby-sidekiq
  sidekiq_installed || die "Sidekiq does not load after installing ruby-sidekiq (see $STATE/install.log)"
}

# --- Benchmark tools (Debian's nginx and wrk) for the gateway benchmark -----
# Not installed by `start`: only `patient-bench --bin gateway` uses them. The
# nginx binary is run with a generated config of its own; the package's
# system-wide server, if the package starts one, is not used.

# The nginx binary, empty when missing.
nginx_bin() {
  local bin
  for bin in "$(command -v nginx || true)" /usr/sbin/nginx; do
    if [ -n "$bin" ] && [ -x "$bin" ]; then
      echo "$bin"
      return
    fi
  done
}

# The wrk binary, empty when missing.
wrk_bin() {
  command -v wrk || true
}

# Installs the first nginx package the archive has, then wrk.
ensure_bench_tools() {
  if [ -n "$(nginx_bin)" ]; then
    say "nginx already installed: $(nginx_bin)"
  else
    local pkg candidate chosen=""
    for pkg in nginx-light nginx-core nginx; do
      candidate=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
      if [ -n "$candidate" ] && [ "$candidate" != "(none)" ]; then
        chosen=$pkg
        break
      fi
    done
    [ -n "$chosen" ] || chosen=nginx
    apt_install "$chosen"
    [ -n "$(nginx_bin)" ] || die "nginx missing after installing $chosen (see $STATE/install.log)"
  fi
  if [ -n "$(wrk_bin)" ]; then
    say "wrk already installed: $(wrk_bin)"
  else
    apt_install wrk
    [ -n "$(wrk_bin)" ] || die "wrk missing after installing it (see $STATE/install.log)"
  fi
}

print_bench_env() {
  local bin
  bin=$(nginx_bin)
  [ -z "$bin" ] || echo "export PATIENT_BENCH_NGINX=$bin"
  bin=$(wrk_bin)
  [ -z "$bin" ] || echo "export PATIENT_BENCH_WRK=$bin"
}

cmd_bench_tools() {
  mkdir -p "$STATE"
  local t0
  t0=$(now_ms)
  ensure_bench_tools
  say "benchmark tools ready in $(($(now_ms) - t0)) ms"
  print_bench_env
}

# --- Commands --------------------------------------------------------------

print_env() {
  if redis_running; then
    echo "export PATIENT_TEST_REDIS_URL=redis://127.0.0.1:$(cat "$STATE/redis.port")/"
  fi
  if pg_running; then
    echo "export PATIENT_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:$(cat "$STATE/postgres.port")/$PG_DATABASE"
  fi
  if moto_running; then
    echo "export PATIENT_TEST_S3_ENDPOINT=http://127.0.0.1:$(cat "$STATE/moto.port")"
  fi
  if tools_installed; then
    echo "export PATIENT_TEST_PYTHON=$TOOLS_VENV/bin/python"
    echo "export PATIENT_TEST_SCHEMATHESIS=$TOOLS_VENV/bin/schemathesis"
  fi
  if chromium_installed; then
    echo "export PATIENT_TEST_CHROMIUM=$CHROMIUM"
    echo "export PATIENT_TEST_CHROMEDRIVER=$CHROMEDRIVER"
  fi
  if sidekiq_installed; then
    echo "export PATIENT_TEST_SIDEKIQ=$(command -v sidekiq)"
  fi
  print_bench_env
}

cmd_start() {
  mkdir -p "$STATE"
  local t0 t
  t0=$(now_ms)
  t=$t0
  start_redis
  say "redis ready in $(($(now_ms) - t)) ms"
  t=$(now_ms)
  start_postgres
  say "postgresql ready in $(($(now_ms) - t)) ms"
  t=$(now_ms)
  start_moto
  say "moto ready in $(($(now_ms) - t)) ms"
  t=$(now_ms)
  ensure_activesupport
  say "active support ready in $(($(now_ms) - t)) ms"
  t=$(now_ms)
  ensure_python_tools
  say "python tools ready in $(($(now_ms) - t)) ms"
  t=$(now_ms)
  ensure_sidekiq
  say "sidekiq ready in $(($(now_ms) - t)) ms"
  t=$(now_ms)
  ensure_chromium
  say "chromium ready in $(($(now_ms) - t)) ms"
  say "all services ready in $(($(now_ms) - t0)) ms"
  print_env
}

cmd_stop() {
  [ -d "$STATE" ] || return 0
  local which=("$@")
  [ ${#which[@]} -gt 0 ] || which=(moto postgres redis)
  local service
  for service in "${which[@]}"; do
    case "$service" in
      moto) stop_moto ;;
      postgres) stop_postgres ;;
      redis) stop_redis ;;
      *) die "unknown service $service (redis, postgres, moto)" ;;
    esac
  done
}

cmd_status() {
  redis_running && say "redis: running on port $(cat "$STATE/redis.port")" || say "redis: stopped"
  pg_running && say "postgresql: running on port $(cat "$STATE/postgres.port")" || say "postgresql: stopped"
  moto_running && say "moto: running on port $(cat "$STATE/moto.port")" || say "moto: stopped"
  activesupport_installed && say "active support: installed" || say "active support: not installed"
  tools_installed && say "python tools: installed" || say "python tools: not installed"
  sidekiq_installed && say "sidekiq: installed" || say "sidekiq: not installed"
  chromium_installed && say "chromium: installed" || say "chromium: not installed"
  [ -n "$(nginx_bin)" ] && say "nginx: $(nginx_bin)" || say "nginx: not installed"
  [ -n "$(wrk_bin)" ] && say "wrk: $(wrk_bin)" || say "wrk: not installed"
}

case "${1:-}" in
  start) cmd_start ;;
  stop)
    shift
    cmd_stop "$@"
    ;;
  env) print_env ;;
  status) cmd_status ;;
  bench-tools) cmd_bench_tools ;;
  *)
    echo "usage: $0 start | stop [redis|postgres|moto ...] | env | status | bench-tools" >&2
    exit 2
    ;;
esac
