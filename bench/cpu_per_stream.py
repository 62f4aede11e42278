#!/usr/bin/env python3
"""Daemon CPU per mock stream, measured in-process and steadily.

The load generator measures the daemon from outside, under real concurrency,
but on a shared 2-core machine its numbers move by 20% from run to run.  This
script drives the real Daemon (real Unix socket, real SCM_RIGHTS, real
socketpair clients) in one process and counts only the CPU spent inside the
loop's passes (time.process_time around run_once), so an optimisation of a few
percent is visible.  Streams are started in waves of --wave, like handoffs
arriving at a steady rate, and run with the real clock and message delay.

    python3 bench/cpu_per_stream.py [--streams 6000] [--wave 30] [--repeat 3] [--log info]

With --fake-clock the loop's clock advances 1 ms per pass instead of running
in real time, so the work done is the same on every run: run it under
`valgrind --tool=callgrind` to compare instruction counts exactly.
"""
import argparse
import array
import io
import json
import os
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import streamd  # noqa: E402


def handoff(path, data, fd):
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(path)
        s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def run(args, path):
    cfg = streamd.load_config({"server.socket_path": path, "metrics.listen_addr": "",
                               "logging.level": args.log}, env={})
    streamd.setup_logging(args.log, "text", io.StringIO() if args.log != "error" else None)
    clock = FakeClock() if args.fake_clock else time.monotonic
    d = streamd.Daemon(cfg, clock=clock)
    d.max_connections = 100000
    d.open_listener()
    d.probe_lag()
    data = json.dumps({"prompt": "cpu per stream", "user_id": 1}).encode()
    clients, cpu, started = [], 0.0, 0
    interval = args.wave / args.rate
    next_wave = clock()
    while started < args.streams or d.conns:
        if started < args.streams and clock() >= next_wave:
            for _ in range(min(args.wave, args.streams - started)):
                a, b = socket.socketpair()
                handoff(path, data, b.fileno())
                b.close()
                clients.append(a)
                started += 1
            next_wave += interval
        t0 = time.process_time()
        if args.fake_clock:
            d.run_once(max_wait=0)
            clock.now += 0.001
        else:
            # until the next wave; after the last one, let the loop sleep as it would
            wait = max(0.0, min(0.01, next_wave - clock())) if started < args.streams else None
            d.run_once(max_wait=wait)
        cpu += time.process_time() - t0
        if started >= args.streams and not d.stats.active_streams:
            # every stream has ended: close the clients so the daemon's FIN/linger completes
            for c in clients:
                c.close()
            clients = []
            if not d.conns:
                break
    for c in clients:
        c.close()
    ok = d.stats.completed
    d.close()
    return cpu, ok


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=6000)
    p.add_argument("--rate", type=float, default=1500.0, help="streams started per second")
    p.add_argument("--wave", type=int, default=30, help="streams started together")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--log", default="warning", choices=("debug", "info", "warning", "error"))
    p.add_argument("--fake-clock", action="store_true", help="deterministic: 1 ms of clock per loop pass")
    args = p.parse_args()
    results = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            cpu, ok = run(args, os.path.join(tmp, "s.sock"))
        results.append(cpu / args.streams * 1e6)
        print("%d streams (%d completed): %.1f us of loop CPU per stream" % (args.streams, ok, results[-1]),
              flush=True)
    print("min %.1f us, median %.1f us per stream" % (min(results), sorted(results)[len(results) // 2]))


if __name__ == "__main__":
    main()
