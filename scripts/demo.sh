#!/usr/bin/env bash
# The main job on a fresh machine: set up, train a quick model on the embedded corpus
# (the Python documentation every CPython ships), serve it over gRPC, stream a
# generation to the terminal, and shut the server down cleanly with SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
TEXTGEN=.venv/bin/textgen
PROMPT=${1:-"The "}

echo "== training a quick model on the embedded corpus (textgen train) =="
# The quick preset for five epochs: about two minutes on two CPU cores.
$TEXTGEN train --out models/textgen --epochs ${EPOCHS:-5}

read -r PORT METRICS_PORT < <(.venv/bin/python -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
')
echo "== serving models/ on 127.0.0.1:$PORT (metrics on :$METRICS_PORT) =="
$TEXTGEN serve --models models --host 127.0.0.1 --port "$PORT" --metrics-port "$METRICS_PORT" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true' EXIT
# Wait (up to two minutes) until the standard gRPC health check says SERVING.
.venv/bin/python - "$PORT" <<'PY'
import sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}"))
deadline = time.monotonic() + 120
while True:
    try:
        if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
            break
    except grpc.RpcError:
        pass
    if time.monotonic() > deadline:
        sys.exit("server did not become SERVING within 120 s")
    time.sleep(0.5)
PY

echo "== streaming a generation (textgen generate --target) =="
$TEXTGEN generate --target "127.0.0.1:$PORT" --max-tokens 400 --temperature 0.8 --seed 1 "$PROMPT"
echo
echo "== stopping the server (SIGTERM) =="
kill -TERM $SERVER
wait $SERVER
trap - EXIT
echo "server exited cleanly"
