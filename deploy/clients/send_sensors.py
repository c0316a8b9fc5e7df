#!/usr/bin/env python3
"""Simulate a gallery's sensors and steer roomscore over OSC.

Sends, a few times a second:
  /roomscore/movement f        0..1, how much people move
  /roomscore/mood     f f      valence -1..1, arousal 0..1
  /roomscore/presence i        number of visitors
following a slow made-up day: people drift in, crowd, thin out.

    python3 -m venv ~/osc && ~/osc/bin/pip install python-osc     (then run it with ~/osc/bin/python)
    ./send_sensors.py --host 192.168.1.50 --port 9000 --duration 120
    ./send_sensors.py --bundle --latency 0.2   # time-tagged bundles, applied 200 ms later

With --bundle every update is one OSC bundle whose time tag is now + latency, so the three
values take effect together at the same moment (the clocks of both machines must agree:
use NTP). Without it, plain messages that act on arrival.
"""
import argparse
import math
import random
import sys
import time

try:
    from pythonosc.udp_client import SimpleUDPClient
    from pythonosc.osc_bundle_builder import OscBundleBuilder
    from pythonosc.osc_message_builder import OscMessageBuilder
except ImportError:
    sys.exit("python-osc is missing: pip install python-osc  (in a venv: python3 -m venv ~/osc && ~/osc/bin/pip install python-osc)")

def message(address, *args):
    b = OscMessageBuilder(address=address)
    for a in args:
        b.add_arg(a)
    return b.build()


def room_at(t, period, rng, state):
    """A made-up room at time t (seconds since start): one 'day' lasts `period` seconds."""
    day = (t % period) / period                          # 0..1
    crowd = max(0.0, math.sin(math.pi * day)) ** 1.5     # empty - busy - empty
    visitors = max(0, round(crowd * 25 + rng.gauss(0, 1.5)))
    # movement wanders around the crowd level, smoothed
    target = min(1.0, 0.1 + 0.7 * crowd + rng.uniform(-0.15, 0.15))
    state["movement"] += 0.25 * (target - state["movement"])
    movement = min(1.0, max(0.0, state["movement"]))
    valence = max(-1.0, min(1.0, math.sin(2 * math.pi * t / (period * 0.7)) * 0.8))
    arousal = min(1.0, max(0.0, 0.2 + 0.6 * movement + rng.uniform(-0.05, 0.05)))
    return movement, valence, arousal, visitors


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1", help="the roomscore box (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=9000, help="its OSC port (default 9000)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds to run; 0 = forever (default 60)")
    ap.add_argument("--rate", type=float, default=4.0, help="updates per second (default 4)")
    ap.add_argument("--period", type=float, default=60.0, help="seconds for one simulated day (default 60)")
    ap.add_argument("--bundle", action="store_true", help="send time-tagged bundles instead of messages")
    ap.add_argument("--latency", type=float, default=0.1, help="bundle time tag = now + this (default 0.1 s)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("-q", "--quiet", action="store_true", help="don't print every update")
    args = ap.parse_args()
    if args.rate <= 0:
        ap.error("--rate must be > 0")

    client = SimpleUDPClient(args.host, args.port)
    rng = random.Random(args.seed)
    state = {"movement": 0.1}
    start = time.monotonic()
    n = 0
    print(f"sending to {args.host}:{args.port} ({'bundles' if args.bundle else 'messages'}); Ctrl-C stops")
    try:
        while args.duration <= 0 or time.monotonic() - start < args.duration:
            t = time.monotonic() - start
            movement, valence, arousal, visitors = room_at(t, args.period, rng, state)
            msgs = [
                message("/roomscore/movement", float(movement)),
                message("/roomscore/mood", float(valence), float(arousal)),
                message("/roomscore/presence", int(visitors)),
            ]
            if args.bundle:
                b = OscBundleBuilder(time.time() + args.latency)  # Unix time; python-osc converts to NTP
                for m in msgs:
                    b.add_content(m)
                client.send(b.build())
            else:
                for m in msgs:
                    client.send(m)
            n += 1
            if not args.quiet:
                print(f"{t:7.1f}s  movement {movement:.2f}  mood {valence:+.2f} {arousal:.2f}  visitors {visitors}")
            time.sleep(max(0.0, start + n / args.rate - time.monotonic()))
    except KeyboardInterrupt:
        pass
    print(f"sent {n} updates")


if __name__ == "__main__":
    main()
