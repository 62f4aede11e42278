"""SPEC §1: every receive case, on real Unix sockets with real SCM_RIGHTS.

Each error-path test counts this process's fds before and after: every fd the
daemon received must be closed exactly once."""
import json
import os
import socket
import tempfile

import pytest

from conftest import Client, client, raw_handoff
import streamd


def responses(c: Client):
    r = c.parsed()
    return r.status, r


def test_mock_stream_full_bytes(daemon, fdcheck):
    ip = daemon(backend__mock__message_delay=0.0)
    c = client(ip.path, {"prompt": "hello there", "user_id": 42})
    ip.pump(c.done)
    head, body = c.data.split(b"\r\n\r\n", 1)
    assert head + b"\r\n\r\n" == streamd.response_head()
    events = body.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    contents = [json.loads(e[6:])["content"] for e in events[:-2]]
    assert len(contents) == 18
    assert contents[0] == "Hello from streamd! Prompt: hello there"
    assert contents[1] == "User ID: 42"
    assert contents[12] == "This is message 13 of 18."
    assert contents[17] == "This is message 18 of 18."
    c.close()
    ip.pump(lambda: not ip.d.conns)
    assert ip.d.stats.completed == 1 and ip.d.stats.handoffs == 1
    ip.finish(fdcheck)


def test_mock_timing_uses_message_delay(daemon):
    ip = daemon()  # 50 ms between events
    c = client(ip.path, b"\0")
    ip.pump(lambda: c.has(b"Hello from"))
    assert c.data.count(b"data: ") == 1, "the first event goes out at once"
    # Not before 50 ms (less the loop's timer slack, which batches timers due within 1 ms).
    ip.clock.advance(0.05 - streamd.TIMER_SLACK - 0.0005)
    ip.run_for(5)
    assert c.count(b"data: ") == 1
    ip.clock.advance(0.0005)
    ip.pump(lambda: c.count(b"data: ") == 2)
    for _ in range(16):
        ip.clock.advance(0.05)
        ip.run_for(3)
    ip.pump(c.done)
    assert c.data.endswith(b"data: [DONE]\n\n") and c.data.count(b"data: ") == 19


def test_prompt_is_cut_to_50_characters(daemon):
    ip = daemon(backend__mock__message_delay=0.0)
    c = client(ip.path, {"prompt": "\u00e9" * 60})
    ip.pump(c.done)
    first = json.loads(c.data.split(b"\r\n\r\n")[1].split(b"\n\n")[0][6:])["content"]
    assert first == "Hello from streamd! Prompt: " + "\u00e9" * 50 + "..."


@pytest.mark.parametrize("data", [b"\0", b"", b"   ", b"\n"])
def test_empty_data_is_served_with_defaults(daemon, data):
    ip = daemon(backend__mock__message_delay=0.0)
    c = client(ip.path, data)
    ip.pump(c.done)
    assert b"User ID: unknown" in c.data and c.data.endswith(b"data: [DONE]\n\n")


def test_response_headers_are_added(daemon):
    ip = daemon(backend__mock__message_delay=0.0)
    c = client(ip.path, {"response_headers": {"X-Request-Id": "abc", "Connection": "keep-alive",
                                              "Bad\r\nName": "x", "X-Inj": "a\r\nb"}})
    ip.pump(c.done)
    head = c.data.split(b"\r\n\r\n")[0]
    assert head.endswith(b"X-Accel-Buffering: no\r\nX-Request-Id: abc")
    assert head.count(b"Connection:") == 1


@pytest.mark.parametrize("data, field", [
    (b"{bad json", "not valid JSON"),
    (b'{"max_tokens": "12"}', "max_tokens: expected an integer"),
    (b'[1]', "expected a JSON object"),
    (b'{"backend": "openai"}', "backend: 'openai' is not configured"),
])
def test_bad_json_gets_400(daemon, fdcheck, data, field):
    ip = daemon()
    c = client(ip.path, data)
    ip.pump(c.done)
    status, r = responses(c)
    assert status == 400
    assert field in json.loads(r.body)["error"]["message"]
    assert r.headers["Content-Type"] == "application/json" and r.headers["Connection"] == "close"
    assert ip.d.stats.handoff_errors["bad_json"] == 1
    c.close()
    ip.finish(fdcheck)


def test_too_large_gets_413(daemon, fdcheck):
    ip = daemon(server__max_handoff_bytes=1024)
    c = client(ip.path, b'{"prompt": "' + b"x" * 2000 + b'"}')
    ip.pump(c.done)
    assert responses(c)[0] == 413
    assert ip.d.stats.handoff_errors["too_large"] == 1
    # exactly at the limit is fine
    body = b'{"prompt": "' + b"x" * (1024 - 14) + b'"}'
    assert len(body) == 1024
    c2 = client(ip.path, body)
    ip.pump(lambda: c2.has(b"HTTP/1.1"))
    assert c2.data.startswith(b"HTTP/1.1 200")
    c.close(), c2.close()
    ip.finish(fdcheck)


def test_default_limit_is_128k(daemon, fdcheck):
    ip = daemon()
    c = client(ip.path, b'{"prompt": "' + b"x" * (130 * 1024) + b'"}')
    ip.pump(c.done)
    assert responses(c)[0] == 413
    c.close()
    ip.finish(fdcheck)


def test_message_without_fd(daemon, fdcheck):
    ip = daemon()
    raw_handoff(ip.path, b'{"prompt": "x"}', [])
    ip.pump(lambda: ip.d.stats.handoff_errors["no_fd"] == 1)
    ip.finish(fdcheck)


def test_peer_closes_without_message(daemon, fdcheck):
    ip = daemon()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(ip.path)
    ip.run_for(3)
    s.close()
    ip.pump(lambda: ip.d.stats.handoff_errors["no_fd"] == 1)
    assert not ip.d.conns
    ip.finish(fdcheck)


@pytest.mark.parametrize("n", [2, 3])
def test_extra_fds_are_closed_first_is_served(daemon, fdcheck, n):
    ip = daemon(backend__mock__message_delay=0.0)
    pairs = [socket.socketpair() for _ in range(n)]
    raw_handoff(ip.path, b"\0", [theirs.fileno() for _, theirs in pairs])
    for _, theirs in pairs:
        theirs.close()
    first = Client(pairs[0][0])
    first.sock.setblocking(False)
    ip.pump(first.done)
    assert first.data.endswith(b"data: [DONE]\n\n")
    for mine, _ in pairs[1:]:
        # The daemon closed its copy of every extra fd: the other end sees EOF.
        mine.settimeout(2)
        assert mine.recv(10) == b""
    for mine, _ in pairs:
        mine.close()
    ip.finish(fdcheck)


def test_too_many_fds_ctrunc_closes_all(daemon, fdcheck):
    ip = daemon()
    n = streamd.MAX_FDS + 4
    pairs = [socket.socketpair() for _ in range(n)]
    raw_handoff(ip.path, b"\0", [theirs.fileno() for _, theirs in pairs])
    for _, theirs in pairs:
        theirs.close()
    ip.pump(lambda: ip.d.stats.handoff_errors["ctrunc"] == 1)
    for mine, _ in pairs:
        mine.settimeout(2)
        assert mine.recv(10) == b""  # nothing was answered; every fd that arrived was closed
        mine.close()
    ip.finish(fdcheck)


def test_non_socket_fd(daemon, fdcheck):
    ip = daemon()
    with tempfile.TemporaryFile() as f:
        raw_handoff(ip.path, b"\0", [f.fileno()])
        ip.pump(lambda: ip.d.stats.handoff_errors["bad_fd"] == 1)
    r, w = os.pipe()
    raw_handoff(ip.path, b"\0", [r])
    os.close(r)
    ip.pump(lambda: ip.d.stats.handoff_errors["bad_fd"] == 2)
    os.close(w)
    ip.finish(fdcheck)


def test_datagram_socket_fd(daemon, fdcheck):
    ip = daemon()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    raw_handoff(ip.path, b"\0", [b.fileno()])
    b.close()
    ip.pump(lambda: ip.d.stats.handoff_errors["bad_fd"] == 1)
    a.close()
    ip.finish(fdcheck)


def test_silent_connection_hits_handoff_timeout(daemon, fdcheck):
    ip = daemon()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(ip.path)
    ip.run_for(5)
    assert len(ip.d.conns) == 1
    ip.clock.advance(4.9)
    ip.run_for(5)
    assert len(ip.d.conns) == 1
    ip.clock.advance(0.2)
    ip.pump(lambda: ip.d.stats.handoff_errors["timeout"] == 1)
    s.settimeout(2)
    assert s.recv(10) == b""  # the daemon closed the Unix connection
    s.close()
    ip.finish(fdcheck)


def test_handoff_over_tcp_socket(daemon, fdcheck):
    """A real TCP client socket, as Apache passes: TCP options are set."""
    ip = daemon(backend__mock__message_delay=0.0)
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    cli = socket.create_connection(lst.getsockname())
    srv, _ = lst.accept()
    lst.close()
    raw_handoff(ip.path, b'{"prompt": "tcp"}', [srv.fileno()])
    srv.close()
    cli.setblocking(False)
    c = Client(cli)
    ip.pump(c.done)
    assert c.data.startswith(b"HTTP/1.1 200 OK") and c.data.endswith(b"data: [DONE]\n\n")
    c.close()
    ip.finish(fdcheck)


def test_zero_length_seqpacket_message_with_fd(daemon):
    ip = daemon(backend__mock__message_delay=0.0)
    c = client(ip.path, b"")
    ip.pump(c.done)
    assert c.data.startswith(b"HTTP/1.1 200 OK")


def test_stream_socket_type_reads_until_eof(daemon, fdcheck, tmp_path):
    ip = daemon(server__socket_type="stream", backend__mock__message_delay=0.0)
    mine, theirs = socket.socketpair()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(ip.path)
    import array
    s.sendmsg([b'{"prompt": "in ', ], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [theirs.fileno()]))])
    theirs.close()
    ip.run_for(5)
    s.sendall(b'pieces", "user_id": 5}')
    ip.run_for(5)
    assert mine.fileno() >= 0 and ip.d.stats.handoffs == 0  # still waiting for EOF
    s.close()
    mine.setblocking(False)
    c = Client(mine)
    ip.pump(c.done)
    assert b"Prompt: in pieces" in c.data and b"User ID: 5" in c.data
    c.close()
    ip.finish(fdcheck)


def test_stream_socket_type_too_large(daemon, fdcheck):
    ip = daemon(server__socket_type="stream", server__max_handoff_bytes=100)
    c = client(ip.path, b"x" * 5000, sock_type=socket.SOCK_STREAM)
    ip.pump(c.done)
    assert c.data.startswith(b"HTTP/1.1 413")
    c.close()
    ip.finish(fdcheck)


def test_burst_of_handoffs_is_accepted_in_one_pass(daemon, fdcheck):
    ip = daemon(backend__mock__message_delay=0.0)
    clients = [client(ip.path, {"user_id": i}) for i in range(200)]
    ip.pump(lambda: all(c.done() for c in clients))
    for i, c in enumerate(clients):
        assert b"User ID: %d\"" % i in c.data and c.data.endswith(b"data: [DONE]\n\n")
        c.close()
    ip.finish(fdcheck)
