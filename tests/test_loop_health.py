"""Nothing an upstream does may stall the loop: mock streams keep their timing
while other streams wait on an upstream that is slow to accept, slow to
finish the TLS handshake, and slow to answer."""
import json
import socket
import ssl
import threading
import time

import pytest

from conftest import handoff_pair
from upstream import TestUpstream


class TimedReader(threading.Thread):
    def __init__(self, sock):
        super().__init__(daemon=True)
        self.sock, self.data, self.times = sock, b"", []
        self.start()

    def run(self):
        self.sock.setblocking(True)
        self.sock.settimeout(30)
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.times.append((time.monotonic(), chunk.count(b"data: ")))
            self.data += chunk
        self.sock.close()

    def gaps(self):
        t = [when for when, n in self.times if n]
        return [b - a for a, b in zip(t, t[1:])]


def test_loop_keeps_serving_while_upstreams_are_slow(daemon_proc, tmp_path):
    trustme = pytest.importorskip("trustme")
    # 1. An upstream that never accepts: its listen queue is full, so SYNs are dropped.
    stuck = socket.socket()
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(0)
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(stuck.getsockname())
        fillers.append(f)
    # 2. A TLS upstream that waits 2 s before its handshake.
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    slow_tls = TestUpstream(tls_context=ctx)
    slow_tls.handshake_delay = 2.0
    # 3. An upstream that reads the request and never answers.
    mute = TestUpstream()
    try:
        d = daemon_proc("--backend", "mock", "--enable-backends", "openai,anthropic,gemini",
                        "--message-delay", "50ms", "--insecure-ssl", "--connect-timeout", "3s",
                        "--header-timeout", "3s",
                        "--openai-base", "http://127.0.0.1:%d/v1" % stuck.getsockname()[1],
                        "--anthropic-base", slow_tls.base, "--gemini-base", mute.base)
        slow = [TimedReader(handoff_pair(d.path, json.dumps({"backend": b, "test_pattern": "nohead"}).encode()))
                for b in ("openai", "anthropic", "gemini") for _ in range(4)]
        mocks = [TimedReader(handoff_pair(d.path, b'{"prompt": "tick"}')) for _ in range(5)]
        for r in mocks:
            r.join(10)
            assert r.data.endswith(b"data: [DONE]\n\n")
            assert max(r.gaps()) < 0.25, "a mock stream stalled for %.3fs" % max(r.gaps())
        for r in slow:
            r.join(15)
            status = int(r.data.split(b" ", 2)[1])
            assert status in (502, 504), r.data[:200]
    finally:
        slow_tls.close()
        mute.close()
        stuck.close()
        for f in fillers:
            f.close()
