# Helpers shared by the load benchmarks (run.sh, cache.sh, scale.sh); sourced, not run.
#
# The caller sets TMP (a scratch folder), SY and SIM (binaries), NGINX (for start_nginx),
# WORKERS (Switchyard and nginx workers), SIM_WORKERS, SIM_TOKENS and an array PIDS that
# collects what to kill on exit. Optional CPU lists pin the processes (taskset -c):
# SIM_CPUS for the simulator, PROXY_CPUS for Switchyard and nginx; empty = not pinned.
# SIM_TPS paces the simulator's streams (tokens per second; unset or 0: sent without pauses).

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# pin CPUS COMMAND...: runs COMMAND on the CPU list CPUS, or unpinned when CPUS is empty.
pin() {
    local cpus=$1
    shift
    if [ -n "$cpus" ]; then taskset -c "$cpus" "$@"; else "$@"; fi
}

# spawn CPUS LOG COMMAND...: starts COMMAND in the background, pinned like `pin`, output to
# LOG; SPAWNED is its pid (the command's own: taskset execs it), also added to PIDS.
spawn() {
    local cpus=$1 out=$2
    shift 2
    if [ -n "$cpus" ]; then
        taskset -c "$cpus" "$@" >"$out" 2>&1 &
    else
        "$@" >"$out" 2>&1 &
    fi
    SPAWNED=$!
    PIDS+=("$SPAWNED")
}

# The logical CPUs this process may use, one per line: the first hyper-thread of every
# physical core before the others.
cpu_order() {
    local n first list
    list=$(awk '/^Cpus_allowed_list/ {print $2}' /proc/self/status)
    for n in $(echo "$list" | tr , '\n' | awk -F- '{for (i = $1; i <= ($2 == "" ? $1 : $2); i++) print i}'); do
        first=$(cut -d, -f1 2>/dev/null </sys/devices/system/cpu/cpu$n/topology/thread_siblings_list | cut -d- -f1)
        echo "$([ "${first:-$n}" = "$n" ] && echo 0 || echo 1) $n"
    done | sort -n -k1,1 -k2,2 | awk '{print $2}'
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits until FILE contains PATTERN or the process dies (5 s at most).
wait_for() {
    local file=$1 pattern=$2 pid=$3 i
    for i in $(seq 100); do
        grep -q "$pattern" "$file" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

# utime+stime in clock ticks, summed over the given pids (all threads of each).
cpu_ticks() {
    local p t=0 v
    for p in "$@"; do
        v=$(awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$p/stat")
        t=$((t + v))
    done
    echo "$t"
}

# Sum of a /proc/PID/status field (kB) over the given pids.
status_kb() {
    local field=$1 p t=0 v
    shift
    for p in "$@"; do
        v=$(awk -v f="$field:" '$1 == f {print $2}' "/proc/$p/status")
        t=$((t + ${v:-0}))
    done
    echo "$t"
}

nginx_pids() { # master and workers
    local master
    master=$(cat "$1/nginx.pid")
    echo "$master" $(grep -l "^PPid:[[:space:]]*$master\$" /proc/[0-9]*/status 2>/dev/null | cut -d/ -f3)
}

start_sim() {
    SIM_PORT=$(free_port)
    spawn "${SIM_CPUS:-}" "$TMP/sim.log" "$SIM" --listen "127.0.0.1:$SIM_PORT" --name sim \
        --workers "$SIM_WORKERS" --completion-tokens "$SIM_TOKENS" --tokens-per-second "${SIM_TPS:-0}"
    SIM_PID=$SPAWNED
    wait_for "$TMP/sim.log" "listening on" "$SIM_PID" || die "simulator did not start: $(cat "$TMP/sim.log")"
}

# start_switchyard DRIVER TAG -> SY_PID, SY_PORT; returns 1 (with SY_ERR) if it refuses to start.
start_switchyard() {
    local driver=$1 tag=$2
    SY_PORT=$(free_port)
    switchyard_config "$driver" "$TMP/data-$tag" "$SIM_PORT" >"$TMP/sy-$tag.toml"
    spawn "${PROXY_CPUS:-}" "$TMP/sy-$tag.log" \
        "$SY" serve --config "$TMP/sy-$tag.toml" --listen "127.0.0.1:$SY_PORT" --workers "$WORKERS"
    SY_PID=$SPAWNED
    if ! wait_for "$TMP/sy-$tag.log" "listening on" "$SY_PID"; then
        SY_ERR=$(tr '\n' ' ' <"$TMP/sy-$tag.log")
        kill "$SY_PID" 2>/dev/null || true
        return 1
    fi
}

# switchyard_config DRIVER DATA_DIR SIM_PORT: the benchmarks' config, on stdout (one tier, one
# simulated backend, no health checks, no admin API).
switchyard_config() {
    cat <<EOF
[listener]
io_driver = "$1"
[health]
interval_ms = 0
[admin]
enabled = false
[storage]
data_dir = "$2"
[[backends]]
name = "sim"
url = "http://127.0.0.1:$3"
models = [{ name = "m", input_per_mtok = 0.1, output_per_mtok = 0.2 }]
[[tiers]]
name = "small"
targets = ["sim/m"]
EOF
}

# nginx_config DIR PORT SIM_PORT WORKERS [MAIN]: the reference proxy's config, on stdout: on
# PORT, in front of the simulator with upstream keep-alive, its files in DIR; MAIN adds lines
# to the main context.
nginx_config() {
    local dir=$1
    cat <<EOF
${5:-}
worker_processes $4;
worker_rlimit_nofile 16384;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    keepalive_requests 1000000;
    upstream sim {
        server 127.0.0.1:$3;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        # One listening socket per worker, as Switchyard's SO_REUSEPORT.
        listen 127.0.0.1:$2 reuseport;
        location / {
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
}

# start_nginx TAG -> NG_DIR, NG_PORT
start_nginx() {
    local tag=$1
    NG_DIR=$TMP/nginx-$tag
    NG_PORT=$(free_port)
    mkdir -p "$NG_DIR"
    nginx_config "$NG_DIR" "$NG_PORT" "$SIM_PORT" "$WORKERS" >"$NG_DIR/nginx.conf"
    spawn "${PROXY_CPUS:-}" "$NG_DIR/stdout.log" \
        "$NGINX" -p "$NG_DIR" -c "$NG_DIR/nginx.conf" -e "$NG_DIR/error.log" -g 'daemon off;'
    local i
    for i in $(seq 100); do
        if [ -s "$NG_DIR/nginx.pid" ] && curl -s -o /dev/null "http://127.0.0.1:$NG_PORT/"; then
            break
        fi
        sleep 0.05
    done
    [ -s "$NG_DIR/nginx.pid" ] || die "nginx did not start: $(cat "$NG_DIR/error.log" "$NG_DIR/stdout.log" 2>/dev/null)"
    # Worker processes appear shortly after the pid file.
    for i in $(seq 40); do
        [ "$(nginx_pids "$NG_DIR" | wc -w)" -gt "$WORKERS" ] && break
        sleep 0.05
    done
}

# Request bodies (BODY_JSON, BODY_STREAM: a chat completion asking for MODEL [auto] with
# SIM_TOKENS of answer) and the wrk scripts that send them, $TMP/json.lua and $TMP/stream.lua.
# Each script prints one line at the end:
#   RESULT requests=.. duration_us=.. p50_us=.. p99_us=.. errors=..
write_wrk_scripts() {
    local mode body model=${MODEL:-auto}
    BODY_JSON="{\"model\":\"$model\",\"messages\":[{\"role\":\"user\",\"content\":\"Summarise: the meeting moved to Friday.\"}],\"max_tokens\":$SIM_TOKENS}"
    BODY_STREAM="{\"model\":\"$model\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"Summarise: the meeting moved to Friday.\"}],\"max_tokens\":$SIM_TOKENS}"
    for mode in json stream; do
        if [ "$mode" = json ]; then body=$BODY_JSON; else body=$BODY_STREAM; fi
        cat >"$TMP/$mode.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[$body]==]
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d errors=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
EOF
    done
}
