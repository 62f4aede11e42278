"""HTTP/2 upstreams (the h2 package): h2c with prior knowledge (upstream.http2:
true) and ALPN h2 over TLS (auto).  The conformance cases, over HTTP/2."""
import json
import ssl

import pytest

from conftest import client
from upstream import WORDS, UNICODE
from test_backends import contents, stream, settings, PROVIDERS, ca, upstream  # noqa: F401  (fixtures)

pytest.importorskip("h2")


@pytest.fixture
def h2up(upstream):
    """Test upstreams that speak HTTP/2 (closed by the upstream fixture)."""
    return lambda **kw: upstream(h2=True, **kw)


def h2c(name, up, **extra):
    return settings(name, up, upstream__http2="true", **extra)


@pytest.mark.parametrize("name", PROVIDERS)
@pytest.mark.parametrize("pattern, expected", [("", "".join(WORDS)), ("unicode", "".join(UNICODE)),
                                               ("short", "".join(WORDS)), ("long", "x" * 4096 * 3)])
def test_h2c_streams(daemon, h2up, name, pattern, expected, fdcheck):
    up = h2up()
    ip = daemon(**h2c(name, up))
    c = stream(ip, {"prompt": "Hi", "test_pattern": pattern})
    assert contents(c) == (expected, True, None)
    rec = up.last()
    assert rec.protocol == "h2" and rec.headers.get("x-test-pattern", "") == pattern
    assert rec.body is not None  # the JSON body arrived over DATA frames
    c.close()
    ip.finish(fdcheck, up)


@pytest.mark.parametrize("name", PROVIDERS)
@pytest.mark.parametrize("pattern", ["abort:3", "cut:3", "error"])
def test_h2c_incomplete_stream_is_an_error(daemon, h2up, name, pattern):
    if name == "langgraph" and pattern.startswith("cut"):
        pytest.skip("LangGraph has no end marker: a clean close is complete")
    up = h2up()
    ip = daemon(**h2c(name, up))
    c = stream(ip, {"test_pattern": pattern})
    text, done, error = contents(c)
    assert not done and error is not None


@pytest.mark.parametrize("code, status", [(500, 502), (429, 503)])
def test_h2c_error_status(daemon, h2up, code, status):
    up = h2up()
    ip = daemon(**h2c("openai", up))
    c = stream(ip, {"test_pattern": "status:%d" % code})
    r = c.parsed()
    assert r.status == status and "upstream answered %d" % code in json.loads(r.body)["error"]["message"]


def test_h2c_client_vanishes_upstream_sees_reset(daemon, h2up):
    up = h2up()
    ip = daemon(**h2c("openai", up))
    c = client(ip.path, {"test_pattern": "slow:300"})
    ip.pump(lambda: c.has(b'"content"'))
    c.close()
    ip.pump(lambda: not ip.d.conns)
    assert up.last().hung_up.wait(1.0)


def test_h2c_silent_upstream_times_out(daemon, h2up):
    up = h2up()
    ip = daemon(**h2c("openai", up, server__heartbeat_interval=0.0))
    c = client(ip.path, {"test_pattern": "silent"})
    ip.pump(lambda: c.has(b"\r\n\r\n"))
    ip.clock.advance(60)
    ip.pump(c.done)
    assert contents(c)[2]["type"] == "timeout"


def test_h2c_retry_then_success(daemon, h2up):
    up = h2up()
    ip = daemon(**h2c("openai", up, upstream__max_retries=2))
    c = client(ip.path, {"test_pattern": "fail:1:503"})
    ip.pump(c.done, advance=0.05)
    assert contents(c)[1] and len(up.requests) == 2


def tls_h2(h2up, ca, alpn):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    ctx.set_alpn_protocols(alpn)
    return h2up(tls_context=ctx)


@pytest.mark.parametrize("name", PROVIDERS)
def test_alpn_h2_over_tls(daemon, h2up, ca, name):
    up = tls_h2(h2up, ca, ["h2", "http/1.1"])
    ip = daemon(**settings(name, up, upstream__insecure_ssl=True, upstream__http2="auto"))
    c = stream(ip, {"test_pattern": "unicode"})
    assert contents(c) == ("".join(UNICODE), True, None)
    assert up.last().protocol == "h2"


def test_alpn_falls_back_to_http1(daemon, h2up, ca):
    up = tls_h2(h2up, ca, ["http/1.1"])
    ip = daemon(**settings("openai", up, upstream__insecure_ssl=True, upstream__http2="auto"))
    c = stream(ip, {})
    assert contents(c)[1] and up.last().protocol == "http/1.1"


def test_http2_false_keeps_http1(daemon, h2up, ca):
    up = tls_h2(h2up, ca, ["h2", "http/1.1"])
    ip = daemon(**settings("openai", up, upstream__insecure_ssl=True, upstream__http2="false"))
    c = stream(ip, {})
    assert contents(c)[1] and up.last().protocol == "http/1.1"


def test_alpn_h2_verifies_certificates(daemon, h2up, ca):
    up = tls_h2(h2up, ca, ["h2", "http/1.1"])
    ip = daemon(**settings("openai", up, upstream__http2="auto"))  # verification on; CA not trusted
    c = stream(ip, {})
    assert c.parsed().status == 502 and "certificate" in json.loads(c.parsed().body)["error"]["message"]


# ---- multiplexing: many streams, one connection ----

def test_concurrent_streams_share_one_connection(daemon, h2up):
    up = h2up()
    ip = daemon(**h2c("openai", up))
    clients = [client(ip.path, {"test_pattern": "slow:50"}) for _ in range(10)]
    ip.pump(lambda: all(c.done() for c in clients), timeout=15)
    for c in clients:
        assert contents(c) == ("".join(WORDS), True, None)
    assert up.connections == 1 and len(up.requests) == 10


def test_upstream_reset_of_one_stream_leaves_the_others(daemon, h2up):
    up = h2up()
    ip = daemon(**h2c("openai", up))
    others = [client(ip.path, {"test_pattern": "slow:50"}) for _ in range(3)]
    ip.pump(lambda: all(c.has(b'"content"') for c in others))
    broken = client(ip.path, {"test_pattern": "abort:3"})  # the upstream resets this stream
    ip.pump(lambda: broken.done() and all(c.done() for c in others), timeout=15)
    text, done, error = contents(broken)
    assert not done and "reset" in error["message"]
    for c in others:
        assert contents(c)[1], "a reset of one stream must not touch the others"
    assert up.connections == 1


def test_client_leaving_resets_only_its_stream(daemon, h2up):
    up = h2up()
    ip = daemon(**h2c("openai", up))
    leaving = client(ip.path, {"test_pattern": "slow:100"})
    staying = client(ip.path, {"test_pattern": "slow:100"})
    ip.pump(lambda: leaving.has(b'"content"') and staying.has(b'"content"'))
    leaving.close()
    ip.pump(staying.done, timeout=15)
    assert contents(staying)[1]
    hung = [r for r in up.requests if r.hung_up.is_set()]
    assert len(hung) == 1 and up.connections == 1


def test_max_concurrent_streams_opens_another_connection(daemon, h2up):
    up = h2up()
    up.h2_max_streams = 2
    ip = daemon(**h2c("openai", up))
    clients = [client(ip.path, {"test_pattern": "slow:50"}) for _ in range(4)]
    ip.pump(lambda: all(c.done() for c in clients), timeout=15)
    assert all(contents(c)[1] for c in clients)
    assert up.connections == 2


def test_dead_connection_is_replaced(daemon, h2up):
    up = h2up()
    ip = daemon(**h2c("openai", up))
    c = stream(ip, {})
    assert contents(c)[1]
    for s in list(up.conns):  # the server drops the connection
        s.close()
    ip.run_for(20)
    c = stream(ip, {})
    assert contents(c)[1] and up.connections == 2


def test_slow_client_pauses_only_its_stream(daemon, h2up):
    """Per-stream flow control: data is acknowledged only when the client takes
    it, so the upstream stops sending to a client that reads nothing, while
    another stream on the same connection runs to the end."""
    from conftest import small_buffer_client
    up = h2up()
    ip = daemon(**h2c("openai", up))
    slow = small_buffer_client(ip.path, {"test_pattern": "flood:8000"}, size=16384)
    ip.pump(lambda: up.requests)
    ip.run_for(400)
    fast = client(ip.path, {"test_pattern": "slow:20"})
    ip.pump(fast.done, timeout=15)
    assert contents(fast)[1] and up.connections == 1
    flood = [r for r in up.requests if r.headers.get("x-test-pattern") == "flood:8000"][0]
    sent = flood.bytes_sent
    ip.run_for(200)
    assert flood.bytes_sent == sent and sent < 4 * 1024 * 1024, "upstream kept sending: %d" % sent
    ip.pump(lambda: slow.done() if (slow.read() or True) else False, timeout=60)
    text, done, error = contents(slow)
    assert done and len(text) == 8000 * 1024


def test_goaway_moves_new_streams_to_a_new_connection(daemon, h2up):
    up = h2up()
    ip = daemon(**h2c("openai", up))
    c = stream(ip, {"test_pattern": "goaway"})
    assert contents(c)[1]
    ip.run_for(20)  # the GOAWAY arrives
    c = stream(ip, {})
    assert contents(c)[1] and up.connections == 2 and len(up.requests) == 2
