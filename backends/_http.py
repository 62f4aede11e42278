"""The upstream HTTP/1.1 client that every LLM backend shares.

Connection setup is urllib3's job: on a helper thread (the loop's "call"
operation) it resolves the name, connects, and does the TLS handshake with
certificate verification.  From then on the loop owns the socket: this module
writes the request, reads the status and headers, removes the body framing
(chunked, Content-Length or until-EOF) and feeds an incremental SSE parser, all
non-blocking, by yielding "readable"/"writable" operations to the loop.

Why not urllib3's response object: after getresponse() the first SSE bytes
already sit in http.client's buffer, its reads block, and a TLS socket hides
decrypted bytes from select().  So after the
handshake we read the raw socket ourselves, and drain TLS until want-read.

Pure pieces first (SSEParser, ChunkedDecoder, parse_head): bytes in, values out.
Then Target (where an upstream is and how to connect) and Stream (one request).
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import select
import socket
import ssl
import time
from urllib.parse import urlsplit

from streamd import BackendError, log, loads_client_json, _finite, _not_json

import logging

REQUIRES = ("urllib3",)      # what a backend built on this module needs installed (checked at start)
MAX_HEAD = 64 * 1024         # status line + headers
MAX_EVENT = 1024 * 1024      # one SSE line or event (tool calls and LangGraph values can be big)
MAX_ERROR_BODY = 4096        # how much of an error response we read
MAX_INTERIM = 8              # 1xx responses before the real one
MAX_CHUNK_LINE = 4096        # a chunk-size line (with extensions) or a trailer line
KEEPALIVE_IDLE = 30.0        # an idle pooled connection older than this is closed, not reused


class UpstreamProtocolError(ValueError):
    """The upstream broke HTTP or SSE framing."""


# ---- SSE (WHATWG "event stream interpretation") ----

class SSEEvent:
    __slots__ = ("event", "data", "id")

    def __init__(self, event, data, id):
        self.event, self.data, self.id = event, data, id

    def __repr__(self):
        return "SSEEvent(%r, %r, id=%r)" % (self.event, self.data, self.id)

    def __eq__(self, other):
        return (self.event, self.data, self.id) == (other.event, other.data, other.id)


_EOL = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


class SSEParser:
    """Incremental: feed() bytes as they arrive, get back completed events.

    Lines end with CRLF, LF or CR, in any mix.  A read that ends in a lone CR is
    ambiguous (CR, or the first half of CRLF), so that CR waits for the next
    byte.  Lines are decoded as UTF-8 only when complete: a line break never
    falls inside a multi-byte sequence, so a character split across reads is
    whole by then."""

    def __init__(self, max_size: int = MAX_EVENT):
        self.max_size = max_size
        self.buf = b""       # an unfinished line (bytes, or a bytearray while it grows)
        self.started = False
        self.data = []
        self.size = 0
        self.type = ""
        self.last_id = ""

    def feed(self, chunk: bytes) -> list:
        if (self.buf and self.started and not self.buf.endswith(b"\r")
                and b"\n" not in chunk and b"\r" not in chunk):
            # More of a line that has not ended (an upstream trickling a long
            # line): append, without copying and rescanning what is held.
            if type(self.buf) is not bytearray:
                self.buf = bytearray(self.buf)
            self.buf += chunk
            if len(self.buf) > self.max_size:
                raise UpstreamProtocolError("SSE line longer than %d bytes" % self.max_size)
            return []
        buf = bytes(self.buf) + chunk if self.buf else chunk
        if not self.started:
            if len(buf) < 3 and _BOM.startswith(buf):
                self.buf = buf
                return []
            self.started = True
            if buf.startswith(_BOM):
                buf = buf[3:]
        events = []
        pos, end = 0, len(buf)
        search = _EOL.search
        limit = self.max_size
        while True:
            m = search(buf, pos)
            if m is None or (m.end() == end and m.end() - m.start() == 1 and buf[m.start()] == 13):
                break  # no line end, or a lone CR at the very end: wait for the next byte
            if m.start() - pos > limit:  # (a held CR does not count: the answer cannot depend on the cut)
                raise UpstreamProtocolError("SSE line longer than %d bytes" % limit)
            self._line(buf[pos:m.start()], events)
            pos = m.end()
        self.buf = buf[pos:]
        if len(self.buf) - self.buf.endswith(b"\r") > limit:
            raise UpstreamProtocolError("SSE line longer than %d bytes" % limit)
        return events

    def close(self) -> list:
        """End of stream: a held CR ends its line; an unfinished event is dropped."""
        events = []
        if self.buf.endswith(b"\r"):
            self._line(self.buf[:-1], events)
        self.buf = b""
        self.data, self.size, self.type = [], 0, ""
        return events

    def _line(self, raw: bytes, events: list) -> None:
        if not raw:
            if self.data:
                events.append(SSEEvent(self.type or "message", "\n".join(self.data), self.last_id))
            self.data, self.size, self.type = [], 0, ""
            return
        if raw[0] == 58:  # ":" comment (heartbeats)
            return
        line = raw.decode("utf-8", "replace")
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self.size += len(raw)
            if self.size > self.max_size:
                raise UpstreamProtocolError("SSE event larger than %d bytes" % self.max_size)
            self.data.append(value)
        elif name == "event":
            self.type = value
        elif name == "id":
            if "\0" not in value:
                self.last_id = value
        # "retry" and unknown fields are ignored


# ---- HTTP/1.1 framing ----

_LENGTH = re.compile(r"[0-9]{1,19}")  # Content-Length
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")  # (16 hex digits: 2**64 - 1, more than anyone sends)


class ChunkedDecoder:
    """Transfer-Encoding: chunked, incrementally.  `done` after the last chunk
    and its trailers: only then is the body known to be complete."""

    SIZE, DATA, DATA_END, TRAILER, DONE = range(5)

    def __init__(self):
        self.state = self.SIZE
        self.buf = b""
        self.left = 0

    @property
    def done(self):
        return self.state == self.DONE

    def feed(self, data: bytes) -> bytes:
        buf = self.buf + data if self.buf else data
        out = []
        pos = 0
        while pos < len(buf) and self.state != self.DONE:
            if self.state == self.DATA:
                take = min(self.left, len(buf) - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self.left -= take
                if not self.left:
                    self.state = self.DATA_END
                continue
            nl = buf.find(b"\n", pos)
            if (nl if nl >= 0 else len(buf)) - pos > MAX_CHUNK_LINE:  # whole or in pieces: the same answer
                raise UpstreamProtocolError("chunk header or trailer line longer than %d bytes" % MAX_CHUNK_LINE)
            if nl < 0:
                break
            line = buf[pos:nl].rstrip(b"\r")
            pos = nl + 1
            if self.state == self.SIZE:
                size_text = line.split(b";", 1)[0].strip()
                if not _CHUNK_SIZE.fullmatch(size_text):
                    raise UpstreamProtocolError("bad chunk size %r" % size_text[:20])
                self.left = int(size_text, 16)
                self.state = self.DATA if self.left else self.TRAILER
            elif self.state == self.DATA_END:
                if line:
                    raise UpstreamProtocolError("chunk data longer than its size")
                self.state = self.SIZE
            elif self.state == self.TRAILER and not line:
                self.state = self.DONE
        self.buf = buf[pos:]
        return b"".join(out)


_STATUS_LINE = re.compile(r"HTTP/1\.[0-9] ([0-9]{3})(?: .*)?")  # exactly three ASCII digits


def parse_head(block: bytes):
    """`HTTP/1.1 200 OK\\r\\nName: value…` (without the blank line) →
    (status, {lower-case name: value})."""
    lines = block.decode("latin-1").split("\n")
    m = _STATUS_LINE.fullmatch(lines[0].rstrip("\r"))
    if m is None:
        raise UpstreamProtocolError("bad status line %r" % lines[0][:80])
    headers = {}
    for line in lines[1:]:
        line = line.rstrip("\r")
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip(" \t"):
            raise UpstreamProtocolError("bad header line %r" % line[:80])
        name = name.lower()
        value = value.strip(" \t")  # (RFC 9110: only SP and HTAB; str.strip() would take \x85, \xa0 ...)
        headers[name] = headers[name] + ", " + value if name in headers else value
    return int(m.group(1)), headers


def exact_retry_after(headers: dict):
    """The upstream's retry hint in seconds (retry-after-ms first), or None
    (absent, an HTTP-date we do not parse, or not a finite number)."""
    try:
        if "retry-after-ms" in headers:
            value = float(headers["retry-after-ms"]) / 1000
        elif "retry-after" in headers:
            value = float(headers["retry-after"])
        else:
            return None
    except ValueError:
        return None
    return max(0.0, value) if math.isfinite(value) else None


def retry_after_seconds(headers: dict):
    """The same hint as whole seconds for our own Retry-After (at least 1)."""
    value = exact_retry_after(headers)
    return None if value is None else max(1, math.ceil(value))


def parse_json(text):
    """json.loads for an upstream's bytes, RFC 8259 only: NaN, Infinity and
    1e999 would reach our clients as invalid JSON (a browser's JSON.parse
    throws on them), and absurd nesting ("[[[[…") makes Python's json raise
    RecursionError.  All of it is bad JSON: ValueError."""
    try:
        return json.loads(text, parse_constant=_not_json, parse_float=_finite)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


# An upstream's JSON is not trusted to have the documented shape: a "choices"
# that is a number, a "delta" that is a string.  Read it through these, so a
# wrong shape reads as "absent" instead of raising TypeError in a backend.

def obj(v) -> dict:
    return v if isinstance(v, dict) else {}


def arr(v) -> list:
    return v if isinstance(v, list) else []


def text(v) -> str:
    return v if isinstance(v, str) else ""


def count(v) -> int:
    """A token count: a non-negative integer, else 0."""
    return v if type(v) is int and v >= 0 else 0


def client_json_object(text):
    """A JSON text from the client (a tool call's arguments, a tool's result)
    as an object, or None when it is not one: not JSON, not an object, or what
    streamd refuses from clients (NaN, nesting past MAX_JSON_DEPTH)."""
    try:
        value = loads_client_json(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def arguments_object(arguments: str, backend: str) -> dict:
    """A tool call's arguments for a provider that wants an object (Anthropic,
    Gemini, LangGraph); 400 if they are not one."""
    value = client_json_object(arguments or "{}")
    if value is None:
        raise BackendError("a tool call's arguments must be a JSON object for %s" % backend, status=400,
                           kind="invalid_request", reason="bad_request")
    return value


def error_parts(body) -> tuple:
    """(the provider's error type or code, its human message) from a JSON
    error body or error event, each "" if absent.  Shapes: OpenAI and
    Anthropic {"error": {"type"|"code", "message"}}, Gemini {"error":
    {"status", "code", "message"}}, LangGraph {"error": name, "message"}."""
    if isinstance(body, (bytes, str)):
        try:
            obj = parse_json(body)
        except ValueError:
            text = body[:300].decode("utf-8", "replace") if isinstance(body, bytes) else body[:300]
            return "", text.strip()
    else:
        obj = body
    if not isinstance(obj, dict):
        return "", str(obj)[:300] if obj else ""
    err = obj.get("error", obj)
    if isinstance(err, dict):
        kind = err.get("type") or err.get("status") or err.get("code") or ""
        msg = err.get("message") or err.get("detail") or ""
    else:
        kind, msg = err, obj.get("message") or obj.get("detail") or ""
    return str(kind)[:80], str(msg)[:300]


def error_message(body: bytes) -> str:
    """The human part of a provider's JSON error body, if it has one."""
    kind, msg = error_parts(body)
    return msg or kind


_UNSAFE = re.compile(r"[\r\n\x00]")


def check_headers(headers: dict) -> None:
    """No CR, LF or NUL in a request header: nothing may inject a header into
    the upstream request (API keys come from config, test_pattern from handoffs)."""
    for k, v in headers.items():
        if _UNSAFE.search(k) or _UNSAFE.search(v):
            raise BackendError("refusing to send header %r: it contains a line break or NUL" % k,
                               status=500, kind="internal_error", reason="other")


# ---- Where an upstream is, and how to connect to it ----

class Target:
    """One upstream: base URL, optional Unix socket, TLS settings, idle pool."""

    def __init__(self, base_url: str, api_socket: str = "", insecure: bool = False):
        u = urlsplit(base_url)
        self.scheme = u.scheme
        self.host = u.hostname or "localhost"
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.path = u.path.rstrip("/")
        self.api_socket = api_socket
        self.insecure = insecure
        default_port = u.port is None or u.port == (443 if u.scheme == "https" else 80)
        host = "[%s]" % self.host if ":" in self.host else self.host
        self.host_header = host if default_port else "%s:%d" % (host, self.port)
        self.idle = []  # [(sock, since)], newest last; loop thread only
        self.http2 = "auto"  # upstream.http2 as it applies here (target() sets it at each use)
        self._tls = {}  # ALPN offer -> SSLContext, shared by every connection

    def __repr__(self):
        return "Target(%s://%s%s%s)" % (self.scheme, self.host_header, self.path,
                                        " via " + self.api_socket if self.api_socket else "")

    def tls_context(self, alpn: tuple) -> ssl.SSLContext:
        """One SSLContext per upstream (and ALPN offer), shared by all its
        connections.  Building one loads the system's CA bundle: per connection
        that cost ~25 ms of CPU and ~500 KB of memory each (measured)."""
        ctx = self._tls.get(alpn)
        if ctx is None:
            ctx = ssl.create_default_context()
            if self.insecure:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            ctx.set_alpn_protocols(list(alpn))
            self._tls[alpn] = ctx  # a race between helper threads only builds it twice
        return ctx

    def connect_blocking(self, timeout: float):
        """Runs on a helper thread: urllib3 resolves, connects and (for https)
        does the TLS handshake with certificate and hostname verification."""
        from urllib3.connection import HTTPConnection, HTTPSConnection
        if self.scheme == "https":
            conn = HTTPSConnection(self.host, self.port, timeout=timeout, ssl_context=self.tls_context(("http/1.1",)))
            # Attributes, not constructor arguments: urllib3 1.26 (Debian 12's)
            # takes neither in its constructor, and both versions read them at connect.
            conn.cert_reqs = "CERT_NONE" if self.insecure else "CERT_REQUIRED"
            conn.assert_hostname = False if self.insecure else None
        else:
            conn = HTTPConnection(self.host, self.port, timeout=timeout)
        conn.connect()
        sock, conn.sock = conn.sock, None  # we own it now; urllib3 must not close it
        sock.setblocking(False)
        return sock

    def connect_unix(self):
        """An AF_UNIX upstream connects at once or never (no EINPROGRESS on Linux)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(self.api_socket)
        except BlockingIOError:
            s.close()
            raise BackendError("upstream socket %s: backlog full" % self.api_socket, status=503,
                               retry_after=1) from None
        except OSError as e:
            s.close()
            raise BackendError("upstream socket %s: %s" % (self.api_socket, e.strerror), reason="network") from None
        return s

    def checkout(self):
        """A pooled keep-alive connection that still looks healthy, or None."""
        now = time.monotonic()
        while self.idle:
            sock, since = self.idle.pop()
            if now - since < KEEPALIVE_IDLE and not _readable(sock):
                return sock
            sock.close()  # expired, closed by the server, or unexpected bytes
        return None

    def checkin(self, sock, max_idle: int) -> None:
        if len(self.idle) < max_idle:
            self.idle.append((sock, time.monotonic()))
        else:
            sock.close()


def _readable(sock) -> bool:
    """An idle connection should have nothing to read: readable means closed."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()  # not select.select(): it fails for fd numbers above 1024
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


_targets = {}


def pool_summary() -> str:
    """Each upstream's pooled connections, for the SIGUSR1 state line:
    host idle=N h2=connections/streams."""
    out = []
    for t in _targets.values():
        muxes = getattr(t, "h2", ())
        out.append("%s idle=%d h2=%d/%d" % (t.host_header, len(t.idle), len(muxes),
                                            sum(len(m.streams) for m in muxes)))
    return "; ".join(out)


def close_all() -> None:
    """Close every pooled connection (the daemon calls this at exit)."""
    for t in _targets.values():
        while t.idle:
            t.idle.pop()[0].close()
        for mux in list(getattr(t, "h2", ())):
            mux.close()
    _targets.clear()


def setting(cfg: dict, name: str, profile, key: str):
    """backend.<name>.<key>, or the profile's own value when the request
    chose a profile that sets it (profiles inherit what they do not set)."""
    if profile:
        prof = (cfg.get("backend.%s.profiles" % name) or {}).get(profile) or {}
        if key in prof:
            return prof[key]
    return cfg.get("backend.%s.%s" % (name, key), "")


def api_key(cfg: dict, name: str, profile=None) -> str:
    """The API key: a profile's api_key, or the variable its api_key_env
    names, else the backend's own; but never the backend's own for a profile
    that names its own upstream (api_base or api_socket): the backend's key
    is not sent to another server unless the profile says so."""
    if profile:
        prof = (cfg.get("backend.%s.profiles" % name) or {}).get(profile) or {}
        if "api_key_env" in prof:
            return os.environ.get(prof["api_key_env"], "")
        if "api_key" not in prof and ("api_base" in prof or "api_socket" in prof):
            return ""
    return setting(cfg, name, profile, "api_key")


def target(cfg: dict, name: str, profile=None) -> Target:
    """The Target for backend `name` (or one of its profiles) under this
    config (cached: it holds the pool)."""
    base = setting(cfg, name, profile, "api_base")
    sock = setting(cfg, name, profile, "api_socket")
    insecure = bool(cfg["upstream.insecure_ssl"] or setting(cfg, name, profile, "insecure_ssl"))
    key = (base, sock, insecure)
    t = _targets.get(key)
    if t is None:
        t = _targets[key] = Target(base, sock, insecure)
        if insecure and t.scheme == "https":
            log(logging.WARNING, "upstream TLS certificates are NOT verified (insecure_ssl)", backend=name)
    # HTTP/2 per backend or profile, else upstream.http2 (both may change on SIGHUP)
    t.http2 = setting(cfg, name, profile, "http2") or cfg["upstream.http2"]
    return t


# ---- One request ----

class Stream:
    """One HTTP request on a socket the loop drives.  Generator methods are
    used with `yield from` inside a backend."""

    def __init__(self, target: Target, sock, cfg: dict, reused: bool):
        self.target = target
        self.sock = sock
        self.cfg = cfg
        self.reused = reused
        self.status = None
        self.headers = {}
        self.body = None       # "chunked" | "length" | "eof"
        self.chunked = None
        self.left = 0
        self.pending = b""     # body bytes read together with the head
        self.sse = SSEParser()
        self.complete = False  # body framing ended cleanly
        self.keep_alive = False

    # -- I/O primitives (generators) --

    def send_all(self, data: bytes, timeout: float):
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view)
            except (BlockingIOError, ssl.SSLWantWriteError):
                yield ("writable", self.sock, timeout)
                continue
            except ssl.SSLWantReadError:
                yield ("readable", self.sock, timeout)
                continue
            view = view[n:]

    def recv_some(self, timeout: float):
        """Wait for bytes; return them, or b"" at EOF.  On TLS, keep reading
        until want-read: decrypted bytes inside OpenSSL are invisible to select()."""
        tls = isinstance(self.sock, ssl.SSLSocket)
        while True:
            chunks = []
            try:
                while True:
                    data = self.sock.recv(65536)
                    if not data:
                        break
                    chunks.append(data)
                    if not tls and len(data) < 65536:
                        break
            except (BlockingIOError, ssl.SSLWantReadError):
                pass
            except ssl.SSLWantWriteError:
                yield ("writable", self.sock, timeout)
                continue
            except (ConnectionError, ssl.SSLError, OSError) as e:
                if chunks:
                    return b"".join(chunks)
                raise BackendError("upstream connection failed: %s" % (getattr(e, "strerror", None) or e),
                                   reason="network") from None
            else:
                return b"".join(chunks)  # EOF (possibly after some data)
            if chunks:
                return b"".join(chunks)
            yield ("readable", self.sock, timeout)

    # -- the exchange --

    def send_request(self, method: str, path: str, headers: dict, body: bytes):
        check_headers(headers)
        lines = ["%s %s HTTP/1.1" % (method, path), "Host: " + self.target.host_header,
                 "User-Agent: streamd", "Accept-Encoding: identity"]
        if body is not None:
            lines += ["Content-Type: application/json", "Content-Length: %d" % len(body)]
        lines += ["%s: %s" % kv for kv in headers.items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
        yield from self.send_all(head + (body or b""), self.cfg["upstream.header_timeout"])

    def read_head(self):
        buf = b""
        interim = 0
        # header_timeout bounds the whole head, not each read: an upstream
        # that trickles a byte at a time does not extend it.
        deadline = (yield ("now",)) + self.cfg["upstream.header_timeout"]
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0 or end > MAX_HEAD:
                if len(buf) > MAX_HEAD:
                    raise BackendError("upstream response head larger than %d bytes" % MAX_HEAD)
                left = deadline - (yield ("now",))
                if left <= 0:
                    raise TimeoutError("no response head in time")
                data = yield from self.recv_some(left)
                if not data:
                    raise BackendError("upstream closed the connection before answering", reason="network")
                buf += data
                continue
            try:
                status, headers = parse_head(buf[:end])
            except UpstreamProtocolError as e:
                raise BackendError("upstream sent an invalid response head: %s" % e) from None
            buf = buf[end + 4:]
            if 100 <= status < 200:
                # 100 Continue / 103 Early Hints: the real head follows (it may
                # be in `buf` already).  A few, not an endless supply.
                interim += 1
                if interim > MAX_INTERIM:
                    raise BackendError("upstream sent more than %d interim (1xx) responses" % MAX_INTERIM)
                continue
            self.status, self.headers = status, headers
            if headers.get("content-encoding", "identity").lower() != "identity":
                raise BackendError("upstream sent Content-Encoding %r; we asked for identity"
                                   % headers["content-encoding"][:40])
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self.body, self.chunked = "chunked", ChunkedDecoder()
            elif "content-length" in headers:
                if not _LENGTH.fullmatch(headers["content-length"]):
                    raise BackendError("upstream sent a bad Content-Length")
                self.body, self.left = "length", int(headers["content-length"])
            else:
                self.body = "eof"
            self.keep_alive = (self.body != "eof" and "close" not in headers.get("connection", "").lower())
            self.pending = buf
            return

    def read_body(self, timeout: float):
        """The next piece of the body with framing removed; None once complete.
        An upstream that closes before its framing ends is an error."""
        while True:
            if self.pending:
                data, self.pending = self.pending, b""
            elif self.complete:
                return None
            else:
                data = yield from self.recv_some(timeout)
                if not data:
                    if self.body == "eof":
                        self.complete = True
                        return None
                    raise BackendError("upstream closed the connection mid-stream", reason="upstream")
            try:
                if self.body == "chunked":
                    out = self.chunked.feed(data)
                    self.complete = self.chunked.done
                elif self.body == "length":
                    out = data[:self.left]
                    self.left -= len(out)
                    self.complete = not self.left
                else:
                    out = data
            except UpstreamProtocolError as e:
                raise BackendError("upstream broke HTTP framing: %s" % e) from None
            if out:
                return out
            if self.complete:
                return None

    def next_events(self):
        """The SSE events completed by the next read; None when the body is done."""
        timeout = self.cfg["upstream.idle_timeout"]
        while True:
            data = yield from self.read_body(timeout)
            try:
                if data is None:
                    return self.sse.close() or None
                events = self.sse.feed(data)
            except UpstreamProtocolError as e:
                raise BackendError("upstream broke SSE framing: %s" % e) from None
            if events:
                return events

    def read_error_body(self):
        """Up to MAX_ERROR_BODY bytes of an error response (best effort, short wait)."""
        out = b""
        try:
            while len(out) < MAX_ERROR_BODY:
                data = yield from self.read_body(min(5.0, self.cfg["upstream.idle_timeout"]))
                if data is None:
                    break
                out += data
        except (BackendError, TimeoutError):
            pass
        return out[:MAX_ERROR_BODY]

    def close(self) -> None:
        """Back to the pool if the exchange was complete and reusable, else closed."""
        sock, self.sock = self.sock, None
        if sock is None:
            return
        if self.complete and self.keep_alive and not self.pending:
            self.target.checkin(sock, self.cfg["upstream.max_idle"])
        else:
            sock.close()


def _close(sock):
    sock.close()


def headers(req, auth_header: str = "", auth_value: str = "") -> dict:
    """Request headers every backend sends: auth (when a key is set), SSE, and
    the handoff's test_pattern as X-Test-Pattern."""
    out = {"Accept": "text/event-stream"}
    if auth_value:
        out[auth_header] = auth_value
    if req.test_pattern:
        out["X-Test-Pattern"] = req.test_pattern
    return out


def json_events(stream: "Stream"):
    """Like Stream.next_events, with each event's data parsed as JSON:
    [(event name, value)], or None when the body is done."""
    events = yield from stream.next_events()
    if events is None:
        return None
    out = []
    for ev in events:
        if ev.data == "[DONE]":  # OpenAI's end marker is not JSON
            out.append((ev.event, ev.data))
            continue
        try:
            out.append((ev.event, parse_json(ev.data)))
        except ValueError:
            raise BackendError("upstream sent an event that is not JSON") from None
    return out


RETRY_STATUSES = frozenset((429, 500, 502, 503, 504, 529))


class RetryableError(Exception):
    """One attempt failed in a way another attempt might not: carries the
    error to raise if no retry happens, and the upstream's own delay hint."""

    def __init__(self, error: BackendError, hint=None):
        super().__init__(str(error))
        self.error, self.hint = error, hint


ENCODE_TIMEOUT = 30.0  # seconds a helper may take to encode a heavy request body


def encode_json(body) -> bytes:
    """A request body as UTF-8 JSON.  A lone surrogate (the client sent
    "\\ud800") cannot be UTF-8: such a body goes \\u-escaped, as valid JSON
    that carries exactly what the client sent."""
    try:
        return json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(body).encode("ascii")


def open_stream(tgt: Target, cfg: dict, method: str, path: str, headers: dict, body,
                secrets=(), heavy=False):
    """Connect (or reuse a pooled connection), send the request, read the head;
    retry what is worth retrying.

    Returns a Stream whose status is 2xx; raises BackendError otherwise:
    502 for a refused/failed/invalid upstream, 503 (with the upstream's
    Retry-After) for 429/503/529, 504 for a timeout.  `secrets` (API keys) are
    cut out of any upstream error text we pass on.

    Retries happen here, so only before the 200 head and any byte reached the
    client: on connect failures and on 429/500/502/503/504 (or whatever
    x-should-retry says), with exponential backoff and full random jitter, or
    the upstream's Retry-After; at most upstream.max_retries times, within
    upstream.retry_budget seconds in all.

    A `heavy` body (one carrying attachments: megabytes of base64) is encoded
    on a helper thread, not on the loop, where it would hold every stream up."""
    if body is None:
        payload = None
    elif heavy:
        payload = yield ("call", lambda: encode_json(body), ENCODE_TIMEOUT, None)
    else:
        payload = encode_json(body)
    started = yield ("now",)
    attempt = 0
    while True:
        try:
            return (yield from _attempt(tgt, cfg, method, path, headers, payload, secrets))
        except RetryableError as e:
            attempt += 1
            if attempt > cfg["upstream.max_retries"]:
                raise e.error from None
            cap = min(cfg["upstream.retry_cap"], cfg["upstream.retry_base"] * 2 ** (attempt - 1))
            delay = e.hint if e.hint is not None else random.uniform(0, cap)
            now = yield ("now",)
            if now + delay - started > cfg["upstream.retry_budget"]:
                raise e.error from None  # the budget is spent: answer now, with the upstream's hint
            yield ("count", "upstream_retries")
            log(logging.INFO, "retrying upstream", target=tgt.host_header, attempt=attempt,
                delay_s=round(delay, 3), error=str(e.error))
            yield ("sleep", delay)


def redact(text: str, secrets) -> str:
    """Cut API keys out of what an upstream said (some echo the request headers)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


def upstream_error(what: str, body, secrets=(), **kw) -> BackendError:
    """A BackendError for an error an upstream reported mid-stream (an error
    event or object): `what` in our words, the provider's type and message
    kept apart (see BackendError)."""
    kind, message = error_parts(body)
    return BackendError(what, detail=redact(message, secrets), upstream_type=redact(kind, secrets), **kw)


def _connect(tgt, cfg, fn, timeout):
    """Connect on a helper thread; turn its failures into BackendErrors."""
    try:
        return (yield ("call", fn, timeout + 1, _close))
    except TimeoutError:
        raise RetryableError(BackendError("connecting to %s timed out" % tgt.host_header, status=504,
                                          kind="upstream_timeout", reason="timeout")) from None
    except ssl.SSLCertVerificationError as e:
        # not retried: another attempt meets the same certificate
        raise BackendError("TLS certificate of %s not trusted: %s" % (tgt.host_header,
                           e.verify_message or e.reason), reason="network") from None
    except Exception as e:  # socket.gaierror, refused, TLS failures, urllib3 errors
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise RetryableError(BackendError("cannot connect to %s: %s" % (tgt.host_header, reason),
                                          reason="network")) from None


def _attempt(tgt, cfg, method, path, headers, payload, secrets):
    mode = tgt.http2
    h2 = None
    if mode != "false" and not tgt.api_socket:
        from backends import _h2
        h2 = _h2 if _h2.available() else None
    for fresh in (False, True):
        sock = None if fresh else tgt.checkout()
        reused = sock is not None
        stream = None
        if sock is None and h2 is not None and (tgt.scheme == "https" or mode == "true"):
            # HTTP/2: a stream on a connection that has room, else a new
            # connection: ALPN h2 over TLS (HTTP/1.1 if the upstream prefers
            # it), or h2c with prior knowledge over plain TCP (http2 "true").
            timeout = cfg["upstream.connect_timeout"]
            fn = h2.connect_tls if tgt.scheme == "https" else h2.connect_plain
            mux, sock = yield from h2.acquire(tgt, cfg, lambda: _connect(tgt, cfg, lambda: fn(tgt, timeout), timeout))
            if mux is not None:
                stream = h2.H2Stream(mux, cfg)
                reused = True  # a dead shared connection before any answer: one fresh try
        if stream is None:
            if sock is None:
                if tgt.api_socket:
                    try:
                        sock = tgt.connect_unix()
                    except BackendError as e:
                        raise RetryableError(e) from None
                else:
                    timeout = cfg["upstream.connect_timeout"]
                    sock = yield from _connect(tgt, cfg, lambda: tgt.connect_blocking(timeout), timeout)
            stream = Stream(tgt, sock, cfg, reused)
        try:
            yield from stream.send_request(method, path, headers, payload)
            yield from stream.read_head()
        except TimeoutError:
            # not retried: the upstream may be working on it (a slow first token)
            stream.close()
            raise BackendError("upstream %s did not answer within %gs" % (tgt.host_header,
                               cfg["upstream.header_timeout"]), status=504, kind="upstream_timeout",
                               reason="timeout") from None
        except BackendError:
            stream.close()
            if reused and stream.status is None:
                continue  # a pooled connection the server had closed: at once, on a fresh one
            raise
        except BaseException:
            stream.close()
            raise
        break
    if 200 <= stream.status < 300:
        return stream
    text = yield from stream.read_error_body()
    stream.close()
    kind, message = error_parts(text)
    status = stream.status
    what = "upstream answered %d" % status
    hint = retry_after_seconds(stream.headers)
    fields = {"detail": redact(message, secrets), "upstream_type": redact(kind, secrets)}
    if status in (429, 503, 529):
        error = BackendError(what, status=503, kind="upstream_unavailable", retry_after=hint or 1, **fields)
    else:
        error = BackendError(what, status=502, kind="upstream_error", **fields)
    should = stream.headers.get("x-should-retry", "").lower()
    if should == "true" or (should != "false" and status in RETRY_STATUSES):
        raise RetryableError(error, exact_retry_after(stream.headers))
    raise error
