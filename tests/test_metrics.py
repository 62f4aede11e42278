"""Metrics (SPEC §6): names, types, labels and buckets as the Go daemon, values
checked by scraping a live daemon; /healthz; --benchmark's summary."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest

from conftest import STREAMD, handoff_pair, read_until_eof, raw_handoff, client
import streamd

prom_parser = pytest.importorskip("prometheus_client.parser")


def metrics_port(d):
    d.wait_log("msg=metrics")
    return int(re.search(r"msg=metrics addr=127\.0\.0\.1:(\d+)", d.logs()).group(1))


def get(port, path, method="GET"):
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        body = e.read()
        e.close()
        return e.code, dict(e.headers), body


def scrape(port):
    status, headers, body = get(port, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    fams = {f.name: f for f in prom_parser.text_string_to_metric_families(body.decode())}
    return fams


def value(fams, name, **labels):
    fam_name = re.sub(r"(_total|_count|_sum|_bucket)$", "", name)
    for sample in fams[fam_name].samples:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    raise KeyError((name, labels))


GO_TYPES = {
    "daemon_active_connections": "gauge", "daemon_connections": "counter",
    "daemon_connections_rejected": "counter", "daemon_handoffs": "counter",
    "daemon_handoff_errors": "counter", "daemon_handoff_duration_seconds": "histogram",
    "daemon_active_streams": "gauge", "daemon_peak_streams": "gauge", "daemon_bytes_sent": "counter",
    "daemon_chunks_sent": "counter", "daemon_stream_errors": "counter",
    "daemon_stream_duration_seconds": "histogram", "daemon_backend_requests": "counter",
    "daemon_backend_errors": "counter", "daemon_backend_duration_seconds": "histogram",
    "daemon_backend_ttfb_seconds": "histogram", "daemon_loop_lag_seconds": "histogram",
    "daemon_upstream_retries": "counter", "daemon_circuit_open": "gauge",
}


def test_metrics_of_a_live_daemon(daemon_proc):
    d = daemon_proc("--metrics-addr", "127.0.0.1:0", "--message-delay", "1ms")
    port = metrics_port(d)
    for _ in range(2):
        c = handoff_pair(d.path, b'{"prompt": "x"}')
        assert read_until_eof(c).endswith(b"data: [DONE]\n\n")
        c.close()
    c = handoff_pair(d.path, b"{bad json")
    read_until_eof(c)
    c.close()
    raw_handoff(d.path, b"no fd here", [])
    d.wait_log("reason=no_fd")
    fams = scrape(port)
    for name, kind in GO_TYPES.items():
        assert fams[name].type == kind, name
    assert value(fams, "daemon_handoffs_total") == 3
    assert value(fams, "daemon_connections_total") == 3
    assert value(fams, "daemon_connections_rejected_total") == 0
    assert value(fams, "daemon_handoff_errors_total", reason="bad_json") == 1
    assert value(fams, "daemon_handoff_errors_total", reason="no_fd") == 1
    assert value(fams, "daemon_backend_requests_total", backend="mock") == 2
    assert value(fams, "daemon_backend_errors_total", backend="mock") == 0
    assert value(fams, "daemon_chunks_sent_total") == 2 * 18
    assert value(fams, "daemon_bytes_sent_total") > 2 * 1000
    assert value(fams, "daemon_stream_duration_seconds_count") == 2
    assert value(fams, "daemon_backend_duration_seconds_count", backend="mock") == 2
    assert value(fams, "daemon_backend_ttfb_seconds_count", backend="mock") == 2
    assert value(fams, "daemon_handoff_duration_seconds_count") == 3
    assert value(fams, "daemon_active_streams") == 0 and value(fams, "daemon_peak_streams") == 1
    assert value(fams, "daemon_stream_errors_total", reason="client_disconnected") == 0
    assert value(fams, "daemon_circuit_open", backend="mock") == 0
    assert "process_cpu_seconds" in fams
    # Go's buckets: 0.0001 x 2^k, 15 of them (+Inf)
    les = [s.labels["le"] for s in fams["daemon_handoff_duration_seconds"].samples if s.name.endswith("_bucket")]
    assert les[0] == "0.0001" and les[-2] == "1.6384" and les[-1] == "+Inf" and len(les) == 16
    les = [s.labels["le"] for s in fams["daemon_stream_duration_seconds"].samples if s.name.endswith("_bucket")]
    assert les[0] == "0.01" and les[-2] == "163.84"
    les = [s.labels["le"] for s in fams["daemon_backend_ttfb_seconds"].samples if s.name.endswith("_bucket")]
    assert les[0] == "0.001" and les[-2] == "16.384"


def test_live_streams_and_disconnects_are_counted(daemon_proc):
    d = daemon_proc("--metrics-addr", "127.0.0.1:0", "--message-delay", "200ms", "--max-connections", "2")
    port = metrics_port(d)
    live = [handoff_pair(d.path, b"\0") for _ in range(2)]
    for c in live:
        c.settimeout(5)
        assert c.recv(4096).startswith(b"HTTP/1.1 200")
    extra = handoff_pair(d.path, b"\0")
    assert read_until_eof(extra).startswith(b"HTTP/1.1 503")
    extra.close()
    fams = scrape(port)
    assert value(fams, "daemon_active_streams") == 2 and value(fams, "daemon_active_connections") == 2
    assert value(fams, "daemon_connections_rejected_total") == 1
    assert value(fams, "daemon_chunks_sent_total") >= 2  # live streams count before they end
    status, _, body = get(port, "/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok", "active_streams": 2, "active_connections": 2}
    live[0].close()
    d.wait_log("outcome=client_disconnected")
    fams = scrape(port)
    assert value(fams, "daemon_stream_errors_total", reason="client_disconnected") == 1
    assert value(fams, "daemon_active_streams") == 1
    live[1].close()


def test_metrics_http_edges(daemon_proc):
    d = daemon_proc("--metrics-addr", "127.0.0.1:0")
    port = metrics_port(d)
    assert get(port, "/nope")[0] == 404
    assert get(port, "/metrics", method="POST")[0] == 405
    status, headers, body = get(port, "/healthz", method="HEAD")
    assert status == 200 and body == b""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 10000)
    assert read_until_eof(s).startswith(b"HTTP/1.1 431")
    s.close()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"garbage\r\n\r\n")
    assert read_until_eof(s).startswith(b"HTTP/1.1 400")
    s.close()


def test_metrics_client_timeout(daemon, fdcheck):
    ip = daemon(metrics__listen_addr="127.0.0.1:0")
    ip.d.start_metrics()
    s = socket.create_connection(ip.d.metrics.addr)
    s.sendall(b"GET /metr")  # and then nothing
    ip.run_for(5)
    assert len(ip.d.metrics.clients) == 1
    ip.clock.advance(5)
    ip.run_for(5)
    assert not ip.d.metrics.clients
    s.settimeout(2)
    assert s.recv(10) == b""
    s.close()
    ip.finish(fdcheck)


def test_metrics_without_prometheus_client(tmp_path):
    """streamd.py alone (-S): metrics are off with one warning; /healthz still works."""
    sock = str(tmp_path / "s.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "n"))
    notify.settimeout(10)
    log = open(tmp_path / "log", "wb")
    p = subprocess.Popen([sys.executable, "-S", STREAMD, "--socket", sock, "--metrics-addr", "127.0.0.1:0"],
                         env={"NOTIFY_SOCKET": str(tmp_path / "n"), "PATH": os.environ["PATH"]}, stderr=log)
    try:
        assert notify.recv(64) == b"READY=1"
        text = (tmp_path / "log").read_text()
        assert text.count("metrics disabled: prometheus_client is not installed") == 1
        port = int(re.search(r"addr=127\.0\.0\.1:(\d+)", text).group(1))
        assert get(port, "/metrics")[0] == 503
        assert json.loads(get(port, "/healthz")[2])["status"] == "ok"
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(10)
        log.close()
        notify.close()


def test_metrics_addr_in_use_is_a_start_error(daemon_proc):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    out = subprocess.run([sys.executable, STREAMD, "--socket", "/tmp/unused-%d.sock" % os.getpid(),
                          "--metrics-addr", "127.0.0.1:%d" % port], capture_output=True, text=True, timeout=30)
    s.close()
    assert out.returncode == 2
    assert out.stderr == "streamd: metrics.listen_addr: cannot listen on '127.0.0.1:%d': Address already in use\n" % port
    assert not os.path.exists("/tmp/unused-%d.sock" % os.getpid())


def test_benchmark_summary(daemon_proc):
    d = daemon_proc("--benchmark", "--message-delay", "20ms")
    for data in (b"\0", b"\0"):
        c = handoff_pair(d.path, data)
        read_until_eof(c)
        c.close()
    c = handoff_pair(d.path, b"\0")
    c.settimeout(5)
    c.recv(10)
    c.close()  # a failed one
    d.wait_log("outcome=client_disconnected")
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    out = d.proc.stdout.read().decode()
    lines = out.strip().splitlines()
    assert lines[0] == "=== Benchmark Summary ==="
    assert lines[1] == "Peak concurrent streams: 1"
    assert lines[2:5] == ["Total started: 3", "Total completed: 2", "Total failed: 1"]
    assert re.fullmatch(r"Total bytes sent: \d+", lines[5]) and lines[6] == "========================="
    assert out.startswith("\n")


def test_benchmark_mode_skips_histograms(daemon):
    ip = daemon(server__benchmark=True, backend__mock__message_delay=0.0)
    c = client(ip.path, b"\0")
    ip.pump(c.done)
    snap = ip.d.snapshot()
    assert snap["histograms"]["handoff_duration"][0] == [0] * 16 and not snap["backend_histograms"]["backend_ttfb"]
    assert snap["counters"]["started"] == 1


def test_merge_snapshots():
    a, b = streamd.Stats(), streamd.Stats()
    a.handoffs, b.handoffs = 3, 4
    a.active_streams, b.active_streams = 1, 2
    a.peak_streams, b.peak_streams = 5, 7
    a.handoff_errors["no_fd"] = 1
    b.handoff_errors["no_fd"] = 2
    a.stream_duration.observe(0.5)
    b.stream_duration.observe(0.5)
    b.observe_backend(b.backend_ttfb, streamd.TTFB_BUCKETS, "mock", 0.002)
    m = streamd.merge_snapshots([a.snapshot(), b.snapshot()])
    assert m["counters"]["handoffs"] == 7 and m["gauges"]["active_streams"] == 3
    assert m["gauges"]["peak_streams"] == 7 and m["labeled"]["handoff_errors"] == {"no_fd": 3}
    assert sum(m["histograms"]["stream_duration"][0]) == 2 and m["histograms"]["stream_duration"][1] == 1.0
    assert m["backend_histograms"]["backend_ttfb"]["mock"][1] == 0.002


def test_tokens_build_info_and_every_handoff_reason(daemon_proc):
    d = daemon_proc("--metrics-addr", "127.0.0.1:0", "--message-delay", "1ms")
    port = metrics_port(d)
    c = handoff_pair(d.path, b'{"prompt": "three words here"}')
    assert read_until_eof(c).endswith(b"data: [DONE]\n\n")
    c.close()
    d.wait_log('msg="stream done"')
    fams = scrape(port)
    assert value(fams, "daemon_tokens_total", backend="mock", kind="prompt") == 3  # the mock counts words
    assert value(fams, "daemon_tokens_total", backend="mock", kind="completion") > 100
    info = [s for s in fams["streamd_build_info"].samples][0]
    assert info.value == 1 and info.labels["version"] == streamd.__version__ and info.labels["python"].count(".") == 2
    for reason in streamd.HANDOFF_REASONS:
        assert value(fams, "daemon_handoff_errors_total", reason=reason) == 0
