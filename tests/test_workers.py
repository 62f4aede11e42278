"""--workers N: one socket, N pre-forked loops, a supervising parent."""
import json
import os
import re
import signal
import threading
import time
import urllib.request

import pytest

from conftest import handoff_pair, read_until_eof
from test_process import Reader

pytest.importorskip("prometheus_client")


def worker_pids(d):
    return {int(w): int(p) for w, p in re.findall(r'msg="worker started" worker=(\d+) pid=(\d+)', d.logs())}


def healthz(port):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/healthz" % port, timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = json.loads(e.read())
        e.close()
        return body


def metric(port, name):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
        text = r.read().decode()
    m = re.search(r"^%s (\S+)$" % re.escape(name), text, re.M)
    return float(m.group(1)) if m else None


def wait_for(cond, timeout=10):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in %gs" % timeout
        time.sleep(0.05)


def start(daemon_proc, *args):
    d = daemon_proc("--workers", "2", "--metrics-addr", "127.0.0.1:0", *args)
    d.wait_log('msg="worker ready"', count=2)
    port = int(re.search(r"msg=metrics addr=127\.0\.0\.1:(\d+)", d.logs()).group(1))
    return d, port


def test_workers_share_the_socket_and_metrics_add_up(daemon_proc):
    d, port = start(daemon_proc, "--message-delay", "1ms")
    for _ in range(8):
        c = handoff_pair(d.path, b"\0")
        assert read_until_eof(c).endswith(b"data: [DONE]\n\n")
        c.close()
    wait_for(lambda: metric(port, "daemon_handoffs_total") == 8)
    assert metric(port, 'daemon_backend_requests_total{backend="mock"}') == 8
    assert metric(port, "daemon_chunks_sent_total") == 8 * 18
    assert healthz(port) == {"status": "ok", "active_streams": 0, "active_connections": 0, "workers": 2}
    assert re.findall(r"msg=\"stream done\" worker=(\d)", d.logs())


def test_killed_worker_comes_back_others_keep_streaming(daemon_proc):
    d, port = start(daemon_proc, "--message-delay", "100ms")
    pids = worker_pids(d)
    base = {w: len(os.listdir("/proc/%d/fd" % p)) for w, p in pids.items()}
    # Workers race to accept: hand off until both hold streams (one fd each).
    readers = []
    while len(readers) < 40 and not all(len(os.listdir("/proc/%d/fd" % p)) > base[w] for w, p in pids.items()):
        readers.append(Reader(handoff_pair(d.path, b"\0")))
        readers[-1].got_first.wait(5)
    assert len(readers) < 40, "one worker took every handoff"
    os.kill(pids[0], signal.SIGKILL)
    d.wait_log("worker died; restarting")
    d.wait_log('msg="worker started" worker=0', count=2)
    for r in readers:
        r.join(10)
    done = [r for r in readers if r.data.endswith(b"data: [DONE]\n\n")]
    cut = [r for r in readers if not r.data.endswith(b"data: [DONE]\n\n")]
    assert done, "the surviving worker's streams must finish"
    assert all(b"data: [DONE]" not in r.data for r in cut)
    # the new worker serves; the parent still counts the dead one's handoffs
    after = [Reader(handoff_pair(d.path, b'{"prompt": "after"}')) for _ in range(4)]
    for r in after:
        r.join(10)
        assert r.data.endswith(b"data: [DONE]\n\n")
    wait_for(lambda: healthz(port)["workers"] == 2)
    wait_for(lambda: metric(port, "daemon_handoffs_total") >= 4 + len(done))


def test_sigterm_drains_across_workers(daemon_proc):
    d, port = start(daemon_proc, "--message-delay", "50ms")
    readers = [Reader(handoff_pair(d.path, b"\0")) for _ in range(6)]
    for r in readers:
        r.got_first.wait(5)
    d.signal(signal.SIGTERM)
    d.wait_notify("STOPPING=1")
    assert not os.path.exists(d.path)
    assert d.wait(20) == 0
    for r in readers:
        r.join(5)
        assert r.data.endswith(b"data: [DONE]\n\n")
    assert d.logs().count("msg=draining") == 2  # each worker drained


def test_sighup_reaches_every_worker(daemon_proc, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backend:\n  mock:\n    message_delay: 1ms\n")
    d, port = start(daemon_proc, "--config", str(cfg))
    cfg.write_text("backend:\n  mock:\n    message_delay: 2ms\n")
    d.signal(signal.SIGHUP)
    d.wait_log('changed=backend.mock.message_delay', count=2)
    assert "SIGHUP: reloading workers" in d.logs()


def test_workers_exit_when_the_supervisor_is_killed(daemon_proc):
    d, port = start(daemon_proc, "--message-delay", "1ms")
    pids = list(worker_pids(d).values())
    d.proc.kill()
    d.proc.wait()
    def gone(pid):
        try:
            with open("/proc/%d/stat" % pid) as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
        except FileNotFoundError:
            return True
    for pid in pids:
        wait_for(lambda: gone(pid))


def test_each_workers_own_fds_memory_and_cpu(daemon_proc):
    """process_* describe the parent: the fullest worker is what an fd alert must watch."""
    d, port = start(daemon_proc)
    for w in ("0", "1"):
        wait_for(lambda: (metric(port, "daemon_worker_open_fds{worker=\"%s\"}" % w) or 0) > 3)
        assert metric(port, 'daemon_worker_resident_memory_bytes{worker="%s"}' % w) > 1 << 20
        assert metric(port, 'daemon_worker_cpu_seconds_total{worker="%s"}' % w) >= 0  # (10 ms ticks: may be 0 yet)
