"""The upstream client's pure parsers, fed whole, byte by byte and in random chunks."""
import random

import pytest
from hypothesis import given, strategies as st

from backends._http import (SSEParser, SSEEvent, ChunkedDecoder, UpstreamProtocolError, parse_head,
                            retry_after_seconds, error_message)


def chunkings(data, seed=3):
    yield [data]
    yield [data[i:i + 1] for i in range(len(data))]
    rnd = random.Random(seed)
    for _ in range(30):
        if len(data) < 2:
            break
        cuts = sorted(rnd.sample(range(1, len(data)), min(len(data) - 1, rnd.randint(1, 10))))
        yield [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


def parse_all(chunks, close=True):
    p = SSEParser()
    out = []
    for c in chunks:
        out += p.feed(c)
    if close:
        out += p.close()
    return out


E = SSEEvent
SSE_FIXTURES = [
    # (name, bytes, events)
    ("lf", b"data: a\n\ndata: b\n\n", [E("message", "a", ""), E("message", "b", "")]),
    ("crlf", b"data: a\r\n\r\ndata: b\r\n\r\n", [E("message", "a", ""), E("message", "b", "")]),
    ("cr", b"data: a\r\rdata: b\r\r", [E("message", "a", ""), E("message", "b", "")]),
    ("mixed", b"data: a\r\n\ndata: b\r\rdata: c\n\r\n", [E("message", c, "") for c in "abc"]),
    ("multiline", b"data: one\ndata: two\ndata:\n\n", [E("message", "one\ntwo\n", "")]),
    ("no space", b"data:x\ndata:  y\n\n", [E("message", "x\n y", "")]),
    ("comment", b": heartbeat\n\n:ping\ndata: a\n\n", [E("message", "a", "")]),
    ("event and id", b"event: messages\nid: 7\ndata: [1]\n\ndata: 2\n\n",
     [E("messages", "[1]", "7"), E("message", "2", "7")]),
    ("id with nul ignored", b"id: 1\ndata: a\n\nid: x\0y\ndata: b\n\n", [E("message", "a", "1"), E("message", "b", "1")]),
    ("retry and unknown", b"retry: 100\nfoo: bar\ndata: a\n\n", [E("message", "a", "")]),
    ("no colon", b"data\n\n", [E("message", "", "")]),
    ("event without data", b"event: x\n\ndata: y\n\n", [E("message", "y", "")]),
    ("bom", b"\xef\xbb\xbfdata: a\n\n", [E("message", "a", "")]),
    ("only first bom", b"\xef\xbb\xbfdata: a\n\n\xef\xbb\xbfdata: b\n\n", [E("message", "a", "")]),
    ("utf8", "data: {\"t\":\"中文 😀 𝐀\"}\r\n\r\n".encode(), [E("message", "{\"t\":\"中文 😀 𝐀\"}", "")]),
    ("partial at eof dropped", b"data: a\n\ndata: b\n", [E("message", "a", "")]),
    ("trailing cr at eof", b"data: a\r\r", [E("message", "a", "")]),
    ("invalid utf8 replaced", b"data: \xff\n\n", [E("message", "\ufffd", "")]),
]


@pytest.mark.parametrize("name, data, events", SSE_FIXTURES, ids=[f[0] for f in SSE_FIXTURES])
def test_sse_every_chunking(name, data, events):
    for chunks in chunkings(data):
        assert parse_all(chunks) == events, chunks


def test_sse_lone_cr_waits_for_next_byte():
    p = SSEParser()
    assert p.feed(b"data: a\r") == []
    assert p.feed(b"\n") == []
    assert p.feed(b"\r") == []
    assert p.feed(b"\n") == [E("message", "a", "")]


def test_sse_size_caps():
    p = SSEParser(max_size=100)
    with pytest.raises(UpstreamProtocolError, match="line longer than 100"):
        p.feed(b"data: " + b"x" * 200)
    p = SSEParser(max_size=100)
    with pytest.raises(UpstreamProtocolError, match="event larger than 100"):
        for _ in range(10):
            p.feed(b"data: " + b"x" * 20 + b"\n")


@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
                        max_size=30), min_size=1, max_size=5),
       st.sampled_from([b"\n", b"\r\n", b"\r"]), st.randoms())
def test_sse_roundtrip_property(lines, eol, rnd):
    data = b"".join(b"data: " + line.encode() + eol for line in lines) + eol
    cuts = sorted(rnd.sample(range(1, len(data)), min(len(data) - 1, 5))) if len(data) > 1 else []
    chunks = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
    assert parse_all(chunks) == [E("message", "\n".join(lines), "")]


CHUNKED = b"5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\nTrailer: x\r\n\r\n"


def test_chunked_every_chunking():
    for chunks in chunkings(CHUNKED):
        d = ChunkedDecoder()
        out = b"".join(d.feed(c) for c in chunks)
        assert out == b"hello world!" and d.done


def test_chunked_not_done_before_terminator():
    d = ChunkedDecoder()
    assert d.feed(b"5\r\nhello\r\n") == b"hello" and not d.done
    assert d.feed(b"0\r\n") == b"" and not d.done
    d.feed(b"\r\n")
    assert d.done


@pytest.mark.parametrize("bad", [b"zz\r\n", b"5\r\nhelloXX\r\n", b"-5\r\n", b"9" * 5000])
def test_chunked_errors(bad):
    with pytest.raises(UpstreamProtocolError):
        ChunkedDecoder().feed(bad)


def test_parse_head():
    status, headers = parse_head(b"HTTP/1.1 429 Too Many\r\nRetry-After: 3\r\nX-A: 1\r\nx-a: 2")
    assert status == 429 and headers == {"retry-after": "3", "x-a": "1, 2"}
    for bad in (b"HTTP/2 200", b"FOO 200 OK", b"HTTP/1.1 2000 X", b"HTTP/1.1 200 OK\r\nno colon"):
        with pytest.raises(UpstreamProtocolError):
            parse_head(bad)


def test_retry_after():
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 2
    assert retry_after_seconds({"retry-after": "0.2"}) == 1
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert retry_after_seconds({}) is None
    assert retry_after_seconds({"retry-after": "inf"}) is None


def test_error_message():
    assert error_message(b'{"error":{"message":"bad key","type":"x"}}') == "bad key"
    assert error_message(b'{"type":"error","error":{"type":"rate_limit_error","message":"slow"}}') == "slow"
    assert error_message(b'{"detail":"no thread"}') == "no thread"
    assert error_message(b"plain text") == "plain text"
