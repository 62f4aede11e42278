"""The pure wire-protocol functions: bytes in, values or bytes out."""
import json
import random
import socket
import array

import pytest
from hypothesis import given, strategies as st

import streamd
from streamd import ProtocolError, parse_handoff


# ---- handoff data ----

@pytest.mark.parametrize("data", [b"", b"\0", b"  \n\t", b"\0\0", b"\r\n\0 "])
def test_empty_data_means_defaults(data):
    req = parse_handoff(data)
    assert req.prompt is None and req.messages is None and req.response_headers == ()
    assert [(m.role, m.text()) for m in req.conversation()] == [("user", "")]


def test_all_fields():
    obj = {
        "prompt": "hi", "system": "be brief", "model": "m", "max_tokens": 5, "temperature": 0.5,
        "top_p": 1, "user_id": 7, "request_id": "r-1", "backend": "mock", "test_pattern": "unicode",
        "response_headers": {"X-Trace": "abc"}, "include_usage": True, "thread_id": "t",
        "assistant_id": "a", "langgraph_input": {"k": 1}, "stream_mode": "values", "unknown": [1, 2],
    }
    req = parse_handoff(json.dumps(obj).encode() + b"\0")
    assert (req.prompt, req.system, req.model, req.max_tokens) == ("hi", "be brief", "m", 5)
    assert (req.temperature, req.top_p, req.user_id, req.request_id) == (0.5, 1, 7, "r-1")
    assert req.response_headers == [("X-Trace", "abc")]
    assert req.include_usage is True and req.stream_mode == ["values"]
    assert req.langgraph_input == {"k": 1}


def test_messages_replace_prompt_and_join_text_parts():
    req = parse_handoff(json.dumps({"prompt": "ignored", "messages": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c"},
    ]}).encode())
    assert [(m.role, m.text()) for m in req.conversation()] == [("system", "sys"), ("user", "ab"), ("assistant", "c")]
    assert req.last_user_text() == "ab"


def test_user_id_string_is_allowed():
    assert parse_handoff(b'{"user_id": "u-9"}').user_id == "u-9"


@pytest.mark.parametrize("obj, field", [
    ({"prompt": 5}, "prompt"),
    ({"max_tokens": "100"}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": [1]}, "top_p"),
    ({"user_id": 1.5}, "user_id"),
    ({"include_usage": "yes"}, "include_usage"),
    ({"response_headers": ["X-A: b"]}, "response_headers"),
    ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ({"langgraph_input": "x"}, "langgraph_input"),
    ({"stream_mode": [1]}, "stream_mode"),
    ({"backend": 3}, "backend"),
    ({"test_pattern": "x\r\nX-Injected: 1"}, "test_pattern"),
])
def test_wrong_type_names_the_field(obj, field):
    with pytest.raises(ProtocolError) as e:
        parse_handoff(json.dumps(obj).encode())
    assert e.value.status == 400 and e.value.reason == "bad_json"
    assert str(e.value).startswith(field + ": expected ")


@pytest.mark.parametrize("field", ["model", "backend", "thread_id", "assistant_id", "request_id", "test_pattern"])
def test_names_with_a_lone_surrogate_are_refused(field):
    """These go into URLs, headers and log lines, which must be encodable;
    JSON allows "\\ud800", UTF-8 does not."""
    with pytest.raises(ProtocolError) as e:
        parse_handoff(b'{"%s": "gpt\\ud800"}' % field.encode())
    assert str(e.value) == "%s: expected a string of at most 1024 characters%s, got a string with a lone surrogate escape" % (
        field, " without control characters (it becomes an upstream header)" if field == "test_pattern" else "")
    assert parse_handoff(b'{"prompt": "text may: \\ud800"}').prompt == "text may: \ud800"


def test_error_never_echoes_the_value():
    with pytest.raises(ProtocolError) as e:
        parse_handoff(json.dumps({"prompt": ["my secret prompt"]}).encode())
    assert "secret" not in str(e.value)


@pytest.mark.parametrize("data, text", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "expected a JSON object, got array"),
    (b'"prompt"', "expected a JSON object, got string"),
    (b'{"prompt": "\xff\xfe"}', "not valid UTF-8 (at byte 12)"),
    (b'{"prompt": "\xed\xa0\x80"}', "not valid UTF-8 (at byte 12)"),  # a UTF-8-encoded surrogate
    (b"\xfe\xff" + '{"prompt": "hi"}'.encode("utf-16-be"), "not valid UTF-8 (at byte 0)"),
    (b"[" * 100000, "not valid JSON"),
    # Python's json takes these; RFC 8259 does not, and no upstream would.
    (b'{"temperature": NaN}', "not valid JSON: NaN is not a JSON number"),
    (b'{"top_p": -Infinity}', "not valid JSON: -Infinity is not a JSON number"),
    (b'{"langgraph_input": {"x": Infinity}}', "not valid JSON: Infinity is not a JSON number"),
    (b'{"temperature": 1e400}', "not valid JSON: 1e400 is out of range"),
])
def test_not_a_json_object(data, text):
    with pytest.raises(ProtocolError) as e:
        parse_handoff(data)
    assert text in str(e.value)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_raise_protocol_error(data):
    try:
        parse_handoff(data)
    except ProtocolError as e:
        assert e.status == 400


# ---- response headers ----

def test_header_validation():
    kept, dropped = streamd.validate_headers({
        "X-Ok": "fine\tvalue", "Set-Cookie": "a=b", "X-Unicode": "caf\u00e9",
        "Bad Name": "x", "X-CRLF": "a\r\nInjected: yes", "X-Nul": "a\0", "": "empty",
        "content-type": "text/html", "Content-Length": "5", "Transfer-Encoding": "chunked",
        "Content-Encoding": "gzip", "Connection": "keep-alive", "X-Accel-Buffering": "yes",
        "Cache-Control": "max-age=5", "Keep-Alive": "1", "Upgrade": "h2c", "TE": "trailers",
        "Trailer": "x", "Proxy-Authenticate": "Basic", "X-Del": "a\x7f", "X:Colon": "x",
    })
    assert kept == [("X-Ok", "fine\tvalue"), ("Set-Cookie", "a=b"), ("X-Unicode", "caf\u00e9")]
    assert len(dropped) == 18


@given(st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=8))
def test_kept_headers_can_never_inject(headers):
    kept, _ = streamd.validate_headers(headers)
    head = streamd.response_head(kept)
    assert head.count(b"\r\n\r\n") == 1 and head.endswith(b"\r\n\r\n")
    assert head.count(b"\n") == head.count(b"\r\n") == 5 + len(kept) + 1


def test_response_head_exact_bytes():
    assert streamd.response_head() == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"Connection: close\r\nX-Accel-Buffering: no\r\n\r\n")
    assert streamd.response_head([("X-A", "1")]).endswith(b"X-Accel-Buffering: no\r\nX-A: 1\r\n\r\n")


def test_error_response_bytes():
    raw = streamd.error_response(503, "full", retry_after=1)
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 503 Service Unavailable"
    assert b"Content-Type: application/json" in lines and b"Connection: close" in lines
    assert b"Retry-After: 1" in lines and b"Content-Length: %d" % len(body) in lines
    assert json.loads(body) == {"error": {"type": "unavailable", "message": "full"}}


def test_sse_events_are_compact_utf8():
    assert streamd.sse_event({"content": "h\u00e9 \U0001f600\n"}) == \
        'data: {"content":"h\u00e9 \U0001f600\\n"}\n\n'.encode()
    assert streamd.sse_error("timeout", "x") == b'data: {"error":{"type":"timeout","message":"x"}}\n\n'
    # A lone surrogate (possible from a \\ud83d escape upstream) must not crash rendering.
    assert streamd.sse_event({"content": "\ud83d"}) == b'data: {"content":"?"}\n\n'


# ---- ancillary data ----

def test_fds_from_ancillary():
    cmsg = array.array("i", [5, 6, 7]).tobytes()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, cmsg), (socket.SOL_SOCKET, 99, b"xxxx"),
           (socket.SOL_SOCKET, socket.SCM_RIGHTS, cmsg[:4] + b"\1\2")]
    assert streamd.fds_from_ancillary(anc) == [5, 6, 7, 5]


# ---- the client-side response reader, fed in every chunking ----

STREAM = (streamd.response_head([("X-A", "1")]) + streamd.sse_event({"content": "\u4e2d\U0001f600"})
          + streamd.SSE_PING + streamd.SSE_DONE)


def chunkings(data):
    yield [data]
    yield [data[i:i + 1] for i in range(len(data))]
    rnd = random.Random(7)
    for _ in range(20):
        cuts = sorted(rnd.sample(range(1, len(data)), rnd.randint(1, 8)))
        yield [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


def test_stream_reader_every_chunking():
    for chunks in chunkings(STREAM):
        r = streamd.StreamReader()
        events = [ev for c in chunks for ev in r.feed(c)]
        assert r.status == 200 and r.headers["X-A"] == "1"
        assert events == ['data: {"content":"\u4e2d\U0001f600"}', ": ping", "data: [DONE]"]


def test_stream_reader_error_body_every_chunking():
    raw = streamd.error_response(400, "prompt: expected a string, got integer")
    for chunks in chunkings(raw):
        r = streamd.StreamReader()
        for c in chunks:
            r.feed(c)
        assert r.status == 400 and json.loads(r.body)["error"]["type"] == "invalid_request"


def test_response_header_with_a_non_string_value_is_dropped():
    req = parse_handoff(b'{"response_headers": {"X-Num": 5, "X-Ok": "y"}}')
    assert req.response_headers == [("X-Ok", "y")] and req.dropped_headers == ["X-Num"]


def test_header_name_with_a_trailing_newline_is_dropped():
    """Regression (found by hypothesis): re "$" matches before a final newline."""
    kept, dropped = streamd.validate_headers({"X-A\n": "v", "X-B": "v\n"})
    assert kept == [] and dropped == ["X-A\n", "X-B"]


def test_logfmt_quotes_a_trailing_newline():
    assert streamd._logfmt_value("abc\n") == '"abc\\n"'
