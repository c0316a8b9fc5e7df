#!/usr/bin/env bash
# Underrun soak: the gallery scene composed by the trained model, through JACK (dummy driver,
# 48 kHz, 256 frames, real-time scheduling where granted), for SECONDS (default 600) while two
# busy-loop processes load both cores. Prints the engine's xruns (its status and its log) and
# JACK's own count. Usage: deploy/bench/soak.sh [SECONDS] [BINARY]
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-600}
bin=${2:-target/release/roomscore}
server="roomscore-soak-$$"
port=$((20000 + $$ % 10000))
work=$(mktemp -d)
export JACK_DEFAULT_SERVER=$server

# The gallery's instruments and mappings, with the model as its source.
sed -e 's|^source = "rules"|source = "model"\nmodel = "../models/roomscore-satb.onnx"\nscale_lock = false|' \
  scenes/gallery.toml > scenes/.soak-gallery-model.toml

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -f scenes/.soak-gallery-model.toml
  rm -rf "$work"
}
trap cleanup EXIT

rt=--realtime
jackd $rt -n "$server" -d dummy -r 48000 -p 256 >"$work/jackd.log" 2>&1 &
pids+=($!)
sleep 2
if ! jack_lsp >/dev/null 2>&1; then
  kill "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true; pids=()
  rt=--no-realtime
  jackd $rt -n "$server" -d dummy -r 48000 -p 256 >"$work/jackd.log" 2>&1 &
  pids+=($!)
  sleep 2
fi
RUST_LOG=info "$bin" play --host jack --buffer 256 --scene scenes/.soak-gallery-model.toml \
  --osc "127.0.0.1:$port" --seconds "$seconds" >"$work/play.log" 2>&1 &
play=$!
sleep 5
for _ in 1 2; do
  ( while :; do :; done ) &
  pids+=($!)
done
# Keep the room moving, as visitors would.
python3 - "$port" "$seconds" <<'PY' &
import math, socket, struct, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
def msg(addr, *floats):
    def pad(b): return b + b"\0" * (4 - len(b) % 4)
    return pad(addr.encode()) + pad(("," + "f" * len(floats)).encode()) + b"".join(struct.pack(">f", f) for f in floats)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
t0 = time.time()
while time.time() - t0 < seconds:
    t = time.time() - t0
    s.sendto(msg("/roomscore/movement", 0.5 + 0.5 * math.sin(t / 20)), ("127.0.0.1", port))
    s.sendto(msg("/roomscore/mood", math.sin(t / 45), 0.5), ("127.0.0.1", port))
    time.sleep(0.1)
PY
pids+=($!)
sleep $((seconds - 10))
python3 deploy/clients/status.py --port "$port" || true
wait "$play" || true
echo "jackd: $rt; load: 2 busy loops; $(nproc) cores"
grep -E "playing on|model|source|stopped|xrun|WARN|ERROR" "$work/play.log" | tail -8
echo "JACK xruns reported by the server: $(grep -c 'JackEngine::XRun' "$work/jackd.log" || true)"
grep 'JackEngine::XRun' "$work/jackd.log" | sed 's/.*client = //' | sort | uniq -c
