"""One conformance suite, run against every upstream backend (parametrized),
with a real upstream server on 127.0.0.1 / a Unix socket / TLS."""
import json
import os
import socket
import ssl
import time
import uuid

import pytest

from conftest import client, Client, small_buffer_client
from upstream import TestUpstream, WORDS, UNICODE

PROVIDERS = ["openai", "anthropic", "gemini", "langgraph"]
PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages",
         "gemini": "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
         "langgraph": "/runs/stream"}


@pytest.fixture
def upstream():
    servers = []

    def start(**kw):
        s = TestUpstream(**kw)
        servers.append(s)
        return s
    yield start
    for s in servers:
        s.close()


def settings(name, up, **extra):
    base = up.base + ("/v1" if name == "openai" else "")
    out = {"backend__provider": name, "backend__%s__api_base" % name: base,
           "backend__%s__api_key" % name: "sk-test-key",
           "upstream__max_retries": 0}  # retries have their own tests (test_resilience.py)
    out.update(extra)
    return out


def contents(c: Client):
    """Text of the content events, whether the stream ended with [DONE], the error event."""
    text, done, error = "", False, None
    for block in c.data.split(b"\r\n\r\n", 1)[1].split(b"\n\n"):
        if not block.startswith(b"data: "):
            continue
        payload = block[6:]
        if payload == b"[DONE]":
            done = True
            continue
        ev = json.loads(payload)
        if "content" in ev:
            text += ev["content"]
        if "error" in ev:
            error = ev["error"]
    return text, done, error


def stream(ip, data, **kw):
    c = client(ip.path, data, **kw)
    ip.pump(c.done, timeout=10)
    return c


@pytest.mark.parametrize("name", PROVIDERS)
def test_full_stream(daemon, upstream, name, fdcheck):
    up = upstream()
    ip = daemon(**settings(name, up))
    c = stream(ip, {"prompt": "Hi", "system": "Be brief", "test_pattern": "", "max_tokens": 50,
                    "temperature": 0.2})
    assert c.data.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream")
    assert contents(c) == ("".join(WORDS), True, None)
    rec = up.last()
    assert rec.path == PATHS[name]
    auth = {"openai": ("authorization", "Bearer sk-test-key"), "anthropic": ("x-api-key", "sk-test-key"),
            "gemini": ("x-goog-api-key", "sk-test-key"), "langgraph": ("x-api-key", "sk-test-key")}[name]
    assert rec.headers[auth[0]] == auth[1]
    body = rec.body
    if name == "openai":
        assert body["stream"] is True and body["model"] == "gpt-4o-mini" and body["max_tokens"] == 50
        assert body["messages"] == [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}]
    elif name == "anthropic":
        assert body["system"] == "Be brief" and body["max_tokens"] == 50 and body["stream"] is True
        assert body["messages"] == [{"role": "user", "content": "Hi"}]
        assert rec.headers["anthropic-version"] == "2023-06-01"
    elif name == "gemini":
        assert body["contents"] == [{"role": "user", "parts": [{"text": "Hi"}]}]
        assert body["systemInstruction"] == {"parts": [{"text": "Be brief"}]}
        assert body["generationConfig"] == {"temperature": 0.2, "maxOutputTokens": 50}
    else:
        assert body["assistant_id"] == "agent" and body["stream_mode"] == ["messages-tuple"]
        assert body["input"]["messages"][-1] == {"type": "human", "content": "Hi"}
        assert body["on_disconnect"] == "cancel"
    c.close()
    ip.finish(fdcheck, up)


@pytest.mark.parametrize("name", PROVIDERS)
@pytest.mark.parametrize("pattern, expected", [
    ("unicode", "".join(UNICODE)), ("short", "".join(WORDS)), ("long", "x" * 4096 * 3),
    ("length", "".join(WORDS)), ("eof", "".join(WORDS)),
])
def test_content_survives_framing(daemon, upstream, name, pattern, expected):
    up = upstream()
    ip = daemon(**settings(name, up))
    c = stream(ip, {"test_pattern": pattern})
    assert contents(c) == (expected, True, None)
    assert up.last().headers["x-test-pattern"] == pattern


@pytest.mark.parametrize("name", PROVIDERS)
@pytest.mark.parametrize("pattern", ["abort:3", "abort:0", "cut:3", "error"])
def test_incomplete_stream_is_an_error_never_done(daemon, upstream, name, pattern):
    if name == "langgraph" and pattern.startswith("cut"):
        pytest.skip("LangGraph has no end marker: a clean close is complete (test_langgraph_clean_close_is_complete)")
    up = upstream()
    ip = daemon(**settings(name, up))
    c = stream(ip, {"test_pattern": pattern})
    text, done, error = contents(c)
    assert not done and error is not None
    assert error["type"] == "upstream_error"
    n = int(pattern.split(":")[1]) if ":" in pattern else 2
    assert text == "".join(WORDS[:n])


@pytest.mark.parametrize("name", PROVIDERS)
@pytest.mark.parametrize("upstream_status, status", [(500, 502), (401, 502), (404, 502), (429, 503), (503, 503)])
def test_error_status(daemon, upstream, name, upstream_status, status, fdcheck):
    up = upstream()
    ip = daemon(**settings(name, up))
    c = stream(ip, {"test_pattern": "status:%d" % upstream_status})
    r = c.parsed()
    assert r.status == status
    err = json.loads(r.body)["error"]
    assert "upstream answered %d" % upstream_status in err["message"]
    assert "test error %d" % upstream_status in err["message"]
    if status == 503:
        assert r.headers["Retry-After"] == "7"
    c.close()
    ip.finish(fdcheck, up)


@pytest.mark.parametrize("name", PROVIDERS)
def test_silent_upstream_before_head_is_504(daemon, upstream, name):
    up = upstream()
    ip = daemon(**settings(name, up))
    c = client(ip.path, {"test_pattern": "nohead"})
    ip.pump(lambda: up.requests)
    ip.run_for(5)
    ip.clock.advance(60)
    ip.pump(c.done)
    assert c.parsed().status == 504
    assert up.last().hung_up.wait(2)


@pytest.mark.parametrize("name", PROVIDERS)
def test_silent_upstream_after_head_times_out(daemon, upstream, name):
    up = upstream()
    ip = daemon(**settings(name, up, server__heartbeat_interval=0.0))
    c = client(ip.path, {"test_pattern": "silent"})
    ip.pump(lambda: c.has(b"\r\n\r\n"))
    ip.clock.advance(60)
    ip.pump(c.done)
    text, done, error = contents(c)
    assert not done and error["type"] == "timeout"


@pytest.mark.parametrize("name", PROVIDERS)
def test_client_vanishes_upstream_sees_it(daemon, upstream, name, fdcheck):
    up = upstream()
    ip = daemon(**settings(name, up))
    c = client(ip.path, {"test_pattern": "slow:300"})
    ip.pump(lambda: c.has(b'"content"'))
    c.close()
    t0 = time.monotonic()
    ip.pump(lambda: not ip.d.conns)
    assert up.last().hung_up.wait(1.0), "the upstream did not see the disconnect within 1 s"
    assert time.monotonic() - t0 < 1.0
    ip.finish(fdcheck, up)


@pytest.mark.parametrize("name", PROVIDERS)
def test_include_usage(daemon, upstream, name):
    up = upstream()
    ip = daemon(**settings(name, up))
    c = stream(ip, {"include_usage": True})
    events = [json.loads(b[6:]) for b in c.data.split(b"\r\n\r\n")[1].split(b"\n\n")
              if b.startswith(b"data: {")]
    if name == "langgraph":
        assert "usage" not in events[-1]  # LangGraph streams carry no usage
        return
    assert events[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}
    assert events[-1]["finish_reason"] in ("stop", "end_turn")
    if name == "openai":
        assert up.last().body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("name", PROVIDERS)
def test_keep_alive_reuses_one_connection(daemon, upstream, name):
    up = upstream()
    ip = daemon(**settings(name, up))
    for _ in range(3):
        c = stream(ip, {})
        assert contents(c)[1]
        c.close()
    assert up.connections == 1 and len(up.requests) == 3


@pytest.mark.parametrize("name", PROVIDERS)
def test_closed_pooled_connection_is_replaced(daemon, upstream, name):
    up = upstream()
    ip = daemon(**settings(name, up))
    c = stream(ip, {})
    c.close()
    for conn in list(up.conns):  # the server drops its idle keep-alive connection
        conn.close()
    c = stream(ip, {})
    assert contents(c)[1] and up.connections == 2


@pytest.mark.parametrize("name", PROVIDERS)
def test_slow_client_pauses_upstream_reading(daemon, upstream, name, tmp_path):
    up = upstream(unix_path=str(tmp_path / "up.sock"))
    ip = daemon(**{"backend__provider": name, "backend__%s__api_base" % name: "http://localhost",
                   "backend__%s__api_socket" % name: up.unix_path})
    c = small_buffer_client(ip.path, {"test_pattern": "flood:8000"}, size=16384)
    ip.pump(lambda: up.requests)
    ip.run_for(400)
    sent = up.last().bytes_sent
    ip.run_for(200)
    assert up.last().bytes_sent == sent, "the upstream kept sending while the client read nothing"
    assert sent < 4 * 1024 * 1024, "upstream sent %d of ~9 MB" % sent
    ip.pump(lambda: c.done() if (c.read() or True) else False, timeout=30)
    text, done, error = contents(c)
    assert done and len(text) == 8000 * 1024


@pytest.mark.parametrize("name", PROVIDERS)
def test_api_socket(daemon, upstream, name, tmp_path):
    up = upstream(unix_path=str(tmp_path / "api.sock"))
    ip = daemon(**{"backend__provider": name, "backend__%s__api_base" % name: "http://api.internal/v1",
                   "backend__%s__api_socket" % name: up.unix_path})
    c = stream(ip, {})
    assert contents(c) == ("".join(WORDS), True, None)
    assert up.last().headers["host"] == "api.internal"


def test_api_socket_missing_is_502(daemon, tmp_path, fdcheck):
    ip = daemon(backend__provider="openai", backend__openai__api_socket=str(tmp_path / "nope.sock"),
                upstream__max_retries=0)
    c = stream(ip, {})
    assert c.parsed().status == 502 and "No such file" in json.loads(c.parsed().body)["error"]["message"]
    c.close()
    ip.finish(fdcheck)


def test_connect_refused_is_502(daemon, fdcheck):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    ip = daemon(backend__provider="openai", backend__openai__api_base="http://127.0.0.1:%d/v1" % port,
                upstream__max_retries=0)
    c = stream(ip, {})
    r = c.parsed()
    assert r.status == 502 and "cannot connect to 127.0.0.1:%d" % port in json.loads(r.body)["error"]["message"]
    c.close()
    ip.finish(fdcheck)


@pytest.fixture(scope="module")
def ca():
    trustme = pytest.importorskip("trustme")
    return trustme.CA()


def tls_upstream(upstream, ca):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return upstream(tls_context=ctx)


@pytest.mark.parametrize("name", PROVIDERS)
def test_tls_verification_fails_against_untrusted_cert(daemon, upstream, ca, name):
    up = tls_upstream(upstream, ca)
    ip = daemon(**settings(name, up))
    c = stream(ip, {})
    r = c.parsed()
    assert r.status == 502 and "certificate" in json.loads(r.body)["error"]["message"]


@pytest.mark.parametrize("name", PROVIDERS)
def test_tls_insecure_ssl_works(daemon, upstream, ca, name):
    up = tls_upstream(upstream, ca)
    ip = daemon(**settings(name, up, upstream__insecure_ssl=True))
    c = stream(ip, {"test_pattern": "unicode"})
    assert contents(c) == ("".join(UNICODE), True, None)


def test_tls_verified_with_trusted_ca(daemon, upstream, ca, tmp_path, monkeypatch):
    up = tls_upstream(upstream, ca)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    ip = daemon(**settings("openai", up))
    c = stream(ip, {"test_pattern": "short"})
    assert contents(c) == ("".join(WORDS), True, None)


def test_api_key_never_in_error_text(daemon, upstream):
    up = upstream()
    ip = daemon(**settings("openai", up))
    c = stream(ip, {"test_pattern": "status:401"})
    assert b"sk-test-key" not in c.data


def test_per_request_backend(daemon, upstream):
    up = upstream()
    ip = daemon(backend__provider="mock", backend__enabled=["openai"], upstream__max_retries=0,
                backend__openai__api_base=up.base + "/v1", backend__mock__message_delay=0.0)
    c = stream(ip, {"backend": "openai"})
    assert contents(c) == ("".join(WORDS), True, None)
    c = stream(ip, {})
    assert b"Hello from streamd" in c.data
    c = stream(ip, {"backend": "gemini"})
    assert c.parsed().status == 400


def test_openai_messages_and_model(daemon, upstream):
    up = upstream()
    ip = daemon(**settings("openai", up))
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "a"}]},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    stream(ip, {"messages": msgs, "model": "gpt-x", "top_p": 0.5})
    body = up.last().body
    assert body["model"] == "gpt-x" and body["top_p"] == 0.5
    assert body["stream_options"] == {"include_usage": True}  # backend.openai.stream_usage defaults on
    assert [m["content"] for m in body["messages"]] == ["S", "a", "b", "c"]


def test_openai_stream_usage_off_asks_only_when_the_handoff_does(daemon, upstream):
    up = upstream()
    ip = daemon(**settings("openai", up, backend__openai__stream_usage=False))
    stream(ip, {"prompt": "a"})
    assert "stream_options" not in up.last().body
    stream(ip, {"prompt": "a", "include_usage": True})
    assert up.last().body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("name", PROVIDERS)
def test_lone_surrogate_reaches_the_upstream_escaped(daemon, upstream, name):
    """JSON may carry "\\ud800", which UTF-8 cannot: the request body goes
    \\u-escaped (valid JSON, the client's text exactly), not a 500."""
    up = upstream()
    ip = daemon(**settings(name, up))
    c = stream(ip, {"prompt": "a\ud800 ü"})
    assert c.parsed().status == 200 and c.data.endswith(b"data: [DONE]\n\n")
    assert "a\ud800 ü" in json.dumps(up.last().body, ensure_ascii=False)


def test_anthropic_defaults(daemon, upstream):
    up = upstream()
    ip = daemon(**settings("anthropic", up))
    stream(ip, {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]})
    body = up.last().body
    assert body["max_tokens"] == 1024 and body["system"] == "S" and body["model"] == "claude-sonnet-4-5"
    assert body["messages"] == [{"role": "user", "content": "q"}]


def test_anthropic_overloaded_mid_stream(daemon, upstream):
    up = upstream()
    ip = daemon(**settings("anthropic", up))
    c = stream(ip, {"test_pattern": "error"})
    _, done, error = contents(c)
    assert not done and "overloaded_error" in error["message"]


def test_gemini_model_in_path(daemon, upstream):
    up = upstream()
    ip = daemon(**settings("gemini", up))
    stream(ip, {"model": "gemini-x/evil"})
    assert up.last().path == "/v1beta/models/gemini-x%2Fevil:streamGenerateContent?alt=sse"


def test_langgraph_thread_and_input(daemon, upstream):
    up = upstream()
    ip = daemon(**settings("langgraph", up))
    c = stream(ip, {"prompt": "q", "thread_id": "t/1", "assistant_id": "bot", "stream_mode": "messages-tuple",
                    "langgraph_input": {"z": 1, "a": {"b": 2}}})
    assert contents(c) == ("".join(WORDS), True, None)
    create, run = up.requests[-2:]
    # LangGraph wants UUID thread ids: another id is sent as uuid5 of it, the same on every turn
    tid = str(uuid.uuid5(uuid.NAMESPACE_URL, "streamd:thread:t/1"))
    assert create.path == "/threads" and create.body == {"thread_id": tid, "if_exists": "do_nothing"}
    assert run.path == "/threads/%s/runs/stream" % tid
    assert run.body["assistant_id"] == "bot" and list(run.body["input"]) == ["messages", "a", "z"]
    assert "on_completion" not in run.body
    assert b"TOOL OUTPUT" not in c.data
    real = "2d1c7f1e-9a1b-4c7e-8f00-123456789abc"
    stream(ip, {"prompt": "q", "thread_id": real})
    assert up.last().path == "/threads/%s/runs/stream" % real  # a UUID goes as it is


def test_langgraph_thread_turn_sends_only_the_new_messages(daemon, upstream):
    """The thread holds the conversation (add_messages appends what it gets):
    with a thread_id only the turn after the last assistant message goes."""
    up = upstream()
    ip = daemon(**settings("langgraph", up))
    history = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
               {"role": "user", "content": "three"}]
    stream(ip, {"messages": history, "thread_id": "conv-1", "system": "be brief"})
    assert up.last().body["input"]["messages"] == [{"type": "human", "content": "three"}]
    stream(ip, {"messages": history, "system": "be brief"})  # stateless: everything, and the system prompt
    assert [m["content"] for m in up.last().body["input"]["messages"]] == ["be brief", "one", "two", "three"]
    # The thread's first turn (no assistant message yet) carries the system prompt: the thread keeps it.
    stream(ip, {"messages": history[:1], "thread_id": "conv-2", "system": "be brief"})
    assert up.last().body["input"]["messages"] == [{"type": "system", "content": "be brief"},
                                                   {"type": "human", "content": "one"}]


def test_langgraph_raw_output(daemon, upstream):
    up = upstream()
    ip = daemon(**settings("langgraph", up, backend__langgraph__output="raw"))
    c = stream(ip, {})
    body = c.data.split(b"\r\n\r\n", 1)[1]
    assert body.startswith(b'event: metadata\ndata: {"run_id": "run-1"')
    assert b": heartbeat\n\n" in body and body.endswith(b'"type": "tool", "id": "t1"}, {}]\n\n')
    assert b"[DONE]" not in body and b'"error"' not in body
    c2 = stream(ip, {"test_pattern": "cut:2"})  # clean framing: complete, the upstream's bytes and nothing else
    assert c2.data.endswith(b'"type": "tool", "id": "t1"}, {}]\n\n') and b'"error"' not in c2.data
    c3 = stream(ip, {"test_pattern": "abort:2"})  # connection cut
    assert c3.data.endswith(b'"message":"upstream closed the connection mid-stream"}}\n\n')


def test_langgraph_raw_output_adds_no_final_event_and_no_warning(daemon, upstream, caplog):
    """Raw is the upstream's bytes: include_usage adds no event of ours, and the
    text streamd did not parse is not 'an answer with nothing in it'."""
    up = upstream()
    ip = daemon(**settings("langgraph", up, backend__langgraph__output="raw"))
    c = stream(ip, {"include_usage": True})
    assert c.data.endswith(b'"type": "tool", "id": "t1"}, {}]\n\n') and b"finish_reason" not in c.data
    assert not [r for r in caplog.records if "neither text nor tool calls" in r.getMessage()]


def test_langgraph_clean_close_is_complete(daemon, upstream, fdcheck):
    """A real LangGraph server sends no end marker: a run stream whose framing
    ends cleanly, without an error event, is complete (research said `event:
    end`; the real server never sends it)."""
    up = upstream()
    ip = daemon(**settings("langgraph", up))
    c = stream(ip, {"test_pattern": "cut:3"})
    assert contents(c) == ("".join(WORDS[:3]), True, None)
    c.close()
    ip.finish(fdcheck, up)
    assert ip.d.stats.completed == 1


def test_typing_backend_with_fortune(daemon, tmp_path):
    prog = tmp_path / "fortune"
    prog.write_text("#!/bin/sh\nprintf 'Hi there!\\n\\t-- Someone\\n'\n")
    prog.chmod(0o755)
    ip = daemon(backend__provider="typing", backend__typing__fortune_path=str(prog),
                backend__typing__char_delay=0.0)
    c = stream(ip, {})
    events = [json.loads(b[6:]) for b in c.data.split(b"\r\n\r\n")[1].split(b"\n\n") if b.startswith(b"data: {")]
    assert "".join(e["char"] for e in events) == "Hi there!"
    assert [e["index"] for e in events] == list(range(9))
    assert c.data.endswith(b"data: [DONE]\n\n")


def test_typing_backend_without_fortune(daemon, tmp_path):
    from backends import typing as typing_backend
    ip = daemon(backend__provider="typing", backend__typing__fortune_path=str(tmp_path / "missing"),
                backend__typing__char_delay=0.001)
    c = client(ip.path, {})
    ip.pump(c.done, advance=0.01)
    text = "".join(json.loads(b[6:])["char"] for b in c.data.split(b"\r\n\r\n")[1].split(b"\n\n")
                   if b.startswith(b'data: {"char"'))
    assert text in [typing_backend.clean(q) for q in typing_backend.QUOTES]


def test_typing_pauses():
    import random
    from backends.typing import pause
    rnd = random.Random(1)
    assert pause(".", 0.04, rnd) > pause("a", 0.04, rnd) > pause(" ", 0.04, rnd)


def test_keep_alive_with_fd_numbers_above_1024(daemon, upstream):
    """Under load pooled connections get high fd numbers: the health check must cope."""
    up = upstream()
    ip = daemon(**settings("openai", up))
    filler = [os.dup(0) for _ in range(1100)]
    try:
        for _ in range(2):
            c = stream(ip, {})
            assert contents(c)[1], c.data
            c.close()
        assert up.connections == 1
    finally:
        for fd in filler:
            os.close(fd)


def test_raw_stream_that_ends_with_nothing_left_to_send_is_closed(daemon, upstream):
    """Regression: the last raw bytes went out in an earlier step, so the end
    of the stream had nothing to send and the FIN was never sent."""
    up = upstream()
    ip = daemon(**settings("langgraph", up, backend__langgraph__output="raw"))
    c = stream(ip, {"test_pattern": "lateend:50"})  # the chunked terminator comes 50 ms later
    assert c.data.endswith(b'"type": "tool", "id": "t1"}, {}]\n\n')
    c.close()


def test_no_header_injection_into_the_upstream_request(daemon, upstream):
    up = upstream()
    ip = daemon(**settings("openai", up, backend__openai__api_key="sk-bad\r\nX-Injected: 1"))
    c = stream(ip, {})
    assert c.parsed().status == 500 and not up.requests
