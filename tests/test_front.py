"""The direct HTTP front (--listen) on a real TCP socket on 127.0.0.1: routes,
errors, timeouts, auth, rate limits, the per-key cap, and the WebSocket with
raw frames.  In-process with a fake clock; error paths count fds."""
import base64
import json
import os
import socket

import pytest

from conftest import Client, client
import streamd
from test_front_wire import client_frame, ws_messages


def front(daemon, **overrides):
    overrides.setdefault("backend__mock__message_delay", 0.0)
    ip = daemon(http__listen=["127.0.0.1:0"], **overrides)
    ip.d.open_front()
    ip.port = ip.d.front.listeners[0].getsockname()[1]
    return ip


def connect(ip, raw=b"") -> Client:
    s = socket.create_connection(("127.0.0.1", ip.port))
    if raw:
        s.sendall(raw)
    s.setblocking(False)
    return Client(s)


def get(path, headers=""):
    return ("GET %s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (path, headers)).encode()


def post(body, headers="", path="/v1/stream"):
    body = body if isinstance(body, bytes) else json.dumps(body).encode()
    return ("POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n" % (path, len(body), headers)).encode() + body


def exchange(ip, raw):
    """Send a request, run the loop until the daemon closes; (status, headers, body)."""
    c = connect(ip, raw)
    ip.pump(c.done)
    c.close()
    return split(c.data)


def split(data):
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


def error_of(body):
    return json.loads(body)["error"]


# ---- streams: the same bytes as a handoff ----

@pytest.mark.parametrize("raw", [
    get("/v1/stream?prompt=hello%20there&user_id=7"),
    post({"prompt": "hello there", "user_id": 7}),
    post({"prompt": "hello there", "user_id": 7}, "Content-Type: text/plain\r\n"),  # curl -d sends a form type
])
def test_stream_is_byte_for_byte_the_handoff_response(daemon, fdcheck, raw):
    ip = front(daemon)
    c = client(ip.path, {"prompt": "hello there", "user_id": 7})
    ip.pump(c.done)
    via_handoff = c.data
    d = connect(ip, raw.replace(b"user_id=7", b"") if raw.startswith(b"GET") else raw)
    ip.pump(d.done)
    if raw.startswith(b"GET"):  # (the query string has no user_id field: strings only)
        via_handoff = via_handoff.replace(b"User ID: 7", b"User ID: unknown")
    assert d.data == via_handoff
    assert d.data.startswith(streamd.response_head()) and d.data.endswith(b"data: [DONE]\n\n")
    c.close()
    d.close()
    ip.pump(lambda: not ip.d.conns)
    assert ip.d.stats.completed == 2 and ip.d.stats.handoffs == 1
    assert ip.d.stats.http_responses == {"200": 1}
    ip.finish(fdcheck)


def test_query_fields_are_typed_and_checked(daemon):
    ip = front(daemon)
    status, _, body = exchange(ip, get("/v1/stream?prompt=x&max_tokens=abc"))
    assert status == 400 and error_of(body)["message"] == "max_tokens: expected an integer, got 'abc'"
    status, _, body = exchange(ip, get("/v1/stream?temperature=hot"))
    assert status == 400 and "temperature" in error_of(body)["message"]
    for bad in ("nan", "inf", "-Infinity", "1e400"):
        status, _, body = exchange(ip, get("/v1/stream?top_p=" + bad))
        assert status == 400 and error_of(body)["message"] == "top_p: expected a number, got %r" % bad
    status, _, body = exchange(ip, get("/v1/stream?backend=nope"))
    assert status == 400 and "backend: 'nope' is not configured" in error_of(body)["message"]
    status, _, body = exchange(ip, get("/v1/stream?prompt=x&max_tokens=5&include_usage=true"))
    assert status == 200


@pytest.mark.parametrize("body,words", [
    (b"{not json", "not valid JSON"),
    (b"[1]", "expected a JSON object"),
    ({"prompt": 5}, "prompt: expected a string, got integer"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
])
def test_bad_post_body_gets_400_naming_the_field(daemon, fdcheck, body, words):
    ip = front(daemon)
    status, headers, resp = exchange(ip, post(body))
    assert status == 400 and words in error_of(resp)["message"]
    assert headers["Content-Type"] == "application/json" and headers["Connection"] == "close"
    ip.finish(fdcheck)


# ---- the other routes and the HTTP errors ----

def test_healthz_backends_and_the_demo_page(daemon):
    ip = front(daemon)
    status, headers, body = exchange(ip, get("/healthz"))
    assert status == 200 and json.loads(body) == {"status": "ok", "active_streams": 0, "active_connections": 1}
    status, headers, body = exchange(ip, get("/v1/backends"))
    assert json.loads(body) == {"backends": ["mock"], "default": "mock", "auth": False}
    status, headers, body = exchange(ip, get("/"))
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    with open(os.path.join(os.path.dirname(streamd.__file__), "demo.html"), "rb") as f:
        assert body == f.read()
    status, headers, body = exchange(ip, b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 1000


def test_missing_demo_page(daemon, tmp_path):
    """Asked for by name, a missing page is a start error.  (streamd.py copied
    alone, with no demo.html beside it: tests/test_process.py.)"""
    ip = front(daemon)
    with pytest.raises(streamd.ConfigError, match="http.demo_page: cannot read .*/missing.html"):
        streamd.HTTPFront(ip.d).configure(dict(ip.d.cfg, **{"http.demo_page": str(tmp_path / "missing.html")}))


@pytest.mark.parametrize("raw,status,extra", [
    (get("/nope"), 404, None),
    (get("/v1/stream/"), 404, None),
    (b"DELETE /v1/stream HTTP/1.1\r\nHost: t\r\n\r\n", 405, ("Allow", "GET, POST")),
    (post(b"{}", path="/healthz"), 405, ("Allow", "GET, HEAD")),
    (b"POST /v1/stream HTTP/1.1\r\nHost: t\r\n\r\n", 411, None),
    (b"POST /v1/stream HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n", 411, None),
    (b"POST /v1/stream HTTP/1.1\r\nHost: t\r\nContent-Length: 200000\r\n\r\n", 413, None),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n", 414, None),
    (b"GET / HTTP/1.1\r\nHost: t\r\nX: " + b"a" * 17000 + b"\r\n\r\n", 431, None),
    (b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X: a\r\n" * 64 + b"\r\n", 431, None),
    (b"GET / HTTP/1.1\r\n\r\n", 400, None),
    (b"hello\r\n\r\n", 400, None),
    (b"GET / HTTP/2.0\r\n\r\n", 505, None),
    (get("/v1/ws"), 426, ("Upgrade", "websocket")),
])
def test_http_errors(daemon, fdcheck, raw, status, extra):
    ip = front(daemon)
    got, headers, body = exchange(ip, raw)
    assert got == status
    assert error_of(body)["type"] == streamd.ERROR_KINDS[status]
    if extra:
        assert headers[extra[0]] == extra[1]
    ip.pump(lambda: not ip.d.conns)
    assert ip.d.stats.http_responses == {str(status): 1}
    ip.finish(fdcheck)


def test_slow_request_gets_408_however_it_trickles(daemon, fdcheck):
    ip = front(daemon, http__request_timeout=10.0)
    c = connect(ip, b"GET /v1/stream HTTP/1.1\r\n")
    for _ in range(9):  # a byte a second does not extend the deadline (slowloris)
        ip.run_for(3)
        c.sock.send(b"X")
        ip.clock.advance(1.0)
    ip.run_for(3)
    assert not c.done()
    ip.clock.advance(1.0)
    ip.pump(c.done)
    status, _, body = split(c.data)
    assert status == 408 and "10s" in error_of(body)["message"]
    c.close()
    ip.finish(fdcheck)


def test_client_leaving_mid_request_or_mid_stream_frees_everything(daemon, fdcheck):
    ip = front(daemon, backend__mock__message_delay=1.0)
    a = connect(ip, b"POST /v1/stream HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n{")
    b = connect(ip, get("/v1/stream"))
    ip.pump(lambda: b.has(b"Hello from"))
    assert ip.d.stats.active_streams == 1 and len(ip.d.conns) == 2
    a.close()
    b.close()
    ip.pump(lambda: not ip.d.conns)
    assert ip.d.stats.stream_errors["client_disconnected"] == 1
    assert ip.d.front.active == {}
    ip.finish(fdcheck)


def test_at_capacity_and_draining_get_503(daemon):
    ip = front(daemon, backend__mock__message_delay=1.0)
    ip.d.max_connections = 1
    a = connect(ip, get("/v1/stream"))
    ip.pump(lambda: a.has(b"Hello"))
    status, headers, _ = exchange(ip, get("/v1/stream"))
    assert status == 503 and headers["Retry-After"] == "1"
    ip.d.max_connections = 10
    ip.d.handle_term()
    assert ip.d.front.listeners == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", ip.port)).close()


# ---- auth ----

def keyed(daemon, tmp_path, keys=("k-one", "k-two"), **overrides):
    path = tmp_path / "keys"
    path.write_text("# streamd keys\n\n" + "\n".join(keys) + "\n")
    return front(daemon, http__api_keys_file=str(path), **overrides)


def test_api_keys(daemon, tmp_path, fdcheck):
    ip = keyed(daemon, tmp_path)
    status, headers, body = exchange(ip, get("/v1/stream"))
    assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="streamd"'
    status, _, body = exchange(ip, get("/v1/stream", "X-API-Key: nope\r\n"))
    assert status == 403 and error_of(body)["type"] == "forbidden"
    status, _, body = exchange(ip, get("/v1/stream", "Authorization: Bearer k-on\r\n"))
    assert status == 403
    assert exchange(ip, get("/v1/stream", "X-API-Key: k-one\r\n"))[0] == 200
    assert exchange(ip, get("/v1/stream", "Authorization: Bearer k-two\r\n"))[0] == 200
    assert exchange(ip, get("/v1/stream", "authorization: bearer  k-two \r\n"))[0] == 200
    assert exchange(ip, get("/v1/stream?api_key=k-one"))[0] == 200
    assert exchange(ip, post({}, "X-API-Key: k-one\r\n"))[0] == 200
    # Pages need no key.
    assert exchange(ip, get("/healthz"))[0] == 200
    assert json.loads(exchange(ip, get("/v1/backends"))[2])["auth"] is True
    ip.finish(fdcheck)


def test_keys_are_kept_only_as_digests(tmp_path):
    path = tmp_path / "keys"
    path.write_text("secret-1\n  secret-2  \n#secret-3\n")
    keys = streamd.load_api_keys(str(path))
    assert len(keys) == 2 and all(len(d) == 32 and len(i) == 8 for d, i in keys.items())
    assert "secret" not in repr(keys)
    with pytest.raises(streamd.ConfigError, match="http.api_keys_file: cannot read .*/nope"):
        streamd.load_api_keys(str(tmp_path / "nope"))


# ---- rate limits and the concurrent cap ----

def test_token_bucket_per_key_with_retry_after(daemon, tmp_path):
    ip = keyed(daemon, tmp_path, http__rate_limit=3, http__rate_window=60.0)
    one, two = "X-API-Key: k-one\r\n", "X-API-Key: k-two\r\n"
    for _ in range(3):
        assert exchange(ip, get("/v1/stream", one))[0] == 200
    status, headers, body = exchange(ip, get("/v1/stream", one))
    assert status == 429 and headers["Retry-After"] == "20"  # one token per 60/3 s
    assert error_of(body)["type"] == "rate_limited"
    assert exchange(ip, get("/v1/stream", two))[0] == 200, "each key has its own bucket"
    ip.clock.advance(15.0)
    assert exchange(ip, get("/v1/stream", one))[1]["Retry-After"] == "5"
    ip.clock.advance(5.0)
    assert exchange(ip, get("/v1/stream", one))[0] == 200
    assert exchange(ip, get("/v1/stream", one))[0] == 429
    # Refilled buckets are forgotten by the sweep, every minute (a new one starts full anyway).
    for _ in range(2):
        assert exchange(ip, get("/v1/stream", one))[0] in (200, 429)
        assert ip.d.front.buckets
        ip.clock.advance(60.0)
        ip.pump(lambda: not ip.d.front.buckets)


def test_failed_auth_spends_the_address_tokens(daemon, tmp_path):
    ip = keyed(daemon, tmp_path, http__rate_limit=2, http__rate_window=60.0)
    assert exchange(ip, get("/v1/stream", "X-API-Key: guess1\r\n"))[0] == 403
    assert exchange(ip, get("/v1/stream"))[0] == 401
    assert exchange(ip, get("/v1/stream", "X-API-Key: guess3\r\n"))[0] == 429
    assert exchange(ip, get("/v1/stream", "X-API-Key: k-one\r\n"))[0] == 200, "a valid key has its own bucket"


def test_without_auth_the_limit_is_per_address_and_trusts_only_named_proxies(daemon):
    ip = front(daemon, http__rate_limit=1, http__rate_window=60.0)
    assert exchange(ip, get("/v1/stream"))[0] == 200
    assert exchange(ip, get("/v1/stream"))[0] == 429
    # X-Forwarded-For from an untrusted peer changes nothing.
    assert exchange(ip, get("/v1/stream", "X-Forwarded-For: 10.0.0.1\r\n"))[0] == 429
    ip.d.cfg["http.trusted_proxies"] = ["127.0.0.1"]
    assert exchange(ip, get("/v1/stream", "X-Forwarded-For: 10.0.0.1\r\n"))[0] == 200
    assert exchange(ip, get("/v1/stream", "X-Forwarded-For: 10.0.0.2, 127.0.0.1\r\n"))[0] == 200
    assert exchange(ip, get("/v1/stream", "X-Forwarded-For: 6.6.6.6, 10.0.0.1\r\n"))[0] == 429
    assert set(ip.d.front.buckets) == {"addr:127.0.0.1", "addr:10.0.0.1", "addr:10.0.0.2"}


def test_rate_limit_zero_disables_it(daemon):
    ip = front(daemon, http__rate_limit=0)
    for _ in range(5):
        assert exchange(ip, get("/v1/stream"))[0] == 200
    assert ip.d.front.buckets == {}


def test_concurrent_stream_cap_per_key(daemon, tmp_path, fdcheck):
    ip = keyed(daemon, tmp_path, http__max_streams_per_key=2, backend__mock__message_delay=1.0)
    one = "X-API-Key: k-one\r\n"
    a, b = connect(ip, get("/v1/stream", one)), connect(ip, get("/v1/stream", one))
    ip.pump(lambda: a.has(b"Hello") and b.has(b"Hello"))
    status, headers, body = exchange(ip, get("/v1/stream", one))
    assert status == 429 and "concurrent streams" in error_of(body)["message"]
    other = connect(ip, get("/v1/stream", "X-API-Key: k-two\r\n"))
    ip.pump(lambda: other.has(b"Hello")), "another key has its own cap"
    a.close()
    ip.pump(lambda: sum(ip.d.front.active.values()) == 2)
    c = connect(ip, get("/v1/stream", one))
    ip.pump(lambda: c.has(b"Hello"))
    for x in (b, c, other):
        x.close()
    ip.pump(lambda: not ip.d.conns)
    assert ip.d.front.active == {}
    ip.finish(fdcheck)


# ---- the WebSocket, with raw frames ----

KEY = base64.b64encode(b"0123456789abcdef").decode()
UPGRADE = "Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n" \
          "Sec-WebSocket-Key: %s\r\n" % KEY


def ws_open(ip, path="/v1/ws", headers=UPGRADE):
    c = connect(ip, get(path, headers))
    ip.pump(lambda: b"\r\n\r\n" in c.data or c.done())
    head, _, rest = c.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), c.data
    assert b"Sec-WebSocket-Accept: " + streamd.ws_accept_key(KEY).encode() in head
    c.data = rest
    return c


def seen(c, want):
    """For pump(): has the client received exactly/ending with `want`?"""
    return lambda: (c.read(), c.data.endswith(want))[1]


def close_code(c):
    assert c.data[-4:-2] == b"\x88\x02", c.data[-10:]
    return int.from_bytes(c.data[-2:], "big")


def test_websocket_request_message_chunks_done_close(daemon, fdcheck):
    ip = front(daemon)
    c = ws_open(ip)
    c.sock.send(client_frame(streamd.WS_TEXT, json.dumps({"prompt": "over ws"}).encode()))
    ip.pump(seen(c, streamd.ws_close_frame(1000)))
    msgs = ws_messages(c.data[:-4])
    assert msgs[0] == {"type": "chunk", "content": "Hello from streamd! Prompt: over ws"}
    assert len(msgs) == 19 and msgs[-1] == {"type": "done"}
    c.sock.send(client_frame(streamd.WS_CLOSE, (1000).to_bytes(2, "big")))
    ip.pump(c.done)
    c.close()
    ip.pump(lambda: not ip.d.conns)
    assert ip.d.stats.completed == 1 and ip.d.stats.http_responses == {"101": 1}
    ip.finish(fdcheck)


def test_websocket_request_in_the_query_ping_pong_and_heartbeat(daemon):
    ip = front(daemon, backend__mock__message_delay=30.0, server__heartbeat_interval=15.0)
    c = ws_open(ip, "/v1/ws?prompt=q")
    ip.pump(lambda: b"Prompt: q" in c.data)
    c.data = b""
    c.sock.send(client_frame(streamd.WS_PING, b"hi"))
    ip.pump(seen(c, streamd.ws_frame(streamd.WS_PONG, b"hi")))
    assert c.data == streamd.ws_frame(streamd.WS_PONG, b"hi")
    c.data = b""
    ip.clock.advance(16.0)
    ip.pump(seen(c, streamd.ws_frame(streamd.WS_PING, b"")))  # ": ping" becomes a ping frame
    assert c.data == streamd.ws_frame(streamd.WS_PING, b"")


def test_websocket_client_close_cancels_the_stream(daemon, fdcheck):
    ip = front(daemon, backend__mock__message_delay=1.0)
    c = ws_open(ip, "/v1/ws?prompt=q")
    ip.pump(lambda: b"Prompt: q" in c.data)
    c.sock.send(client_frame(streamd.WS_CLOSE, (1001).to_bytes(2, "big") + b"bye"))
    ip.pump(c.done)
    assert close_code(c) == 1001  # echoed, then our FIN
    c.close()
    ip.pump(lambda: not ip.d.conns)
    assert ip.d.stats.stream_errors["client_disconnected"] == 1
    ip.finish(fdcheck)


@pytest.mark.parametrize("frame,code", [
    (client_frame(streamd.WS_TEXT, b"{}", masked=False), 1002),
    (client_frame(streamd.WS_BINARY, b"\x00"), 1003),
    (client_frame(streamd.WS_TEXT, b"\xff"), 1007),
    (client_frame(streamd.WS_TEXT, b"a" * 200), 1009),
    (client_frame(streamd.WS_TEXT, b'{"prompt": 1}'), 1008),
    (client_frame(streamd.WS_TEXT, b'{"backend": "nope"}'), 1008),
])
def test_websocket_bad_frames_and_requests_close_with_a_code(daemon, fdcheck, frame, code):
    ip = front(daemon, http__max_body_bytes=100)
    c = ws_open(ip)
    c.sock.send(frame)
    ip.pump(c.done)
    assert close_code(c) == code
    if code == 1008:
        err = ws_messages(c.data[:-4])[0]
        assert err["type"] == "error" and err["error"]["status"] == 400
    c.close()
    ip.finish(fdcheck)


def test_websocket_that_never_sends_its_request_times_out(daemon):
    ip = front(daemon, http__request_timeout=5.0)
    c = ws_open(ip)
    ip.clock.advance(5.0)
    ip.pump(c.done)
    assert ws_messages(c.data[:-4])[0]["error"]["type"] == "request_timeout"
    assert close_code(c) == 1008


@pytest.mark.parametrize("headers,status", [
    (UPGRADE.replace("Version: 13", "Version: 8"), 426),
    (UPGRADE.replace(KEY, "c2hvcnQ="), 400),
    (UPGRADE.replace("Connection: keep-alive, Upgrade", "Connection: keep-alive"), 426),
])
def test_bad_websocket_handshakes(daemon, headers, status):
    ip = front(daemon)
    got, resp_headers, _ = exchange(ip, get("/v1/ws", headers))
    assert got == status
    if "Version: 8" in headers:
        assert resp_headers["Sec-WebSocket-Version"] == "13"


# ---- the Apache path is unaffected ----

def test_handoffs_and_direct_clients_share_the_loop(daemon, fdcheck):
    ip = front(daemon, backend__mock__message_delay=0.01, http__max_streams_per_key=0)
    handoffs = [client(ip.path, {"prompt": "h%d" % i}) for i in range(20)]
    direct = [connect(ip, get("/v1/stream?prompt=d%d" % i)) for i in range(20)]
    ip.pump(lambda: all(c.done() for c in handoffs + direct), advance=0.01)
    for i, c in enumerate(handoffs):
        assert c.data.startswith(streamd.response_head()) and c.data.endswith(streamd.SSE_DONE)
        assert b"Prompt: h%d\"" % i in c.data
    for i, c in enumerate(direct):
        assert c.data.startswith(streamd.response_head()) and c.data.endswith(streamd.SSE_DONE)
    for c in handoffs + direct:
        c.close()
    ip.pump(lambda: not ip.d.conns)
    assert ip.d.stats.handoffs == 20 and ip.d.stats.completed == 40
    ip.finish(fdcheck)


def test_expect_100_continue_is_answered_before_the_body(daemon):
    ip = front(daemon)
    body = json.dumps({"prompt": "p" * 2000}).encode()
    c = connect(ip, b"POST /v1/stream HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body))
    ip.pump(seen(c, b"HTTP/1.1 100 Continue\r\n\r\n"))
    c.sock.sendall(body)
    ip.pump(c.done)
    assert c.data.startswith(b"HTTP/1.1 100 Continue\r\n\r\n" + streamd.response_head())
    assert c.data.count(b"100 Continue") == 1


def test_a_connection_that_never_sends_a_byte_is_closed_quietly(daemon, fdcheck):
    ip = front(daemon, http__request_timeout=10.0)
    c = connect(ip)
    ip.run_for(3)
    assert len(ip.d.conns) == 1
    ip.clock.advance(10.0)
    ip.pump(c.done)
    assert c.data == b""  # no 408 for a preconnect that never asked anything
    c.close()
    ip.pump(lambda: not ip.d.conns)
    assert ip.d.stats.http_responses == {"0": 1}
    ip.finish(fdcheck)


def test_bucket_table_is_bounded(daemon):
    ip = front(daemon, http__rate_limit=5, http__rate_window=60.0, http__trusted_proxies=["127.0.0.1"])
    ip.d.front.MAX_BUCKETS = 4
    for i in range(5):
        ip.clock.advance(1.0)
        assert exchange(ip, get("/v1/stream", "X-Forwarded-For: 10.0.0.%d\r\n" % i))[0] == 200
    assert set(ip.d.front.buckets) == {"addr:10.0.0.3", "addr:10.0.0.4"}  # the newest half


def test_cors_for_pages_from_other_origins(daemon, tmp_path):
    ip = keyed(daemon, tmp_path, http__cors_origins=["http://localhost:3000"])
    origin = "Origin: http://localhost:3000\r\n"
    status, headers, _ = exchange(ip, b"OPTIONS /v1/stream HTTP/1.1\r\nHost: t\r\n" + origin.encode()
                                  + b"Access-Control-Request-Method: POST\r\n\r\n")
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert "X-API-Key" in headers["Access-Control-Allow-Headers"] and "Content-Length" not in headers
    status, headers, body = exchange(ip, post({"prompt": "x"}, origin + "X-API-Key: k-one\r\n"))
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert headers["Vary"] == "Origin" and body.endswith(streamd.SSE_DONE)
    status, headers, _ = exchange(ip, post({"prompt": "x"}, origin))  # errors are readable too
    assert status == 401 and headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    # Another origin gets no CORS headers (the browser blocks the page), and no preflight.
    other = "Origin: http://evil.example\r\n"
    status, headers, _ = exchange(ip, post({"prompt": "x"}, other + "X-API-Key: k-one\r\n"))
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    status, _, _ = exchange(ip, b"OPTIONS /v1/stream HTTP/1.1\r\nHost: t\r\n" + other.encode() + b"\r\n")
    assert status == 403


def test_cors_off_by_default_and_star(daemon):
    ip = front(daemon)
    status, headers, _ = exchange(ip, get("/v1/stream", "Origin: http://a.example\r\n"))
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    assert exchange(ip, b"OPTIONS /v1/stream HTTP/1.1\r\nHost: t\r\n\r\n")[0] == 405
    ip.d.cfg["http.cors_origins"] = ["*"]
    status, headers, _ = exchange(ip, get("/v1/stream", "Origin: http://a.example\r\n"))
    assert headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize("value", [["localhost:3000"], ["http://a/b"], "ftp://x"])
def test_bad_cors_origins_are_config_errors(value):
    with pytest.raises(streamd.ConfigError, match=r"config.yaml: http.cors_origins: expected a list of origins"):
        streamd.parse_option(streamd.OPTION_BY_KEY["http.cors_origins"], value, "config.yaml")


def test_query_takes_include_reasoning_and_profile(daemon):
    ip = front(daemon)
    status, _, body = exchange(ip, get("/v1/stream?prompt=x&profile=nope&include_reasoning=true"))
    assert status == 400 and "profile: 'nope' is not a profile of backend mock" in error_of(body)["message"]
