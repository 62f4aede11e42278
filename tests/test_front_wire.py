"""The direct front's pure parts: the HTTP/1.1 request parser, WebSocket
framing, and the SSE -> WebSocket translation.  Bytes in, values out."""
import json
import os

import pytest
from hypothesis import given, settings, strategies as st

import streamd
from streamd import HTTPError, RequestParser, WSError, WSParser


def parse(data: bytes, chunks=None, **limits):
    """Feed `data` in the given chunk sizes (default: at once); return the
    request, or None if it never completed."""
    p = RequestParser(**limits)
    if chunks is None:
        return p.feed(data)
    req, at = None, 0
    for n in chunks:
        req = p.feed(data[at:at + n])
        at += n
    return req


def summary(req):
    return (req.method, req.target, req.path, req.query, req.version, req.headers, req.body)


GOOD = [
    b"GET /v1/stream?prompt=hi%20there&backend=mock HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n"
    b'{"prompt":"h\xc3\xa9"}',
    b"GET http://example.com/healthz HTTP/1.1\r\nHost: example.com\r\n\r\n",   # absolute form
    b"GET / HTTP/1.1\nHost: x\nX-Long:   padded value\t \n\n",                  # bare LF, OWS
    b"\r\n\r\nGET / HTTP/1.0\r\n\r\n",                                          # blank lines; 1.0 needs no Host
    b"POST /v1/stream HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
]


@pytest.mark.parametrize("data", GOOD)
def test_every_two_way_split_and_byte_by_byte_give_the_same_request(data):
    whole = summary(parse(data))
    for cut in range(len(data) + 1):
        assert summary(parse(data, [cut, len(data) - cut])) == whole, cut
    assert summary(parse(data, [1] * len(data))) == whole


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(GOOD), st.lists(st.integers(1, 40), min_size=1, max_size=60))
def test_any_chunking_gives_the_same_request(data, sizes):
    chunks, total = [], 0
    for n in sizes:
        if total >= len(data):
            break
        chunks.append(n)
        total += n
    if total < len(data):
        chunks.append(len(data) - total)
    assert summary(parse(data, chunks)) == summary(parse(data))


def test_fields():
    r = parse(GOOD[0])
    assert (r.method, r.path, r.query, r.version) == ("GET", "/v1/stream", {"prompt": "hi there", "backend": "mock"},
                                                      (1, 1))
    assert r.headers == {"host": "x"}
    r = parse(GOOD[1])
    assert json.loads(r.body) == {"prompt": "hé"}
    assert parse(GOOD[2]).path == "/healthz"
    assert parse(GOOD[3]).headers["x-long"] == "padded value"
    assert parse(GOOD[4]).version == (1, 0)


def test_incomplete_request_waits_and_pipelined_bytes_are_ignored():
    p = RequestParser()
    assert p.feed(b"POST /v1/stream HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab") is None
    r = p.feed(b"cdeGET /next HTTP/1.1\r\n\r\n")
    assert r.body == b"abcde"
    assert p.feed(b"more") is r


def test_repeated_headers_are_joined():
    r = parse(b"GET / HTTP/1.1\r\nHost: x\r\nAccept: a\r\nAccept: b\r\n\r\n")
    assert r.headers["accept"] == "a, b"
    assert r.header_tokens("accept") == ["a", "b"]


BAD = [
    # (request, status, words in the message)
    (b"GET /v1/stream HTTP/1.1\r\n\r\n", 400, "Host"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "conflicting host"),
    (b"GET /\r\nHost: x\r\n\r\n", 400, "malformed request line"),
    (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "malformed request line"),
    (b"G\x01T / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "malformed request line"),
    (b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n", 400, "malformed request line"),
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505, "HTTP/1.0 and HTTP/1.1"),
    (b"GET / HTTP/3\r\nHost: x\r\n\r\n", 505, "HTTP/1.0 and HTTP/1.1"),
    (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400, "malformed header line"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n", 400, "malformed header line"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n", 400, "folding"),
    (b"GET / HTTP/1.1\r\nHost: x\rX: 1\r\n\r\n", 400, "bare CR"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400, "control character in header X-A"),
    (b"POST /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n", 411, "Content-Length"),
    (b"POST /v1/stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411,
     "Transfer-Encoding"),
    (b"POST /v1/stream HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 411,
     "Transfer-Encoding"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\n", 400, "Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400, "content-length"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \r\n\r\n", 400, "Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x10\r\n\r\n", 400, "Content-Length"),
    (b"GET /?a=%ff HTTP/1.1\r\nHost: x\r\n\r\n", 400, "query"),
    (b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", 400, "path"),
    (b"\r\n" * 9 + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "empty lines"),
]


@pytest.mark.parametrize("data,status,words", BAD)
def test_malformed_requests_are_refused_at_any_chunking(data, status, words):
    for chunks in (None, [1] * len(data), [len(data) // 2, len(data) - len(data) // 2]):
        with pytest.raises(HTTPError) as e:
            parse(data, chunks)
        assert e.value.status == status
        assert words.lower() in str(e.value).lower()


LIMITS = dict(max_line=100, max_header_bytes=200, max_headers=5, max_body=50)


@pytest.mark.parametrize("data,status", [
    (b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),      # complete line, too long
    (b"GET /" + b"a" * 200, 414),                                        # no LF yet, already too long
    (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"v" * 200 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"v" * 300, 431),             # a header line that never ends
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X%d: 1\r\n" % i for i in range(5)) + b"\r\n", 431),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 51\r\n\r\n", 413),  # refused before the body
])
def test_limits_at_any_chunking(data, status):
    for chunks in (None, [1] * len(data), [7] * (len(data) // 7 + 1)):
        with pytest.raises(HTTPError) as e:
            parse(data, chunks, **LIMITS)
        assert e.value.status == status


def test_just_under_the_limits_is_fine():
    line = b"GET /" + b"a" * (100 - len(b"GET / HTTP/1.1") ) + b" HTTP/1.1"
    assert len(line) == 100
    assert parse(line + b"\r\nHost: x\r\n\r\n", **LIMITS).method == "GET"
    four = b"".join(b"X%d: 1\r\n" % i for i in range(4))
    assert parse(b"GET / HTTP/1.1\r\nHost: x\r\n" + four[:-7] + b"\r\n", **LIMITS) is not None
    body = b"x" * 50
    assert parse(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n" + body, **LIMITS).body == body


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_never_raises_anything_but_httperror(data):
    p = RequestParser(**LIMITS)
    try:
        p.feed(data)
    except HTTPError as e:
        assert e.status in (400, 411, 413, 414, 431, 505)


# ---- WebSocket framing ----

def client_frame(opcode, payload=b"", fin=True, mask=b"\x01\x02\x03\x04", rsv=0, masked=True, length=None):
    """A frame as a client sends it (masked)."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | rsv | opcode
    if n < 126:
        head = bytes((b0, (0x80 if masked else 0) | n))
    elif n < 65536:
        head = bytes((b0, (0x80 if masked else 0) | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, (0x80 if masked else 0) | 127)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def feed_all(data, chunks=None, max_message=1 << 20):
    p = WSParser(max_message)
    if chunks is None:
        return p.feed(data)
    out, at = [], 0
    for n in chunks:
        out += p.feed(data[at:at + n])
        at += n
    return out


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_masked_frames_of_every_length_class(size):
    payload = os.urandom(size)
    data = client_frame(streamd.WS_BINARY, payload)
    assert feed_all(data) == [(streamd.WS_BINARY, payload)]
    assert feed_all(data, [3] * (len(data) // 3 + 1)) == [(streamd.WS_BINARY, payload)]


def test_fragments_are_joined_and_control_frames_may_come_between():
    data = (client_frame(streamd.WS_TEXT, b'{"prompt":', fin=False)
            + client_frame(streamd.WS_PING, b"p")
            + client_frame(streamd.WS_CONT, b'"h\xc3', fin=False)
            + client_frame(streamd.WS_CONT, b'\xa9"}'))
    want = [(streamd.WS_PING, b"p"), (streamd.WS_TEXT, '{"prompt":"hé"}'.encode())]
    for cut in range(len(data) + 1):
        assert feed_all(data, [cut, len(data) - cut]) == want


@pytest.mark.parametrize("data,code", [
    (client_frame(streamd.WS_TEXT, b"hi", masked=False), streamd.WS_PROTOCOL_ERROR),
    (client_frame(streamd.WS_TEXT, b"hi", rsv=0x40), streamd.WS_PROTOCOL_ERROR),
    (client_frame(0x3, b"hi"), streamd.WS_PROTOCOL_ERROR),
    (client_frame(streamd.WS_PING, b"x" * 126), streamd.WS_PROTOCOL_ERROR),
    (client_frame(streamd.WS_PING, b"x", fin=False), streamd.WS_PROTOCOL_ERROR),
    (client_frame(streamd.WS_CONT, b"x"), streamd.WS_PROTOCOL_ERROR),
    (client_frame(streamd.WS_TEXT, b"x", fin=False) + client_frame(streamd.WS_TEXT, b"y"),
     streamd.WS_PROTOCOL_ERROR),
    (client_frame(streamd.WS_TEXT, b"\xff\xfe"), streamd.WS_BAD_DATA),
    (client_frame(streamd.WS_CLOSE, b"\x03"), streamd.WS_PROTOCOL_ERROR),
    (client_frame(streamd.WS_CLOSE, (1005).to_bytes(2, "big")), streamd.WS_PROTOCOL_ERROR),
    (client_frame(streamd.WS_CLOSE, (1000).to_bytes(2, "big") + b"\xff"), streamd.WS_BAD_DATA),
    (client_frame(streamd.WS_BINARY, b"", length=2000)[:12], streamd.WS_TOO_BIG),   # refused by the header alone
    (client_frame(streamd.WS_TEXT, b"a" * 600, fin=False) + client_frame(streamd.WS_CONT, b"a" * 600),
     streamd.WS_TOO_BIG),
    (bytes((0x82, 0xFF)) + (1 << 63).to_bytes(8, "big"), streamd.WS_PROTOCOL_ERROR),
])
def test_protocol_violations_fail_with_the_right_close_code(data, code):
    for chunks in (None, [1] * len(data)):
        with pytest.raises(WSError) as e:
            feed_all(data, chunks, max_message=1000)
        assert e.value.code == code


def test_close_frames_parse_and_end_the_batch():
    data = client_frame(streamd.WS_CLOSE, (1000).to_bytes(2, "big") + b"bye") + client_frame(streamd.WS_TEXT, b"x")
    assert feed_all(data) == [(streamd.WS_CLOSE, (1000).to_bytes(2, "big") + b"bye")]
    assert feed_all(client_frame(streamd.WS_CLOSE)) == [(streamd.WS_CLOSE, b"")]


def test_server_frames_are_unmasked_with_the_right_length_encoding():
    assert streamd.ws_frame(streamd.WS_TEXT, b"a" * 125)[:2] == bytes((0x81, 125))
    assert streamd.ws_frame(streamd.WS_TEXT, b"a" * 126)[:4] == bytes((0x81, 126, 0, 126))
    assert streamd.ws_frame(streamd.WS_BINARY, b"a" * 65536)[:10] == bytes((0x82, 127)) + (65536).to_bytes(8, "big")
    assert streamd.ws_close_frame(1000) == b"\x88\x02\x03\xe8"


def test_accept_key_matches_rfc6455_example():
    assert streamd.ws_accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def ws_messages(frames: bytes):
    """Decode our (unmasked) server frames for the assertions."""
    out = []
    while frames:
        op, n, at = frames[0] & 0x0F, frames[1] & 0x7F, 2
        if n == 126:
            n, at = int.from_bytes(frames[2:4], "big"), 4
        payload = frames[at:at + n]
        out.append(("ping", payload) if op == streamd.WS_PING else json.loads(payload))
        frames = frames[at + n:]
    return out


def test_sse_becomes_websocket_messages():
    pending = bytearray()
    sse = (streamd.sse_event({"content": "héllo"}) + streamd.SSE_PING + streamd.sse_event({"char": "x", "index": 3})
           + streamd.sse_event({"finish_reason": "stop", "usage": {"total_tokens": 3}})
           + streamd.sse_error("upstream_error", "boom") + b"event: values\ndata: {\"a\":1}\n\n" + streamd.SSE_DONE)
    assert ws_messages(streamd.sse_to_ws(sse, pending)) == [
        {"type": "chunk", "content": "héllo"}, ("ping", b""), {"type": "chunk", "content": "x", "index": 3},
        {"type": "usage", "finish_reason": "stop", "usage": {"total_tokens": 3}},
        {"type": "error", "error": {"type": "upstream_error", "message": "boom"}},
        {"type": "event", "event": "values", "data": {"a": 1}}, {"type": "done"}]
    assert not pending


def test_an_event_cut_across_writes_waits_for_its_end():
    pending = bytearray()
    ev = streamd.sse_event({"content": "abc"})
    assert streamd.sse_to_ws(ev[:5], pending) == b""
    assert ws_messages(streamd.sse_to_ws(ev[5:], pending)) == [{"type": "chunk", "content": "abc"}]


def test_reasoning_tool_calls_and_the_finish_become_typed_websocket_messages():
    call = {"id": "c1", "name": "get_weather", "arguments": "{}"}
    sse = (streamd.sse_event({"reasoning": "hmm"}) + streamd.sse_event({"tool_call": call})
           + streamd.sse_event({"finish_reason": "tool_calls"}) + streamd.SSE_DONE)
    assert ws_messages(streamd.sse_to_ws(sse, bytearray())) == [
        {"type": "reasoning", "content": "hmm"}, {"type": "tool_call", "tool_call": call},
        {"type": "finish", "finish_reason": "tool_calls"}, {"type": "done"}]
