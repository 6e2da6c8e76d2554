#!/usr/bin/env python3
"""A DNS load generator for tests/bench/dns.sh: A queries over UDP to one
server, printing one JSON line of figures.

    dnsload.py SERVER NAME [--unique] [--seconds S] [--window W]

NAME is asked again and again (a warm cache after the first), or with
--unique as a fresh random label under NAME each time (every query a cache
miss). Latency: W=1 queries one after another for a third of the time
(p50 and p99 in ms); throughput: W queries kept in flight for the rest
(answers per second). Unanswered queries are counted, never waited on for
more than 1 s.
"""
import json
import os
import random
import select
import socket
import struct
import sys
import time


def query(qid, name):
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.strip(".").split("."))
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack(">HH", 1, 1)


def main():
    args = sys.argv[1:]
    server, name = args[0], args[1]
    unique = "--unique" in args
    seconds = float(args[args.index("--seconds") + 1]) if "--seconds" in args else 6.0
    window = int(args[args.index("--window") + 1]) if "--window" in args else 32
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect((server, 53))
    n = [0]

    def next_name():
        n[0] += 1
        return f"q{n[0]}x{random.randrange(1 << 30)}.{name}" if unique else name

    def run(until, inflight_max):
        sent = {}
        lat = []
        lost = 0
        while time.monotonic() < until or sent:
            now = time.monotonic()
            while len(sent) < inflight_max and now < until:
                qid = random.randrange(65536)
                if qid in sent:
                    continue
                sock.send(query(qid, next_name()))
                sent[qid] = now
            r, _, _ = select.select([sock], [], [], 0.05)
            if r:
                while True:
                    try:
                        data = sock.recv(4096)
                    except BlockingIOError:
                        break
                    qid = struct.unpack(">H", data[:2])[0]
                    t = sent.pop(qid, None)
                    if t is not None:
                        lat.append(time.monotonic() - t)
            now = time.monotonic()
            for qid, t in list(sent.items()):
                if now - t > 1.0:
                    del sent[qid]
                    lost += 1
        return lat, lost

    t0 = time.monotonic()
    lat, lost1 = run(t0 + seconds / 3, 1)
    t1 = time.monotonic()
    answered, lost2 = run(t1 + seconds * 2 / 3, window)
    t2 = time.monotonic()
    lat.sort()
    pick = lambda q: round(lat[min(len(lat) - 1, int(len(lat) * q))] * 1e3, 3) if lat else None
    print(json.dumps({
        "p50_ms": pick(0.5),
        "p99_ms": pick(0.99),
        "qps": round(len(answered) / (t2 - t1)),
        "lost": lost1 + lost2,
    }))


if __name__ == "__main__":
    main()
