"""SPEC §4: a connection's life — back-pressure, slow clients, timeouts,
disconnects, capacity, exception isolation — with the daemon's fake clock."""
import json
import os
import resource
import socket

import pytest

from conftest import client, small_buffer_client
import streamd


class Probe:
    """A real backend whose behaviour the test chooses; it records what happened."""

    def __init__(self, script):
        self.script = script
        self.closed = False
        self.yields = 0

    def run(self, req, cfg):
        try:
            yield from self.script(req)
        finally:
            self.closed = True


@pytest.fixture
def probe_backend(monkeypatch):
    """Register a backend named 'probe' for this test."""
    def register(script):
        p = Probe(script)
        script.probe = p
        monkeypatch.setitem(streamd.BACKENDS, "probe", p)
        return p
    return register


def endless(size=1000):
    def script(req):
        while True:
            script.probe.yields += 1
            yield ("event", {"content": "x" * size})
    return script


def test_client_disconnect_cancels_backend_at_once(daemon, fdcheck, probe_backend):
    def script(req):
        yield ("event", {"content": "first"})
        yield ("sleep", 3600)
    probe = probe_backend(script)
    ip = daemon(backend__provider="probe")
    c = client(ip.path, b"\0")
    ip.pump(lambda: c.has(b"first"))
    assert not probe.closed
    c.close()
    ip.pump(lambda: probe.closed)  # no clock movement needed: EOF alone cancels it
    assert not ip.d.conns and ip.d.stats.failed == 1
    ip.finish(fdcheck)


def test_mock_disconnect_mid_stream(daemon, fdcheck):
    ip = daemon()
    c = client(ip.path, b"\0")
    ip.pump(lambda: c.has(b"Hello from"))
    c.close()
    ip.pump(lambda: not ip.d.conns)
    assert ip.d.stats.failed == 1 and len(ip.d.timers) <= 1  # its sleep timer was cancelled
    ip.finish(fdcheck)


def test_backpressure_pauses_backend(daemon, probe_backend):
    probe = probe_backend(endless())
    ip = daemon(backend__provider="probe")
    c = small_buffer_client(ip.path)
    ip.run_for(50)
    conn = next(iter(ip.d.conns))
    assert conn.parked
    assert streamd.Daemon.__init__  # loop stays alive
    paused_at = probe.yields
    ip.run_for(50)
    assert probe.yields == paused_at, "a paused backend is not stepped"
    assert len(conn.out) <= ip.cfg["server.write_high_water"] + 1100
    # The client reads: the backend resumes.
    for _ in range(20):
        c.read()
        ip.run_for(2)
    assert probe.yields > paused_at
    c.close()
    ip.pump(lambda: probe.closed)


def test_slow_client_write_timeout_measures_progress(daemon, fdcheck, probe_backend):
    probe = probe_backend(endless())
    ip = daemon(backend__provider="probe", server__write_timeout=30.0)
    c = small_buffer_client(ip.path)
    ip.run_for(30)
    conn = next(iter(ip.d.conns))
    assert conn.parked and conn.out
    # Progress resets the clock: read a little every 20 s; 60 s pass, no timeout.
    for _ in range(3):
        ip.clock.advance(20)
        assert c.sock.recv(65536)  # take what the kernel holds: the daemon can send again
        ip.run_for(5)
        assert ip.d.conns, "a client that makes progress is never timed out"
    # Now stop reading: 30 s without progress drops it.
    ip.clock.advance(29)
    ip.run_for(5)
    assert ip.d.conns
    ip.clock.advance(2)
    ip.pump(lambda: not ip.d.conns)
    assert conn.outcome == "timeout" and probe.closed
    c.close()
    ip.finish(fdcheck)


def test_one_event_bigger_than_the_buffer_limit_is_delivered(daemon, fdcheck, probe_backend):
    """One step's bytes are taken as a unit: an event over write_buffer_limit
    (256 KiB) reaches a client that reads, however small its buffers."""
    def script(req):
        yield ("event", {"content": "x" * 300_000})
        yield ("event", {"content": "after"})
    probe_backend(script)
    ip = daemon(backend__provider="probe")
    c = small_buffer_client(ip.path)
    ip.pump(lambda: c.done())
    assert b"\"" + b"x" * 300_000 + b"\"" in c.data and c.data.endswith(b'data: {"content":"after"}\n\ndata: [DONE]\n\n')
    c.close()
    ip.finish(fdcheck)
    assert ip.d.stats.completed == 1


def test_heartbeat_after_silence(daemon, probe_backend):
    def script(req):
        yield ("head",)
        yield ("sleep", 100)
        yield ("event", {"content": "late"})
    probe_backend(script)
    ip = daemon(backend__provider="probe", server__heartbeat_interval=15.0)
    c = client(ip.path, b"\0")
    ip.pump(lambda: c.has(b"\r\n\r\n"))
    ip.clock.advance(14.9)
    ip.run_for(3)
    assert not c.has(b": ping")
    ip.clock.advance(0.2)
    ip.pump(lambda: c.has(b": ping\n\n"))
    ip.clock.advance(15)
    ip.pump(lambda: c.count(b": ping") == 2)
    ip.clock.advance(70)
    ip.pump(c.done)
    assert c.data.endswith(b'data: {"content":"late"}\n\ndata: [DONE]\n\n')


def test_max_stream_duration(daemon, probe_backend):
    probe = probe_backend(lambda req: iter([("event", {"content": "a"}), ("sleep", 1000)]))
    ip = daemon(backend__provider="probe", server__max_stream_duration=300.0,
                server__heartbeat_interval=0.0)
    c = client(ip.path, b"\0")
    ip.pump(lambda: c.has(b'"a"'))
    ip.clock.advance(300)
    ip.pump(c.done)
    assert c.data.endswith(b'data: {"error":{"type":"timeout","message":"stream exceeded '
                           b'max_stream_duration (300s)"}}\n\n')
    assert b"[DONE]" not in c.data and probe.closed


def test_capacity_answers_503(daemon, fdcheck):
    ip = daemon(server__max_connections=2)
    held = [client(ip.path, b"\0") for _ in range(2)]
    ip.pump(lambda: all(c.has(b"Hello") for c in held))
    extra = client(ip.path, b"\0")
    ip.pump(extra.done)
    r = extra.parsed()
    assert r.status == 503 and r.headers["Retry-After"] == "1"
    assert ip.d.stats.rejected == 1
    for c in held + [extra]:
        c.close()
    ip.finish(fdcheck)


def test_emfile_pauses_accepting_without_spinning(daemon, fdcheck):
    ip = daemon(backend__mock__message_delay=0.0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # More pending connections than the daemon has spare fds (FdReserve): the
    # spares take the first ones in, then accepting pauses.
    pending = [socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(streamd.FdReserve.SPARES + 2)]
    for p in pending:
        p.connect(ip.path)
    try:
        # The limit caps fd numbers: set it to the lowest free one, so the next fd fails.
        lowest_free = os.dup(0)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        ip.run_for(3)
        assert ip.d.accept_paused and ip.d.listener not in [k.fileobj for k in ip.d.selector.get_map().values()]
        # Not spinning: with the listener unregistered, select() sleeps until the timer.
        import time
        t0 = time.monotonic()
        ip.d.run_once(max_wait=0.05)
        assert time.monotonic() - t0 >= 0.04
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for p in pending:
        p.close()
    ip.clock.advance(0.1)
    ip.run_for(3)
    assert not ip.d.accept_paused
    c = client(ip.path, b"\0")
    ip.pump(c.done)
    assert c.data.endswith(b"data: [DONE]\n\n")
    c.close()
    ip.finish(fdcheck)


def test_backend_exception_before_head_is_500_and_isolated(daemon, fdcheck, probe_backend):
    def script(req):
        if req.user_id == 1:
            raise RuntimeError("boom")
        yield ("event", {"content": "fine"})
        yield ("sleep", 0)
        yield ("event", {"content": "still fine"})
    probe_backend(script)
    ip = daemon(backend__provider="probe")
    bad = client(ip.path, {"user_id": 1})
    good = client(ip.path, {"user_id": 2})
    ip.pump(lambda: bad.done() and good.done())
    assert bad.parsed().status == 500
    assert json.loads(bad.parsed().body)["error"]["type"] == "internal_error"
    assert good.data.endswith(b'"still fine"}\n\ndata: [DONE]\n\n')
    bad.close(), good.close()
    ip.finish(fdcheck)


def test_backend_exception_after_head_is_error_event(daemon, probe_backend):
    def script(req):
        yield ("event", {"content": "one"})
        raise KeyError("bug")
    probe_backend(script)
    ip = daemon(backend__provider="probe")
    c = client(ip.path, b"\0")
    ip.pump(c.done)
    assert c.data.endswith(b'data: {"content":"one"}\n\n'
                           b'data: {"error":{"type":"internal_error","message":"internal error"}}\n\n')


def test_backend_error_before_head_is_its_status(daemon, probe_backend):
    def script(req):
        raise streamd.BackendError("upstream said 429", status=503, kind="rate_limited", retry_after=7)
        yield
    probe_backend(script)
    ip = daemon(backend__provider="probe")
    c = client(ip.path, b"\0")
    ip.pump(c.done)
    r = c.parsed()
    assert r.status == 503 and r.headers["Retry-After"] == "7"
    assert json.loads(r.body) == {"error": {"type": "rate_limited", "message": "upstream said 429"}}


def test_unknown_operation_is_500(daemon, probe_backend):
    probe_backend(lambda req: iter([("teleport", 1)]))
    ip = daemon(backend__provider="probe")
    c = client(ip.path, b"\0")
    ip.pump(c.done)
    assert c.parsed().status == 500


def test_wait_readable_and_timeout(daemon, probe_backend):
    a, b = socket.socketpair()

    def script(req):
        yield ("readable", a, 5.0)
        yield ("event", {"content": a.recv(10).decode()})
        try:
            yield ("readable", a, 5.0)
        except TimeoutError:
            yield ("event", {"content": "timed out"})
    probe_backend(script)
    ip = daemon(backend__provider="probe")
    c = client(ip.path, b"\0")
    ip.run_for(5)
    assert not c.has(b"HTTP")
    b.send(b"ping")
    ip.pump(lambda: c.has(b'"ping"'))
    ip.clock.advance(5)
    ip.pump(c.done)
    assert c.data.endswith(b'"timed out"}\n\ndata: [DONE]\n\n')
    a.close(), b.close()


def test_wait_timeout_before_head_is_504(daemon, probe_backend):
    a, b = socket.socketpair()
    probe_backend(lambda req: iter([("readable", a, 2.0)]))
    ip = daemon(backend__provider="probe")
    c = client(ip.path, b"\0")
    ip.run_for(3)
    ip.clock.advance(2)
    ip.pump(c.done)
    assert c.parsed().status == 504
    a.close(), b.close()


def test_include_usage_event(daemon):
    ip = daemon(backend__mock__message_delay=0.0)
    c = client(ip.path, {"prompt": "two words " + "x " * 40, "include_usage": True})
    ip.pump(c.done)
    events = c.data.split(b"\r\n\r\n")[1].split(b"\n\n")
    usage = json.loads(events[-3][6:])
    assert usage["finish_reason"] == "stop" and usage["usage"]["prompt_tokens"] == 42
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]
    # The mock's stand-in tokenizer counts words: exactly the words it sent.
    sent = [json.loads(e[6:])["content"] for e in events if e.startswith(b'data: {"content"')]
    assert len(sent) == 18
    assert usage["usage"]["completion_tokens"] == sum(len(t.split()) for t in sent)


def test_fin_before_close_and_linger(daemon, fdcheck):
    """The daemon shuts down its write side, then waits for the client's close."""
    ip = daemon(backend__mock__message_delay=0.0)
    c = client(ip.path, b"\0")
    ip.pump(c.done)  # EOF seen while the daemon still holds the socket
    conn = next(iter(ip.d.conns))
    assert conn.state is streamd.State.DRAINING
    c.sock.send(b"late bytes the daemon must discard")
    ip.run_for(3)
    assert ip.d.conns
    c.close()
    ip.pump(lambda: not ip.d.conns)
    assert conn.outcome == "done"
    ip.finish(fdcheck)


def test_linger_expires_for_a_client_that_never_closes(daemon):
    ip = daemon(backend__mock__message_delay=0.0)
    c = client(ip.path, b"\0")
    ip.pump(c.done)
    ip.clock.advance(streamd.LINGER)
    ip.pump(lambda: not ip.d.conns)
    c.close()


def test_drain_in_process(daemon, probe_backend):
    probe_backend(lambda req: iter([("event", {"content": "x"}), ("sleep", 1000 if req.user_id else 1)]))
    ip = daemon(backend__provider="probe", server__shutdown_timeout=10.0, server__heartbeat_interval=0.0)
    short, long_ = client(ip.path, {"user_id": 0}), client(ip.path, {"user_id": 1})
    ip.pump(lambda: short.has(b'"x"') and long_.has(b'"x"'))
    ip.d.handle_term()
    assert ip.d.listener is None and not __import__("os").path.exists(ip.path)
    ip.clock.advance(1)
    ip.pump(short.done)
    assert short.data.endswith(b"data: [DONE]\n\n")
    short.close()
    ip.clock.advance(9)
    ip.pump(long_.done)
    assert long_.data.endswith(b'data: {"error":{"type":"shutdown","message":"server is shutting down"}}\n\n')
    long_.close()
    ip.pump(lambda: ip.d.stopping)


def test_state_table_covers_every_state():
    sources = {s for s, _ in streamd.TRANSITIONS}
    targets = set(streamd.TRANSITIONS.values())
    assert sources | targets == set(streamd.State)
    assert streamd.State.CLOSED not in sources


def test_illegal_transition_names_event_and_state(daemon):
    ip = daemon()
    conn = streamd.Connection(ip.d, None, 99)
    with pytest.raises(streamd.TransitionError, match="can't handle event 'head' in state RECEIVING"):
        conn.transition("head")


def test_event_for_a_socket_unregistered_earlier_in_the_same_pass(daemon, probe_backend):
    """Regression: the client's EOF and its upstream's readiness in one
    select() batch.  Releasing the connection unregisters the upstream socket;
    its event, already in the batch, must not be dispatched."""
    a, b = socket.socketpair()
    probe_backend(lambda req: iter([("event", {"content": "x"}), ("readable", a, None)]))
    ip = daemon(backend__provider="probe")
    c = client(ip.path, b"\0")
    ip.pump(lambda: c.has(b'"x"'))
    c.close()          # the client leaves (first in epoll's ready list) ...
    b.send(b"ready")   # ... and the "upstream" becomes readable: both in the next select()
    ip.pump(lambda: not ip.d.conns)
    a.close(), b.close()
