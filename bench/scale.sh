#!/usr/bin/env bash
# Scaling benchmark for a machine with many cores: Switchyard and nginx, each with N workers
# pinned to N cores of their own, in front of one simulator on other cores, driven by wrk on
# the cores left, so the proxy's cores are the only limit. For each N: req/s, CPU per request,
# the ratio to nginx at the same N, and the speed-up over N = 1. Interleaved rounds in one run.
#
#   bash bench/scale.sh
#
# Environment (defaults in brackets):
#   WORKER_COUNTS ["1 2 4"]  proxy worker counts to measure (one core each)
#   SIM_CPU_COUNT [6]        cores (and workers) of the simulator
#   DRIVER [io_uring]        Switchyard io_driver values to measure
#   DURATION [5] ROUNDS [2] CONNS [256] SIM_TOKENS [16] MODEL [auto]
#   REPORT [docs/BENCHMARKS.md]  file the dated section is appended to; "-" = do not write
#   REV [git rev-parse --short HEAD]  the build named in the report
#
# Cores are handed out one per physical core first (hyper-threads last), proxy first, then the
# simulator, then wrk (one thread per core); at least two are left for wrk or it stops.
# Only 127.0.0.1 is used; every run is bounded by wrk -d and timeout(1).
set -euo pipefail
cd "$(dirname "$0")/.."

WORKER_COUNTS=${WORKER_COUNTS:-1 2 4}
SIM_CPU_COUNT=${SIM_CPU_COUNT:-6}
DRIVER=${DRIVER:-io_uring}
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-2}
CONNS=${CONNS:-256}
SIM_TOKENS=${SIM_TOKENS:-16}
REPORT=${REPORT:-docs/BENCHMARKS.md}

. bench/lib.sh
for t in wrk taskset python3 curl; do
    command -v "$t" >/dev/null 2>&1 || die "$t is required"
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || die "nginx is required"
[ -x target/release/switchyard ] && [ -x target/release/switchyard-sim ] || cargo build --release --bins

TMP=$(mktemp -d /tmp/switchyard-scale.XXXXXX)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; sleep 0.3; kill -9 "${PIDS[@]}" 2>/dev/null || true; rm -rf "$TMP"' EXIT
trap 'exit 130' INT TERM # so that the exit trap stops what was started
cp target/release/switchyard target/release/switchyard-sim "$TMP/"
SY=$TMP/switchyard
SIM=$TMP/switchyard-sim
ulimit -n 65536 2>/dev/null || true
CLK_TCK=$(getconf CLK_TCK)

mapfile -t CPUS < <(cpu_order)
MAX_N=0
for n in $WORKER_COUNTS; do [ "$n" -gt "$MAX_N" ] && MAX_N=$n; done
WRK_N=$((${#CPUS[@]} - MAX_N - SIM_CPU_COUNT))
[ "$WRK_N" -ge 2 ] || die "${#CPUS[@]} CPUs: too few for $MAX_N proxy + $SIM_CPU_COUNT simulator cores and 2 for wrk"
cpu_list() { local IFS=,; echo "${CPUS[*]:$1:$2}"; }
SIM_CPUS=$(cpu_list "$MAX_N" "$SIM_CPU_COUNT")
WRK_CPUS=$(cpu_list $((MAX_N + SIM_CPU_COUNT)) "$WRK_N")
SIM_WORKERS=$SIM_CPU_COUNT

start_sim
write_wrk_scripts
declare -A PORT PROCS PROXY_OF
TARGETS=()
for n in $WORKER_COUNTS; do
    WORKERS=$n PROXY_CPUS=$(cpu_list 0 "$n")
    for d in $DRIVER; do
        start_switchyard "$d" "$d-$n" || { log "not measured: Switchyard ($d, $n workers) did not start: $SY_ERR"; continue; }
        t="switchyard-$d/$n"
        PORT[$t]=$SY_PORT PROCS[$t]=$SY_PID
        TARGETS+=("$t")
    done
    start_nginx "$n"
    t="nginx/$n"
    PORT[$t]=$NG_PORT PROCS[$t]=$(nginx_pids "$NG_DIR")
    TARGETS+=("$t")
done
PORT[direct]=$SIM_PORT PROCS[direct]=$SIM_PID
for t in direct "${TARGETS[@]}"; do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H 'content-type: application/json' \
        -d "$BODY_STREAM" "http://127.0.0.1:${PORT[$t]}/v1/chat/completions") || true
    [ "$code" = 200 ] || die "$t answers HTTP $code"
done
log "proxy CPUs $(cpu_list 0 "$MAX_N"), simulator CPUs $SIM_CPUS, wrk CPUs $WRK_CPUS"

RESULTS=$TMP/results
# run ROUND MODE TARGET
run() {
    local before after line
    before=$(cpu_ticks ${PROCS[$3]})
    pin "$WRK_CPUS" timeout -k 5 $((DURATION + 30)) wrk -t"$WRK_N" -c"$CONNS" -d"${DURATION}s" \
        --timeout 5s -s "$TMP/$2.lua" "http://127.0.0.1:${PORT[$3]}/v1/chat/completions" >"$TMP/wrk.out" 2>&1 ||
        die "wrk failed against $3: $(tail -3 "$TMP/wrk.out")"
    after=$(cpu_ticks ${PROCS[$3]})
    line=$(grep '^RESULT ' "$TMP/wrk.out") || die "no wrk result for $3"
    echo "$1 $2 $3 ${line#RESULT } ticks=$((after - before))" >>"$RESULTS"
    log "round $1 $2 $3: ${line#RESULT }"
}
for r in $(seq "$ROUNDS"); do
    for mode in json stream; do
        for t in direct "${TARGETS[@]}"; do
            run "$r" "$mode" "$t"
        done
    done
done

TABLE=$(python3 - "$RESULTS" "$CLK_TCK" <<'EOF'
import statistics, sys
rows = []
for line in open(sys.argv[1]):
    r, mode, target, *kv = line.split()
    d = dict(x.split("=") for x in kv)
    rows.append(dict(mode=mode, target=target, rps=int(d["requests"]) * 1e6 / int(d["duration_us"]),
                     p99=int(d["p99_us"]), errors=int(d["errors"]),
                     cpu=int(d["ticks"]) * 1e6 / int(sys.argv[2]) / max(int(d["requests"]), 1)))
def med(mode, target, key):
    vals = [x[key] for x in rows if x["mode"] == mode and x["target"] == target]
    return statistics.median(vals) if vals else None
targets = list(dict.fromkeys(x["target"] for x in rows))
print("| mode | target / workers | req/s (median) | vs nginx, same workers | vs 1 worker | p99 | CPU us/req | CPU vs nginx | errors |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for mode in ("json", "stream"):
    for t in targets:
        rps, cpu = med(mode, t, "rps"), med(mode, t, "cpu")
        errors = sum(x["errors"] for x in rows if x["mode"] == mode and x["target"] == t)
        if t == "direct":
            print(f"| {mode} | simulator directly | {rps:,.0f} | | | {med(mode, t, 'p99'):,.0f} us | | | {errors} |")
            continue
        name, n = t.split("/")
        ng = f"nginx/{n}"
        one = med(mode, f"{name}/1", "rps")
        vs_ng = "" if name == "nginx" else f"{rps / med(mode, ng, 'rps'):.2f}x"
        cpu_ng = "" if name == "nginx" else f"{cpu / med(mode, ng, 'cpu'):.2f}x"
        scale = f"{rps / one:.2f}x" if one else ""
        print(f"| {mode} | {name} / {n} | {rps:,.0f} | {vs_ng} | {scale} | {med(mode, t, 'p99'):,.0f} us | {cpu:.1f} | {cpu_ng} | {errors} |")
EOF
)
SECTION="
## $(date -u '+%Y-%m-%d %H:%M UTC'): scaling with cores (bench/scale.sh)

- Host: Linux $(uname -r), $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), ${#CPUS[@]} logical CPUs ($(sort -u /sys/devices/system/cpu/cpu*/topology/thread_siblings_list | wc -l) physical cores).
- Build: \`${REV:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}\`; $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///').
- Pinned: proxy workers on CPUs $(cpu_list 0 "$MAX_N") (the first N of them), simulator ($SIM_WORKERS workers) on $SIM_CPUS, wrk ($WRK_N threads, $CONNS connections) on $WRK_CPUS. nginx as in bench/run.sh (upstream keepalive 64). ${DURATION}s per run, $ROUNDS interleaved rounds, medians; request as in bench/run.sh, model \"${MODEL:-auto}\", $SIM_TOKENS tokens (SSE: one event per token).
- Command: \`WORKER_COUNTS=\"$WORKER_COUNTS\" SIM_CPU_COUNT=$SIM_CPU_COUNT DRIVER=\"$DRIVER\" DURATION=$DURATION ROUNDS=$ROUNDS CONNS=$CONNS bash bench/scale.sh\`

$TABLE"
echo "$SECTION"
[ "$REPORT" = - ] || { echo "$SECTION" >>"$REPORT"; log "appended to $REPORT"; }
