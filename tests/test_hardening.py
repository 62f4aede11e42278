"""Hostile peers: no input from any peer may stop the daemon, stall a stream or
starve handoffs.  One regression test (at least) per case found, in the order
of the issue, then the containment rule itself.  Real sockets throughout; the
daemon runs in-process with a fake clock unless a real process is the point."""
import array
import json
import os
import resource
import signal
import socket
import threading
import time

import pytest

from conftest import client, small_buffer_client, raw_handoff, read_until_eof
from test_backends import settings, upstream  # noqa: F401  (fixture)
from test_connection import probe_backend  # noqa: F401  (fixture)
from test_front import front, connect, exchange, get, post, error_of
import streamd


# ---- 1. Content-Length with more digits than int() takes ----

@pytest.mark.parametrize("value, status", [(b"9" * 4301, 413), (b"0" * 5000 + b"1", 200), (b"1" + b"0" * 40, 413)],
                         ids=["4301-nines", "leading-zeros", "41-digits"])
def test_content_length_of_thousands_of_digits(daemon, fdcheck, value, status):
    ip = front(daemon)
    body = b" " if status == 200 else b""  # one byte of whitespace: "all defaults"
    got, _, answer = exchange(ip, b"POST /v1/stream HTTP/1.1\r\nHost: t\r\nContent-Length: " + value
                              + b"\r\n\r\n" + body)
    assert got == status
    if status == 413:
        assert error_of(answer)["message"] == "request body larger than 131072 bytes"
    assert exchange(ip, get("/healthz"))[0] == 200  # still serving
    ip.finish(fdcheck)


# ---- 2. JSON nested deeper than Python's recursion limit ----

def test_deeply_nested_messages_in_the_query_is_400(daemon, fdcheck):
    ip = front(daemon, http__max_request_line=16384)
    status, _, body = exchange(ip, get("/v1/stream?messages=" + "%5B" * 2500))
    assert status == 400 and error_of(body)["message"].startswith("messages: expected a JSON list")
    ip.finish(fdcheck)


@pytest.mark.parametrize("data", [b"[" * 5000, b'{"messages":' + b"[" * 3000,
                                  b'{"langgraph_input":' + b'{"a":' * 65 + b"1" + b"}" * 66], ids=range(3))
def test_deeply_nested_handoff_data_and_body_is_400(daemon, fdcheck, data):
    ip = front(daemon)
    c = client(ip.path, data)
    ip.pump(c.done)
    r = c.parsed()
    assert r.status == 400 and b"nested deeper than 64 levels" in r.body
    status, _, body = exchange(ip, post(data))
    assert status == 400 and "nested deeper than 64 levels" in error_of(body)["message"]
    c.close()
    ip.finish(fdcheck)


def test_number_and_list_limits_in_handoff_data():
    with pytest.raises(streamd.ProtocolError, match="an integer of 5000 digits is too long"):
        streamd.parse_handoff(b'{"max_tokens": ' + b"9" * 5000 + b"}")
    many = json.dumps({"messages": [{"role": "user", "content": "x"}] * 1001}).encode()
    with pytest.raises(streamd.ProtocolError, match="messages: 1001 entries, more than the limit of 1000"):
        streamd.parse_handoff(many)
    with pytest.raises(streamd.ProtocolError, match="request_id: expected a string of at most 1024 characters, "
                                                    "got a string of 1025 characters"):
        streamd.parse_handoff(json.dumps({"request_id": "r" * 1025}).encode())
    assert streamd.parse_handoff(json.dumps({"prompt": "[" * 10000}).encode()).prompt == "[" * 10000


# ---- 3. back-pressure cannot lose its wake-up ----
#
# A step that writes more than write_high_water parks its backend; whatever
# drains the queue (the send at the end of the step, or the socket becoming
# writable) must unpark it.  Every size, every backend shape, a fast and a
# slow reader: the stream completes.

SIZES = [1024, 64 * 1024, 65 * 1024, 1024 * 1024]


def burst_backend(size):
    """A plain generator: `size` bytes of events in one step, then one more."""
    def script(req):
        for i in range(0, size, 1100):
            yield ("event", {"content": "z" * min(1100, size - i)})
        yield ("sleep", 0.01)
        yield ("event", {"content": "after"})
    return script


def paced_backend(size):
    events = [streamd.sse_event({"content": "z" * min(1100, size - i)}) for i in range(0, size, 1100)]

    def script(req):
        yield ("paced", events, 0.0)
        yield ("event", {"content": "after"})
    return script


def read_all(ip, c, slow):
    """Pump the loop and read; a slow reader takes 4 KiB at a time."""
    end = time.monotonic() + 30
    while not c.eof:
        assert time.monotonic() < end, "stream stalled: %d bytes so far" % len(c.data)
        ip.d.run_once(max_wait=0.002)
        if slow:
            try:
                chunk = c.sock.recv(4096)
            except BlockingIOError:
                continue
            c.data += chunk
            c.eof = not chunk
        else:
            c.read()
        ip.clock.advance(0.01)


def content_bytes(data):
    body = data.split(b"\r\n\r\n", 1)[1]
    return sum(len(json.loads(b[6:]).get("content", "")) for b in body.split(b"\n\n")
               if b.startswith(b"data: {") and b'"content"' in b and b'"after"' not in b)


@pytest.mark.parametrize("shape", ["generator", "paced"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("slow", [False, True], ids=["fast", "slow"])
def test_a_burst_never_stalls_a_builtin_shape(daemon, fdcheck, probe_backend, shape, size, slow):
    probe_backend((burst_backend if shape == "generator" else paced_backend)(size))
    ip = daemon(backend__provider="probe")
    c = small_buffer_client(ip.path) if slow else client(ip.path, b"\0")
    read_all(ip, c, slow)
    assert c.data.endswith(b'data: {"content":"after"}\n\ndata: [DONE]\n\n')
    assert content_bytes(c.data) == size
    c.close()
    ip.finish(fdcheck)


@pytest.mark.parametrize("protocol", ["http/1.1", "h2"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("slow", [False, True], ids=["fast", "slow"])
def test_a_burst_never_stalls_a_proxied_stream(daemon, fdcheck, upstream, protocol, size, slow):  # noqa: F811
    if protocol == "h2":
        pytest.importorskip("h2")
    up = upstream(h2=protocol == "h2")
    extra = {"upstream__http2": "true"} if protocol == "h2" else {"upstream__http2": "false"}
    ip = daemon(**settings("openai", up, **extra))
    data = {"test_pattern": "burst:%d" % size}
    c = small_buffer_client(ip.path, data) if slow else client(ip.path, data)
    read_all(ip, c, slow)
    assert c.data.endswith(b"data: [DONE]\n\n"), c.data[-300:]
    assert content_bytes(c.data) == size
    c.close()
    ip.finish(fdcheck, up)


# ---- 4. a config file that is not UTF-8 ----

def test_non_utf8_config_at_start_is_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys
    f = tmp_path / "c.yaml"
    f.write_bytes(b"server:\n  # caf\xe9\n  max_connections: 10\n")
    out = subprocess.run([sys.executable, streamd.__file__, "--config", str(f), "--socket", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr == "streamd: %s: not UTF-8: byte 0xe9 at line 2 (save the file as UTF-8)\n" % f


def test_non_utf8_config_on_sighup_keeps_the_daemon_and_its_streams(daemon_proc, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("backend:\n  mock:\n    message_delay: 100ms\n")
    d = daemon_proc(config=f)
    s = streamd_handoff(d.path, {"prompt": "x"})
    f.write_bytes(b"backend:\n  mock:\n    message_delay: 1ms  # caf\xe9\n")
    d.signal(signal.SIGHUP)
    d.wait_log("reload failed; keeping the current config")
    assert "not UTF-8: byte 0xe9 at line 3" in d.logs()
    data = read_until_eof(s)
    s.close()
    assert data.endswith(b"data: [DONE]\n\n") and d.proc.poll() is None


def streamd_handoff(path, data):
    mine, theirs = socket.socketpair()
    raw_handoff(path, json.dumps(data).encode(), [theirs.fileno()])
    theirs.close()
    return mine


# ---- 5. front connections cannot starve handoffs ----

def test_handoffs_get_200_while_the_front_is_flooded(daemon, fdcheck):
    ip = front(daemon, server__max_connections=20, http__max_connections=5, http__max_pending_per_address=0)
    idle = [connect(ip) for _ in range(5)]
    ip.pump(lambda: ip.d.front.open == 5)
    over = [connect(ip) for _ in range(3)]
    ip.pump(lambda: all(c.done() for c in over))
    for c in over:  # answered at once, not held
        assert c.data.startswith(b"HTTP/1.1 503 ") and b"the HTTP front is at capacity (5 connections)" in c.data
    assert ip.d.front.open == 5
    streams = [client(ip.path, b"\0") for _ in range(15)]
    ip.pump(lambda: all(c.done() for c in streams))
    assert all(c.parsed().status == 200 and c.data.endswith(b"data: [DONE]\n\n") for c in streams)
    assert ip.d.stats.http_responses["503"] == 3
    for c in idle + over + streams:
        c.close()
    ip.finish(fdcheck)


def test_one_address_may_hold_only_a_few_unfinished_requests(daemon, fdcheck):
    ip = front(daemon, http__max_pending_per_address=3)
    half = [connect(ip, b"GET /healthz HTTP/1.1\r\n") for _ in range(3)]
    ip.pump(lambda: ip.d.front.open == 3)
    extra = connect(ip, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    ip.pump(extra.done)
    assert extra.data.startswith(b"HTTP/1.1 429 ") and b"too many unfinished requests" in extra.data
    # A finished request does not count: the same address is served as soon as one completes.
    half[0].sock.sendall(b"Host: t\r\n\r\n")
    ip.pump(half[0].done)
    assert half[0].data.startswith(b"HTTP/1.1 200 ")
    assert exchange(ip, get("/healthz"))[0] == 200
    for c in half + [extra]:
        c.close()
    ip.finish(fdcheck)


# ---- 6. an upstream status line that is not three digits ----

class RawUpstream:
    """Answers every connection with the same bytes, then closes."""

    def __init__(self, answer: bytes):
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.base = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.stopped = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        self.sock.settimeout(0.05)  # (a blocking accept() would outlive close())
        while not self.stopped:
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with c:
                c.settimeout(5)
                try:
                    c.recv(65536)
                    self.send_answer(c)
                except OSError:
                    pass

    def send_answer(self, c):
        c.sendall(self.answer)
        c.shutdown(socket.SHUT_WR)
        c.recv(1)

    def close(self):
        self.stopped = True
        self.thread.join(5)
        self.sock.close()


@pytest.mark.parametrize("line", [b"HTTP/1.1 4", b"HTTP/1.1 40000", b"HTTP/1.1 99", b"HTTP/1.1 \xb200 OK",
                                  b"HTTP/1.1 2x0 OK", b"garbage"], ids=range(6))
def test_bad_upstream_status_line_is_502_not_500(daemon, fdcheck, line, caplog):
    up = RawUpstream(line + b"\r\nContent-Length: 0\r\n\r\n")
    ip = daemon(**settings("openai", up))
    c = client(ip.path, b"\0")
    ip.pump(c.done)
    r = c.parsed()
    assert r.status == 502 and b"upstream sent an invalid response head: bad status line" in r.body
    assert "internal error" not in caplog.text and "Traceback" not in caplog.text
    c.close()
    ip.finish(fdcheck, up)


@pytest.mark.parametrize("answer, message", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", b"upstream sent a bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", b"upstream sent a bad Content-Length"),
    (b"HTTP/1.1 100 Continue\r\n\r\n" * 9, b"more than 8 interim (1xx) responses"),
], ids=["5000-digits", "negative", "interim"])
def test_bad_upstream_heads_are_502(daemon, fdcheck, answer, message):
    up = RawUpstream(answer)
    ip = daemon(**settings("openai", up))
    c = client(ip.path, b"\0")
    ip.pump(c.done)
    r = c.parsed()
    assert r.status == 502 and message in r.body
    c.close()
    ip.finish(fdcheck, up)


def test_interim_response_in_the_same_packet_as_the_real_one(daemon, fdcheck):
    body = b'data: {"choices":[{"delta":{"content":"hi"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    up = RawUpstream(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    ip = daemon(**settings("openai", up))
    c = client(ip.path, b"\0")
    ip.pump(c.done)
    assert c.data.endswith(b'data: {"content":"hi"}\n\ndata: [DONE]\n\n')
    c.close()
    ip.finish(fdcheck, up)


@pytest.mark.parametrize("body, message", [
    (b"data: " + b"[" * 100000 + b"\n\n", b"upstream sent an event that is not JSON"),
    (b"3\r\nabc\r\n" + b"f" * 5000 + b"\r\n", b"upstream broke HTTP framing: chunk header or trailer line longer"),
    (b"3\r\nabc\r\n" + b"f" * 17 + b"\r\n", b"upstream broke HTTP framing: bad chunk size"),
], ids=["deep-json", "giant-chunk-line", "17-hex-digits"])
def test_hostile_upstream_bodies_end_the_stream_with_an_error_event(daemon, fdcheck, body, message):
    chunked = not body.startswith(b"data")
    head = b"HTTP/1.1 200 OK\r\n" + (b"Transfer-Encoding: chunked\r\n\r\n" if chunked else b"Connection: close\r\n\r\n")
    up = RawUpstream(head + body)
    ip = daemon(**settings("openai", up, upstream__idle_timeout=2.0))
    c = client(ip.path, b"\0")
    ip.pump(c.done)
    assert message in c.data and b"[DONE]" not in c.data
    c.close()
    ip.finish(fdcheck, up)


# ---- 7. at the fd limit, a handoff is answered 503, not dropped ----

def handoff_at_the_fd_limit(ip, free):
    """Send a handoff, then let the daemon take it with only `free` fds left
    (the limit caps fd numbers: set it just above the lowest free one).
    Returns (our end of the client socket, the Unix connection)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    mine, theirs = socket.socketpair()
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    unix.connect(ip.path)
    unix.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [theirs.fileno()]))])
    theirs.close()
    lowest = os.dup(0)
    os.close(lowest)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest + free, hard))
        ip.run_for(5)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return mine, unix


def test_at_the_fd_limit_a_handoff_gets_503(daemon, fdcheck):
    ip = daemon(backend__mock__message_delay=0.0)
    mine, unix = handoff_at_the_fd_limit(ip, 0)  # no free fd left
    c = streamd_client(mine)
    ip.pump(c.done)
    r = c.parsed()
    assert r.status == 503 and b"server at capacity (out of file descriptors)" in r.body
    assert r.headers["Retry-After"] == "1" and ip.d.stats.rejected == 1
    unix.close()
    c.close()
    # With fds free again (accepting resumes 100 ms later), the next handoff
    # is served and the spares are back.
    again = client(ip.path, b"\0")
    ip.pump(again.done, advance=0.05)
    assert again.parsed().status == 200 and len(ip.d.reserve.spares) == streamd.FdReserve.SPARES
    again.close()
    ip.finish(fdcheck)


def streamd_client(sock):
    from conftest import Client
    sock.setblocking(False)
    return Client(sock)


def test_a_burst_at_the_fd_limit_loses_no_client(daemon, fdcheck):
    """After the first 503 the spares are gone: the rest wait in the backlog
    (accepting pauses) instead of being taken in and losing their socket."""
    ip = daemon(backend__mock__message_delay=0.0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    clients, unixes = [], []
    for _ in range(4):
        mine, theirs = socket.socketpair()
        u = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        u.connect(ip.path)
        u.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [theirs.fileno()]))])
        theirs.close()
        clients.append(streamd_client(mine))
        unixes.append(u)
    lowest = os.dup(0)
    os.close(lowest)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
        ip.run_for(10)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    ip.pump(lambda: all(c.done() for c in clients), advance=0.05)  # (accepting resumes after 100 ms)
    statuses = sorted(c.parsed().status for c in clients)
    assert statuses[0] in (200, 503) and all(s in (200, 503) for s in statuses), statuses
    assert ip.d.stats.rejected >= 1 and "ctrunc" not in ip.d.stats.handoff_errors
    assert not any(r for r in (c.data for c in clients) if not r), "a client got no answer"
    for u in unixes:
        u.close()
    for c in clients:
        c.close()
    ip.finish(fdcheck)


def test_a_socket_lost_to_the_fd_limit_is_named_as_such(daemon, fdcheck, monkeypatch, caplog):
    monkeypatch.setattr(streamd.FdReserve, "SPARES", 0)  # no spares: the kernel drops the fd
    ip = daemon()
    mine, unix = handoff_at_the_fd_limit(ip, 1)  # room for the accept only
    ip.pump(lambda: not ip.d.conns)
    assert ip.d.stats.handoff_errors == {"emfile": 1}
    [rec] = [r for r in caplog.records if r.getMessage() == "handoff failed"]
    assert rec.fields["reason"] == "emfile"
    assert rec.fields["detail"].startswith("the client's socket was lost: out of file descriptors (fd limit ")
    unix.close()
    mine.close()
    ip.finish(fdcheck)


# ---- 8. control bytes and huge values never reach the log raw ----

def test_control_bytes_and_long_request_ids_are_escaped_and_cut(daemon_proc):
    d = daemon_proc("--message-delay", "1ms")
    for rid in ("a\x00b\x1b[31mred\x7f\u202eevil\u2028x", "r" * 1000):
        s = streamd_handoff(d.path, {"request_id": rid})
        assert read_until_eof(s).endswith(b"data: [DONE]\n\n")
        s.close()
    s = streamd_handoff(d.path, {"request_id": "r" * 100_000})  # beyond MAX_NAME_LENGTH: 400, value not logged
    assert read_until_eof(s).startswith(b"HTTP/1.1 400 ")
    s.close()
    d.wait_log('msg="stream done"', 3)
    raw = d.log_path.read_bytes()
    for bad in (b"\x00", b"\x1b", b"\x7f", "\u202e".encode(), "\u2028".encode()):
        assert bad not in raw
    assert b'request_id="a\\u0000b\\u001b[31mred\\u007f\\u202eevil\\u2028x"' in raw
    assert b'request_id="' + b"r" * 256 + b'...[744 more]"' in raw
    assert max(len(line) for line in raw.splitlines()) < 2000


def test_json_log_lines_escape_the_same(tmp_path):
    import io
    out = io.StringIO()
    saved = (streamd.logger.handlers[:], streamd.logger.level, streamd.logger.propagate)
    streamd.setup_logging("info", "json", out)
    try:
        streamd.log(20, "x", request_id="\x1b]0;owned\x07\u0085")
    finally:
        streamd.logger.handlers[:], streamd.logger.level, streamd.logger.propagate = saved
    line = out.getvalue()
    assert "\x1b" not in line and "\x07" not in line and "\u0085" not in line
    assert json.loads(line)["request_id"] == "\x1b]0;owned\x07\u0085"


# ---- 9. what an upstream says in its errors stays out of the log ----

def test_upstream_error_text_goes_to_the_client_not_the_log(daemon_proc, upstream):  # noqa: F811
    up = upstream()
    d = daemon_proc("--backend", "openai", "--openai-base", up.base + "/v1", "--max-retries", "0")
    s = streamd_handoff(d.path, {"prompt": "MY SECRET PROMPT", "test_pattern": "echo:400"})
    data = read_until_eof(s)
    s.close()
    assert data.startswith(b"HTTP/1.1 502 ") and b"MY SECRET PROMPT" in data  # the client may know
    d.wait_log('msg="stream done"')
    logs = d.logs()
    assert "MY SECRET PROMPT" not in logs
    assert ('msg="stream failed"' in logs and 'error="upstream answered 400"' in logs
            and "upstream_error=invalid_request_error" in logs and "upstream_message_len=" in logs)


def test_upstream_error_text_is_logged_at_debug_only(daemon_proc, upstream):  # noqa: F811
    up = upstream()
    d = daemon_proc("--backend", "anthropic", "--anthropic-base", up.base, "--max-retries", "0",
                    "--log-level", "debug")
    s = streamd_handoff(d.path, {"prompt": "p", "test_pattern": "error"})
    assert b"Overloaded" in read_until_eof(s)
    s.close()
    d.wait_log('msg="upstream error text"')
    assert 'level=debug msg="upstream error text"' in d.logs()


# ---- 10. the small ones ----

@pytest.mark.parametrize("kind", ["listening", "unconnected", "udp"])
def test_a_socket_that_is_not_a_connected_stream_is_bad_fd(daemon, fdcheck, kind):
    ip = daemon()
    if kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    else:
        s = socket.socket()
        if kind == "listening":
            s.bind(("127.0.0.1", 0))
            s.listen(1)
    raw_handoff(ip.path, b"\0", [s.fileno()])
    s.close()
    ip.pump(lambda: ip.d.stats.handoff_errors.get("bad_fd") == 1 and not ip.d.conns)
    assert ip.d.stats.handoffs == 0
    ip.finish(fdcheck)


@pytest.mark.parametrize("query", ["prompt=%zz", "prompt=%4", "prompt=a%", "%zz=1"])
def test_invalid_percent_encoding_is_400(daemon, fdcheck, query):
    ip = front(daemon)
    status, _, body = exchange(ip, get("/v1/stream?" + query))
    assert status == 400 and "invalid percent-encoding" in error_of(body)["message"]
    ip.finish(fdcheck)


@pytest.mark.parametrize("data, status", [(b'{"prompt": "hi"}', 200), (b'{"prompt": "h', 400)])
def test_stream_mode_sender_that_never_closes_still_gets_an_answer(daemon, fdcheck, data, status):
    ip = daemon(server__socket_type="stream", server__handoff_timeout=1.0)
    mine, theirs = socket.socketpair()
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.connect(ip.path)
    unix.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [theirs.fileno()]))])
    theirs.close()
    c = streamd_client(mine)
    ip.pump(lambda: c.has(b"HTTP/1.1"), advance=0.25)
    ip.pump(c.done, advance=0.25)
    assert c.parsed().status == status
    unix.close()
    c.close()
    ip.finish(fdcheck)


# ---- containment: a bug while handling one connection ends that one ----

def test_an_operation_that_raises_before_the_head_is_500_for_that_stream_only(daemon, fdcheck, probe_backend,
                                                                             caplog):
    def script(req):
        if req.user_id == 1:
            yield ("readable", "not a socket", 1.0)  # the loop's handler raises on this
        yield ("event", {"content": "fine"})
    probe_backend(script)
    ip = daemon(backend__provider="probe")
    bad, good = client(ip.path, {"user_id": 1}), client(ip.path, {"user_id": 2})
    ip.pump(lambda: bad.done() and good.done())
    assert bad.parsed().status == 500 and b'"internal_error"' in bad.parsed().body
    assert good.data.endswith(b"data: [DONE]\n\n")
    assert ip.d.stats.internal_errors == {"backend": 1}
    assert 'internal error' in caplog.text and "Traceback" in caplog.text
    bad.close()
    good.close()
    ip.finish(fdcheck)


def test_a_handler_that_raises_after_the_head_ends_with_an_error_event(daemon, fdcheck, probe_backend):
    def script(req):
        yield ("event", {"content": "first"})
        yield ("sleep", "soon")  # not a number: the loop's handler raises
    probe_backend(script)
    ip = daemon(backend__provider="probe")
    c = client(ip.path, b"\0")
    ip.pump(c.done)
    assert c.data.endswith(b'data: {"error":{"type":"internal_error","message":"internal error"}}\n\n')
    c.close()
    ip.finish(fdcheck)
    assert ip.d.stats.failed == 1 and ip.d.stats.stream_errors == {"other": 1}


def test_a_timer_that_raises_ends_its_connection_only(daemon, fdcheck):
    ip = daemon(backend__mock__message_delay=0.01)
    a, b = client(ip.path, b"\0"), client(ip.path, b"\0")
    ip.pump(lambda: a.has(b"Hello") and b.has(b"Hello"))
    victim = min(ip.d.conns, key=lambda conn: conn.id)

    def boom(conn):
        raise RuntimeError("a bug in a timer callback")
    ip.d.timers.call_later(0.0, boom, victim)
    ip.pump(lambda: a.done() and b.done(), advance=0.01)
    assert a.data.endswith(b'"internal_error","message":"internal error"}}\n\n')
    assert b.data.endswith(b"data: [DONE]\n\n")
    assert ip.d.stats.internal_errors == {"timer": 1}
    a.close()
    b.close()
    ip.finish(fdcheck)


class Exploding:
    """A socket owner whose handler raises: contained, cleaned up, counted."""
    WHERE = "metrics"

    def __init__(self, sock):
        self.sock, self.cleaned = sock, False

    def on_io(self, sock, mask):
        raise ValueError("a bug")

    def internal_error(self, sock):
        self.cleaned = True


def test_an_io_handler_that_raises_is_contained(daemon, fdcheck):
    ip = daemon()
    a, b = socket.socketpair()
    owner = Exploding(a)
    ip.d.selector.register(a, streamd._READ, owner.on_io)
    b.send(b"x")
    c = client(ip.path, b"\0")
    ip.pump(lambda: owner.cleaned)
    ip.d.selector.unregister(a)
    ip.pump(c.done, advance=0.05)
    assert c.data.endswith(b"data: [DONE]\n\n") and ip.d.stats.internal_errors == {"metrics": 1}
    for s in (a, b):
        s.close()
    c.close()
    ip.finish(fdcheck)


def test_internal_errors_are_a_metric_with_every_where_at_zero(daemon_proc, tmp_path):
    import urllib.request
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    d = daemon_proc("--metrics-addr", "127.0.0.1:%d" % port)
    text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5).read().decode()
    for where in streamd.INTERNAL_WHERE:
        assert 'daemon_internal_errors_total{where="%s"} 0.0' % where in text
    d.stop()


def test_a_ping_flood_that_never_reads_is_dropped_at_the_buffer_limit(daemon, fdcheck):
    """write_buffer_limit caps what is queued while the client does not read:
    a WebSocket client that sends pings and never reads the pongs."""
    from conftest import Client
    from test_front import UPGRADE
    from test_front_wire import client_frame
    ip = front(daemon, server__write_high_water=8192, server__write_buffer_limit=16384,
               backend__mock__message_delay=30.0)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    s.connect(("127.0.0.1", ip.port))
    s.sendall(get("/v1/ws?prompt=q", UPGRADE))
    s.setblocking(False)
    c = Client(s)
    ip.pump(lambda: c.has(b"101 Switching Protocols"))
    conn = next(iter(ip.d.conns))
    ping = client_frame(streamd.WS_PING, b"p" * 125) * 100
    for _ in range(400):  # up to 40,000 pings: far more pong bytes than the kernel holds
        try:
            s.send(ping)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            pass
        ip.run_for(2)
        if conn.outcome:
            break
    assert conn.outcome == "slow_client"
    c.close()
    ip.finish(fdcheck)


def test_a_failure_of_the_loop_itself_stops_loudly_and_removes_the_socket(tmp_path):
    """Fault injection into the loop's machinery (the timer heap): the one case
    that may stop the daemon.  It says so, tells systemd, removes its socket."""
    import subprocess
    import sys
    sock_path, notify_path = str(tmp_path / "s.sock"), str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(10)
    script = ("import sys; sys.path.insert(0, %r); import streamd\n"
              "def broken(self, now, slack=0.0, on_error=None):\n"
              "    raise RuntimeError('the timer heap is broken')\n"
              "streamd.Timers.run_due = broken\n"
              "sys.exit(streamd.main(['--socket', %r, '--metrics-addr', '']))\n"
              % (os.path.dirname(streamd.__file__), sock_path))
    p = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, NOTIFY_SOCKET=notify_path),
                       capture_output=True, text=True, timeout=30)
    states = []
    while True:
        try:
            states.append(notify.recv(256).decode())
        except (socket.timeout, BlockingIOError):
            break
        notify.settimeout(0.1)
    notify.close()
    assert p.returncode == 70
    assert states == ["READY=1", "STOPPING=1"]
    assert 'level=critical msg="event loop crashed: this is a bug in streamd" error=RuntimeError' in p.stderr
    assert "the timer heap is broken" in p.stderr
    assert not os.path.exists(sock_path)


# ---- found by the process-level hostile mix (tests/test_hostile.py) ----

@pytest.mark.parametrize("first, later, status", [
    (b"GET  / HTTP/1.1\r\n", b"x\r\n", 400),                          # refused at once, more bytes follow
    (b"GET /healthz HTTP/1.1\r\nHost: t\r\n", b"\r\n", 408),          # timed out, then the rest arrives
    (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n", b"", 431),  # refused in the first read of many
], ids=["400", "408", "431"])
def test_bytes_after_the_front_answered_are_discarded(daemon, fdcheck, first, later, status):
    ip = front(daemon, http__request_timeout=1.0)
    c = connect(ip, first)
    ip.pump(lambda: c.has(b"HTTP/1.1 "), advance=0.25)
    assert c.data.startswith(b"HTTP/1.1 %d " % status)
    if later:
        c.sock.sendall(later)
    ip.run_for(10)
    c.close()
    ip.finish(fdcheck)
    assert not ip.d.stats.internal_errors


class TrickleUpstream(RawUpstream):
    """Sends its answer one byte at a time, 20 ms apart."""

    def send_answer(self, c):
        for b in self.answer:
            if self.stopped:
                return
            c.send(bytes((b,)))
            time.sleep(0.02)


def test_header_timeout_bounds_the_whole_head_not_each_read(daemon, fdcheck):
    up = TrickleUpstream(b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"s" * 1000 + b"\r\n\r\n")
    ip = daemon(**settings("openai", up, upstream__header_timeout=1.0))
    c = client(ip.path, b"\0")
    ip.pump(c.done, advance=0.05)  # ~1 fake second per 20 passes; the head needs 1,000+ bytes
    r = c.parsed()
    assert r.status == 504 and b"did not answer within 1s" in r.body
    c.close()
    ip.finish(fdcheck, up)


def test_a_head_over_64_KiB_in_one_read_is_502(daemon, fdcheck):
    up = RawUpstream(b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 70000 + b"\r\n\r\n")
    ip = daemon(**settings("openai", up))
    c = client(ip.path, b"\0")
    ip.pump(c.done)
    assert c.parsed().status == 502 and b"head larger than 65536 bytes" in c.parsed().body
    c.close()
    ip.finish(fdcheck, up)


def sse_upstream(*events):
    body = b"".join(b"data: " + e + b"\n\n" for e in events)
    return RawUpstream(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


def test_chunks_of_the_wrong_shape_are_read_as_absent(daemon, fdcheck):
    weird = [b'{"choices":5}', b'{"choices":"s"}', b'{"choices":[5]}', b'{"choices":[null]}', b'{"choices":[[1]]}',
             b'{"choices":[{"delta":5}]}', b'{"choices":[{"delta":"x"}]}', b'{"choices":[{"delta":[1]}]}',
             b'{"choices":[{"delta":{"content":5}}]}', b'{"usage":5}', b'{"usage":"s"}', b'{"usage":[1]}',
             b'{"choices":[{"delta":{"content":"ok"},"finish_reason":7}]}',
             b'{"choices":[],"usage":{"prompt_tokens":"3","completion_tokens":true,"total_tokens":-1}}', b"[DONE]"]
    up = sse_upstream(*weird)
    ip = daemon(**settings("openai", up))
    c = client(ip.path, {"include_usage": True})
    ip.pump(c.done)
    assert c.data.endswith(b'data: {"content":"ok"}\n\n'
                           b'data: {"finish_reason":"stop","usage":{"prompt_tokens":0,"completion_tokens":0,'
                           b'"total_tokens":0}}\n\ndata: [DONE]\n\n')
    c.close()
    ip.finish(fdcheck, up)
    assert not ip.d.stats.internal_errors


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_numbers_from_an_upstream_never_reach_the_client(daemon, fdcheck, number):
    up = sse_upstream(b'{"choices":[{"delta":{"content":"a"}}]}',
                      b'{"choices":[],"usage":{"prompt_tokens":' + number + b"}}", b"[DONE]")
    ip = daemon(**settings("openai", up))
    c = client(ip.path, {"include_usage": True})
    ip.pump(c.done)
    assert number not in c.data and b"upstream sent an event that is not JSON" in c.data
    c.close()
    ip.finish(fdcheck, up)


# ---- no reference cycles per connection ----
#
# The daemon freezes what survives into the permanent generation once a second
# (Daemon.tend_gc): connections must be freed by reference counting alone.  A
# cycle through one (an exception kept in a frame of its own traceback) would
# hold it, its buffers and its request until the next full collection.

@pytest.mark.parametrize("flow", ["mock", "ws_fault", "bad_handoff", "front_refusal", "backend_error", "timeout"])
def test_a_connection_leaves_no_reference_cycle_behind(daemon, probe_backend, flow):
    import gc
    from test_front import ws_open
    from test_front_wire import client_frame

    def script(req):
        yield ("event", {"content": "x"})
        raise streamd.BackendError("upstream went away")
    probe_backend(script)
    ip = front(daemon, backend__mock__message_delay=0.0, http__request_timeout=1.0, backend__enabled=["probe"])
    exchange(ip, get("/healthz"))  # warm every code path once (first-use caches)
    gc.collect()
    gc.disable()
    try:
        if flow == "mock":
            c = client(ip.path, b"\0")
        elif flow == "ws_fault":
            c = ws_open(ip)
            c.sock.send(client_frame(streamd.WS_TEXT, b"\xff\xfe"))  # invalid UTF-8: close 1007
        elif flow == "bad_handoff":
            c = client(ip.path, b"[" * 5000)
        elif flow == "front_refusal":
            c = connect(ip, b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n")
        elif flow == "backend_error":
            c = client(ip.path, {"backend": "probe"})
        else:
            c = connect(ip, b"GET / HTTP/1.1\r\n")
        ip.pump(c.done, advance=0.25)
        c.close()
        ip.pump(lambda: not ip.d.conns, advance=0.25)
        assert gc.collect() == 0, "the %s flow left garbage that only the cycle collector can free" % flow
    finally:
        gc.enable()
