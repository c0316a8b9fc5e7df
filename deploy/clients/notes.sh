#!/usr/bin/env bash
# Play a few notes on a running roomscore with liblo's oscsend (apt-get install liblo-tools).
#   ./notes.sh [HOST] [PORT]
# /roomscore/note takes two ints: MIDI pitch 0..127 and velocity 0..127.
set -euo pipefail
host=${1:-localhost}
port=${2:-9000}
command -v oscsend >/dev/null || { echo "oscsend not found: apt-get install liblo-tools" >&2; exit 1; }

# A rising D major arpeggio, then a chord.
for pitch in 62 66 69 74 78; do
    oscsend "$host" "$port" /roomscore/note ii "$pitch" 100
    sleep 0.4
done
for pitch in 50 62 69 78; do
    oscsend "$host" "$port" /roomscore/note ii "$pitch" 90
done
echo "sent 9 notes to $host:$port"
