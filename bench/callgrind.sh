#!/usr/bin/env bash
# User-space instructions per proxied chat request, repeatable on a noisy machine:
# callgrind totals of the router serving 1,000 and then 2,000 requests on one keep-alive
# connection (epoll driver; valgrind does not follow io_uring), difference divided by 1,000,
# so start-up and shutdown cancel out. Needs valgrind and python3; release binaries are built
# if missing.
#
#   bash bench/callgrind.sh            # prints "instructions per request: N"
#   KEEP=1 bash bench/callgrind.sh     # also keeps callgrind.out.* for callgrind_annotate
#   HIT=1 bash bench/callgrind.sh      # a deterministic request: every one after the first is
#                                      # a response-cache hit
#   NGINX=1 bash bench/callgrind.sh    # the same count for nginx in front of the simulator
#                                      # (one process, upstream keep-alive, as in bench/run.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind; }
[ -x target/release/switchyard ] && [ -x target/release/switchyard-sim ] || cargo build --release --bins
work=$(mktemp -d)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sim_port=$(port); router_port=$(port)
trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
target/release/switchyard-sim --listen 127.0.0.1:$sim_port --workers 1 >/dev/null 2>&1 &
cat > "$work/switchyard.toml" <<TOML
[listener]
io_driver = "epoll"
[health]
interval_ms = 0
[admin]
enabled = false
[storage]
data_dir = "$work/data"
[[backends]]
name = "sim"
url = "http://127.0.0.1:$sim_port"
models = [{ name = "m", input_per_mtok = 0.1, output_per_mtok = 0.2 }]
[[tiers]]
name = "small"
targets = ["sim/m"]
TOML
cat > "$work/nginx.conf" <<CONF
master_process off;
daemon off;
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $work/client_body;
    proxy_temp_path $work/proxy;
    fastcgi_temp_path $work/fastcgi;
    uwsgi_temp_path $work/uwsgi;
    scgi_temp_path $work/scgi;
    keepalive_requests 1000000;
    upstream sim { server 127.0.0.1:$sim_port; keepalive 64; }
    server {
        listen 127.0.0.1:$router_port;
        location / { proxy_pass http://sim; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
}
CONF
if [ -n "${NGINX:-}" ]; then
    command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] ||
        apt-get install -y -qq nginx-light || { apt-get update -qq && apt-get install -y -qq nginx-light; }
    router=("$(command -v nginx || echo /usr/sbin/nginx)" -p "$work" -c "$work/nginx.conf" -e "$work/nginx-error.log")
else
    router=(target/release/switchyard serve --config "$work/switchyard.toml" --listen 127.0.0.1:$router_port --workers 1)
fi
run() {
    valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out.$1" "${router[@]}" >"$work/log.$1" 2>&1 &
    local vg=$!
    # This runs in a command substitution: its own trap stops the router if the client fails.
    trap 'kill $vg 2>/dev/null' EXIT
    python3 - "$1" "$router_port" "${HIT:-}" <<'PY'
import socket, sys, time
n, port, hit = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
for _ in range(200):
    try:
        s = socket.create_connection(("127.0.0.1", port)); break
    except OSError:
        time.sleep(0.1)
body = b'{"model":"auto",%s"messages":[{"role":"user","content":"Summarise: the meeting moved to Friday."}]}' % (b'"temperature":0,' if hit else b"")
req = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
for _ in range(n):
    s.sendall(req)
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(65536)
    head, rest = buf.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200"), head
    length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
    while len(rest) < length:
        rest += s.recv(65536)
PY
    kill -INT $vg
    wait $vg || true
    awk '/^(summary|totals):/ {print $2; exit}' "$work/callgrind.out.$1"
}
a=$(run 1000)
b=$(run 2000)
echo "instructions per request: $(( (b - a) / 1000 ))"
[ -z "${KEEP:-}" ] || echo "callgrind output kept in $work"
