"""Property tests (hypothesis) for every parser that reads a peer's bytes.

Each parser gets (1) arbitrary or near-valid hostile input: only its own error
type may come out, with a sensible status or close code, and (2) the same input
in several chunkings: whole, byte by byte, and split at random points (empty
pieces included).  An incremental parser must give the same answer whichever
way the bytes arrive: the network decides the chunking, not the peer's intent.

Parsers: RequestParser, split_target, WSParser, parse_handoff, the direct
front's query -> Request (HTTPFront.stream_request), the upstream side in
backends/_http.py (parse_head, ChunkedDecoder, SSEParser, exact_retry_after,
retry_after_seconds, error_message), the config loader (read_config_file,
load_config) and the `send` client's StreamReader.

All pure functions: no sockets, no sleeps, no fds to count.
"""
import json
import math
import os
import re
import string
import urllib.parse

import pytest
import yaml
from hypothesis import Phase, example, given, settings, strategies as st

import streamd
from backends import _http

# No "explain" phase: it re-runs a failing example under a tracer, which takes
# tens of seconds here and adds nothing to a shrunk reproducer.
PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink)
FAST = settings(max_examples=60, deadline=None, phases=PHASES)
MEDIUM = settings(max_examples=80, deadline=None, phases=PHASES)
SLOW = settings(max_examples=25, deadline=None, phases=PHASES)  # big inputs (thousands of bytes, byte by byte)


# ---- chunking helpers ----

def split_at(data, cuts):
    """`data` cut at the given offsets (sorted; repeats give empty pieces)."""
    cuts = sorted(cuts)
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


def chunkings(data, draw):
    """[(name, pieces)]: whole, byte by byte, and two random splits drawn with
    st.data()'s `draw` (one with few cuts, one with many)."""
    few = draw(st.lists(st.integers(0, len(data)), max_size=4), label="few cuts")
    many = draw(st.lists(st.integers(0, len(data)), max_size=40), label="many cuts")
    return [("whole", [data]),
            ("bytes", [data[i:i + 1] for i in range(len(data))]),
            ("few", split_at(data, few)),
            ("many", split_at(data, many))]


def bytewise(data):
    return [data[i:i + 1] for i in range(len(data))]


# ---- 1. RequestParser (the direct HTTP front) ----

HTTP_STATUSES = {400, 411, 413, 414, 431, 505}
SMALL = dict(max_line=60, max_header_bytes=240, max_headers=6, max_body=64)
DEFAULT = {}  # the parser's own defaults (8 KiB lines, 16 KiB of headers, 128 KiB bodies)


def req_tuple(r):
    return (r.method, r.target, r.path, r.query, r.version, r.headers, r.body)


def http_outcome(chunks, limits):
    """Feed `chunks` to a fresh parser: ("request", ...), ("incomplete", head or
    None) or ("error", status).  Anything but HTTPError propagates."""
    p = streamd.RequestParser(**limits)
    got = None
    for c in chunks:
        try:
            r = p.feed(c)
        except streamd.HTTPError as e:
            assert e.status in HTTP_STATUSES, (e.status, str(e))
            return ("error", e.status)
        if got is not None:
            assert r is got, "feed() after the request was complete returned something else"
        elif r is not None:
            got = r
    if got is not None:
        return ("request",) + req_tuple(got)
    return ("incomplete", req_tuple(p.request) if p.request is not None else None)


def assert_http_same_at_every_chunking(data, draw, limits):
    results = {name: http_outcome(pieces, limits) for name, pieces in chunkings(data, draw)}
    whole = results["whole"]
    for name, r in results.items():
        assert r == whole, "chunking %r gave %r, whole input gave %r" % (name, r[:2], whole[:2])
    return whole


@MEDIUM
@given(st.binary(max_size=300), st.data())
def test_request_parser_arbitrary_bytes(data, d):
    """Any bytes: None, an HTTPRequest or HTTPError with a 4xx/505 status, never
    another exception; the same outcome (and status) at every chunking."""
    for limits in (SMALL, DEFAULT):
        assert_http_same_at_every_chunking(data, d.draw, limits)


@FAST
@given(st.sampled_from([b"\r", b"\x00", b" ", b"\t"]), st.integers(0, 70), st.data())
def test_request_parser_overlong_and_malformed_line(bad, at, d):
    """A request line or header line over its limit that also holds a bare CR
    (or a NUL, SP or HTAB) gets one status at every chunking: not 400 when it
    arrives whole and 414/431 when it arrives in pieces."""
    line = b"G" * at + bad + b"0" * (80 - at)  # longer than SMALL max_line (60)
    assert_http_same_at_every_chunking(line + b"\r\nHost: x\r\n\r\n", d.draw, SMALL)
    header = b"X: " + b"v" * at + bad + b"v" * (300 - at)  # more than SMALL max_header_bytes (240)
    assert_http_same_at_every_chunking(b"GET / HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n", d.draw, SMALL)


TCHAR = "!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits
tokens = st.text(TCHAR, min_size=1, max_size=10)
HUGE_DIGITS = ["0" * 5000 + "1", "9" * 4301, "1" + "0" * 19, "18446744073709551616", "00000000000000000000064"]
CL_VALUES = st.one_of(
    st.integers(0, 100).map(str),
    st.sampled_from(["0", "64", "65", "131072", "131073", " 3 ", "1, 1", "1,1", "2, 3", "1,", ",", "-1", "+1",
                     "0x1", "1.0", "", "1 1", "\xb2", "\xb9\xb2"] + HUGE_DIGITS))
HEADER_NAMES = st.one_of(
    st.sampled_from(["Host", "host", "HOST", "Content-Length", "content-length", "Transfer-Encoding", "Expect",
                     "Connection", "Upgrade", "X-Api-Key", "Authorization"]),
    tokens,
    st.sampled_from(["Bad Name", "", "Host ", " Host", "\tHost", "Na\x00me", "N\xe4me", "X:Y", "X(Y)"]))
HEADER_VALUES = st.one_of(
    st.text(st.characters(max_codepoint=255), max_size=30),
    st.text(string.printable, max_size=30),
    CL_VALUES,
    st.sampled_from(["100-continue", "chunked", "close", "websocket", "example.com", "a\x00b", "a\x7fb",
                     "a\rb", "a\nb", "\t tabbed \t"]))
EOLS = st.sampled_from([b"\r\n"] * 8 + [b"\n"] * 3 + [b"\r", b"\r\r\n", b"\n\r", b""])
TARGETS = st.one_of(
    st.sampled_from(["/", "/v1/stream", "/v1/ws", "/healthz", "http://example.com", "HTTPS://h:1/p?q=1", "*",
                     "example.com", "/a#frag", "/%zz", "/?%zz", "/?a=%4", "/?a=b&c=%E2%82%AC", "/?a=%ff",
                     "/?" + "&".join(["a"] * 70), "/?" + "&".join(["a=%d" % i for i in range(64)])]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=40).map(lambda s: "/" + s),
    st.text(st.characters(max_codepoint=255), max_size=20))
VERSIONS = st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0"] * 2 + [
    b"HTTP/1.9", b"HTTP/2.0", b"HTTP/2", b"HTTP/3", b"HTTP/0.9", b"http/1.1", b"HTTP/11", b"HTTP/1.10",
    b"HTTP/1.1 ", b"HTTP/1", b"HTTP/9.9"])
METHODS = st.one_of(st.sampled_from(["GET", "POST", "HEAD", "PUT", "PATCH", "OPTIONS", "DELETE"]),
                    tokens, st.sampled_from(["", "G T", "GET\x00", "G\xc9T"]))


@st.composite
def header_lines(draw):
    kind = draw(st.sampled_from(["field"] * 8 + ["fold", "long", "dup-cl", "raw"]))
    if kind == "fold":
        return draw(st.sampled_from([b" ", b"\t"])) + draw(HEADER_VALUES).encode("latin-1") + draw(EOLS)
    if kind == "long":
        n = draw(st.sampled_from([50, 200, 239, 240, 241, 8200, 16400, 20000]))
        return b"X-Long: " + b"a" * n + b"\r\n"
    if kind == "dup-cl":
        v = draw(CL_VALUES).encode("latin-1")
        return b"Content-Length: " + v + b"\r\nContent-Length: " + draw(st.sampled_from([v, b"1", b"2"])) + b"\r\n"
    if kind == "raw":
        return draw(st.binary(max_size=20)) + b"\r\n"
    name = draw(HEADER_NAMES).encode("latin-1")
    sep = draw(st.sampled_from([b":", b": ", b":\t", b" : ", b":  "]))
    return name + sep + draw(HEADER_VALUES).encode("latin-1") + draw(EOLS)


@st.composite
def near_valid_requests(draw):
    """A request line, headers and a body; mostly well formed, often hostile."""
    out = b"".join(draw(st.lists(st.sampled_from([b"\r\n", b"\n"]), max_size=10)))  # blank lines first
    method = draw(METHODS).encode("latin-1")
    target = draw(TARGETS).encode("latin-1")
    if draw(st.integers(0, 9)) == 0:
        target = b"/" + b"x" * draw(st.sampled_from([58, 59, 60, 8170, 8200, 9000]))
    out += method + b" " + target + b" " + draw(VERSIONS) + draw(EOLS)
    lines = draw(st.lists(header_lines(), max_size=8))
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), b"Host: example.com\r\n")
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), b"Content-Length: " + draw(CL_VALUES).encode("latin-1") + b"\r\n")
    out += b"".join(lines) + draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"", b"\r"]))
    return out + draw(st.binary(max_size=80))


@settings(max_examples=80, deadline=None, phases=PHASES)
@given(near_valid_requests(), st.data())
def test_request_parser_near_valid(data, d):
    """Near-valid requests (random headers, duplicate/huge Content-Length, bare
    CR, obs-fold, long lines, odd versions): an HTTPRequest whose body has its
    Content-Length, or HTTPError 400/411/413/414/431/505; never another
    exception; the same at every chunking."""
    for limits in (SMALL, DEFAULT):
        r = assert_http_same_at_every_chunking(data, d.draw, limits)
        if r[0] == "request":
            method, target, path, query, version, headers, body = r[1:]
            assert re.fullmatch("[%s]+" % re.escape(TCHAR), method)
            assert path.startswith("/")
            assert version[0] == 1
            assert version < (1, 1) or "host" in headers
            assert all(k == k.lower() for k in headers)
            assert "transfer-encoding" not in headers
            length = headers.get("content-length", "0").split(",")[0].strip().lstrip("0") or "0"
            assert len(length) <= 6 and len(body) == int(length)


HOSTILE_REQUESTS = [
    # (id, bytes, expected: a set of statuses, or "request"/"incomplete")
    ("cl-5001-digits-leading-zeros",
     b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"0" * 5000 + b"1\r\n\r\nx", {400, 413, "request"}),
    ("cl-4301-nines", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 4301 + b"\r\n\r\n", {400, 413}),
    ("cl-5000-nines-get", b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", {400, 413}),
    ("cl-20-digits", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n", {413}),
    ("cl-list-huge", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 4301 + b", " + b"9" * 4301
     + b"\r\n\r\n", {400, 413}),
    ("cl-dup-huge", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 4400 + b"\r\nContent-Length: "
     + b"9" * 4400 + b"\r\n\r\n", {400, 413}),
    ("cl-negative", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", {400}),
    ("cl-plus", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\n", {400}),
    ("cl-hex", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x1\r\n\r\n", {400}),
    ("cl-superscript", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n", {400}),
    ("cl-conflict", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx", {400}),
    ("cl-list-conflict", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\nxx", {400}),
    ("cl-same-twice", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", {"request"}),
    ("cl-empty", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length:\r\n\r\n", {400}),
    ("te-chunked", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", {411}),
    ("te-and-cl", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\nx", {411}),
    ("post-no-length", b"POST / HTTP/1.1\r\nHost: x\r\n\r\n", {411}),
    ("dup-host", b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", {400}),
    ("no-host-11", b"GET / HTTP/1.1\r\n\r\n", {400}),
    ("no-host-10", b"GET / HTTP/1.0\r\n\r\n", {"request"}),
    ("bare-cr-line", b"GET / HTTP/1.1\rHost: x\r\n\r\n", {400}),
    ("bare-cr-header", b"GET / HTTP/1.1\r\nHost: x\rX: y\r\n\r\n", {400}),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", {400}),
    ("obs-fold-tab", b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n\tb\r\n\r\n", {400}),
    ("space-before-colon", b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", {400}),
    ("nul-in-value", b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", {400}),
    ("no-colon", b"GET / HTTP/1.1\r\nHost: x\r\nJunk\r\n\r\n", {400}),
    ("long-request-line", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", {414}),
    ("long-request-line-no-eol", b"GET /" + b"a" * 9000, {414}),
    ("long-header", b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 17000 + b"\r\n\r\n", {431}),
    ("long-header-no-eol", b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 17000, {431}),
    ("many-headers", b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 70 + b"\r\n", {431}),
    ("http2", b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", {505}),
    ("http3", b"GET / HTTP/3\r\nHost: x\r\n\r\n", {505}),
    ("http09", b"GET /\r\n\r\n", {400}),
    ("lower-http", b"GET / http/1.1\r\nHost: x\r\n\r\n", {400}),
    ("9-blank-lines", b"\r\n" * 9 + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", {400}),
    ("8-blank-lines", b"\r\n" * 8 + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", {"request"}),
    ("bare-lf", b"GET / HTTP/1.1\nHost: x\n\n", {"request"}),
    ("query-bad-percent", b"GET /v1/stream?prompt=%zz HTTP/1.1\r\nHost: x\r\n\r\n", {400}),
    ("query-short-percent", b"GET /v1/stream?prompt=%4 HTTP/1.1\r\nHost: x\r\n\r\n", {400}),
    ("query-bad-utf8", b"GET /v1/stream?prompt=%ff HTTP/1.1\r\nHost: x\r\n\r\n", {400}),
    ("target-not-path", b"GET example.com HTTP/1.1\r\nHost: x\r\n\r\n", {400}),
    ("absolute-form", b"GET http://example.com/v1/stream?prompt=hi HTTP/1.1\r\nHost: x\r\n\r\n", {"request"}),
    ("non-ascii-target", b"GET /\xe9 HTTP/1.1\r\nHost: x\r\n\r\n", {400}),
    ("body-waits", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc", {"incomplete"}),
    ("body-over-limit", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 131073\r\n\r\n", {413}),
]


@settings(max_examples=4, deadline=None, phases=PHASES)
@pytest.mark.parametrize("data, expected", [h[1:] for h in HOSTILE_REQUESTS], ids=[h[0] for h in HOSTILE_REQUESTS])
@given(d=st.data())
def test_request_parser_hostile(data, expected, d):
    """Hand-picked hostile requests get the documented status (never ValueError
    from int() of a huge Content-Length), at every chunking."""
    r = assert_http_same_at_every_chunking(data, d.draw, DEFAULT)
    got = r[1] if r[0] == "error" else r[0]
    assert got in expected, r[:2]
    if r[0] == "request":
        assert r[7] == data[len(data) - len(r[7]):]  # the body is the bytes after the head


@MEDIUM
@given(st.lists(st.sampled_from([-2, -1, 0, 1]), min_size=1, max_size=4), st.sampled_from([b"\r\n", b"\n"]),
       st.data())
def test_request_line_at_the_limit(offsets, eol, d):
    """A request line of max_line-2 .. max_line+1 bytes: accepted up to
    max_line, 414 above, and the same whichever way its CRLF is split."""
    limits = dict(SMALL)
    for off in offsets:
        n = limits["max_line"] + off
        line = b"GET /" + b"a" * (n - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
        assert len(line) == n
        r = assert_http_same_at_every_chunking(line + eol + b"Host: x" + eol + eol, d.draw, limits)
        assert r[0] == ("request" if off <= 0 else "error"), (n, r[:2])


@MEDIUM
@given(st.binary(max_size=64), st.sampled_from(["100-continue", "100-Continue", "100-CONTINUE"]),
       st.sampled_from(["POST", "PUT"]), st.data())
def test_request_parser_expect_and_split_body(body, expect, method, d):
    """Expect: 100-continue with a body split across feeds: after the head the
    parser exposes it (with the Expect header) while feed() returns None; the
    request completes with exactly the body, as for the whole input."""
    head = ("%s /v1/stream HTTP/1.1\r\nHost: x\r\nExpect: %s\r\nContent-Length: %d\r\n\r\n"
            % (method, expect, len(body))).encode("ascii")
    whole = http_outcome([head + body], DEFAULT)
    assert whole[0] == "request" and whole[7] == body and whole[6]["expect"] == expect
    p = streamd.RequestParser()
    r = p.feed(head)
    assert (r is None) == bool(body)
    fed = 0
    for piece in split_at(body, d.draw(st.lists(st.integers(0, len(body)), max_size=8))):
        if r is None:  # the head is in, the body is not: what the front answers 100 Continue from
            assert p.request is not None and p.request.header("expect") == expect and p.request.body == b""
        r = p.feed(piece)
        fed += len(piece)
        assert (r is None) == (fed < len(body))
    assert r is not None and ("request",) + req_tuple(r) == whole
    for name, pieces in chunkings(head + body + b"GET / HTTP/1.1\r\n\r\n", d.draw):  # a pipelined request: ignored
        assert http_outcome(pieces, DEFAULT) == whole, name


# ---- 2. split_target ----

@MEDIUM
@given(st.text(max_size=80))
@example("/?a=%zz")
@example("/?" + "%5B" * 2500)
def test_split_target_any_text(target):
    """Any str: (path, {name: value}) with a path that starts with "/", or
    HTTPError(400); never another exception."""
    try:
        path, query = streamd.split_target(target)
    except streamd.HTTPError as e:
        assert e.status == 400
        return
    assert path.startswith("/") and "?" not in path and "#" not in path
    assert isinstance(query, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in query.items())


@MEDIUM
@given(st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=20),
       st.sampled_from(["/v1/stream", "http://h:8080/v1/stream", "/"]), st.sampled_from(["", "#frag", "#a?b=c"]))
def test_split_target_round_trip(query, path, fragment):
    """A urlencoded query of up to 64 fields decodes to exactly the dict encoded."""
    target = path + "?" + urllib.parse.urlencode(query) + fragment
    got_path, got_query = streamd.split_target(target)
    assert got_path == (path if path.startswith("/") else "/v1/stream")
    assert got_query == query


BAD_PERCENT = st.one_of(
    st.sampled_from(["%", "%4", "%zz", "%g0", "%0g", "%%", "%-1", "% 1", "%4\xe9", "%\u20ac1", "%+1", "%0"]),
    st.tuples(st.sampled_from(list(string.hexdigits) + [""]), st.characters().filter(lambda c: c not in string.hexdigits))
    .map(lambda t: "%" + t[0] + t[1]))


@MEDIUM
@given(st.dictionaries(st.text(string.ascii_letters, max_size=5), st.text(max_size=8), max_size=4),
       st.text(string.ascii_letters + string.digits, max_size=6), BAD_PERCENT, st.booleans(), st.text(max_size=5))
@example({}, "a", "%zz", False, "")
@example({}, "a", "%4", False, "")
def test_split_target_invalid_percent_is_400(before, prefix, bad, in_key, after):
    """A query with a "%" not followed by two hex digits (%zz, %4, a trailing %)
    is HTTPError(400), not passed on as literal text."""
    field = (prefix + bad + "=v") if in_key else ("k=" + prefix + bad)
    field += "&z=" + urllib.parse.quote(after)  # (a separator: "%4" + "0..." would be valid)
    qs = "&".join([urllib.parse.urlencode(before), field] if before else [field])
    with pytest.raises(streamd.HTTPError) as ei:
        streamd.split_target("/v1/stream?" + qs)
    assert ei.value.status == 400


@FAST
@given(st.integers(65, 200))
def test_split_target_too_many_fields_is_400(n):
    """More than 64 query fields: HTTPError(400)."""
    with pytest.raises(streamd.HTTPError) as ei:
        streamd.split_target("/?" + "&".join("f%d=1" % i for i in range(n)))
    assert ei.value.status == 400


# ---- 3. WSParser (RFC 6455) ----

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
masks = st.binary(min_size=4, max_size=4)


def ws_encode(opcode, payload, fin=True, mask=b"\x00\x00\x00\x00", masked=True, rsv=0, length=None):
    """One client frame.  `length` overrides the length field (header only)."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    m = 0x80 if masked else 0
    if n < 126:
        head = bytes((b0, m | n))
    elif n < 65536:
        head = bytes((b0, m | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, m | 127)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def ws_run(chunks, max_message):
    """(messages, close code of the WSError or None).  Stops feeding after a
    close frame: the parser's contract is that nothing after one counts
    (test_ws_bytes_after_close_ignored_at_every_chunking feeds on)."""
    p = streamd.WSParser(max_message)
    out = []
    for c in chunks:
        try:
            msgs = p.feed(c)
        except streamd.WSError as e:
            return out, e.code
        out += msgs
        if any(op == CLOSE for op, _ in msgs):
            break
    return out, None


VALID_CLOSE_CODES = st.one_of(st.sampled_from([1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013,
                                               1014]), st.integers(3000, 4999))
INVALID_CLOSE_CODES = st.one_of(st.integers(0, 999), st.sampled_from([1004, 1005, 1006, 1015]),
                                st.integers(1016, 2999), st.integers(5000, 65535))


def short_text(max_bytes):
    return st.text(max_size=max_bytes).map(lambda s: s.encode("utf-8")).filter(lambda b: len(b) <= max_bytes)


@st.composite
def ws_conversations(draw, close=True):
    """(frames, expected messages): text and binary messages, fragmented at
    random byte offsets (through UTF-8 characters too), pings and pongs between
    fragments, random masks, payloads in the 7-bit and 16-bit length classes;
    perhaps a valid close frame at the end."""
    frames, expected = [], []
    for _ in range(draw(st.integers(0, 4))):
        opcode = draw(st.sampled_from([TEXT, BINARY]))
        if opcode == TEXT:
            payload = draw(st.text(max_size=100)).encode("utf-8")
        else:
            payload = draw(st.binary(max_size=300))
        pieces = split_at(payload, draw(st.lists(st.integers(0, len(payload)), max_size=3)))
        for i, piece in enumerate(pieces):
            if draw(st.integers(0, 3)) == 0:
                op, body = draw(st.sampled_from([PING, PONG])), draw(st.binary(max_size=125))
                frames.append(ws_encode(op, body, mask=draw(masks)))
                expected.append((op, body))
            frames.append(ws_encode(opcode if i == 0 else CONT, piece, fin=i == len(pieces) - 1, mask=draw(masks)))
        expected.append((opcode, payload))
    if close and draw(st.booleans()):
        body = b""
        if draw(st.booleans()):
            body = draw(VALID_CLOSE_CODES).to_bytes(2, "big") + draw(short_text(123))
        frames.append(ws_encode(CLOSE, body, mask=draw(masks)))
        expected.append((CLOSE, body))
    return frames, expected


@MEDIUM
@given(ws_conversations(), st.data())
def test_ws_valid_conversation_round_trips(conv, d):
    """Valid frames (masked, fragmented, control frames between fragments, a
    close at the end) decode to exactly the messages sent, at every chunking."""
    frames, expected = conv
    data = b"".join(frames)
    for name, pieces in chunkings(data, d.draw):
        assert ws_run(pieces, 1 << 20) == (expected, None), name


@settings(max_examples=12, deadline=None, phases=PHASES)
@given(st.sampled_from([0, 1, 125, 126, 127, 65535, 65536, 70000]), st.sampled_from([TEXT, BINARY]), masks,
       st.data())
def test_ws_every_length_class(n, opcode, mask, d):
    """7-bit, 16-bit and 64-bit payload lengths at their boundaries, at every chunking."""
    payload = (b"a" * n) if opcode == TEXT else bytes(i % 251 for i in range(n))
    data = ws_encode(opcode, payload, mask=mask)
    for name, pieces in chunkings(data, d.draw):
        assert ws_run(pieces, 1 << 17) == ([(opcode, payload)], None), name


WS_MAX = 512  # max_message in the fault tests; valid messages stay under 400 bytes


@st.composite
def ws_faults(draw):
    """(bytes of one protocol violation, the close code RFC 6455 / streamd wants)."""
    mask = draw(masks)
    data_op = draw(st.sampled_from([TEXT, BINARY]))
    kind = draw(st.sampled_from(["rsv", "opcode", "unmasked", "control-long", "control-fragmented", "orphan-cont",
                                 "interleaved", "top-bit", "frame-too-big", "message-too-big", "bad-utf8",
                                 "close-1-byte", "close-bad-code", "close-bad-reason"]))
    if kind == "rsv":
        return ws_encode(draw(st.sampled_from([TEXT, BINARY, CONT, PING, CLOSE])), b"x", mask=mask,
                         rsv=draw(st.integers(1, 7))), 1002
    if kind == "opcode":
        return ws_encode(draw(st.sampled_from([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])), b"x", mask=mask), 1002
    if kind == "unmasked":
        return ws_encode(draw(st.sampled_from([TEXT, BINARY, PING, CLOSE])), b"ab", masked=False), 1002
    if kind == "control-long":
        return ws_encode(draw(st.sampled_from([PING, PONG, CLOSE])), b"p" * draw(st.integers(126, 300)),
                         mask=mask), 1002
    if kind == "control-fragmented":
        return ws_encode(draw(st.sampled_from([PING, PONG, CLOSE])), b"", fin=False, mask=mask), 1002
    if kind == "orphan-cont":
        return ws_encode(CONT, draw(st.binary(max_size=20)), fin=draw(st.booleans()), mask=mask), 1002
    if kind == "interleaved":
        return (ws_encode(data_op, b"first", fin=False, mask=mask)
                + ws_encode(draw(st.sampled_from([TEXT, BINARY])), b"second", mask=mask)), 1002
    if kind == "top-bit":
        n = (1 << 63) | draw(st.integers(0, (1 << 63) - 1))
        return bytes((0x80 | data_op, 0x80 | 127)) + n.to_bytes(8, "big") + mask, 1002
    if kind == "frame-too-big":
        n = draw(st.integers(WS_MAX + 1, (1 << 63) - 1))
        return ws_encode(data_op, b"", mask=mask, length=n), 1009
    if kind == "message-too-big":
        sizes = draw(st.lists(st.integers(1, WS_MAX), min_size=2, max_size=4).filter(lambda s: sum(s) > WS_MAX))
        out = b"".join(ws_encode(data_op if i == 0 else CONT, b"a" * s, fin=i == len(sizes) - 1, mask=mask)
                       for i, s in enumerate(sizes))
        return out, 1009
    if kind == "bad-utf8":
        text = draw(st.text(max_size=20))
        at = draw(st.integers(0, len(text)))
        bad = draw(st.sampled_from([b"\xff", b"\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80",
                                    b"\xe2\x82A", b"\x80", b"\xf4\x90\x80\x80"]))
        payload = text[:at].encode() + bad + text[at:].encode()
        if draw(st.booleans()):
            payload += b"\xe2\x82"  # a character cut at the end of the message
        pieces = split_at(payload, draw(st.lists(st.integers(0, len(payload)), max_size=3)))
        return b"".join(ws_encode(TEXT if i == 0 else CONT, p, fin=i == len(pieces) - 1, mask=mask)
                        for i, p in enumerate(pieces)), 1007
    if kind == "close-1-byte":
        return ws_encode(CLOSE, draw(st.binary(min_size=1, max_size=1)), mask=mask), 1002
    if kind == "close-bad-code":
        return ws_encode(CLOSE, draw(INVALID_CLOSE_CODES).to_bytes(2, "big") + draw(short_text(100)), mask=mask), 1002
    reason = draw(st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"ok\xe2\x82"]))
    return ws_encode(CLOSE, draw(VALID_CLOSE_CODES).to_bytes(2, "big") + reason, mask=mask), 1007


def is_prefix(a, b):
    return a == b[:len(a)]


@MEDIUM
@given(ws_conversations(close=False), ws_faults(), st.binary(max_size=20), st.data())
def test_ws_fault_gets_its_close_code(conv, fault, trailing, d):
    """Valid messages, then one violation, then anything: WSError with the
    violation's close code (1002 protocol, 1007 bad UTF-8, 1009 too big) at
    every chunking, and only messages from before the violation (a prefix of
    them: those in earlier reads) come out."""
    frames, expected = conv
    bad, code = fault
    data = b"".join(frames) + bad + trailing
    for name, pieces in chunkings(data, d.draw):
        got, err = ws_run(pieces, WS_MAX)
        assert err == code, (name, got, err)
        assert is_prefix(got, expected), name


@st.composite
def random_frames(draw):
    """Frames with every header field random: fin, rsv, any of 16 opcodes,
    masked or not, payload mostly small (7-bit and 16-bit length forms)."""
    return ws_encode(draw(st.integers(0, 15)) if draw(st.integers(0, 4)) == 0 else
                     draw(st.sampled_from([CONT, TEXT, BINARY, CLOSE, PING, PONG])),
                     draw(st.binary(max_size=130) | short_text(130)),
                     fin=draw(st.integers(0, 4)) != 0, mask=draw(masks), masked=draw(st.integers(0, 9)) != 0,
                     rsv=draw(st.integers(0, 7)) if draw(st.integers(0, 9)) == 0 else 0)


@MEDIUM
@given(st.one_of(st.lists(random_frames(), max_size=6).map(b"".join), st.binary(max_size=200)), st.data())
def test_ws_random_frames(data, d):
    """Random frames or bytes: messages or WSError 1002/1007/1009, never another
    exception; the same close code at every chunking, and the messages of any
    chunking are a prefix of those read byte by byte (all equal without error)."""
    ref, ref_err = ws_run(bytewise(data), WS_MAX)
    assert ref_err in (None, 1002, 1007, 1009)
    for name, pieces in chunkings(data, d.draw):
        got, err = ws_run(pieces, WS_MAX)
        assert err == ref_err, name
        assert got == ref if err is None else is_prefix(got, ref), name
    for op, payload in ref:
        assert op in (TEXT, BINARY, CLOSE, PING, PONG)
        if op == TEXT:
            payload.decode("utf-8")


@FAST
@given(VALID_CLOSE_CODES, st.one_of(st.lists(random_frames(), min_size=1, max_size=3).map(b"".join),
                                    st.binary(min_size=1, max_size=30)), st.data())
def test_ws_bytes_after_close_ignored_at_every_chunking(code, after, d):
    """Nothing after a close frame counts: feeding every read to the parser
    (as the front does while it drains), the bytes after the close give no
    message and no error, whether they arrive with the close frame or later."""
    close = ws_encode(CLOSE, code.to_bytes(2, "big"), mask=b"abcd")
    data = close + after
    for name, pieces in chunkings(data, d.draw):
        p = streamd.WSParser(WS_MAX)
        got, err = [], None
        try:
            for piece in pieces:
                got += p.feed(piece)
        except streamd.WSError as e:
            err = e.code
        assert (got, err) == ([(CLOSE, code.to_bytes(2, "big"))], None), name


# ---- 4. parse_handoff ----

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=20)
SURROGATE = st.sampled_from(["\ud800", "\udfff", "a\udc00b", "\ud83d"])
FIELD_VALUES = {
    "prompt": st.text(max_size=20) | json_values | SURROGATE,
    "system": st.text(max_size=20) | json_values,
    "model": st.text(max_size=20) | SURROGATE | st.just("m" * 2000) | json_values,
    "backend": st.sampled_from(["mock", "openai", "nosuch", ""]) | SURROGATE | json_values,
    "request_id": st.text(max_size=20) | SURROGATE | json_values,
    "test_pattern": st.text(max_size=20) | SURROGATE,
    "thread_id": st.text(max_size=10) | SURROGATE,
    "assistant_id": st.text(max_size=10) | SURROGATE,
    "max_tokens": st.integers() | st.floats() | st.sampled_from([10 ** 39, 10 ** 40, 10 ** 41, 0, -1, True]),
    "temperature": st.floats() | st.integers() | st.text(max_size=3),
    "top_p": st.floats() | st.integers(),
    "user_id": st.integers() | st.text(max_size=5) | json_values,
    "include_usage": st.booleans() | json_values,
    "langgraph_input": st.dictionaries(st.text(max_size=5), json_values, max_size=3) | json_values,
    "stream_mode": st.text(max_size=8) | st.lists(st.text(max_size=5), max_size=3) | json_values,
    "response_headers": st.dictionaries(st.text(max_size=12) | SURROGATE | st.sampled_from(
        ["X-Ok", "Content-Type", "Proxy-X", "Set-Cookie", "Bad Name"]),
        st.text(max_size=12) | SURROGATE | json_values | st.just("a\r\nInjected: 1"), max_size=4) | json_values,
    "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", ""]) | json_values,
         "content": st.text(max_size=10) | st.lists(st.fixed_dictionaries(
             {"type": st.sampled_from(["text", "image"]), "text": st.text(max_size=5) | json_values}), max_size=3)
         | json_values}), max_size=4) | json_values,
}
handoff_objects = st.tuples(st.dictionaries(st.text(max_size=6), json_values, max_size=2),
                            st.fixed_dictionaries({}, optional=FIELD_VALUES)).map(lambda t: {**t[0], **t[1]})


def dumps_any(obj, ensure_ascii):
    """JSON text as a client might write it, NaN and Infinity included; lone
    surrogates \\u-escaped (ensure_ascii) or raw (then surrogatepass bytes)."""
    return json.dumps(obj, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


def handoff_outcome(data):
    try:
        req = streamd.parse_handoff(data)
    except streamd.ProtocolError as e:
        assert e.status in (400, 413), e.status
        assert isinstance(str(e), str)
        return e
    assert isinstance(req, streamd.Request)
    assert req.max_tokens is None or (type(req.max_tokens) is int and req.max_tokens >= 1)
    for name in ("prompt", "system", "model", "backend", "request_id", "test_pattern"):
        assert getattr(req, name) is None or isinstance(getattr(req, name), str)
    for v in (req.temperature, req.top_p):
        assert v is None or (isinstance(v, (int, float)) and math.isfinite(v))
    assert req.messages is None or isinstance(req.messages, list)
    for name, value in req.response_headers:
        assert "\r" not in value and "\n" not in value
    return req


@MEDIUM
@given(st.binary(max_size=200))
@example(b"[" * 5000)
@example(b'{"messages":' + b"[" * 3000)
@example(b"\xff\xfe{\x00}\x00")
def test_handoff_arbitrary_bytes(data):
    """Any bytes: a Request or ProtocolError(400/413); never RecursionError,
    UnicodeDecodeError, ValueError or anything else."""
    handoff_outcome(data)


@FAST
@given(json_values | handoff_objects, st.booleans())
def test_handoff_random_json(obj, ensure_ascii):
    """Random JSON values and handoff objects with random field types: a
    Request with well-typed fields, or ProtocolError(400/413)."""
    handoff_outcome(dumps_any(obj, ensure_ascii))


MARK = "PROMPT-TEXT-7f3a"


@FAST
@given(handoff_objects, st.sampled_from(["prompt", "system", "messages"]), st.booleans())
def test_handoff_error_never_quotes_the_prompt(obj, where, ensure_ascii):
    """A ProtocolError names a field and a type, never the client's text: a
    marker in the prompt, system prompt or a message is not in the message."""
    obj = dict(obj)
    if where == "messages":
        obj["messages"] = [{"role": "user", "content": MARK}] + (obj["messages"] if isinstance(
            obj.get("messages"), list) else [])
    else:
        obj[where] = MARK
    r = handoff_outcome(dumps_any(obj, ensure_ascii))
    if isinstance(r, streamd.ProtocolError):
        assert MARK not in str(r)


def nested(n, opener=b"[", closer=b"]", inner=b"1"):
    return opener * n + inner + closer * n


HOSTILE_HANDOFFS = [
    ("deep-array-5000", b"[" * 5000),
    ("deep-array-closed", nested(5000)),
    ("deep-array-100000", b"[" * 100000),
    ("deep-object", b'{"a":' * 3000 + b"1" + b"}" * 3000),
    ("deep-messages", b'{"messages":' + b"[" * 3000),
    ("deep-messages-closed", b'{"messages":' + nested(3000) + b"}"),
    ("deep-content", b'{"messages":[{"role":"user","content":' + nested(2000) + b"}]}"),
    ("deep-langgraph-input", b'{"langgraph_input":' + b'{"a":' * 2000 + b"1" + b"}" * 2001),
    ("deep-mixed", b"[{" * 1500 + b"}]" * 1500),
    ("deep-response-headers", b'{"response_headers":{"x":' + nested(3000) + b"}}"),
    ("deep-after-string", b'["[[[[", ' + b"[" * 3000),
    ("brackets-in-strings", b'{"prompt":"' + b"[" * 5000 + b'"}'),
    ("max-tokens-5000-digits", b'{"max_tokens":' + b"9" * 5000 + b"}"),
    ("max-tokens-4301-digits", b'{"max_tokens":' + b"1" * 4301 + b"}"),
    ("max-tokens-negative-huge", b'{"max_tokens":-' + b"9" * 5000 + b"}"),
    ("huge-int-elsewhere", b'{"x":' + b"9" * 5000 + b"}"),
    ("huge-int-in-list", b"[" + b"9" * 5000 + b"]"),
    ("temperature-nan", b'{"temperature":NaN}'),
    ("temperature-infinity", b'{"temperature":Infinity}'),
    ("temperature-minus-infinity", b'{"top_p":-Infinity}'),
    ("float-1e400", b'{"temperature":1e400}'),
    ("float-minus-1e400", b'{"temperature":-1e400}'),
    ("float-1e-400", b'{"temperature":1e-400}'),
    ("float-long", b'{"temperature":0.' + b"1" * 5000 + b"}"),
    ("float-exp-huge", b'{"temperature":1e' + b"9" * 5000 + b"}"),
    ("nan-in-ignored-key", b'{"zzz":[NaN]}'),
    ("lone-surrogate-prompt", b'{"prompt":"\\ud800"}'),
    ("lone-surrogate-model", b'{"model":"\\udfff"}'),
    ("lone-surrogate-key", b'{"\\ud800":1}'),
    ("lone-surrogate-header-name", b'{"response_headers":{"\\ud800":"x"}}'),
    ("lone-surrogate-header-value", b'{"response_headers":{"X-A":"\\ud800"}}'),
    ("lone-surrogate-message", b'{"messages":[{"role":"\\ud800","content":"\\udc00"}]}'),
    ("invalid-utf8-string", b'{"prompt":"\xff"}'),
    ("invalid-utf8-key", b'{"\xc3\x28":1}'),
    ("utf8-encoded-surrogate", b'{"prompt":"\xed\xa0\x80"}'),
    ("overlong-utf8", b'{"prompt":"\xc0\xaf"}'),
    ("truncated-utf8", b'{"prompt":"\xe2\x82"}'),
    ("utf16-bom", b"\xfe\xff\x00{\x00}"),
    ("utf16le", '{"prompt":"hi"}'.encode("utf-16-le")),
    ("utf32", '{"prompt":"hi"}'.encode("utf-32")),
    ("nul-placeholder", b"\x00"),
    ("whitespace", b" \t\r\n"),
    ("nul-inside", b'{"prompt":"a\x00b"}'),
    ("two-values", b"{} {}"),
    ("top-level-array", b"[]"),
    ("top-level-string", b'"x"'),
    ("many-messages", b'{"messages":[' + b",".join([b'{"role":"user","content":"x"}'] * 5000) + b"]}"),
    ("long-model", b'{"model":"' + b"m" * 100000 + b'"}'),
]


@pytest.mark.parametrize("data", [h[1] for h in HOSTILE_HANDOFFS], ids=[h[0] for h in HOSTILE_HANDOFFS])
def test_handoff_hostile(data):
    """Deep nesting, 5000-digit numbers, NaN/Infinity/1e400, lone surrogates,
    invalid UTF-8: a Request or ProtocolError(400/413), nothing else."""
    handoff_outcome(data)


def valid_utf8(data):
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


INVALID_UTF8 = st.sampled_from([b"\xff", b"\xfe", b"\x80", b"\xc0\xaf", b"\xc3\x28", b"\xed\xa0\x80", b"\xed\xbf\xbf",
                                b"\xe2\x82", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80"])


@FAST
@given(handoff_objects, INVALID_UTF8, st.one_of(st.none(), st.integers(0, 10 ** 6)), st.booleans(),
       st.text(max_size=5))
def test_handoff_invalid_utf8_is_400(obj, bad, where, ensure_ascii, around):
    """Handoff data that is not valid UTF-8 is 400 (README: "invalid UTF-8 ...
    are 400"), wherever the bad bytes are: inside the prompt string (where
    json would otherwise carry them upstream), or after any other quote."""
    if where is None:
        text = dumps_any(dict(obj, prompt=around + "@@BAD@@" + around), ensure_ascii)
        at = text.index(b"@@BAD@@")
        text = text[:at] + text[at + 7:]
    else:
        text = dumps_any(obj, ensure_ascii)
        quotes = [m.start() + 1 for m in re.finditer(b'"', text)] or [0]
        at = quotes[where % len(quotes)]  # just after a quote: inside a string (or at a key)
    data = text[:at] + bad + text[at:]
    assert not valid_utf8(data)
    with pytest.raises(streamd.ProtocolError) as ei:
        streamd.parse_handoff(data)
    assert ei.value.status == 400


@settings(max_examples=15, deadline=None, phases=PHASES)
@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-16-le", "utf-32", "utf-32-be", "bom+utf-16-be"])
@given(obj=handoff_objects | json_values)
def test_handoff_non_utf8_encodings_are_400(obj, encoding):
    """JSON in UTF-16/UTF-32 (with or without a BOM) is not UTF-8 (RFC 8259
    §8.1, README "invalid UTF-8 ... are 400"): 400, never a Request."""
    text = json.dumps(obj)
    data = b"\xfe\xff" + text.encode("utf-16-be") if encoding == "bom+utf-16-be" else text.encode(encoding)
    r = handoff_outcome(data)
    assert isinstance(r, streamd.ProtocolError), "JSON in %s was accepted" % encoding


# ---- 5. the direct front's query -> Request ----

QUERY_NAMES = ["prompt", "backend", "model", "system", "request_id", "test_pattern", "thread_id", "assistant_id",
               "stream_mode", "max_tokens", "temperature", "top_p", "include_usage", "messages", "api_key", "x"]
NUMBERISH = st.one_of(
    st.integers().map(str), st.floats().map(repr),
    st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1e400", "1_000", " 5 ", "+5", "-1", "0",
                     "\u0661\u0662", "0x10", "", "9" * 5000, "9" * 4300, "1e" + "9" * 5000, "0." + "1" * 5000]))
MESSAGES_JSON = st.one_of(
    json_values.map(json.dumps),
    FIELD_VALUES["messages"].map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass").decode("utf-8", "replace")),
    st.sampled_from(["[" * 2500, "[" * 5000, nested(3000).decode(), "[{" * 1500, '[{"role":"user","content":'
                     + "[" * 2000, "[NaN]", "[1e400]", "[" + "9" * 5000 + "]", "{", "", '"x"']))
query_dicts = st.dictionaries(
    st.sampled_from(QUERY_NAMES),
    st.text(max_size=20) | NUMBERISH | MESSAGES_JSON | SURROGATE, max_size=6)


def front_outcome(req):
    try:
        r = streamd.HTTPFront.stream_request(None, req)
    except streamd.ProtocolError as e:
        assert e.status == 400, e.status
        return e
    if r is None:
        assert req.path == "/v1/ws" and "prompt" not in req.query and "messages" not in req.query
    else:
        assert isinstance(r, streamd.Request)
        assert r.max_tokens is None or (type(r.max_tokens) is int and r.max_tokens >= 1)
        assert r.messages is None or isinstance(r.messages, list)
    return r


@MEDIUM
@given(query_dicts, st.sampled_from(["/v1/stream", "/v1/ws"]))
@example({"messages": "[" * 2500}, "/v1/stream")
@example({"messages": "[" * 2500}, "/v1/ws")
@example({"max_tokens": "9" * 5000}, "/v1/stream")
def test_front_query_to_request(query, path):
    """Any decoded query: a Request, None (a WebSocket with no prompt yet) or
    ProtocolError(400); deep `messages=` nesting is 400, not RecursionError."""
    req = streamd.HTTPRequest("GET", path, path, query, (1, 1), {"host": "x"})
    front_outcome(req)


@SLOW
@given(st.lists(st.tuples(st.sampled_from(QUERY_NAMES), st.text(max_size=15) | NUMBERISH | MESSAGES_JSON),
                max_size=5),
       st.sampled_from(["", "%5B" * 2500, "%5B%7B" * 1200, "%zz", "%4"]), st.sampled_from(["/v1/stream", "/v1/ws"]))
@example([], "%5B" * 2500, "/v1/stream")
def test_front_query_through_the_parser(fields, raw_messages, path):
    """The same through RequestParser: a percent-encoded query in a request
    line (up to 8 KiB) gives HTTPError, or a Request, None or ProtocolError(400)."""
    qs = "&".join("%s=%s" % (k, urllib.parse.quote(v.encode("utf-8", "surrogatepass"), safe="")) for k, v in fields)
    if raw_messages:
        qs += "&messages=" + raw_messages
    data = ("GET %s?%s HTTP/1.1\r\nHost: x\r\n\r\n" % (path, qs)).encode("ascii")
    try:
        req = streamd.RequestParser().feed(data)
    except streamd.HTTPError as e:
        assert e.status in (400, 414)
        return
    assert req is not None
    front_outcome(req)


# ---- 6. the upstream side: backends/_http.py ----

def head_outcome(block):
    try:
        status, headers = _http.parse_head(block)
    except _http.UpstreamProtocolError:  # (a subclass of ValueError: a bare ValueError is a bug)
        return None
    first = block.decode("latin-1").split("\n")[0].rstrip("\r")
    assert re.fullmatch(r"HTTP/1\.[0-9] [0-9]{3}( .*)?", first, re.S), first
    assert status == int(first[9:12])
    assert all(isinstance(k, str) and k == k.lower() and isinstance(v, str) for k, v in headers.items())
    return status, headers


@MEDIUM
@given(st.binary(max_size=200) | st.binary(max_size=60).map(lambda b: b"HTTP/1.1 " + b))
@example(b"HTTP/1.1 \xb200 OK")
@example(b"HTTP/1.1 \xd9\xa1\xd9\xa2\xd9\xa3 OK")
def test_parse_head_arbitrary_bytes(block):
    """Any bytes: (status, headers) with a status line of exactly three ASCII
    digits, or UpstreamProtocolError; never a bare ValueError or another."""
    head_outcome(block)


BAD_STATUS = st.one_of(
    st.sampled_from(["4", "40000", "99", "2000", "20", "\xb200", "\xb9\xb2\xb3", "\u0661\u0662\u0663", "2 00", "-20",
                     "+20", "20\t0", "0x1", "", " 200", "200\x00", "1e2", "\uff12\uff10\uff10", "\u00bd00", "2\u200b00"]),
    st.text(max_size=6).filter(lambda s: " " not in s and "\n" not in s and "\r" not in s
                               and not re.fullmatch("[0-9]{3}", s)))


@MEDIUM
@given(BAD_STATUS, st.sampled_from(["", " OK", " Not Found"]), st.sampled_from(["", "\r\nServer: x"]))
@example("4", " OK", "")
@example("40000", " OK", "")
@example("99", "", "")
@example("\xb200", " OK", "")
def test_parse_head_status_must_be_three_ascii_digits(code, reason, rest):
    """A status that is not exactly three ASCII digits ("4", "40000", "99",
    "\xb200", Arabic-Indic digits) is UpstreamProtocolError."""
    line = "HTTP/1.1 " + code + reason + rest
    try:
        block = line.encode("latin-1")  # what parse_head decodes with: "\xb200" arrives as "²00"
    except UnicodeEncodeError:
        block = line.encode("utf-8")
    with pytest.raises(_http.UpstreamProtocolError):
        _http.parse_head(block)


header_name_st = st.text(TCHAR, min_size=1, max_size=12)
header_value_st = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=20)


@MEDIUM
@given(st.integers(100, 999), st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=20),
       st.lists(st.tuples(header_name_st, header_value_st), max_size=8), st.sampled_from(["\r\n", "\n"]))
def test_parse_head_round_trip(status, reason, headers, eol):
    """A well-formed head gives its status and its headers, names lower-cased,
    repeats joined with ", "."""
    lines = ["HTTP/1.1 %d %s" % (status, reason)] + ["%s: %s" % h for h in headers]
    got_status, got = _http.parse_head(eol.join(lines).encode("latin-1"))
    want = {}
    for name, value in headers:
        name = name.lower()
        want[name] = want[name] + ", " + value if name in want else value
    assert (got_status, got) == (status, want)


@MEDIUM
@given(header_name_st, st.text(st.characters(min_codepoint=0x21, max_codepoint=0xff), max_size=10),
       st.sampled_from(["", " ", "\t", " \t "]), st.sampled_from(["", "\xa0", "\x85", "\x1c", "\x0b", "\x0c"]))
def test_parse_head_strips_only_sp_and_htab(name, value, ows, edge):
    """A header value loses only its OWS (SP and HTAB, RFC 9110 5.5); other
    bytes at its edges (0xA0, 0x85, 0x0B, 0x0C, 0x1C, which Python's
    str.strip() calls whitespace) are part of the value."""
    value = edge + value + edge
    block = ("HTTP/1.1 200 OK\r\n%s:%s%s%s" % (name, ows, value, ows)).encode("latin-1")
    try:
        status, headers = _http.parse_head(block)
    except _http.UpstreamProtocolError:
        return  # refusing a control character is fine too
    assert headers == {name.lower(): value}


def chunked_outcome(chunks):
    """(body, done, leftover) or ("error",).  Only UpstreamProtocolError may come out."""
    dec = _http.ChunkedDecoder()
    body = b""
    for c in chunks:
        try:
            body += dec.feed(c)
        except _http.UpstreamProtocolError:
            return ("error",)
    return body, dec.done, dec.buf if dec.done else None


@st.composite
def chunked_bodies(draw):
    """(encoded, body, trailing): valid chunked framing with random chunk sizes,
    hex case, leading zeros, extensions, LF or CRLF, trailers, and bytes after."""
    pieces = draw(st.lists(st.binary(min_size=1, max_size=80), max_size=6))
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
    ext = st.sampled_from([b"", b"", b";a=b", b"; name", b';q="x;y"', b" ;a", b";" + b"e" * 100])
    out = b""
    for p in pieces:
        size = ("%x" % len(p)) if draw(st.booleans()) else ("%X" % len(p))
        size = "0" * draw(st.integers(0, 3)) + size
        out += size.encode() + draw(ext) + eol + p + eol
    out += b"0" * draw(st.integers(1, 3)) + draw(ext) + eol
    for name, value in draw(st.lists(st.tuples(header_name_st, header_value_st), max_size=3)):
        out += ("%s: %s" % (name, value)).encode("latin-1") + eol
    out += eol
    return out, b"".join(pieces), draw(st.binary(max_size=20))


@MEDIUM
@given(chunked_bodies(), st.data())
def test_chunked_valid_at_every_chunking(enc, d):
    """Valid chunked framing decodes to the body, `done`, with bytes after the
    last chunk left over, at every chunking; `done` is False until the last
    byte of the framing has arrived."""
    encoded, body, trailing = enc
    for name, pieces in chunkings(encoded + trailing, d.draw):
        assert chunked_outcome(pieces) == (body, True, trailing), name
    dec = _http.ChunkedDecoder()
    got = b""
    for i in range(len(encoded)):
        assert not dec.done, i
        got += dec.feed(encoded[i:i + 1])
    assert dec.done and got == body


@MEDIUM
@given(st.one_of(
    st.binary(max_size=100),
    chunked_bodies().flatmap(lambda enc: st.tuples(st.just(enc[0] + enc[2]), st.integers(0, len(enc[0]) + len(enc[2])),
                                                   st.binary(max_size=4)))
    .map(lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:]),
    st.sampled_from([b"f" * 5000 + b"\r\nabc", b"1;" + b"x" * 5000 + b"\r\nA\r\n0\r\n\r\n",
                     b"0\r\nX: " + b"t" * 5000 + b"\r\n\r\n", b"0" * 5000 + b"1\r\nA\r\n0\r\n\r\n",
                     b"-1\r\n", b"0x10\r\n", b"1_0\r\n", b"+a\r\n", b" a \r\n", b"\xd9\xa1\r\n",
                     b"ffffffffffffffffffff\r\n", b"1\r\nAB\r\n"])), st.data())
def test_chunked_garbage_same_at_every_chunking(data, d):
    """Any bytes (random, valid framing with bytes inserted, giant hex sizes,
    long extensions and trailers): UpstreamProtocolError or a body, never
    another exception, and error-or-not, body and `done` the same at every
    chunking (a 5000-byte chunk line may not pass whole and fail in pieces)."""
    whole = chunked_outcome([data])
    for name, pieces in chunkings(data, d.draw):
        assert chunked_outcome(pieces) == whole, name


@pytest.mark.parametrize("line", [b"1;" + b"x" * 4200, b"1" + b" " * 4200, b"0\r\nX: " + b"t" * 4200],
                         ids=["extension", "whitespace", "trailer"])
def test_chunked_long_line_same_whole_or_in_pieces(line):
    """A chunk-size or trailer line over the 4096-byte limit fails the same
    whether it arrives in one read or in two (not only when incomplete)."""
    data = line + b"\r\nA\r\n0\r\n\r\n" if not line.startswith(b"0") else line + b"\r\n\r\n"
    whole = chunked_outcome([data])
    assert chunked_outcome([data[:4100], data[4100:]]) == whole


def sse_outcome(chunks, max_size=_http.MAX_EVENT):
    """(events, close events) or ("error",).  Only UpstreamProtocolError may come out."""
    p = _http.SSEParser(max_size)
    events = []
    try:
        for c in chunks:
            events += p.feed(c)
    except _http.UpstreamProtocolError:
        return ("error",)
    return events, p.close()


SSE_ATOMS = st.one_of(
    st.sampled_from([b"data:", b"data: ", b"event:", b"event: ", b"id:", b"id: ", b"retry: 5", b":", b": ping",
                     b"\r", b"\n", b"\r\n", b"\n\n", b"\r\r", b" ", b"\xef\xbb\xbf", b"\xef", b"\xbb", b"\xbf",
                     b"\x00", b"\xff", "é中😀".encode(), b"\xe4\xb8", b"\xad", b"[DONE]", b'{"a":1}']),
    st.binary(max_size=6))
sse_streams = st.one_of(st.lists(SSE_ATOMS, max_size=30).map(b"".join), st.binary(max_size=120))


@MEDIUM
@given(sse_streams, st.data())
def test_sse_any_bytes_same_at_every_chunking(data, d):
    """Any bytes (biased to SSE syntax, CR/LF/CRLF mixtures, BOM pieces, split
    and invalid UTF-8): the same events at every chunking as whole; only
    UpstreamProtocolError may be raised."""
    whole = sse_outcome([data])
    assert whole != ("error",)  # nothing here comes near the 1 MiB limits
    for name, pieces in chunkings(data, d.draw):
        assert sse_outcome(pieces) == whole, name


@MEDIUM
@given(st.lists(SSE_ATOMS | st.sampled_from([b"c" * 40, b"data: " + b"d" * 30]), max_size=30).map(b"".join),
       st.data())
def test_sse_size_limit_same_at_every_chunking(data, d):
    """With a small max_size (32 bytes) the limits are reached: whether the
    stream fails must not depend on how it was split (a long comment or
    event: line may not pass whole and fail in pieces, or the reverse)."""
    whole = sse_outcome([data], 32)
    for name, pieces in chunkings(data, d.draw):
        got = sse_outcome(pieces, 32)
        assert got == whole, (name, "whole:", whole, "in pieces:", got)


@st.composite
def sse_model(draw):
    """(bytes, expected events): events with data lines, event types and ids,
    comments between lines, every line ended by CR, LF or CRLF at random."""
    lines, events, last_id = [], [], ""
    line_text = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=12)
    for _ in range(draw(st.integers(0, 5))):
        kind = None
        if draw(st.booleans()):
            kind = draw(line_text)
            lines.append(b"event: " + kind.encode())
        if draw(st.booleans()):
            ev_id = draw(line_text | st.just("a\0b"))
            lines.append(b"id: " + ev_id.encode())
            if "\0" not in ev_id:
                last_id = ev_id
        data = draw(st.lists(line_text, min_size=1, max_size=3))
        for i, value in enumerate(data):
            lines.append(b"data: " + value.encode())
            if draw(st.integers(0, 4)) == 0:
                lines.append(b":" + draw(line_text).encode())
        lines.append(b"")
        events.append(_http.SSEEvent(kind or "message", "\n".join(data), last_id))
    out, prev = b"", None
    for line in lines:
        choices = [b"\r\n", b"\n", b"\r"]
        if prev == b"\r" and not line:
            choices = [b"\r\n", b"\r"]  # CR then an LF-ended empty line would be one CRLF
        prev = draw(st.sampled_from(choices))
        out += line + prev
    bom = draw(st.sampled_from([b"", b"\xef\xbb\xbf"]))
    return bom + out, events


@FAST
@given(sse_model(), st.data())
def test_sse_events_at_every_chunking(model, d):
    """Generated events (multi-line data, event types, ids, comments, CR/LF/CRLF
    mixed, multi-byte UTF-8, an optional BOM) come out exactly, at every
    chunking: a BOM or a character split across reads is whole by then."""
    data, events = model
    for name, pieces in chunkings(data, d.draw):
        fed, closed = sse_outcome(pieces)
        assert fed + closed == events, name


@FAST
@given(st.text(min_size=1, max_size=20), st.sampled_from([b"\n\n", b"\r\n\r\n", b"\r\r"]))
def test_sse_bom_and_utf8_split_at_every_offset(text, eol):
    """A BOM and multi-byte characters split at every pair of offsets decode as whole."""
    data = b"\xef\xbb\xbfdata: " + text.replace("\r", "").replace("\n", "").encode() + eol
    want = sse_outcome([data])
    for i in range(len(data) + 1):
        for j in range(i, min(len(data), i + 5) + 1):
            assert sse_outcome([data[:i], data[i:j], data[j:]]) == want, (i, j)


retry_values = st.one_of(
    st.text(max_size=12), st.integers().map(str), st.floats().map(repr), st.floats().map(str),
    st.sampled_from(["inf", "-inf", "nan", "-nan", "Infinity", "1e400", "-1e400", "1e308", "-0", "0", "0.0001",
                     " 5 ", "1_000", "\u0661", "Wed, 21 Oct 2015 07:28:00 GMT", "", "9" * 5000, "0." + "9" * 5000,
                     "1e-400", "\x00", "5\x00"]))


@MEDIUM
@given(st.dictionaries(st.sampled_from(["retry-after", "retry-after-ms", "x-other"]), retry_values, max_size=3))
def test_retry_after_any_values(headers):
    """Any header values: exact_retry_after is None or a finite float >= 0,
    retry_after_seconds None or an int >= 1 (None together); never raises."""
    exact = _http.exact_retry_after(headers)
    whole = _http.retry_after_seconds(headers)
    assert exact is None or (isinstance(exact, float) and math.isfinite(exact) and exact >= 0)
    assert whole is None or (type(whole) is int and whole >= 1)
    assert (exact is None) == (whole is None)
    if exact is not None:
        assert whole == max(1, math.ceil(exact))


error_bodies = st.one_of(
    st.binary(max_size=400),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({}, optional={"error": json_values | st.fixed_dictionaries({}, optional={
        "message": json_values | st.text(max_size=500), "type": json_values, "detail": json_values,
        "code": json_values, "status": json_values}), "message": json_values | st.text(min_size=300, max_size=600),
        "detail": json_values}).map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"[" * 5000, b'{"error":' * 3000, b'{"error":{"message":' + b"[" * 5000,
                     b'{"error":{"message":' + nested(900) + b"}}", b'{"error":{"message":' + b"9" * 5000 + b"}}",
                     b'{"error":{"message":NaN}}', b'{"error":{"message":1e400}}', b'{"message":"\\ud800"}',
                     b"\xff" * 500, "é".encode() * 300, b"x" * 100000]))


@FAST
@given(error_bodies)
@example(b"[" * 5000)
def test_error_message_any_body(body):
    """Any error body: a str of at most 300 characters; never raises
    (RecursionError on deep nesting, ValueError on huge numbers)."""
    msg = _http.error_message(body)
    assert isinstance(msg, str) and len(msg) <= 300


# ---- 7. the config loader ----

@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzzconfig")


def config_outcome(directory, data):
    """Write `data` to a file; read_config_file and load_config give a dict or a
    one-line ConfigError naming the file, nothing else."""
    path = os.path.join(str(directory), "streamd.yaml")
    with open(path, "wb") as f:
        f.write(data)
    results = []
    for fn in (lambda: streamd.read_config_file(path), lambda: streamd.load_config(path=path, env={})):
        try:
            r = fn()
        except streamd.ConfigError as e:
            msg = str(e)
            assert "\n" not in msg and "\r" not in msg, "ConfigError over more than one line: %r" % msg[:300]
            assert path in msg, "ConfigError does not name the file: %r" % msg[:300]
            results.append(e)
            break  # load_config starts with read_config_file: it would fail the same way (and parse again)
        else:
            assert isinstance(r, dict)
            results.append(r)
    return results


@SLOW
@given(st.binary(max_size=200) | st.lists(st.sampled_from(
    [b"server:", b"\n", b"  ", b"\t", b"max_connections: ", b"5", b"[", b"]", b"{", b"}", b"&a ", b"*a", b"!!", b"-",
     b"#", b"\xe9", b"\x00", b"\xef\xbb\xbf", b"'", b'"', b":", b"---", b"%YAML 1.1", b"? ", b"|", b">"]),
    max_size=30).map(b"".join))
@example(b"# caf\xe9\nserver:\n  max_connections: 5\n")
def test_config_arbitrary_bytes(config_dir, data):
    """Any bytes in a config file (non-UTF-8, control characters, YAML
    fragments): a dict or a one-line ConfigError naming the file; never
    UnicodeDecodeError, a YAML error, or anything else."""
    config_outcome(config_dir, data)


CONFIG_KEYS = sorted(streamd.OPTION_BY_KEY)
config_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
    st.sampled_from(["5s", "50ms", "2m", "1h", "0", "64KiB", "1MiB", "0660", "127.0.0.1:8080", "[::1]:80",
                     "http://x", "https://api.example.com/v1", "mock", "openai", "text", "json", "info", "/abs/path",
                     "", "true", "no", "auto", "root", "10.0.0.1", "nosuch", 10 ** 400, -10 ** 400, 10 ** 4000,
                     2 ** 63, 10 ** 308, 1e308, float("inf"), float("nan")]))
config_values = st.recursive(config_scalars, lambda c: st.lists(c, max_size=3)
                             | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=6)


def nest(flat):
    tree = {}
    for key, value in flat.items():
        node, parts = tree, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[parts[-1]] = value
    return tree


@SLOW
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS) | st.text(max_size=8), config_values, max_size=6),
       st.booleans(), st.sampled_from([None, True, False]),
       st.sampled_from(["", "# a comment: caf\xe9\n", "\ufeff", "%YAML 1.1\n---\n"]),
       st.sampled_from(["utf-8", "utf-8", "latin-1", "utf-16"]), st.booleans())
def test_config_random_yaml(config_dir, flat, nested_form, flow, header, encoding, crlf):
    """Random YAML documents over the real option keys (good and bad values,
    huge integers, nested lists and mappings, unknown keys), block or flow
    style, with a comment, BOM or directive, in UTF-8, Latin-1 or UTF-16:
    a dict or a one-line ConfigError naming the file."""
    tree = nest(flat) if nested_form else flat
    text = header + yaml.safe_dump(tree, default_flow_style=flow, allow_unicode=True)
    if crlf:
        text = text.replace("\n", "\r\n")
    config_outcome(config_dir, text.encode(encoding, "replace"))


BILLION_LAUGHS = b"""a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
server:
  max_connections: *d
"""

HOSTILE_CONFIGS = [
    ("latin1-comment", b"# caf\xe9\nserver:\n  max_connections: 5\n"),
    ("latin1-value", b"server:\n  socket_path: /tmp/caf\xe9\n"),
    ("utf16", "server:\n  max_connections: 5\n".encode("utf-16")),
    ("deep-flow-seq", b"[" * 5000),
    ("deep-flow-map", b"{a: " * 1000),
    ("deep-block", b"".join(b"  " * i + b"a:\n" for i in range(400))),
    ("deep-value", b"server:\n  max_connections: " + b"[" * 1000 + b"\n"),
    ("int-5000-digits", b"server:\n  max_connections: " + b"9" * 5000 + b"\n"),
    ("int-400-digits", b"server:\n  max_connections: " + b"9" * 400 + b"\n"),
    ("duration-400-digits", b"server:\n  handoff_timeout: " + b"9" * 400 + b"\n"),
    ("duration-4000-digits", b"upstream:\n  connect_timeout: " + b"9" * 4000 + b"\n"),
    ("size-400-digits", b"server:\n  write_buffer_limit: " + b"9" * 400 + b"\n"),
    ("float-1e400", b"server:\n  handoff_timeout: 1e400\n"),
    ("nan", b"server:\n  handoff_timeout: .nan\n"),
    ("hex-int", b"server:\n  max_connections: 0x" + b"f" * 5000 + b"\n"),
    ("sexagesimal", b"server:\n  max_connections: 1:2:3:4:5:6:7:8:9\n"),
    ("tab-indent", b"server:\n\tmax_connections: 5\n"),
    ("tab-value", b"server:\n  max_connections:\t5\n"),
    ("billion-laughs", BILLION_LAUGHS),
    ("python-object", b"server: !!python/object:os.system {}\n"),
    ("python-apply", b"x: !!python/object/apply:os.system ['true']\n"),
    ("python-name", b"server:\n  max_connections: !!python/name:os.system\n"),
    ("unknown-tag", b"server:\n  max_connections: !foo 5\n"),
    ("binary-tag", b"server:\n  socket_path: !!binary aGVsbG8=\n"),
    ("timestamp", b"server:\n  handoff_timeout: 2001-12-14t21:59:43.10-05:00\n"),
    ("bad-timestamp", b"server:\n  handoff_timeout: !!timestamp 2001-99-99\n"),
    ("duplicate-keys", b"server:\n  max_connections: 5\n  max_connections: 6\n"),
    ("duplicate-sections", b"server:\n  max_connections: 5\nserver:\n  max_connections: x\n"),
    ("top-level-list", b"- a\n- b\n"),
    ("top-level-string", b"just a string\n"),
    ("top-level-int", b"5\n"),
    ("top-level-zero", b"0\n"),
    ("top-level-false", b"false\n"),
    ("top-level-empty-list", b"[]\n"),
    ("empty", b""),
    ("only-comment", b"# nothing\n"),
    ("two-documents", b"a: 1\n---\nb: 2\n"),
    ("nul", b"server:\n  socket_path: a\x00b\n"),
    ("bell", b"server:\n  socket_path: a\x07b\n"),
    ("newline-in-key", b'"a\\nb": 1\n'),
    ("cr-in-key", b'"a\\rb": 1\n'),
    ("newline-in-section", b'server:\n  "max\\nconnections": 1\n'),
    ("newline-in-value", b'server:\n  max_connections: "5\\n6"\n'),
    ("unhashable-key", b"? [a, b]\n: 1\n"),
    ("null-key", b"~: 1\n"),
    ("int-key", b"5: 1\n"),
    ("section-not-mapping", b"server: 5\n"),
    ("undefined-alias", b"server: *nope\n"),
    ("unknown-backend", b"backend:\n  enabled: [nosuch]\n"),
    ("unknown-provider", b"backend:\n  provider: nosuch\n"),
    ("high-water-over-limit", b"server:\n  write_high_water: 1MiB\n  write_buffer_limit: 64KiB\n"),
    ("long-key", b"k" * 100000 + b": 1\n"),
    ("long-value", b"server:\n  socket_path: /" + b"p" * 100000 + b"\n"),
    ("surrogate-escape", b'server:\n  socket_path: "/\\ud800"\n'),
    ("group-nul", b'server:\n  socket_group: "a\\0b"\n'),
    ("group-digits", b'server:\n  socket_group: "\\u00b2"\n'),
    ("addr-superscript-port", b'metrics:\n  listen_addr: "h:\\u00b2"\n'),
    ("mode-int", b"server:\n  socket_mode: 0660\n"),
]


@pytest.mark.parametrize("data", [h[1] for h in HOSTILE_CONFIGS], ids=[h[0] for h in HOSTILE_CONFIGS])
def test_config_hostile(config_dir, data):
    """Non-UTF-8 bytes, deep nesting, 5000-digit and 400-digit numbers, tabs,
    aliases, python tags, duplicate keys, non-mapping documents, control
    characters, keys with line breaks: a dict or a one-line ConfigError that
    names the file; never UnicodeDecodeError, RecursionError, ValueError,
    OverflowError or another exception."""
    config_outcome(config_dir, data)


# ---- 8. StreamReader (the `send` client) ----

def reader_outcome(chunks):
    r = streamd.StreamReader()
    err = None
    try:
        for c in chunks:
            r.feed(c)
    except Exception as e:  # the client side: which exception it is must not depend on the chunking
        err = type(e).__name__
    return r.status, r.headers, r.events, r.body, err


sse_payloads = st.one_of(
    json_values.map(streamd.sse_event),
    st.tuples(st.sampled_from(["upstream_error", "timeout"]), st.text(max_size=20)).map(
        lambda t: streamd.sse_error(*t)),
    st.just(streamd.SSE_PING))


@FAST
@given(st.lists(st.tuples(st.sampled_from(["X-A", "X-Request-Id"]), st.text(string.printable.strip(), max_size=10)),
                max_size=2),
       st.lists(sse_payloads, max_size=6), st.booleans(), st.data())
def test_stream_reader_daemon_output_at_every_chunking(extra, events, done, d):
    """What the daemon writes (the 200 head, events, [DONE]) reads back the
    same at every chunking: status, headers and event blocks as whole."""
    data = streamd.response_head(extra) + b"".join(events) + (streamd.SSE_DONE if done else b"")
    whole = reader_outcome([data])
    assert whole[0] == 200 and whole[4] is None
    assert len(whole[2]) == len(events) + done
    for name, pieces in chunkings(data, d.draw):
        assert reader_outcome(pieces) == whole, name


@MEDIUM
@given(st.sampled_from(sorted(streamd.REASONS)), st.text(max_size=40), st.data())
def test_stream_reader_error_response_at_every_chunking(status, message, d):
    """An error response reads back with its status and whole body at every chunking."""
    data = streamd.error_response(status, message)
    whole = reader_outcome([data])
    assert whole[0] == status and whole[4] is None
    for name, pieces in chunkings(data, d.draw):
        assert reader_outcome(pieces) == whole, name


@MEDIUM
@given(st.one_of(st.binary(max_size=150),
                 st.binary(max_size=80).map(lambda b: b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
                                            + b)), st.data())
def test_stream_reader_any_bytes_same_at_every_chunking(data, d):
    """Any bytes: the same status, headers, events and error (if any) at every chunking."""
    whole = reader_outcome([data])
    for name, pieces in chunkings(data, d.draw):
        assert reader_outcome(pieces) == whole, name
