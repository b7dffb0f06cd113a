#!/usr/bin/env bash
# dev-db.sh — a throwaway local PostgreSQL for agentapp development and tests.
#
#   ./dev-db.sh start    start (initdb first if needed); prints the DATABASE_URL
#   ./dev-db.sh url      print the DATABASE_URL if running (exit 1 if not)
#   ./dev-db.sh stop     stop the cluster (fast shutdown) if running
#   ./dev-db.sh destroy  stop and delete the data directory
#
# Only the URL is printed on stdout; everything else goes to stderr, so
# `DATABASE_URL=$(./dev-db.sh start)` works.
#
# Data directory: $AGENTAPP_PGDATA, else <repo>/.devdb. initdb/postgres/pg_ctl
# refuse to run as root, so when run as root they run as the OS user
# `postgres`, which then owns the data directory (mode 0700). That user must be
# able to traverse every directory above it (for the data files and for the
# unix socket, which lives in the data dir). If <repo> is not reachable by
# `postgres` (e.g. a repo under a 0700 home directory), or the repo is not
# writable, or the socket path would be too long, the default falls back to
# /tmp/agentapp-devdb-<uid>-<hash of repo path>. An explicit AGENTAPP_PGDATA is
# never relocated; the script fails with a hint instead.
#
# The cluster listens on 127.0.0.1 only, with trust auth (no password): it is
# for local development, never for anything that holds real data.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
DB_NAME=agentapp
PORT_MIN=55500
PORT_MAX=55999

log() { printf 'dev-db: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

IS_ROOT=false
[ "$(id -u)" -eq 0 ] && IS_ROOT=true

# as_pg CMD...: run a PostgreSQL server binary as the right user, from a
# directory that user can always read (avoids "could not change directory").
# fd 9 (our lock) is closed so a started server does not hold the lock forever.
as_pg() {
	if $IS_ROOT; then
		(cd / && runuser -u postgres -- "$@") 9>&-
	else
		"$@" 9>&-
	fi
}

# ---------------------------------------------------------------- binaries ---

find_pg_bin() {
	local d
	d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
	if [ -n "$d" ] && [ -x "$d/initdb" ]; then
		printf '%s\n' "$d"
	elif command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
		dirname "$(command -v initdb)" # e.g. Homebrew, or PATH set up by hand
	fi
}

PG_BIN=$(find_pg_bin)
if [ -z "$PG_BIN" ]; then
	command -v apt-get >/dev/null 2>&1 || die "PostgreSQL not found (no /usr/lib/postgresql/*/bin, no initdb on PATH); install it"
	$IS_ROOT || die "PostgreSQL not found; install it first: sudo apt-get install -y postgresql"
	log "PostgreSQL not found; installing Debian's postgresql package"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update >&2 </dev/null
	apt-get install -y postgresql >&2 </dev/null
	PG_BIN=$(find_pg_bin)
	[ -n "$PG_BIN" ] || die "postgresql installed but no initdb found"
fi
PSQL="$PG_BIN/psql"
[ -x "$PSQL" ] || PSQL=$(command -v psql) || die "psql not found"

if $IS_ROOT; then
	id -u postgres >/dev/null 2>&1 || die "running as root needs an OS user 'postgres' to run the server as"
fi

# ---------------------------------------------------------- data directory ---

# usable_parent DIR: can the server user create and use a data dir inside DIR?
usable_parent() {
	local parent=$1
	[ -d "$parent" ] && [ -w "$parent" ] || return 1
	# unix socket path ("DIR/.devdb/.s.PGSQL.NNNNN") must fit in sun_path (108).
	[ $(( ${#parent} + 24 )) -lt 108 ] || return 1
	if $IS_ROOT; then
		# access(2) as postgres checks search permission on every ancestor.
		(cd / && runuser -u postgres -- test -x "$parent") || return 1
	fi
}

if [ -n "${AGENTAPP_PGDATA:-}" ]; then
	DATA=$(realpath -m -- "$AGENTAPP_PGDATA")
	EXPLICIT=true
else
	EXPLICIT=false
	fallback="/tmp/agentapp-devdb-$(id -u)-$(printf %s "$ROOT" | sha256sum | cut -c1-12)"
	if [ -e "$ROOT/.devdb/PG_VERSION" ]; then
		DATA="$ROOT/.devdb"
	elif [ -e "$fallback/PG_VERSION" ]; then
		DATA=$fallback
	elif usable_parent "$ROOT"; then
		DATA="$ROOT/.devdb"
	else
		DATA=$fallback
	fi
fi

case "$DATA" in
/ | /var/lib/postgresql | /var/lib/postgresql/* | /etc/postgresql/*)
	die "refusing to use $DATA: looks like a system cluster location" ;;
*[[:space:]\'\"\\,\$\`]*)
	die "data directory path must not contain spaces, quotes, commas, \\ or \$: $DATA" ;;
esac
[ $(( ${#DATA} + 18 )) -lt 108 ] || die "data directory path too long for the unix socket (max ~89 chars): $DATA"

URL_FMT="postgres://postgres@127.0.0.1:%s/${DB_NAME}?sslmode=disable&connect_timeout=5"

# running: 0 if the cluster in $DATA is up.
running() {
	[ -f "$DATA/PG_VERSION" ] || return 1
	local rc=0
	as_pg "$PG_BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1 || rc=$?
	[ "$rc" -eq 0 ]
}

# live_port: the port of the running server (line 4 of postmaster.pid).
live_port() {
	local p
	p=$(sed -n 4p "$DATA/postmaster.pid" 2>/dev/null || true)
	[[ "$p" =~ ^[0-9]+$ ]] || p=$(cat "$DATA/port" 2>/dev/null || true)
	[[ "$p" =~ ^[0-9]+$ ]] || die "cluster in $DATA is running but its port is unknown"
	printf '%s\n' "$p"
}

port_in_use() {
	local p=$1
	if command -v ss >/dev/null 2>&1 && [ -n "$(ss -Hltn "sport = :$p" 2>/dev/null)" ]; then
		return 0
	fi
	timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$p" 2>/dev/null
}

# free_port FROM: first free port >= FROM in our range.
free_port() {
	local p
	for ((p = $1; p <= PORT_MAX; p++)); do
		port_in_use "$p" || { printf '%s\n' "$p"; return 0; }
	done
	die "no free TCP port in $PORT_MIN-$PORT_MAX on 127.0.0.1"
}

psql_admin() { # psql_admin PORT ARGS...
	local port=$1
	shift
	"$PSQL" -X -q -v ON_ERROR_STOP=1 \
		"host=127.0.0.1 port=$port user=postgres dbname=postgres sslmode=disable connect_timeout=5" "$@"
}

ensure_database() {
	local port=$1
	if [ "$(psql_admin "$port" -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")" != 1 ]; then
		log "creating database $DB_NAME"
		psql_admin "$port" -c "CREATE DATABASE $DB_NAME" >&2
	fi
}

init_cluster() {
	if [ -e "$DATA" ] && [ -n "$(ls -A "$DATA" 2>/dev/null)" ]; then
		die "$DATA exists, is not empty and is not a PostgreSQL data directory"
	fi
	if ! $EXPLICIT && [ "$DATA" != "$ROOT/.devdb" ]; then
		log "note: repo dir not usable for the data dir; using $DATA"
	fi
	if [ -e "$DATA" ] && [ ! -O "$DATA" ] && ! $IS_ROOT; then
		die "$DATA is owned by someone else"
	fi
	if [ -L "$DATA" ]; then die "$DATA is a symlink"; fi
	mkdir -p "$DATA"
	if $IS_ROOT; then
		chown postgres:postgres "$DATA"
		as_pg test -w "$DATA" ||
			die "user postgres cannot reach $DATA (a parent directory is not traversable, e.g. mktemp -d is 0700: chmod 755 it)"
	fi
	chmod 0700 "$DATA"
	log "initdb $DATA (PostgreSQL binaries in $PG_BIN)"
	# initdb's output (its trust warning, how to start a server) is advice for someone
	# setting a server up by hand: shown only if it fails.
	local out
	out=$(mktemp)
	if ! as_pg "$PG_BIN/initdb" -D "$DATA" -U postgres --auth=trust -E UTF8 --locale=C >"$out" 2>&1; then
		cat "$out" >&2
		rm -f "$out"
		die "initdb failed"
	fi
	rm -f "$out"
}

start_cluster() {
	local port attempt prev=""
	# Prefer the port used last time so the URL stays stable across restarts.
	prev=$(cat "$DATA/port" 2>/dev/null || true)
	if [[ "$prev" =~ ^[0-9]+$ ]] && ! port_in_use "$prev"; then
		port=$prev
	else
		port=$(free_port "$PORT_MIN")
	fi
	for attempt in 1 2 3 4 5; do
		log "starting PostgreSQL on 127.0.0.1:$port (data $DATA, log $DATA/server.log)"
		if as_pg "$PG_BIN/pg_ctl" -D "$DATA" -s -w -t 60 -l "$DATA/server.log" \
			-o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$DATA -c max_connections=300 -c fsync=on" \
			start >&2; then
			printf '%s\n' "$port" >"$DATA/port"
			return 0
		fi
		# Lost a race for the port? Try the next one; otherwise give up.
		if tail -n 20 "$DATA/server.log" 2>/dev/null | grep -q 'could not bind\|Address already in use'; then
			port=$(free_port $((port + 1)))
			continue
		fi
		break
	done
	log "PostgreSQL failed to start; last lines of $DATA/server.log:"
	tail -n 30 "$DATA/server.log" >&2 2>/dev/null || true
	exit 1
}

stop_cluster() {
	if running; then
		log "stopping PostgreSQL in $DATA"
		as_pg "$PG_BIN/pg_ctl" -D "$DATA" stop -s -m fast -w -t 60 >&2
	else
		log "not running ($DATA)"
	fi
}

# Serialise concurrent invocations (e.g. `make run` and `make test` at once).
# The lock file sits next to the data dir ($DATA.lock, e.g. <repo>/.devdb.lock).
lock() {
	command -v flock >/dev/null 2>&1 || return 0
	local parent f="$DATA.lock"
	parent=$(dirname "$DATA")
	if [ ! -d "$parent" ]; then
		[ "$cmd" = start ] || return 0 # nothing to stop or destroy
		mkdir -p "$parent"
	fi
	[ -w "$parent" ] || [ -w "$f" ] || return 0
	exec 9>>"$f"
	flock -w 120 9 || die "timed out waiting for lock $f"
}

cmd=${1:-}
case "$cmd" in
start)
	lock
	if ! running; then
		[ -f "$DATA/PG_VERSION" ] || init_cluster
		start_cluster
	fi
	port=$(live_port)
	ensure_database "$port" # also repairs a start that was interrupted earlier
	printf "$URL_FMT\n" "$port"
	;;
url)
	running || { log "not running ($DATA); use: $0 start"; exit 1; }
	printf "$URL_FMT\n" "$(live_port)"
	;;
stop)
	lock
	stop_cluster
	;;
destroy)
	lock
	stop_cluster
	if [ -e "$DATA" ]; then
		if [ -f "$DATA/PG_VERSION" ] || [ -z "$(ls -A "$DATA")" ]; then
			log "removing $DATA"
			rm -rf -- "$DATA"
		else
			die "$DATA does not look like a PostgreSQL data directory; not removing it"
		fi
	fi
	;;
*)
	sed -n '2,7s/^# \{0,1\}//p' "$0" >&2
	exit 2
	;;
esac
