#!/usr/bin/env bash
# A multi-node Ray cluster on this machine, to try the cluster path of relay_ray without a cloud:
# one head node and N extra worker nodes, all on 127.0.0.1, with token authentication on and the
# dashboard (the job-submission API) bound to 127.0.0.1 only.
#
#   cluster/local.sh up [--workers N] [--cpus-per-node C]   start (or report the running one)
#   cluster/local.sh down                                  stop what `up` started, by PID
#   cluster/local.sh status                                show the nodes
#
# Everything lives in one state directory (default /tmp/relay-ray-local-$UID, or
# $RELAY_RAY_LOCAL_STATE): the auth token, Ray's temp dir and logs, the PIDs of the
# `ray start --block` processes, and `env`, a file to source for `ray job submit`.
# `down` stops only those PIDs and what runs under this cluster's temp dir; it never runs
# `ray stop`, which would kill every Ray process on the machine.
set -euo pipefail

STATE=${RELAY_RAY_LOCAL_STATE:-/tmp/relay-ray-local-$(id -u)}
RAY_TMP="$STATE/ray"          # Ray's --temp-dir (keep it short: it holds unix sockets)
PROG="cluster/local.sh"

die() { echo "$PROG: error: $*" >&2; exit 2; }
say() { echo "$PROG: $*"; }

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
}

find_ray() {
    RAY=${RAY:-$(command -v ray || true)}
    [[ -n "$RAY" && -x "$RAY" ]] || die "'ray' not found on PATH; activate the venv (source .venv/bin/activate) or set RAY=/path/to/ray"
    BIN=$(cd "$(dirname "$RAY")" && pwd)
    PY="$BIN/python"; [[ -x "$PY" ]] || PY=$(command -v python3)
}

alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

# Processes of this cluster: the recorded PIDs, everything whose command line names this
# cluster's temp dir, the client server (it names the head's port instead), and their children.
cluster_pids() {
    local roots=() pid ppid state cmd
    local gcs_port; gcs_port=$(cat "$STATE/gcs_port" 2>/dev/null || echo none)
    declare -A parent=()
    while read -r pid ppid state cmd; do
        [[ "$pid" == "$$" || "$state" == Z* ]] && continue     # not this script; a zombie is already dead
        parent[$pid]=$ppid
        case "$cmd" in
            *"$RAY_TMP"*) roots+=("$pid") ;;
            *ray.util.client.server*"--address="*":$gcs_port "*) roots+=("$pid") ;;
        esac
    done < <(ps -ewwo pid=,ppid=,stat=,args=)
    if [[ -f "$STATE/pids" ]]; then       # the recorded `ray start --block` PIDs, if still running
        while read -r _ pid; do [[ -n "${parent[$pid]:-}" ]] && roots+=("$pid"); done < "$STATE/pids"
    fi
    declare -A ours=()
    for pid in "${roots[@]}"; do ours[$pid]=1; done
    local changed=1
    while (( changed )); do       # add descendants until nothing changes
        changed=0
        for pid in "${!parent[@]}"; do
            if [[ -z "${ours[$pid]:-}" && -n "${ours[${parent[$pid]}]:-}" ]]; then ours[$pid]=1; changed=1; fi
        done
    done
    echo "${!ours[@]}"
}

is_up() {
    [[ -f "$STATE/pids" ]] || return 1
    local pid; pid=$(awk '$1=="head"{print $2}' "$STATE/pids")
    alive "$pid"
}

free_ports() {   # N distinct free TCP ports on 127.0.0.1
    "$PY" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

ray_env() {   # run a ray CLI command against this cluster
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/auth_token" "$@"
}

alive_nodes() {
    ray_env "$RAY" list nodes --address "http://127.0.0.1:$(cat "$STATE/dashboard_port")" \
        --filter "state=ALIVE" --format json 2>/dev/null | "$PY" -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null || echo 0
}

cmd_up() {
    local workers=2 cpus=2
    while (( $# )); do
        case "$1" in
            --workers) workers=${2:?--workers needs a number}; shift 2 ;;
            --cpus-per-node) cpus=${2:?--cpus-per-node needs a number}; shift 2 ;;
            *) die "unknown option for up: $1 (see '$PROG --help')" ;;
        esac
    done
    [[ "$workers" =~ ^[0-9]+$ ]] || die "--workers must be a whole number >= 0, got '$workers'"
    [[ "$cpus" =~ ^[1-9][0-9]*$ ]] || die "--cpus-per-node must be a whole number >= 1, got '$cpus'"
    find_ray
    if is_up; then
        say "already up ($(cat "$STATE/nodes") nodes, dashboard http://127.0.0.1:$(cat "$STATE/dashboard_port")); run '$PROG down' first to change it"
        say "use it with: source $STATE/env"
        return 0
    fi
    if [[ -e "$STATE" ]]; then
        say "cleaning up the state of a previous cluster that is no longer running ($STATE)"
        stop_all quiet
    fi
    mkdir -p "$STATE/logs" "$RAY_TMP"
    chmod 700 "$STATE"
    "$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$STATE/auth_token"
    chmod 600 "$STATE/auth_token"

    local gcs dash client agent
    read -r gcs dash client agent <<< "$(free_ports 4)"
    echo "$gcs" > "$STATE/gcs_port"; echo "$dash" > "$STATE/dashboard_port"
    : > "$STATE/pids"
    # Every node gets token auth and the bin dir of this ray first on PATH, so a job's
    # entrypoint (`relay-ray ...`) runs from the same environment.
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/auth_token" PATH="$BIN:$PATH" RAY_USAGE_STATS_ENABLED=0

    say "starting head node on 127.0.0.1:$gcs (dashboard 127.0.0.1:$dash, $cpus CPUs)"
    nohup "$RAY" start --head --block --node-ip-address 127.0.0.1 --port "$gcs" \
        --dashboard-host 127.0.0.1 --dashboard-port "$dash" --ray-client-server-port "$client" \
        --dashboard-agent-listen-port "$agent" --num-cpus "$cpus" --temp-dir "$RAY_TMP" \
        > "$STATE/logs/head.log" 2>&1 < /dev/null &
    echo "head $!" >> "$STATE/pids"
    wait_for_nodes 1 || fail_up "the head node did not start; see $STATE/logs/head.log"

    local i ports
    for (( i = 1; i <= workers; i++ )); do
        # explicit free ports: nodes sharing one host must not race for the same random ones
        read -r -a ports <<< "$(free_ports 6)"
        say "starting worker node $i ($cpus CPUs)"
        nohup "$RAY" start --block --address "127.0.0.1:$gcs" --node-ip-address 127.0.0.1 \
            --num-cpus "$cpus" --temp-dir "$RAY_TMP" --include-log-monitor false \
            --node-manager-port "${ports[0]}" --object-manager-port "${ports[1]}" \
            --dashboard-agent-listen-port "${ports[2]}" --dashboard-agent-grpc-port "${ports[3]}" \
            --runtime-env-agent-port "${ports[4]}" --metrics-export-port "${ports[5]}" \
            > "$STATE/logs/worker-$i.log" 2>&1 < /dev/null &
        echo "worker-$i $!" >> "$STATE/pids"
        wait_for_nodes $(( i + 1 )) || fail_up "worker node $i did not join; see $STATE/logs/worker-$i.log"
    done
    echo $(( workers + 1 )) > "$STATE/nodes"
    # `ray job submit` answers "No available agent" for a few seconds after start: wait it out here.
    local t
    for (( t = 0; t < 60; t++ )); do
        ray_env "$RAY" job list --address "http://127.0.0.1:$dash" > /dev/null 2>&1 && break
        sleep 1
    done
    cat > "$STATE/env" <<EOF
# source this file to use the local relay_ray cluster from this shell
export RAY_ADDRESS=http://127.0.0.1:$dash
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$STATE/auth_token
EOF
    say "up: $(( workers + 1 )) nodes x $cpus CPUs, token auth on, dashboard and job API on http://127.0.0.1:$dash"
    say "use it with: source $STATE/env"
    say "stop it with: $PROG down"
}

wait_for_nodes() {   # wait until $1 nodes are alive (up to 60 s), failing early if a node process died
    local want=$1 t pid
    for (( t = 0; t < 120; t++ )); do
        [[ "$(alive_nodes)" -ge "$want" ]] && return 0
        while read -r _ pid; do alive "$pid" || return 1; done < "$STATE/pids"
        sleep 0.5
    done
    return 1
}

fail_up() {
    echo "$PROG: error: $1" >&2
    stop_all quiet
    exit 1
}

stop_all() {   # stop this cluster's processes by PID: SIGTERM, then SIGKILL what is left
    local quiet=${1:-} pids n t
    read -r -a pids <<< "$(cluster_pids)"
    n=${#pids[@]}
    if (( n )); then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        for (( t = 0; t < 30; t++ )); do
            read -r -a pids <<< "$(cluster_pids)"
            (( ${#pids[@]} == 0 )) && break
            sleep 0.5
        done
        if (( ${#pids[@]} )); then
            # gcs_server and raylet can outlive SIGTERM
            kill -KILL "${pids[@]}" 2>/dev/null || true
        fi
    fi
    rm -rf "$STATE"
    [[ -n "$quiet" ]] || say "stopped the local cluster ($n processes) and removed $STATE"
}

cmd_down() {
    if [[ ! -e "$STATE" ]]; then
        say "no local cluster to stop (no $STATE)"
        return 0
    fi
    stop_all
}

cmd_status() {
    find_ray
    is_up || { say "not running"; return 1; }
    say "up: $(alive_nodes) nodes alive, dashboard http://127.0.0.1:$(cat "$STATE/dashboard_port")"
    ray_env "$RAY" status --address "127.0.0.1:$(cat "$STATE/gcs_port")"
}

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    down) shift; cmd_down ;;
    status) shift; cmd_status ;;
    -h|--help|help) usage ;;
    "") usage; exit 2 ;;
    *) die "unknown command '$1'; use up, down or status" ;;
esac
