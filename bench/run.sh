#!/usr/bin/env bash
# Load benchmark: the simulator directly vs Switchyard vs nginx, both in front of the same
# simulator, measured interleaved in one run. Prints a markdown table and appends a dated
# section to docs/BENCHMARKS.md.
#
#   bash bench/run.sh                         # defaults below
#   DURATION=8 ROUNDS=2 bash bench/run.sh     # shorter
#
# Environment (defaults in brackets):
#   DURATION [10]       seconds per wrk run
#   ROUNDS [3]          interleaved rounds (every target and mode once per round)
#   CONNS [64]          wrk connections for the throughput runs
#   THREADS [2]         wrk threads for the throughput runs
#   LAT_DURATION [$DURATION]  seconds per 1-connection latency run
#   WARMUP [2]          seconds of warm-up per target and mode before round 1
#   WORKERS [1]         Switchyard --workers and nginx worker_processes
#   SIM_WORKERS [1]     simulator --workers
#   SIM_TOKENS [16]     simulator --completion-tokens (also the request's max_tokens)
#   DRIVER ["epoll io_uring"]  Switchyard io_driver values to measure (epoll, io_uring, auto)
#   MODEL [auto]        the request's model; "auto" exercises the classifier
#   CONNS_IDLE [1000]   idle keep-alive connections for the connection-memory check
#   BUILD [0]           1 = run `cargo build --release --bins` first (else only when missing)
#   OUT [docs/BENCHMARKS.md]  file the dated section is appended to; "-" = do not write
#   PROXY_CPUS, SIM_CPUS, WRK_CPUS [unset]  CPU lists (taskset -c) that pin Switchyard and
#                       nginx, the simulator and wrk, on a machine with cores to spare
#   PLACED [1]          when nothing is pinned: also measure 1 connection with the same CPUs
#                       for every target (proxy and wrk on one core, the simulator on another)
#
# Only 127.0.0.1 is used; every load run is bounded by wrk -d and timeout(1); every process
# this script starts is killed on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
LAT_DURATION=${LAT_DURATION:-$DURATION}
WARMUP=${WARMUP:-2}
WORKERS=${WORKERS:-1}
SIM_WORKERS=${SIM_WORKERS:-1}
SIM_TOKENS=${SIM_TOKENS:-16}
DRIVER=${DRIVER:-epoll io_uring}
MODEL=${MODEL:-auto}
CONNS_IDLE=${CONNS_IDLE:-1000}
BUILD=${BUILD:-0}
OUT=${OUT:-docs/BENCHMARKS.md}
PLACED=${PLACED:-1}

. bench/lib.sh

# ---------------------------------------------------------------- tools
need_apt=()
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
if [ ${#need_apt[@]} -gt 0 ]; then
    log "installing ${need_apt[*]}"
    apt-get install -y "${need_apt[@]}" >/dev/null 2>&1 ||
        { apt-get update >/dev/null 2>&1 && apt-get install -y "${need_apt[@]}" >/dev/null; } ||
        die "cannot install ${need_apt[*]}"
fi
NGINX=$(command -v nginx 2>/dev/null || echo /usr/sbin/nginx)
for t in wrk python3 curl timeout awk; do
    command -v "$t" >/dev/null 2>&1 || die "$t is required"
done

if [ "$BUILD" = 1 ] || [ ! -x target/release/switchyard ] || [ ! -x target/release/switchyard-sim ]; then
    log "cargo build --release --bins"
    cargo build --release --bins >&2
fi

REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(git status --porcelain --untracked-files=no 2>/dev/null | wc -l)
BIN_DATE=$(date -u -r target/release/switchyard '+%Y-%m-%d %H:%M UTC')

TMP=$(mktemp -d /tmp/switchyard-bench.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    sleep 0.3
    for p in "${PIDS[@]}"; do
        kill -9 "$p" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Copies, so a concurrent rebuild cannot swap the binaries mid-run.
cp target/release/switchyard target/release/switchyard-sim "$TMP/"
SY=$TMP/switchyard
SIM=$TMP/switchyard-sim

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------- request bodies
write_wrk_scripts

# ---------------------------------------------------------------- start everything
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
awk '$1 > 0.5 {exit 1}' /proc/loadavg ||
    log "warning: load average ${LOAD_START} before starting; other work on this box will skew the numbers"
log "starting the simulator, Switchyard ($DRIVER) and nginx"
start_sim

TARGETS=(direct)
declare -A PORT PROCS IDLE_KB IDLE_ANON_KB IDLE_FILE_KB NOTE
PORT[direct]=$SIM_PORT
PROCS[direct]=$SIM_PID
SY_TARGETS=()
SKIPPED=()
for d in $DRIVER; do
    t="switchyard-$d"
    if start_switchyard "$d" "$d"; then
        sleep 0.3
        PORT[$t]=$SY_PORT
        PROCS[$t]=$SY_PID
        IDLE_KB[$t]=$(status_kb VmRSS "$SY_PID")
        IDLE_ANON_KB[$t]=$(status_kb RssAnon "$SY_PID")
        IDLE_FILE_KB[$t]=$(status_kb RssFile "$SY_PID")
        NOTE[$t]=$(grep -o '[a-z_]* I/O driver' "$TMP/sy-$d.log" || true)
        TARGETS+=("$t")
        SY_TARGETS+=("$t")
    else
        log "Switchyard with io_driver=$d did not start: $SY_ERR"
        SKIPPED+=("io_driver=\"$d\": did not start: $SY_ERR")
    fi
done
[ ${#SY_TARGETS[@]} -gt 0 ] || die "Switchyard did not start with any driver"
start_nginx main
sleep 0.3
PORT[nginx]=$NG_PORT
PROCS[nginx]=$(nginx_pids "$NG_DIR")
IDLE_KB[nginx]=$(status_kb VmRSS ${PROCS[nginx]})
IDLE_ANON_KB[nginx]=$(status_kb RssAnon ${PROCS[nginx]})
IDLE_FILE_KB[nginx]=$(status_kb RssFile ${PROCS[nginx]})
TARGETS+=(nginx)
NG_MAIN_DIR=$NG_DIR

# ---------------------------------------------------------------- sanity checks
URL_PATH=/v1/chat/completions
for t in "${TARGETS[@]}"; do
    for mode in json stream; do
        if [ "$mode" = json ]; then body=$BODY_JSON; else body=$BODY_STREAM; fi
        code=$(curl -s -o "$TMP/check.body" -D "$TMP/check.head" -w '%{http_code}' --max-time 5 \
            -H 'content-type: application/json' -d "$body" "http://127.0.0.1:${PORT[$t]}$URL_PATH") || true
        [ "$code" = 200 ] || die "$t $mode: HTTP $code: $(head -c 300 "$TMP/check.body")"
        if [ "$mode" = json ]; then
            grep -q '"chat.completion"' "$TMP/check.body" || die "$t json: unexpected body"
        else
            grep -q 'data: \[DONE\]' "$TMP/check.body" || die "$t stream: no [DONE] in the stream"
            grep -qi '^content-type: text/event-stream' "$TMP/check.head" || die "$t stream: not an event stream"
            grep -qi '^transfer-encoding: chunked' "$TMP/check.head" || die "$t stream: not chunked"
            # Every token as an event, and no usage chunk the caller did not ask for.
            events=$(grep -c '^data: {' "$TMP/check.body" || true)
            [ "$events" = "$SIM_TOKENS" ] || die "$t stream: $events events, not $SIM_TOKENS"
            ! grep -q '"usage"' "$TMP/check.body" || die "$t stream: a usage chunk reached the caller"
        fi
        case $t in switchyard-*)
            grep -qi '^x-switchyard-tier:' "$TMP/check.head" || die "$t: no x-switchyard-* headers" ;;
        esac
    done
done
log "all targets answer 200 for JSON and SSE requests"

# ---------------------------------------------------------------- load runs
RESULTS=$TMP/results.tsv
printf 'round\tmode\ttarget\tconns\trequests\tduration_us\tp50_us\tp99_us\terrors\tproxy_ticks\tsim_ticks\n' >"$RESULTS"

# run_wrk ROUND MODE TARGET CONNS THREADS SECONDS [record]; recorded as mode LABEL if set.
run_wrk() {
    local round=$1 mode=$2 t=$3 conns=$4 threads=$5 secs=$6 record=${7:-1}
    local before after sbefore safter line
    before=$(cpu_ticks ${PROCS[$t]})
    sbefore=$(cpu_ticks "$SIM_PID")
    pin "${WRK_CPUS:-}" timeout -k 5 $((secs + 30)) wrk -t"$threads" -c"$conns" -d"${secs}s" --timeout 5s --latency \
        -s "$TMP/$mode.lua" "http://127.0.0.1:${PORT[$t]}$URL_PATH" >"$TMP/wrk.out" 2>&1 ||
        die "wrk failed against $t: $(tail -5 "$TMP/wrk.out")"
    after=$(cpu_ticks ${PROCS[$t]})
    safter=$(cpu_ticks "$SIM_PID")
    line=$(grep '^RESULT ' "$TMP/wrk.out") || die "no wrk result for $t: $(tail -5 "$TMP/wrk.out")"
    eval "local ${line#RESULT }"
    [ "$record" = 1 ] || return 0
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "${LABEL:-$mode}" "$t" "$conns" \
        "$requests" "$duration_us" "$p50_us" "$p99_us" "$errors" \
        $((after - before)) $((safter - sbefore)) >>"$RESULTS"
    log "round $round ${LABEL:-$mode} c=$conns $t: $((requests * 1000000 / duration_us)) req/s p50=${p50_us}us p99=${p99_us}us errors=$errors"
}

# Where the scheduler puts three processes that wake each other on two cores decides a
# 1-connection latency more than any proxy does (docs/BENCHMARKS.md, 2026-11-28 16:xx notes),
# so the placed runs give every target the same CPUs: the proxy and wrk share core A, the
# simulator has core B (for direct: wrk on A, the simulator on B), as when a proxy runs
# beside its callers and the backend elsewhere.
PLACE_A="" PLACE_B=""
if [ "$PLACED" = 1 ] && [ -z "${PROXY_CPUS:-}${SIM_CPUS:-}${WRK_CPUS:-}" ] && [ "$(cpu_order | wc -l)" -ge 2 ]; then
    read -r PLACE_A PLACE_B <<<"$(cpu_order | head -2 | tr '\n' ' ')"
fi
ALL_CPUS=$(awk '/^Cpus_allowed_list/ {print $2}' /proc/self/status)
affine() { # affine CPUS PIDS...: every thread of each pid
    local cpus=$1 p
    shift
    for p in "$@"; do taskset -apc "$cpus" "$p" >/dev/null; done
}
run_placed() { # run_placed ROUND TARGET
    local r=$1 t=$2
    affine "$PLACE_B" "$SIM_PID"
    [ "$t" = direct ] || affine "$PLACE_A" ${PROCS[$t]}
    LABEL=json_placed WRK_CPUS=$PLACE_A run_wrk "$r" json "$t" 1 1 "$LAT_DURATION"
    affine "$ALL_CPUS" "$SIM_PID"
    [ "$t" = direct ] || affine "$ALL_CPUS" ${PROCS[$t]}
}

if [ "$WARMUP" -gt 0 ]; then
    log "warm-up: ${WARMUP}s per target and mode"
    for mode in json stream; do
        for t in "${TARGETS[@]}"; do
            run_wrk 0 "$mode" "$t" "$CONNS" "$THREADS" "$WARMUP" 0
        done
    done
fi

for r in $(seq "$ROUNDS"); do
    # Each round starts with another target, so that none always runs first or after the same one.
    ORDER=()
    for i in $(seq 0 $((${#TARGETS[@]} - 1))); do
        ORDER+=("${TARGETS[$(((i + r - 1) % ${#TARGETS[@]}))]}")
    done
    for mode in json stream; do
        for t in "${ORDER[@]}"; do
            run_wrk "$r" "$mode" "$t" "$CONNS" "$THREADS" "$DURATION"
            sleep 1
        done
    done
    for t in "${ORDER[@]}"; do
        run_wrk "$r" json "$t" 1 1 "$LAT_DURATION"
        sleep 1
    done
    if [ -n "$PLACE_A" ]; then
        for t in "${ORDER[@]}"; do
            run_placed "$r" "$t"
            sleep 1
        done
    fi
done

declare -A PEAK_KB AFTER_KB
# Idle again after the load: what the allocator kept counts as idle memory too (Switchyard
# returns free memory after 10 s without requests).
sleep 12
for t in "${SY_TARGETS[@]}" nginx; do
    PEAK_KB[$t]=$(status_kb VmHWM ${PROCS[$t]})
    AFTER_KB[$t]=$(status_kb VmRSS ${PROCS[$t]})
done

# ---------------------------------------------------------------- idle keep-alive connections
# Fresh processes, so the load runs above do not colour the number.
cat >"$TMP/idle_conns.py" <<'EOF'
import os, socket, sys, time
port, n, pids = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
def rss():
    total = 0
    for p in pids:
        with open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total
before = rss()
socks, ok = [], 0
# A proxied request on each (the same chat completion as the load runs), so that every
# connection holds what serving a request leaves with it.
body = os.environ["BODY"].encode()
req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
       b"Content-Length: %d\r\n\r\n" % len(body)) + body
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(req)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = 0
    for h in head.split(b"\r\n")[1:]:
        k, _, v = h.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(rest) < length:
        chunk = s.recv(4096)
        if not chunk:
            break
        rest += chunk
    if head.startswith(b"HTTP/1.1 200 ") and len(rest) >= length:
        ok += 1
    socks.append(s)
time.sleep(1.0)
open_now = 0
for s in socks:  # still open: a non-blocking peek finds no EOF
    s.setblocking(False)
    try:
        open_now += 0 if s.recv(1, socket.MSG_PEEK) == b"" else 1
    except BlockingIOError:
        open_now += 1
print(f"before_kb={before} with_kb={rss()} answered={ok} open={open_now}")
for s in socks:
    s.close()
EOF

declare -A CONN_BEFORE CONN_WITH CONN_OK
idle_conns() { # idle_conns TARGET PORT PIDS...
    local t=$1 port=$2 out
    shift 2
    out=$(BODY=$BODY_JSON timeout 120 python3 "$TMP/idle_conns.py" "$port" "$CONNS_IDLE" "$@") ||
        { log "idle-connection check failed for $t"; CONN_OK[$t]="failed"; return 0; }
    eval "local $out"
    CONN_BEFORE[$t]=$before_kb
    CONN_WITH[$t]=$with_kb
    CONN_OK[$t]="$answered answered 200, $open open"
    # The RSS counts only when every connection was answered and stayed open.
    [ "$answered" = "$CONNS_IDLE" ] && [ "$open" = "$CONNS_IDLE" ] || CONN_WITH[$t]=""
    log "$t: RSS ${before_kb} kB idle, ${with_kb} kB with $CONNS_IDLE keep-alive connections ($answered answered, $open still open)"
}
log "memory with $CONNS_IDLE idle keep-alive connections (fresh processes)"
for t in "${SY_TARGETS[@]}"; do
    d=${t#switchyard-}
    start_switchyard "$d" "$d-conns" || die "Switchyard ($d) did not restart: $SY_ERR"
    sleep 0.3
    idle_conns "$t" "$SY_PORT" "$SY_PID"
    kill "$SY_PID" 2>/dev/null || true
done
start_nginx conns
sleep 0.3
idle_conns nginx "$NG_PORT" $(nginx_pids "$NG_DIR")
kill "$(cat "$NG_DIR/nginx.pid")" 2>/dev/null || true
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- report
export CLK_TCK ROUNDS DURATION LAT_DURATION CONNS THREADS WORKERS SIM_WORKERS CONNS_IDLE
export PINNED="${PROXY_CPUS:-}${SIM_CPUS:-}${WRK_CPUS:-}" PLACE_A PLACE_B
export TARGETS_STR="${TARGETS[*]}" SY_TARGETS_STR="${SY_TARGETS[*]}"
META=$TMP/meta.tsv
: >"$META"
meta() { printf '%s\t%s\n' "$1" "$2" >>"$META"; }
for t in "${SY_TARGETS[@]}" nginx; do
    meta "idle_kb:$t" "${IDLE_KB[$t]:-}"
    meta "idle_anon_kb:$t" "${IDLE_ANON_KB[$t]:-}"
    meta "idle_file_kb:$t" "${IDLE_FILE_KB[$t]:-}"
    meta "peak_kb:$t" "${PEAK_KB[$t]:-}"
    meta "after_kb:$t" "${AFTER_KB[$t]:-}"
    meta "conn_before_kb:$t" "${CONN_BEFORE[$t]:-}"
    meta "conn_with_kb:$t" "${CONN_WITH[$t]:-}"
    meta "conn_ok:$t" "${CONN_OK[$t]:-}"
done
TABLE=$TMP/table.md
python3 - "$RESULTS" "$META" >"$TABLE" <<'EOF'
import csv, os, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
meta = dict(l.rstrip("\n").split("\t", 1) for l in open(sys.argv[2]) if "\t" in l)
tck = int(os.environ["CLK_TCK"])
targets = os.environ["TARGETS_STR"].split()
sys_targets = os.environ["SY_TARGETS_STR"].split()
conns = int(os.environ["CONNS"])
idle_n = os.environ["CONNS_IDLE"]

def runs(mode, t, c):
    return [r for r in rows if r["mode"] == mode and r["target"] == t and int(r["conns"]) == c]

def stats(mode, t, c):
    rs = runs(mode, t, c)
    if not rs:
        return None
    rps = [int(r["requests"]) * 1e6 / int(r["duration_us"]) for r in rs]
    cpu = [int(r["proxy_ticks"]) * 1e6 / tck / max(int(r["requests"]), 1) for r in rs]
    sim = [int(r["sim_ticks"]) * 1e6 / tck / max(int(r["requests"]), 1) for r in rs]
    return dict(
        rps=statistics.median(rps), rps_min=min(rps), rps_max=max(rps),
        p50=statistics.median(int(r["p50_us"]) for r in rs),
        p99=statistics.median(int(r["p99_us"]) for r in rs),
        cpu=statistics.median(cpu), sim=statistics.median(sim),
        errors=sum(int(r["errors"]) for r in rs), n=len(rs))

def mb(kb):
    return f"{int(kb) / 1024:.1f} MB" if kb not in (None, "") else "n/a"

def fmt_us(v):
    return f"{v:,.0f} us" if v >= 1000 else f"{v:.0f} us"

out = []
w = out.append
w("| mode | target | req/s (median) | req/s min-max | p50 | p99 | proxy CPU us/req | sim CPU us/req | errors |")
w("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for mode, c in (("json", conns), ("stream", conns), ("json", 1), ("json_placed", 1)):
    label = {"json": "JSON", "stream": "SSE", "json_placed": "JSON"}[mode] + f", {c} conn" + ("s" if c > 1 else "")
    label += ", placed" if mode == "json_placed" else ""
    for t in targets:
        s = stats(mode, t, c)
        if not s:
            continue
        cpu = "-" if t == "direct" else f"{s['cpu']:.1f}"
        w(f"| {label} | {t} | {s['rps']:,.0f} | {s['rps_min']:,.0f}-{s['rps_max']:,.0f} | {fmt_us(s['p50'])} | {fmt_us(s['p99'])} | {cpu} | {s['sim']:.1f} | {s['errors']} |")
w("")
w("Medians over the rounds. \"sim CPU\" is the simulator's own CPU per request, for context.")
w("")
w("| memory (RSS) | " + " | ".join(sys_targets + ["nginx"]) + " |")
w("|---|" + "---:|" * (len(sys_targets) + 1))
def memrow(label, key):
    w(f"| {label} | " + " | ".join(mb(meta.get(f"{key}:{t}")) for t in sys_targets + ["nginx"]) + " |")
memrow("idle, right after start", "idle_kb")
memrow("... of which anonymous (RssAnon)", "idle_anon_kb")
memrow("... of which file-backed (RssFile: binary, libraries)", "idle_file_kb")
memrow("peak during the load runs (VmHWM)", "peak_kb")
memrow("idle again, 12 s after the load runs", "after_kb")
memrow(f"fresh process, before the idle connections", "conn_before_kb")
memrow(f"fresh process, with {idle_n} idle keep-alive connections", "conn_with_kb")
w(f"| idle-connection check | " + " | ".join(meta.get(f"conn_ok:{t}", "") for t in sys_targets + ["nginx"]) + " |")
w("")
w("nginx memory is master + workers summed (pages they share are counted in each).")
w("")

ng = {m: stats(m, "nginx", conns) for m in ("json", "stream")}
w("| target check | " + " | ".join(sys_targets) + " |")
w("|---|" + "---:|" * len(sys_targets))
def verdict(ok):
    return "meets" if ok else "misses"
def checked(s, ok):
    # wrk counts error answers as requests: a run with errors says nothing either way.
    both = s["errors"] + ng[m]["errors"]
    return f"invalid: {both} errors" if both else verdict(ok)
for m in ("json", "stream"):
    name = {"json": "JSON", "stream": "SSE"}[m]
    cells = []
    for t in sys_targets:
        s = stats(m, t, conns)
        r = s["rps"] / ng[m]["rps"]
        cells.append(f"{r:.2f} ({checked(s, r >= 1.0)})")
    w(f"| {name} throughput / nginx (target >= 1.0) | " + " | ".join(cells) + " |")
    cells = []
    for t in sys_targets:
        s = stats(m, t, conns)
        r = s["cpu"] / ng[m]["cpu"]
        cells.append(f"{r:.2f}x ({checked(s, r <= 1.2)})")
    w(f"| {name} CPU per request / nginx (target <= 1.2x) | " + " | ".join(cells) + " |")
def memcheck(key, limit_mb):
    cells = []
    for t in sys_targets:
        kb = meta.get(f"{key}:{t}")
        cells.append("n/a" if not kb else f"{mb(kb)} ({verdict(int(kb) / 1024 < limit_mb)})")
    return " | ".join(cells)
w(f"| idle RSS right after start (target < 10 MB) | " + memcheck("idle_kb", 10) + " |")
w(f"| idle RSS after the load runs (target < 10 MB) | " + memcheck("after_kb", 10) + " |")
w(f"| RSS with {idle_n} keep-alive connections (target < 64 MB) | " + memcheck("conn_with_kb", 64) + " |")
def added_p99(t, mode):
    """Per round, the target's p99 less the direct one's of the same round (runs minutes
    apart see different noise): the median and every round's."""
    direct = {r["round"]: int(r["p99_us"]) for r in runs(mode, "direct", 1)}
    adds = [int(r["p99_us"]) - direct[r["round"]] for r in runs(mode, t, 1) if r["round"] in direct]
    return statistics.median(adds), adds
placed = bool(runs("json_placed", "direct", 1))
for mode, label in (("json", "added p99 at 1 connection vs direct, same round"),
                    ("json_placed", f"... placed: proxy and wrk on CPU {os.environ['PLACE_A']}, simulator on CPU {os.environ['PLACE_B']}")):
    if mode == "json_placed" and not placed:
        continue
    cells = []
    for t in sys_targets:
        add, adds = added_p99(t, mode)
        spread = max(adds) - min(adds)
        errors = stats(mode, t, 1)["errors"] + stats(mode, "direct", 1)["errors"]
        call = f"invalid: {errors} errors" if errors else verdict(add < 50)
        call += f"; rounds spread {spread} us: noise-bound" if spread > 50 else ""
        cells.append(f"{add:+,.0f} us, per round {', '.join(f'{a:+d}' for a in adds)} ({call})")
    w(f"| {label} (target < 50 us) | " + " | ".join(cells) + " |")
w("")
for mode, label in (("json", "unplaced"), ("json_placed", "placed")):
    if mode == "json_placed" and not placed:
        continue
    base = stats(mode, "direct", 1)
    add50 = ", ".join(f"{t} {stats(mode, t, 1)['p50'] - base['p50']:+.0f} us" for t in sys_targets)
    w(f"Reference, {label}: nginx adds {added_p99('nginx', mode)[0]:+,.0f} us p99 at 1 connection (median of the rounds). Added p50 at 1 connection (medians): nginx {stats(mode, 'nginx', 1)['p50'] - base['p50']:+.0f} us, {add50}.")
if not os.environ.get("PINNED"):
    w("")
    w("Unplaced, wrk, the simulator and the proxy share the cores as the scheduler places them, and a 1-connection latency follows the placement more than the proxy (compare the per-round values below); the placed runs give every target the same CPUs.")
w("")
w("<details><summary>every run</summary>")
w("")
w("| round | mode | conns | target | requests | req/s | p50 us | p99 us | proxy CPU us/req | errors |")
w("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    rps = int(r["requests"]) * 1e6 / int(r["duration_us"])
    cpu = "-" if r["target"] == "direct" else f"{int(r['proxy_ticks']) * 1e6 / tck / max(int(r['requests']), 1):.1f}"
    w(f"| {r['round']} | {r['mode']} | {r['conns']} | {r['target']} | {r['requests']} | {rps:,.0f} | {r['p50_us']} | {r['p99_us']} | {cpu} | {r['errors']} |")
w("")
w("</details>")
print("\n".join(out))
EOF

CPU_MODEL=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
CORES=$(nproc)
SECTION=$TMP/section.md
{
    echo
    echo "## $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- Host: Linux $(uname -r), ${CPU_MODEL:-unknown CPU}, $CORES cores; load average ${LOAD_START} before, ${LOAD_END} after."
    echo "- Build: \`$REV\`$([ "$DIRTY" -gt 0 ] && echo " plus $DIRTY uncommitted modified files"), release binary built $BIN_DATE; $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///')."
    echo "- Switchyard: --workers $WORKERS, io_driver measured: $(for t in "${SY_TARGETS[@]}"; do printf '%s ' "${NOTE[$t]:-${t#switchyard-} (unconfirmed)}"; done | sed 's/ $//; s/ I\/O driver /, /g; s/ I\/O driver$//')$([ ${#SKIPPED[@]} -gt 0 ] && printf '; not measured: %s' "${SKIPPED[*]}"). nginx: worker_processes $WORKERS, listen with reuseport, upstream keepalive 64 (keepalive_requests 1000000), proxy_http_version 1.1, access_log off, proxy_buffering at its default (on; off measured the same, docs/BENCHMARKS.md 2026-11-28 notes). Simulator: --workers $SIM_WORKERS, $SIM_TOKENS completion tokens, SSE chunks sent without pauses."
    echo "- Load: wrk, $THREADS threads x $CONNS connections, ${DURATION}s per run, $ROUNDS interleaved rounds (each round: JSON then SSE, each over direct / Switchyard / nginx, starting with another target each round, then 1 thread x 1 connection JSON for ${LAT_DURATION}s per target$([ -n "$PLACE_A" ] && echo ", unplaced and then placed: proxy and wrk pinned to CPU $PLACE_A, the simulator to CPU $PLACE_B, for that run only")), ${WARMUP}s warm-up per target and mode first. Request: POST /v1/chat/completions, model \"$MODEL\", one user message. $(if [ -n "$PINNED" ]; then echo "Pinned CPUs: proxy ${PROXY_CPUS:-any}, simulator ${SIM_CPUS:-any}, wrk ${WRK_CPUS:-any}."; else echo "Otherwise nothing is pinned: wrk, the simulator and the proxy share the $CORES cores, so throughput is bounded by the box, not by the proxy alone; CPU per request is the cleaner comparison."; fi)"
    echo "- Command: \`$([ -n "$PINNED" ] && echo "PROXY_CPUS=${PROXY_CPUS:-} SIM_CPUS=${SIM_CPUS:-} WRK_CPUS=${WRK_CPUS:-} ")DURATION=$DURATION ROUNDS=$ROUNDS CONNS=$CONNS THREADS=$THREADS WORKERS=$WORKERS SIM_WORKERS=$SIM_WORKERS DRIVER=\"$DRIVER\" bash bench/run.sh\`"
    echo
    cat "$TABLE"
} >"$SECTION"

cat "$SECTION"

if [ "$OUT" != "-" ]; then
    if [ ! -f "$OUT" ]; then
        mkdir -p "$(dirname "$OUT")"
        cat >"$OUT" <<'EOF'
# Benchmarks

Sections below are appended by `bash bench/run.sh`; each is one run, newest last. Numbers are
only ever written by that script from what it measured on the machine named in the section.

Method: one run starts the simulator (`switchyard-sim`), Switchyard in front of it (per
`io_driver` measured), and nginx in front of the same simulator as a reference reverse proxy
(`upstream` with `keepalive 64`, HTTP/1.1 to the upstream, access log off, the same worker count
as Switchyard). wrk drives each target in turn, interleaved (A B C A B C ...) over several
rounds, with non-streaming and streaming (`"stream": true`, SSE) chat completions, plus a
1-connection run for latency. Reported per target: requests/s, p50/p99 latency (wrk), the proxy
process's CPU time per request (utime+stime from /proc/PID/stat around each run, divided by the
requests completed; nginx master + workers), and resident memory from /proc/PID/status (idle,
peak, and with 1,000 idle keep-alive connections held open on a fresh process). "Added p99" is
the proxy's 1-connection p99 minus the simulator's own.

Targets: throughput >= nginx, CPU per request <= 1.2x nginx, idle RSS < 10 MB, RSS with 1,000
keep-alive connections < 64 MB, added p99 at one connection < 50 us.
EOF
    fi
    cat "$SECTION" >>"$OUT"
    log "appended to $OUT"
fi
