#!/usr/bin/env bash
# User-space instructions per proxied chat request, repeatable on a noisy machine:
# callgrind totals of the router serving 1,000 and then 2,000 requests on one keep-alive
# connection (epoll driver; valgrind does not follow io_uring), difference divided by 1,000,
# so start-up and shutdown cancel out. Counted per thread too: the busiest is the data-plane
# worker. Work on wall-clock periods, which valgrind stretches (the control plane's usage
# ledger, timers), moves both counts by a few hundred from run to run. Needs valgrind and python3; release binaries are built if missing.
#
#   bash bench/callgrind.sh            # prints "instructions per request: N (worker thread W)"
#   KEEP=1 bash bench/callgrind.sh     # also keeps callgrind.out.* for callgrind_annotate
#   HIT=1 bash bench/callgrind.sh      # a deterministic request: every one after the first is
#                                      # a response-cache hit
#   NGINX=1 bash bench/callgrind.sh    # the same count for nginx in front of the simulator
#                                      # (one process, upstream keep-alive, as in bench/run.sh)
#   STREAM=1 bash bench/callgrind.sh   # per streamed request (SSE, 16 chunks paced 1 ms apart,
#                                      # so that each is relayed on its own): 200 and 400 streams
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind; }
[ -x target/release/switchyard ] && [ -x target/release/switchyard-sim ] || cargo build --release --bins
. bench/lib.sh
work=$(mktemp -d)
sim_port=$(free_port); router_port=$(free_port)
trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
trap 'exit 130' INT TERM # so that the exit trap stops what was started
# Streams are paced so that every chunk is read and relayed by itself, as a real backend's are.
target/release/switchyard-sim --listen 127.0.0.1:$sim_port --workers 1 \
    --tokens-per-second "$([ -n "${STREAM:-}" ] && echo 1000 || echo 0)" >/dev/null 2>&1 &
switchyard_config epoll "$work/data" "$sim_port" >"$work/switchyard.toml"
# One process (no master), so that valgrind measures the one that serves.
nginx_config "$work" "$router_port" "$sim_port" 1 "master_process off; daemon off;" >"$work/nginx.conf"
if [ -n "${NGINX:-}" ]; then
    command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] ||
        apt-get install -y -qq nginx-light || { apt-get update -qq && apt-get install -y -qq nginx-light; }
    router=("$(command -v nginx || echo /usr/sbin/nginx)" -p "$work" -c "$work/nginx.conf" -e "$work/error.log")
else
    router=(target/release/switchyard serve --config "$work/switchyard.toml" --listen 127.0.0.1:$router_port --workers 1)
fi
run() {
    valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$work/callgrind.out.$1" "${router[@]}" >"$work/log.$1" 2>&1 &
    vg=$!
    python3 - "$1" "$router_port" "${HIT:-}" "${STREAM:-}" <<'PY'
import socket, sys, time
n, port, hit, stream = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
for _ in range(200):
    try:
        s = socket.create_connection(("127.0.0.1", port)); break
    except OSError:
        time.sleep(0.1)
body = b'{"model":"auto",%s"messages":[{"role":"user","content":"Summarise: the meeting moved to Friday."}]}' % (
    b'"temperature":0,' if hit else b'"stream":true,' if stream else b"")
req = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
for _ in range(n):
    s.sendall(req)
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(65536)
    head, rest = buf.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200"), head
    if stream:  # chunked: read to the last chunk
        while not rest.endswith(b"0\r\n\r\n"):
            rest += s.recv(65536)
        assert b"data: [DONE]" in rest, rest
        continue
    length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
    while len(rest) < length:
        rest += s.recv(65536)
PY
    kill -INT $vg
    wait $vg || true
    # One line per thread: "thread-number total".
    for f in "$work"/callgrind.out.$1-*; do
        echo "${f##*-} $(awk '/^(summary|totals):/ {print $2; exit}' "$f")"
    done
}
# Streams take 16 ms each: fewer of them.
if [ -n "${STREAM:-}" ]; then n=200; else n=1000; fi
run $n >"$work/threads.1"
run $((2 * n)) >"$work/threads.2"
# Threads are matched by number; the worker is the one whose count grew most.
awk -v n=$n 'NR == FNR {a[$1] = $2; next} {d = $2 - a[$1]; all += d; if (d > w) w = d}
    END {printf "instructions per request: %d (worker thread %d)\n", all / n, w / n}' \
    "$work/threads.1" "$work/threads.2"
[ -z "${KEEP:-}" ] || echo "callgrind output kept in $work"
