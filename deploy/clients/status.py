#!/usr/bin/env python3
"""Ask a running roomscore for its status over OSC and print the reply.

    ./status.py                         # the engine on this box
    ./status.py --host 192.168.1.50     # another box
    ./status.py --watch 2               # every 2 seconds until Ctrl-C

Sends /roomscore/status (no arguments) from a UDP socket and waits for the engine's
/roomscore/status reply on that same socket. No reply means the engine is not running,
listens elsewhere (ROOMSCORE_OSC), or a firewall drops UDP on the way (either direction).
Exit status: 0 reply received, 1 no reply.
Needs only Python 3's standard library (it speaks the bit of OSC it needs itself), so it
runs on the kiosk as it is.
"""
import argparse
import socket
import struct
import sys
import time

FIELDS = [
    ("scene", "s"),
    ("tempo (BPM)", "f"),
    ("notes played", "i"),
    ("dropped messages", "i"),
    ("xruns", "i"),
    ("source", "s"),
    ("invalid messages", "i"),
    ("late notes", "i"),
    ("sounding voices", "i"),
    ("seconds playing", "f"),
    ("audio load peak %", "f"),
    ("output", "s"),
    ("times the device was lost", "i"),
    ("refused by allow lists", "i"),
]


def osc_string(s):
    b = s.encode() + b"\0"
    return b + b"\0" * (-len(b) % 4)


def read_string(data, i):
    end = data.index(b"\0", i)
    return data[i:end].decode("utf-8", "replace"), (end + 4) & ~3


def parse_message(data):
    """(address, [args]) from one OSC message; handles s i f d h T F N b."""
    address, i = read_string(data, 0)
    tags, i = read_string(data, i)
    args = []
    for t in tags.lstrip(","):
        if t == "s":
            v, i = read_string(data, i)
        elif t in "if":
            v = struct.unpack_from(">i" if t == "i" else ">f", data, i)[0]
            i += 4
        elif t in "dh":
            v = struct.unpack_from(">d" if t == "d" else ">q", data, i)[0]
            i += 8
        elif t == "b":
            n = struct.unpack_from(">i", data, i)[0]
            v = data[i + 4:i + 4 + n]
            i += 4 + n + (-n % 4)
        else:
            v = {"T": True, "F": False, "N": None}.get(t, "?" + t)
        args.append(v)
    return address, args


def ask(sock, addr, timeout):
    sock.sendto(osc_string("/roomscore/status") + osc_string(","), addr)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            data, _ = sock.recvfrom(65536)
        except socket.timeout:
            return None
        try:
            address, args = parse_message(data)
        except (ValueError, struct.error):
            continue
        if address == "/roomscore/status":
            return args


def show(values):
    for i, (name, kind) in enumerate(FIELDS):
        v = values[i] if i < len(values) else "?"
        if kind == "f" and isinstance(v, float):
            v = f"{v:.1f}"
        print(f"  {name:<18} {v}")
    for v in values[len(FIELDS):]:
        print(f"  {'(extra)':<18} {v}")
    if len(values) >= 5 and isinstance(values[4], int) and values[4] > 0:
        print("  -> xruns > 0: the audio could not keep up; raise ROOMSCORE_BUFFER")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the reply (default 2)")
    ap.add_argument("--watch", type=float, default=0, metavar="SECONDS", help="repeat every SECONDS")
    ap.add_argument("--raw", action="store_true", help="print the reply's arguments as a list")
    args = ap.parse_args()

    addr = (socket.gethostbyname(args.host), args.port)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    ok = False
    try:
        while True:
            values = ask(sock, addr, args.timeout)
            if values is None:
                print(f"no reply from {args.host}:{args.port} within {args.timeout:g} s", file=sys.stderr)
            else:
                ok = True
                print(f"roomscore at {args.host}:{args.port}")
                print(values) if args.raw else show(values)
            if args.watch <= 0:
                break
            time.sleep(args.watch)
    except KeyboardInterrupt:
        pass
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
