#!/usr/bin/env bash
# Make a Docker engine and an offline base image available for chatenv's Docker tests.
#
# Usage:
#   .ci/docker-engine.sh [start]   install docker.io/debootstrap if missing, start dockerd
#                                  if no engine answers, build chatenv-base:bookworm if absent
#   .ci/docker-engine.sh stop      stop the dockerd this script started (by its recorded PID)
#   .ci/docker-engine.sh status    say whether an engine answers and who started it
#
# Idempotent: every phase is skipped when its result is already there. Official base
# images cannot be pulled on the CI machines, so the base image is made locally with
# debootstrap from the Debian mirror configured for apt, with the machine's locally
# added CA certificates installed (outgoing TLS may pass through an intercepting proxy).
#
# Environment (all optional):
#   CHATENV_DOCKER_DIR          where dockerd.log and dockerd.pid go (default /tmp/chatenv-docker)
#   CHATENV_DOCKER_BASE         base image tag to build (default chatenv-base:bookworm)
#   CHATENV_DOCKER_WAIT_S       how long to wait for the engine to answer (default 60)
#   CHATENV_DEBIAN_MIRROR       override the mirror read from apt's sources
set -euo pipefail

STATE_DIR="${CHATENV_DOCKER_DIR:-/tmp/chatenv-docker}"
LOG_FILE="$STATE_DIR/dockerd.log"
PID_FILE="$STATE_DIR/dockerd.pid"
BASE_IMAGE="${CHATENV_DOCKER_BASE:-chatenv-base:bookworm}"
WAIT_S="${CHATENV_DOCKER_WAIT_S:-60}"
SUITE=bookworm

say() { printf '[docker-engine] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# phase NAME CMD...: run CMD and print how long it took.
phase() {
    local name="$1"; shift
    local t0="$EPOCHREALTIME"
    "$@"
    say "$(awk -v n="$name" -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "phase %-11s took %6.1f s", n, b - a }')"
}

# run_logged LOG CMD...: run CMD with its output in LOG; show the tail only if it fails.
run_logged() {
    local log="$1"; shift
    if ! "$@" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        return 1
    fi
}

need_root() {
    [ "$(id -u)" = 0 ] || die "$1 needs root (run with sudo)"
}

engine_answers() { docker info >/dev/null 2>&1; }

# ---------------------------------------------------------------- install
install_packages() {
    local missing=()
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    if [ "${#missing[@]}" -eq 0 ]; then
        say "docker.io and debootstrap already installed"
        return
    fi
    need_root "installing ${missing[*]}"
    say "installing ${missing[*]} with apt"
    export DEBIAN_FRONTEND=noninteractive
    # Wait for a concurrent apt/dpkg (e.g. a provisioning step) instead of failing.
    apt-get -o DPkg::Lock::Timeout=600 update -q
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
}

# ---------------------------------------------------------------- engine
pid_alive() { [ -f "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; }

start_engine() {
    if engine_answers; then
        say "a Docker engine already answers; not starting dockerd"
        return
    fi
    command -v docker >/dev/null 2>&1 || die "the docker command line is not installed"
    command -v dockerd >/dev/null 2>&1 || die "dockerd is not installed"
    need_root "starting dockerd"
    mkdir -p "$STATE_DIR"
    if ! pid_alive; then
        say "starting dockerd (log: $LOG_FILE, pid file: $PID_FILE)"
        # setsid: dockerd must not die with this script's session / CI step.
        [ -f "$LOG_FILE" ] && mv -f "$LOG_FILE" "$LOG_FILE.1"
        setsid dockerd >"$LOG_FILE" 2>&1 < /dev/null &
        echo $! > "$PID_FILE"
    else
        say "dockerd pid $(cat "$PID_FILE") is alive but not answering yet; waiting"
    fi
    local deadline=$(( $(date +%s) + WAIT_S )) delay=0.1
    until engine_answers; do
        if ! pid_alive; then
            say "dockerd exited; last lines of $LOG_FILE:"
            tail -n 30 "$LOG_FILE" >&2 || true
            rm -f "$PID_FILE"
            die "the Docker engine could not start: dockerd exited (full log: $LOG_FILE)"
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            tail -n 30 "$LOG_FILE" >&2 || true
            die "the Docker engine did not answer 'docker info' within ${WAIT_S}s (dockerd pid $(cat "$PID_FILE"), log $LOG_FILE)"
        fi
        sleep "$delay"
        delay=0.5
    done
    say "Docker engine is up (dockerd pid $(cat "$PID_FILE"))"
}

stop_engine() {
    if [ ! -f "$PID_FILE" ]; then
        say "no pid file at $PID_FILE; nothing to stop (an engine not started by this script is left alone)"
        return
    fi
    local pid
    pid="$(cat "$PID_FILE")"
    if kill -0 "$pid" 2>/dev/null; then
        say "stopping dockerd pid $pid"
        kill -TERM "$pid"
        local i
        for i in $(seq 1 150); do          # up to 15 s, dockerd stops containers first
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "dockerd pid $pid did not stop in 15 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
        fi
        say "dockerd stopped"
    else
        say "dockerd pid $pid is not running"
    fi
    rm -f "$PID_FILE"
}

# ---------------------------------------------------------------- base image
# The Debian mirror apt uses for the main archive (not -security), from
# /etc/apt/sources.list (one-line format) or sources.list.d/*.list|*.sources (deb822).
debian_mirror() {
    if [ -n "${CHATENV_DEBIAN_MIRROR:-}" ]; then
        echo "$CHATENV_DEBIAN_MIRROR"; return
    fi
    local f uri=""
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        uri=$(awk -v s="$SUITE" '
            /^[[:space:]]*deb[[:space:]]/ {
                i = 2
                if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($(i+1) == s && $i !~ /security/) { print $i; exit }
            }' "$f")
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        # deb822: stanzas separated by blank lines; want Types: deb, Suites containing
        # the suite itself, URIs not a security archive.
        uri=$(awk -v s="$SUITE" '
            function flush() {
                if (types ~ /(^|[[:space:]])deb([[:space:]]|$)/ && enabled != "no" &&
                    (" " suites " ") ~ (" " s " ") && uris !~ /security/ && uris != "") {
                    split(uris, u, /[[:space:]]+/); print u[1]; found = 1; exit
                }
                types = ""; suites = ""; uris = ""; enabled = ""
            }
            /^[[:space:]]*$/ { flush(); next }
            /^#/ { next }
            tolower($1) == "types:"   { $1 = ""; types = $0 }
            tolower($1) == "suites:"  { $1 = ""; suites = $0 }
            tolower($1) == "uris:"    { $1 = ""; sub(/^[[:space:]]+/, ""); uris = $0 }
            tolower($1) == "enabled:" { enabled = tolower($2) }
            END { if (!found) flush() }' "$f")
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
    return 1
}

build_base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        say "base image $BASE_IMAGE already exists"
        return
    fi
    need_root "debootstrap"
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap is not installed"
    local mirror rootfs
    mirror="$(debian_mirror)" || die "no Debian $SUITE mirror found in apt's sources; set CHATENV_DEBIAN_MIRROR"
    rootfs="$(mktemp -d /tmp/chatenv-rootfs.XXXXXX)"
    # shellcheck disable=SC2064
    trap "rm -rf '$rootfs'" EXIT
    say "debootstrap $SUITE from $mirror into $rootfs"
    phase debootstrap run_logged "$STATE_DIR/debootstrap.log" debootstrap --variant=minbase \
        --include=ca-certificates,python3,python3-pip "$SUITE" "$rootfs" "$mirror" \
        || die "debootstrap failed (log $STATE_DIR/debootstrap.log)"
    # Trust the same locally added CAs as this machine (TLS interception proxies).
    if compgen -G "/usr/local/share/ca-certificates/*" >/dev/null; then
        cp -a /usr/local/share/ca-certificates/. "$rootfs/usr/local/share/ca-certificates/"
    fi
    run_logged "$STATE_DIR/update-ca-certificates.log" chroot "$rootfs" update-ca-certificates \
        || die "update-ca-certificates failed in the base image"
    # PEP 668: let pip install into the image's system Python (it is a container).
    rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    # Keep the image small: drop apt's caches, docs and man pages.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
           "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
           "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old
    say "importing $rootfs as $BASE_IMAGE"
    phase import sh -c "tar -C '$rootfs' --numeric-owner -c . | docker import - '$BASE_IMAGE' >/dev/null"
    rm -rf "$rootfs"
    trap - EXIT
    say "base image $BASE_IMAGE: $(docker image inspect -f '{{.Size}}' "$BASE_IMAGE") bytes"
}

status() {
    if engine_answers; then
        say "engine answers: $(docker version -f '{{.Server.Version}}' 2>/dev/null)"
    else
        say "no Docker engine answers"
    fi
    if pid_alive; then say "dockerd started by this script: pid $(cat "$PID_FILE")"; fi
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then say "base image $BASE_IMAGE present"; fi
}

main() {
    case "${1:-start}" in
        start)
            mkdir -p "$STATE_DIR"
            phase install install_packages
            phase engine start_engine
            phase base-image build_base_image
            say "ready: build with  docker build --build-arg BASE=$BASE_IMAGE -t chatenv .  (stop later with: $0 stop)"
            ;;
        stop) stop_engine ;;
        status) status ;;
        mirror) debian_mirror ;;
        *) die "usage: $0 [start|stop|status|mirror]" ;;
    esac
}

main "$@"
