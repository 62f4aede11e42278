#!/usr/bin/env python3
"""Load generator for streamd: acts like Apache under load.

Each stream: make a socket pair (a Unix socketpair, or a TCP pair on
127.0.0.1), connect to the daemon's socket (SOCK_SEQPACKET), send the handoff
data with one end as SCM_RIGHTS, close that end, and read the response from the
other end until EOF.  Several processes share the work (one core each, and each
with its own fd limit); each runs one selectors loop.

Modes:
  rate   --rate R --duration S      start R streams/s for S seconds
  ramp   --rate-start A --rate B --duration S
                                    start streams at a rate rising linearly from A/s to B/s
  burst  --count N                  start N streams at once
  hold   --count N --rate R         ramp up to N concurrent streams at R/s, hold them to the end

Everything is bounded: --duration, --count, and --timeout per stream; the
target is a Unix socket path, so traffic never leaves the machine.

Reports success/failure by kind, handoff latency, time to first byte and
stream duration (p50/p99/p99.9), events/s, peak concurrency, and the daemon's
CPU time and RSS (from /proc, summed over its worker processes) as a table on
stdout and as JSON (--json FILE).  Live progress goes to stderr.
"""
import argparse
import array
import errno
import json
import multiprocessing
import os
import resource
import selectors
import socket
import sys
import time

SCM = socket.SCM_RIGHTS


# ---- the daemon, seen through /proc ----

def proc_tree(pid):
    """pid and all its descendants (the workers of a --workers daemon)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def proc_usage(pid):
    """(cpu seconds user+sys, rss KiB) summed over the daemon's process tree."""
    if not pid:
        return 0.0, 0
    cpu, rss, tick = 0.0, 0, os.sysconf("SC_CLK_TCK")
    for p in proc_tree(pid):
        try:
            with open("/proc/%d/stat" % p) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / tick
            with open("/proc/%d/status" % p) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
        except OSError:
            pass
    return cpu, rss


# ---- one load process ----

class Stream:
    __slots__ = ("sock", "t0", "t_handoff", "t_first", "head", "tail", "events")

    def __init__(self, sock, t0):
        self.sock, self.t0, self.t_handoff, self.t_first = sock, t0, None, None
        self.head, self.tail, self.events = b"", b"", 0  # only what classification needs


def make_pair(kind, tcp_listener):
    if kind == "unix":
        return socket.socketpair()
    a = socket.create_connection(tcp_listener.getsockname())
    b, _ = tcp_listener.accept()
    return a, b


def handoff(path, data, fd):
    """Connect and send, as mod_socket_handoff does; raise OSError on failure."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.setblocking(False)  # Apache connects non-blocking too: a full backlog is EAGAIN, not a wait
        s.connect(path)
        s.sendmsg([data], [(socket.SOL_SOCKET, SCM, array.array("i", [fd]))])
    finally:
        s.close()


def worker(index, args, schedule, progress, conn):
    """Start the streams whose start times are in `schedule` (seconds from
    `args.t_start`), read them all, and send the records back over `conn`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sel = selectors.DefaultSelector()
    tcp = None
    if args.pair == "tcp":
        tcp = socket.socket()
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(4096)
    data = args.data.encode()
    if args.http:  # the direct front: POST the same data as the handoff's
        host, _, port = args.http.rpartition(":")
        http_addr = (host.strip("[]"), int(port))
        http_request = (b"POST /v1/stream HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % (args.http.encode(), len(data))) + data
    records = []          # (handoff_s, ttfb_s, duration_s, events, outcome)
    live = {}
    i = 0
    deadline = args.t_start + (schedule[-1] if schedule else 0) + args.timeout + 5
    last_progress = 0.0
    while (i < len(schedule) or live) and time.time() < deadline:
        now = time.time()
        # start every stream that is due
        while i < len(schedule) and args.t_start + schedule[i] <= now:
            i += 1
            t0 = time.monotonic()
            if args.http:
                try:
                    mine = socket.create_connection(http_addr)
                    mine.sendall(http_request)
                except OSError as e:
                    records.append((time.monotonic() - t0, 0, 0, 0, "connect_" + errno.errorcode.get(e.errno, "error")))
                    continue
                st = Stream(mine, t0)
                st.t_handoff = time.monotonic()
                mine.setblocking(False)
                sel.register(mine, selectors.EVENT_READ, st)
                live[mine] = st
                continue
            try:
                mine, theirs = make_pair(args.pair, tcp)
            except OSError as e:
                records.append((0, 0, 0, 0, "loadgen_" + errno.errorcode.get(e.errno, "error")))
                continue
            try:
                handoff(args.socket, data, theirs.fileno())
            except OSError as e:
                mine.close()
                kind = {errno.EAGAIN: "backlog_full", errno.ECONNREFUSED: "refused",
                        errno.ENOENT: "no_socket"}.get(e.errno, "handoff_" + errno.errorcode.get(e.errno, "error"))
                records.append((time.monotonic() - t0, 0, 0, 0, kind))
                continue
            finally:
                theirs.close()
            st = Stream(mine, t0)
            st.t_handoff = time.monotonic()
            mine.setblocking(False)
            sel.register(mine, selectors.EVENT_READ, st)
            live[mine] = st
        # read what arrived
        wait = 0.05
        if i < len(schedule):
            wait = max(0.0, min(wait, args.t_start + schedule[i] - time.time()))
        for key, _ in sel.select(wait):
            st = key.data
            try:
                chunk = st.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                chunk = None
            now_m = time.monotonic()
            if chunk:
                if st.t_first is None:
                    st.t_first = now_m
                    st.head = chunk[:12]
                st.events += chunk.count(b"\n\n")
                st.tail = (st.tail + chunk)[-16:]
                continue
            sel.unregister(st.sock)
            st.sock.close()
            del live[st.sock]
            records.append(finish(st, now_m, chunk is None))
        # streams that exceeded --timeout
        now_m = time.monotonic()
        for s, st in list(live.items()):
            if now_m - st.t0 > args.timeout:
                sel.unregister(s)
                s.close()
                del live[s]
                records.append((st.t_handoff - st.t0, (st.t_first or now_m) - st.t0, now_m - st.t0, st.events,
                                "timeout"))
        if time.time() - last_progress > 0.25:
            progress[index * 3] = i
            progress[index * 3 + 1] = len(records)
            progress[index * 3 + 2] = len(live)
            last_progress = time.time()
    for s, st in live.items():
        s.close()
        records.append((0, 0, 0, st.events, "timeout"))
    progress[index * 3], progress[index * 3 + 1], progress[index * 3 + 2] = i, len(records), 0
    conn.send(records)
    conn.close()


def finish(st, now, reset):
    status = st.head[9:12].decode("latin-1", "replace") if st.head.startswith(b"HTTP/1.1 ") else "none"
    if status != "200":
        outcome = "status_" + status
    elif reset:
        outcome = "reset"
    elif not st.tail.endswith(b"data: [DONE]\n\n"):
        outcome = "incomplete"
    else:
        outcome = "ok"
    return (st.t_handoff - st.t0, st.t_first - st.t0 if st.t_first else 0, now - st.t0, st.events, outcome)


# ---- the run ----

def pct(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(p / 100 * len(values) + 0.5)) - 1))
    return values[k]


def schedules(args):
    """Start times (seconds from t_start), split across processes round-robin."""
    if args.mode == "burst":
        times = [0.0] * args.count
    elif args.mode == "ramp":
        # rate(t) = a + (b - a) t / S; stream k starts when the integral reaches k
        a, b, S = args.rate_start, args.rate, args.duration
        times, t, k = [], 0.0, 0
        total = (a + b) / 2 * S
        while k < total and (not args.count or k < args.count):
            # solve a t + (b - a) t^2 / (2 S) = k for t
            if b == a:
                t = k / a
            else:
                c2 = (b - a) / (2 * S)
                t = (-a + (a * a + 4 * c2 * k) ** 0.5) / (2 * c2)
            times.append(t)
            k += 1
    elif args.mode == "hold":
        times = [i / args.rate for i in range(args.count)]
    else:
        n = int(args.rate * args.duration)
        if args.count:
            n = min(n, args.count)
        times = [i / args.rate for i in range(n)]
    return [times[k::args.procs] for k in range(args.procs)]


def run(args):
    scheds = schedules(args)
    total = sum(len(s) for s in scheds)
    args.t_start = time.time() + 0.3  # every process starts together
    progress = multiprocessing.Array("l", 3 * args.procs, lock=False)
    cpu0, rss0 = proc_usage(args.pid)
    procs, pipes = [], []
    for k in range(args.procs):
        r, w = multiprocessing.Pipe(duplex=False)
        p = multiprocessing.Process(target=worker, args=(k, args, scheds[k], progress, w), daemon=True)
        p.start()
        w.close()
        procs.append(p)
        pipes.append(r)
    peak_rss, peak_live, peak_live_at, results = rss0, 0, 0.0, []
    t0 = time.time()
    while any(not r.poll() for r in pipes):
        time.sleep(0.2)
        cpu, rss = proc_usage(args.pid)
        peak_rss = max(peak_rss, rss)
        started = sum(progress[k * 3] for k in range(args.procs))
        done = sum(progress[k * 3 + 1] for k in range(args.procs))
        live = sum(progress[k * 3 + 2] for k in range(args.procs))
        if live > peak_live:
            peak_live, peak_live_at = live, rss
        if not args.quiet:
            sys.stderr.write("\r%5.1fs started %d/%d done %d live %d  daemon rss %.1f MiB cpu %.1fs   " % (
                time.time() - t0, started, total, done, live, rss / 1024, cpu - cpu0))
            sys.stderr.flush()
    for r in pipes:
        results += r.recv()
    for p in procs:
        p.join()
    elapsed = time.time() - args.t_start
    cpu1, rss1 = proc_usage(args.pid)
    if not args.quiet:
        sys.stderr.write("\n")
    ok = [r for r in results if r[4] == "ok"]
    kinds = {}
    for r in results:
        kinds[r[4]] = kinds.get(r[4], 0) + 1
    events = sum(r[3] for r in results)
    report = {
        "mode": args.mode, "rate": args.rate if args.mode != "burst" else None, "count": total,
        "data": args.data, "procs": args.procs, "pair": args.pair,
        "ok": len(ok), "failed": len(results) - len(ok), "outcomes": kinds,
        "elapsed_s": round(elapsed, 3), "events": events, "events_per_s": round(events / elapsed, 1),
        # the rate streams were started at (not counting the last streams' run time)
        "handoffs_per_s": round(total / (max((s[-1] for s in scheds if s), default=0) + 1 / args.rate), 1)
        if args.mode != "burst" else None,
        "peak_concurrency": peak_live,
    }
    for name, idx in (("handoff_ms", 0), ("ttfb_ms", 1), ("duration_ms", 2)):
        vals = [r[idx] * 1000 for r in ok]
        report[name] = {"p50": round(pct(vals, 50), 3), "p99": round(pct(vals, 99), 3),
                        "p99.9": round(pct(vals, 99.9), 3), "max": round(max(vals), 3) if vals else None}
    if args.pid:
        report["daemon"] = {"cpu_s": round(cpu1 - cpu0, 3),
                            "cpu_us_per_stream": round((cpu1 - cpu0) / max(1, len(results)) * 1e6, 1),
                            "rss_before_kib": rss0, "rss_peak_kib": peak_rss, "rss_after_kib": rss1,
                            "rss_growth_per_stream_kb": round((peak_rss - rss0) * 1.024 / max(1, peak_live), 3)
                            if peak_live else None}
    return report


def table(rep):
    lines = ["| metric | value |", "|---|---|"]
    add = lambda k, v: lines.append("| %s | %s |" % (k, v))
    add("mode", "%s%s" % (rep["mode"], " to %s/s" % rep["rate"] if rep["mode"] == "ramp" else
                           " at %s/s" % rep["rate"] if rep["rate"] else ""))
    add("streams", "%d (%d ok, %d failed)" % (rep["count"], rep["ok"], rep["failed"]))
    if rep["failed"]:
        add("outcomes", ", ".join("%s %d" % kv for kv in sorted(rep["outcomes"].items())))
    for name in ("handoff_ms", "ttfb_ms", "duration_ms"):
        v = rep[name]
        add(name.replace("_ms", " (ms)"), "p50 %s · p99 %s · p99.9 %s · max %s" % (v["p50"], v["p99"], v["p99.9"], v["max"]))
    add("events/s", rep["events_per_s"])
    if rep["handoffs_per_s"]:
        add("handoffs/s", rep["handoffs_per_s"])
    add("peak concurrency", rep["peak_concurrency"])
    if "daemon" in rep:
        d = rep["daemon"]
        add("daemon CPU", "%.2f s, %.0f µs/stream" % (d["cpu_s"], d["cpu_us_per_stream"]))
        add("daemon RSS (KiB)", "%d → peak %d → %d; %s KB/stream at peak" % (
            d["rss_before_kib"], d["rss_peak_kib"], d["rss_after_kib"], d["rss_growth_per_stream_kb"]))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--socket", help="the daemon's handoff socket")
    p.add_argument("--http", metavar="HOST:PORT",
                   help="instead of handoffs: POST /v1/stream to the daemon's direct front (--listen)")
    p.add_argument("--mode", choices=("rate", "ramp", "burst", "hold"), default="rate")
    p.add_argument("--rate", type=float, default=100.0, help="new streams per second (rate, hold; ramp: the end)")
    p.add_argument("--rate-start", type=float, default=10.0, help="ramp: the starting rate")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of starting streams (rate)")
    p.add_argument("--count", type=int, default=0, help="streams (burst, hold; a cap for rate)")
    p.add_argument("--procs", type=int, default=2, help="load processes")
    p.add_argument("--pair", choices=("unix", "tcp"), default="unix", help="client socket kind")
    p.add_argument("--data", default='{"prompt":"load test","user_id":1}', help="handoff data")
    p.add_argument("--timeout", type=float, default=60.0, help="give up on a stream after this long")
    p.add_argument("--pid", type=int, default=0, help="daemon pid, for CPU and RSS from /proc")
    p.add_argument("--json", help="also write the report as JSON here")
    p.add_argument("--quiet", action="store_true", help="no live progress")
    args = p.parse_args(argv)
    if not args.socket and not args.http:
        p.error("one of --socket or --http is required")
    if args.mode in ("burst", "hold") and not args.count:
        p.error("--mode %s needs --count" % args.mode)
    if args.count > 200000 or args.duration > 600 or args.rate > 50000:
        p.error("refusing a run that large (count <= 200000, duration <= 600 s, rate <= 50000/s)")
    rep = run(args)
    print(table(rep))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=2)
    return 0 if rep["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
