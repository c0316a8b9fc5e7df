#!/usr/bin/env bash
# Underrun soak: the gallery scene composed by the trained model, through JACK (dummy driver,
# 48 kHz, 256 frames, real-time scheduling where granted), for SECONDS (default 600) while two
# busy-loop processes load both cores. Prints the engine's xruns (its status and its log) and
# JACK's own count; with cyclictest (Debian rt-tests) it also measures how late the machine wakes
# a real-time thread meanwhile, so an xrun can be told apart from a box (or a VM host) that stalls
# real-time threads by itself. Usage: deploy/bench/soak.sh [SECONDS] [BINARY]
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
if command -v cyclictest >/dev/null; then
  # One thread per core at a priority above JACK's, waking every millisecond.
  cyclictest -m -t"$(nproc)" -a -p 80 -i 1000 -D "$((seconds - 10))" -q -h 100000 >"$work/cyclictest.txt" 2>&1 &
  pids+=($!)
fi
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
if [ -s "$work/cyclictest.txt" ]; then
  # Histogram rows: microseconds, then one count per thread.
  awk '/^[0-9]/ { n = 0; for (i = 2; i <= NF; i++) n += $i;
                  if ($1 >= 2667) half += n; if ($1 >= 5333) period += n }
       /^# Max Latencies/ { max = $0 }
       END { printf "real-time wake-ups (cyclictest, priority 80, every 1 ms): %d later than half a period, %d later than a period (5.33 ms); %s us\n", half, period, max }' \
    "$work/cyclictest.txt"
fi
