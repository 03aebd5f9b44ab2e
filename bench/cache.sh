#!/usr/bin/env bash
# Cache benchmark: the simulator answering directly vs Switchyard answering the same
# deterministic request from its cache, interleaved in one run (wrk, 64 connections), plus the
# CPU per request of each (user and system). Target: cache hits at >= 1.5x the simulator's
# direct throughput. wrk shares the cores, so the script also prints requests per core-second
# (the inverse ratio of CPU per request), the capacity a machine with spare cores would see.
#
#   bash bench/cache.sh                # DURATION [8] ROUNDS [3] CONNS [64] WORKERS [1] THREADS [1]
#
# THREADS is wrk's thread count. One by default: with one worker answering, wrk's thread and
# the worker then have a core each on a 2-core box; two wrk threads make three busy threads on
# two cores, and the preempted wrk thread caps the faster target (cache hits) most. wrk's own
# CPU is printed too: a run where it is near 100% of one core per thread measured wrk.
# SIM_CPUS, PROXY_CPUS, WRK_CPUS (taskset -c lists, unset by default) pin the simulator,
# Switchyard and wrk on a machine with cores to spare, so each has its own.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8}; ROUNDS=${ROUNDS:-3}; CONNS=${CONNS:-64}; WORKERS=${WORKERS:-1}; THREADS=${THREADS:-1}
command -v wrk >/dev/null && [ -x /usr/bin/time ] || { apt-get update -qq && apt-get install -y -qq wrk time; }
[ -x target/release/switchyard ] && [ -x target/release/switchyard-sim ] || cargo build --release --bins
. bench/lib.sh
TMP=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; rm -rf "$TMP"' EXIT
trap 'exit 130' INT TERM # so that the exit trap stops what was started
work=$TMP
SY=target/release/switchyard SIM=target/release/switchyard-sim SIM_TOKENS=16 SIM_WORKERS=$WORKERS
start_sim
start_switchyard auto cache || die "Switchyard did not start: $SY_ERR"
sim_port=$SIM_PORT sim_pid=$SIM_PID sy_port=$SY_PORT sy_pid=$SY_PID
cat > "$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"auto","temperature":0,"messages":[{"role":"user","content":"Extract the invoice number: INV-2291, due 2024-05-01, total 1,234.50 EUR."}]}'
LUA
sleep 1
curl -s -o /dev/null -D - -H 'content-type: application/json' --data "$(sed -n "s/^wrk.body = '\(.*\)'$/\1/p" "$work/post.lua")" \
    http://127.0.0.1:$sy_port/v1/chat/completions | grep -i '^x-switchyard-cache' >&2
# utime and stime of every thread, in clock ticks.
cpu() { awk '{u += $14; s += $15} END {print u, s}' /proc/$1/task/*/stat; }
tck=$(getconf CLK_TCK)
per_req() { echo "scale=2; ($1) * 1000000 / $tck / $reqs" | bc -l; }
echo "| round | target | req/s | p50 | p99 | user us/req | system us/req | CPU us/req | wrk CPU us/req | wrk CPU % |"
echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
results="$work/results"
for round in $(seq "$ROUNDS"); do
    for target in direct cache-hit; do
        if [ $target = direct ]; then url=http://127.0.0.1:$sim_port; pid=$sim_pid; else url=http://127.0.0.1:$sy_port; pid=$sy_pid; fi
        read -r u0 s0 < <(cpu $pid)
        out=$(pin "${WRK_CPUS:-}" /usr/bin/time -f '%U %S %e' -o "$work/wrk-time" \
            wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency -s "$work/post.lua" $url/v1/chat/completions)
        read -r u1 s1 < <(cpu $pid)
        reqs=$(echo "$out" | awk '/requests in/{print $1}')
        rps=$(echo "$out" | awk '/Requests\/sec/{printf "%d", $2}')
        p50=$(echo "$out" | awk '$1=="50%"{print $2}'); p99=$(echo "$out" | awk '$1=="99%"{print $2}')
        user=$(per_req "$u1-$u0"); sys=$(per_req "$s1-$s0"); total=$(per_req "$u1-$u0+$s1-$s0")
        read -r wu ws we < "$work/wrk-time"
        wrk_us=$(echo "($wu + $ws) * 1000000 / $reqs" | bc -l); wrk_pct=$(echo "($wu + $ws) * 100 / $we" | bc -l)
        printf "| %s | %s | %s | %s | %s | %.2f | %.2f | %.2f | %.2f | %.0f |\n" "$round" "$target" "$rps" "$p50" "$p99" "$user" "$sys" "$total" "$wrk_us" "$wrk_pct"
        echo "$round $target $rps $total" >> "$results"
    done
done
# Per round: hits' req/s over the simulator's, and the simulator's CPU per request over a
# hit's (how many more requests one core answers from the cache than the simulator does).
echo
echo "| round | throughput, cache hit / direct | requests per core-second, cache hit / direct |"
echo "|---:|---:|---:|"
awk '$2=="direct"{r[$1]=$3; c[$1]=$4} $2=="cache-hit"{printf "| %s | %.2fx | %.2fx |\n", $1, $3/r[$1], c[$1]/$4}' "$results"
