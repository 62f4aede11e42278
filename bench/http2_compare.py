#!/usr/bin/env python3
"""HTTP/1.1 vs HTTP/2 to the upstream: 1,000 concurrent proxied streams.

For each protocol: start the test upstream (tests/upstream.py, plain HTTP/1.1,
or h2c) in its own process, a daemon with the openai backend pointed at it
(--http2 false or true), and hand it --streams streams of 8 events 200 ms
apart through bench/loadgen.py.  Reports daemon CPU, RSS, the worst loop lag
and how many connections the upstream saw.  Needs the h2 package.

    python3 bench/http2_compare.py [--streams 1000]
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def serve(h2: bool, tls: bool) -> None:
    """Child process: run a test upstream until SIGTERM, then print its stats."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # for sigwait, in every thread
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import threading
    threading.stack_size(256 * 1024)
    from upstream import TestUpstream
    ctx = None
    if tls:  # a throwaway certificate; the daemon runs with --insecure-ssl
        import ssl
        import trustme
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        trustme.CA().issue_cert("127.0.0.1").configure_cert(ctx)
        ctx.set_alpn_protocols(["h2", "http/1.1"] if h2 else ["http/1.1"])
    up = TestUpstream(h2=h2, tls_context=ctx)
    print(up.port, flush=True)
    signal.sigwait({signal.SIGTERM})
    print(json.dumps({"connections": up.connections, "requests": len(up.requests)}), flush=True)
    os._exit(0)


def run(proto: str, tls: bool, streams: int) -> dict:
    up = subprocess.Popen([sys.executable, __file__, "--serve", proto] + (["--tls"] if tls else []),
                          stdout=subprocess.PIPE, text=True)
    port = int(up.stdout.readline())
    with tempfile.TemporaryDirectory() as tmp:
        sock, log = os.path.join(tmp, "s.sock"), os.path.join(tmp, "daemon.log")
        with open(log, "wb") as logf:
            d = subprocess.Popen([sys.executable, os.path.join(ROOT, "streamd.py"), "--socket", sock,
                                  "--metrics-addr", "", "--backend", "openai", "--upstream-max-idle", str(streams),
                                  "--openai-base", "%s://127.0.0.1:%d/v1" % ("https" if tls else "http", port),
                                  "--insecure-ssl", "--upstream-threads", "32",
                                  "--http2", ("auto" if tls else "true") if proto == "h2" else "false"],
                                 stderr=logf)
            while not os.path.exists(sock):
                time.sleep(0.05)
            out = os.path.join(tmp, "load.json")
            subprocess.run([sys.executable, os.path.join(HERE, "loadgen.py"), "--socket", sock, "--mode", "hold",
                            "--count", str(streams), "--rate", str(streams), "--pid", str(d.pid), "--quiet",
                            "--timeout", "60", "--json", out,
                            "--data", '{"prompt": "compare", "test_pattern": "slow:200"}'],
                           stdout=subprocess.DEVNULL, check=False)
            with open(out) as f:
                rep = json.load(f)
            d.send_signal(signal.SIGTERM)
            d.wait(60)
        with open(log) as f:
            lag = re.findall(r"max_loop_lag_ms=([\d.]+)", f.read())
    up.send_signal(signal.SIGTERM)
    stats = json.loads(up.stdout.readline())
    up.wait(10)
    return {"proto": proto, "tls": tls, "ok": rep["ok"], "failed": rep["failed"], "peak": rep["peak_concurrency"],
            "connections": stats["connections"], "cpu_s": rep["daemon"]["cpu_s"],
            "cpu_us": rep["daemon"]["cpu_us_per_stream"], "rss_kb": rep["daemon"]["rss_growth_per_stream_kb"],
            "rss_peak_kib": rep["daemon"]["rss_peak_kib"], "ttfb_p99": rep["ttfb_ms"]["p99"],
            "lag_ms": float(lag[-1]) if lag else None}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--serve", choices=("h1", "h2"), help=argparse.SUPPRESS)
    p.add_argument("--tls", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return serve(args.serve == "h2", args.tls)
    rows = [run(proto, tls, args.streams) for tls in (False, True) for proto in ("h1", "h2")]
    print("| upstream protocol | streams OK | peak concurrent | upstream connections | daemon CPU | RSS per stream "
          "| TTFB p99 | worst loop lag |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| %s | %d/%d | %d | %d | %.2f s (%.0f µs/stream) | %.2f KB | %.1f ms | %s ms |" % (
            ("HTTP/1.1" if r["proto"] == "h1" else "HTTP/2") + (" over TLS" if r["tls"] else
                                                                 " (h2c)" if r["proto"] == "h2" else ""), r["ok"], r["ok"] + r["failed"], r["peak"],
            r["connections"], r["cpu_s"], r["cpu_us"], r["rss_kb"], r["ttfb_p99"], r["lag_ms"]))


if __name__ == "__main__":
    sys.exit(main())
