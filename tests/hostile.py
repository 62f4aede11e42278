"""Hostile peers for a real streamd process: a launcher, a hostile upstream,
and generators of hostile clients (handoff, HTTP front, WebSocket, metrics).

Used by tests/test_hostile.py; also a command-line tool to replay cases:

    .venv/bin/python tests/hostile.py --seed 123 --seconds 20          # a whole mix
    .venv/bin/python tests/hostile.py --seed 123 --case 57 --case 90   # only these cases
    .venv/bin/python tests/hostile.py --seed 123 --case 57 --show      # print the case, run nothing

Every case is built from its own RNG, random.Random("<seed>:<index>"), so a
seed and a case index name the exact bytes sent; the order in which the
worker threads run cases is not deterministic, the cases themselves are.
An openai case also decides what the hostile upstream answers: it sends
test_pattern "h:<scenario>:<index>", which streamd forwards as
X-Test-Pattern, and the upstream answers with that scenario.

Every socket a client opens has a deadline (SLACK seconds past what the daemon
is configured to take) and is closed; nothing here waits without a bound.
Standard library only.
"""
import argparse
import array
import collections
import json
import os
import random
import re
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STREAMD = os.path.join(ROOT, "streamd.py")

# How much later than the daemon's configured timeouts an answer may come
# before a client calls it a stall (a 2-core machine under a fuzz load).
SLACK = float(os.environ.get("STREAMD_FUZZ_SLACK", "4"))

# The daemon's timeouts (flags below); deadlines are derived from them.
HANDOFF_TIMEOUT = 1.0
REQUEST_TIMEOUT = 1.0
HEADER_TIMEOUT = 2.0
IDLE_TIMEOUT = 2.0
METRICS_TIMEOUT = 5.0      # MetricsServer.TIMEOUT
LINGER = 2.0               # streamd.LINGER
MAX_FDS = 16               # streamd.MAX_FDS: more fds in one message is MSG_CTRUNC
MAX_HANDOFF = 128 * 1024

DAEMON_FLAGS = [
    "--backend", "mock", "--message-delay", "1ms", "--enable-backends", "openai,anthropic",
    # anthropic points at a Blackhole: connects hang on a helper thread until
    # connect_timeout, so clients leave while a connect is pending
    "--connect-timeout", "2s",
    "--max-retries", "0", "--idle-timeout", "2s", "--header-timeout", "2s",
    "--handoff-timeout", "1s", "--request-timeout", "1s", "--log-level", "debug",
    # Not in the brief's command line, needed for a fair fuzz: every client is
    # 127.0.0.1, so the front's per-address limits (100 per 15 min, 10
    # concurrent) would answer 429 to almost everything after a few seconds, and
    # the circuit breaker would answer 503 to every openai request after 5
    # hostile answers in a row: both would hide the code paths under test.
    "--rate-limit", "0", "--max-streams-per-key", "0", "--breaker-failures", "0",
]


# ---------------------------------------------------------------- launcher --

class StreamdProcess:
    """`streamd.py serve` as a subprocess with --listen and --metrics-addr on
    free ports (port 0; the addresses are read from the log), the openai
    backend pointed at `upstream_port`, readiness awaited via NOTIFY_SOCKET,
    stderr to `log_path`."""

    def __init__(self, workdir, upstream_port, extra=(), streamd=STREAMD, python=sys.executable, blackhole_port=None):
        self.workdir = workdir
        self.path = os.path.join(workdir, "s.sock")
        self.log_path = os.path.join(workdir, "daemon.log")
        self.out_path = os.path.join(workdir, "daemon.stdout")
        notify_path = os.path.join(workdir, "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(notify_path)
        self.notify.settimeout(0.5)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path, OPENAI_API_KEY="sk-hostile-test",
                   ANTHROPIC_API_KEY="sk-ant-hostile-test")
        for k in ("OPENAI_API_BASE", "ANTHROPIC_API_BASE", "OPENAI_API_SOCKET", "ANTHROPIC_API_SOCKET"):
            env.pop(k, None)
        self.cmd = [python, streamd, "serve", "--socket", self.path,
                    "--metrics-addr", "127.0.0.1:0", "--listen", "127.0.0.1:0",
                    "--openai-base", "http://127.0.0.1:%d/v1" % upstream_port,
                    "--anthropic-base", "http://127.0.0.1:%d" % (blackhole_port or 9)] + DAEMON_FLAGS + list(extra)
        self.log = open(self.log_path, "wb")
        self.out = open(self.out_path, "wb")
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=self.out, stderr=self.log, cwd=workdir)
        self.pid = self.proc.pid
        try:
            self._wait_ready(20.0)
            self.front = self._addr(r"msg=listening addr=(\S+):(\d+)")
            self.metrics = self._addr(r"msg=metrics addr=(\S+):(\d+)")
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError("streamd exited with %s before READY=1; log:\n%s"
                                   % (self.proc.returncode, self.logs()[-3000:]))
            try:
                if self.notify.recv(256) == b"READY=1":
                    return
            except socket.timeout:
                pass
        raise RuntimeError("streamd never said READY=1; log:\n%s" % self.logs()[-3000:])

    def _addr(self, pattern):
        m = re.search(pattern, self.logs())
        if not m:
            raise RuntimeError("no %r in the log:\n%s" % (pattern, self.logs()[-3000:]))
        return m.group(1), int(m.group(2))

    def logs(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def log_bytes(self):
        with open(self.log_path, "rb") as f:
            return f.read()

    def alive(self):
        return self.proc.poll() is None

    def rss_kb(self):
        with open("/proc/%d/status" % self.pid) as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))

    def fd_count(self):
        return len(os.listdir("/proc/%d/fd" % self.pid))

    def fd_listing(self):
        out = []
        for fd in sorted(os.listdir("/proc/%d/fd" % self.pid), key=int):
            try:
                out.append("%s -> %s" % (fd, os.readlink("/proc/%d/fd/%s" % (self.pid, fd))))
            except OSError:
                pass
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.log, self.out, self.notify):
            f.close()


# ------------------------------------------------------------ small helpers --

def now():
    return time.monotonic()


def recv_until(sock, deadline, stop=None, limit=8 << 20):
    """Read until EOF, `deadline`, stop(data) or `limit` bytes.
    Returns (data, how): how is "eof", "reset", "timeout", "stop" or "limit"."""
    data = bytearray()
    while True:
        left = deadline - now()
        if left <= 0:
            return bytes(data), "timeout"
        sock.settimeout(min(left, 1.0))
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return bytes(data), "reset"
        except OSError:
            return bytes(data), "reset"
        if not chunk:
            return bytes(data), "eof"
        data += chunk
        if stop is not None and stop(data):
            return bytes(data), "stop"
        if len(data) >= limit:
            return bytes(data), "limit"


def send_quiet(sock, data, deadline=None):
    """sendall that reports failure instead of raising (the peer may be gone)."""
    try:
        sock.settimeout(max(0.05, (deadline - now()) if deadline else 5.0))
        sock.sendall(data)
        return True
    except (OSError, socket.timeout):
        return False


def set_linger0(sock):
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def short(b, n=160):
    """repr of bytes, cut in the middle when long (for reports)."""
    if isinstance(b, str):
        b = b.encode("utf-8", "surrogatepass")
    if len(b) <= n:
        return repr(b)
    return "%r ... (%d bytes) ... %r" % (b[:n // 2], len(b), b[-n // 4:])


class Outcome:
    """What a client saw: kind is one of none, garbage, partial, status,
    done, error (an error event after a 200), incomplete (a 200 that did not
    end), ws (see ws fields)."""

    def __init__(self, kind, status=None, error_type=None, how=None, data=b"", detail=""):
        self.kind, self.status, self.error_type = kind, status, error_type
        self.how, self.data, self.detail = how, data, detail

    def __repr__(self):
        s = self.kind
        if self.status is not None:
            s += " %s" % self.status
        if self.error_type:
            s += " error=%s" % self.error_type
        if self.how:
            s += " (%s)" % self.how
        return s


_STATUS = re.compile(rb"HTTP/1\.[01] ([0-9]{3}) ")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def classify(data, how):
    """An HTTP answer (a handoff's or the front's) as an Outcome."""
    while data.startswith(CONTINUE):
        data = data[len(CONTINUE):]
    if not data:
        return Outcome("none", how=how)
    m = _STATUS.match(data)
    if not m:
        return Outcome("garbage", how=how, data=data)
    status = int(m.group(1))
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return Outcome("partial", status, how=how, data=data)
    head, body = data[:end].lower(), data[end + 4:]
    if status != 200 or b"text/event-stream" not in head:
        etype = None
        try:
            etype = json.loads(body.decode("utf-8"))["error"]["type"]
        except Exception:
            pass
        return Outcome("status", status, etype, how=how, data=data)
    events = body.split(b"\n\n")
    complete = [e for e in events[:-1] if e and not e.startswith(b":")]
    if complete and complete[-1] == b"data: [DONE]":
        return Outcome("done", 200, how=how, data=data)
    if complete and complete[-1].startswith(b'data: {"error":'):
        try:
            etype = json.loads(complete[-1][6:].decode("utf-8"))["error"]["type"]
        except Exception:
            etype = "?"
        return Outcome("error", 200, etype, how=how, data=data)
    return Outcome("incomplete", 200, how=how, data=data)


# ------------------------------------------------------------- WebSocket --

def ws_frame(opcode, payload=b"", fin=True, mask=True, rsv=0, length=None, key=None):
    """A client frame; `length` overrides the encoded length (lying frames)."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    mbit = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, mbit | n))
    elif n < 65536:
        head = bytes((b0, mbit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, mbit | 127)) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = key or b"\x37\xfa\x21\x3d"  # fixed: the bytes of a case stay the same per seed
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if len(payload) < 4096 else \
        (int.from_bytes(payload, "big") ^ int.from_bytes((key * (len(payload) // 4 + 1))[:len(payload)], "big")
         ).to_bytes(len(payload), "big")
    return head + key + masked


def ws_parse_server(data):
    """Server frames (unmasked) -> [(opcode, payload)], stopping at a partial frame."""
    out, pos = [], 0
    while len(data) - pos >= 2:
        b0, b1 = data[pos], data[pos + 1]
        n, at = b1 & 0x7F, pos + 2
        if n == 126:
            if len(data) < at + 2:
                break
            n, at = int.from_bytes(data[at:at + 2], "big"), at + 2
        elif n == 127:
            if len(data) < at + 8:
                break
            n, at = int.from_bytes(data[at:at + 8], "big"), at + 8
        if b1 & 0x80:
            at += 4  # a server must not mask; skip the key anyway
        if len(data) < at + n:
            break
        out.append((b0 & 0x0F, data[at:at + n]))
        pos = at + n
    return out


def ws_upgrade_request(path="/v1/ws", extra="", key=None, version="13"):
    key = key if key is not None else "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's example key
    return ("GET %s HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: %s\r\n%s\r\n" % (path, key, version, extra)).encode()


class WSOutcome:
    def __init__(self, upgraded, status, messages, close_code, how, frames=()):
        self.upgraded, self.status, self.messages = upgraded, status, messages
        self.close_code, self.how, self.frames = close_code, how, list(frames)

    def kind(self):
        """Like Outcome.kind for the stream part: done, status, error, incomplete."""
        for m in self.messages:
            if isinstance(m, dict) and m.get("type") == "done":
                return "done"
            if isinstance(m, dict) and m.get("type") == "error":
                return "status" if "status" in (m.get("error") or {}) else "error"
        return "incomplete"

    def error(self):
        for m in self.messages:
            if isinstance(m, dict) and m.get("type") == "error":
                return m.get("error") or {}
        return {}

    def __repr__(self):
        return "ws(upgraded=%s status=%s close=%s kind=%s how=%s msgs=%d)" % (
            self.upgraded, self.status, self.close_code, self.kind(), self.how, len(self.messages))


# ---------------------------------------------------------- hostile upstream --

WORDS = ["Hello", " from", " the", " hostile", " upstream", ",", " streamd", "!", " 😀", " 中文", " naïve"]


def oa_chunk(obj):
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def oa_content(text):
    return oa_chunk({"id": "chatcmpl-h", "object": "chat.completion.chunk", "created": 0, "model": "h",
                     "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


def valid_events(rng, n=None, done=True):
    n = rng.randint(1, 12) if n is None else n
    evs = [oa_content(rng.choice(WORDS)) for _ in range(n)]
    evs.append(oa_chunk({"id": "chatcmpl-h", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    evs.append(oa_chunk({"id": "chatcmpl-h", "choices": [],
                         "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}}))
    if done:
        evs.append(b"data: [DONE]\n\n")
    return evs


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"


def chunked(pieces):
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"


class Expect:
    """What a client must see for an upstream scenario: `done` allowed, the
    statuses allowed before the head, the error-event types allowed after it;
    `open`: the stream never ends by itself (the client leaves).  `deadline`:
    seconds from the request by which the answer must be complete (plus SLACK)."""

    def __init__(self, done=False, statuses=(), errors=(), open=False, deadline=4.0, note=False):
        self.done, self.statuses, self.errors = done, frozenset(statuses), frozenset(errors)
        self.open, self.deadline, self.note = open, deadline, note

    def __repr__(self):
        parts = ["done"] if self.done else []
        parts += ["status %s" % "/".join(map(str, sorted(self.statuses)))] if self.statuses else []
        parts += ["error %s" % "/".join(sorted(self.errors))] if self.errors else []
        return "Expect(%s%s, by %gs)" % (" or ".join(parts) or "-", ", open" if self.open else "", self.deadline)


DONE = Expect(done=True, deadline=4.0)
E502 = Expect(statuses={502}, deadline=3.0)
UPERR = Expect(errors={"upstream_error"}, deadline=3.0)
UPERR_OR_TIMEOUT = Expect(errors={"upstream_error", "timeout"}, deadline=IDLE_TIMEOUT + 1.5)
OPEN = Expect(open=True)


class HostileUpstream:
    """A threaded HTTP/1.1 server on 127.0.0.1 that answers each request with
    one hostile scenario: the one its X-Test-Pattern names ("h:<name>:<tag>"),
    else one chosen by its own seeded RNG.  It keeps a valid keep-alive
    connection open for the next request; every other scenario closes."""

    MAX_LIFE = 25.0  # no connection thread lives longer than this

    def __init__(self, seed=0):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.rng = random.Random("upstream:%s" % seed)
        self.lock = threading.Lock()
        self.conns = set()
        self.threads = set()
        self.counts = collections.Counter()
        self.hangups = {}   # tag -> threading.Event, set when the daemon hung up mid-scenario
        self.errors = []    # harness errors (bugs in this class)
        self.stopped = False
        self.acceptor = threading.Thread(target=self._accept_loop, name="hostile-upstream", daemon=True)
        self.acceptor.start()

    def _accept_loop(self):
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self.lock:
                self.conns.add(conn)
                self.threads.add(t)
            t.start()

    def hangup_event(self, tag):
        with self.lock:
            return self.hangups.setdefault(str(tag), threading.Event())

    def close_connections(self):
        """Close every connection (the listener stays): the daemon's pooled
        ones become dead, so its next checkout discards them."""
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        end = now() + 5
        while now() < end:
            with self.lock:
                if not self.conns:
                    return True
            time.sleep(0.02)
        return False

    def close(self):
        self.stopped = True
        self.sock.close()
        self.close_connections()
        self.acceptor.join(5)
        with self.lock:
            threads = list(self.threads)
        for t in threads:
            t.join(5)

    # -- one connection --

    def _serve(self, conn):
        born = now()
        try:
            buf = b""
            while not self.stopped and now() - born < self.MAX_LIFE:
                req, buf = self._read_request(conn, buf, born)
                if req is None:
                    return
                name, tag = req
                with self.lock:
                    self.counts[name] += 1
                fn = SCENARIOS[name][0]
                rng = random.Random("%s:%s" % (name, tag))
                ctx = _UpCtx(self, conn, tag, born)
                if not fn(ctx, rng):
                    return
        except (OSError, ValueError):
            return
        except Exception:  # a bug in a scenario: report it, never raise in a thread
            self.errors.append(traceback.format_exc())
        finally:
            try:
                conn.close()
            except OSError:
                pass
            with self.lock:
                self.conns.discard(conn)
                self.threads.discard(threading.current_thread())

    def _read_request(self, conn, buf, born):
        deadline = min(born + self.MAX_LIFE, now() + 10)
        while b"\r\n\r\n" not in buf:
            data, how = recv_until(conn, deadline, stop=lambda d: b"\r\n\r\n" in d, limit=1 << 20)
            if how in ("eof", "reset", "timeout") and b"\r\n\r\n" not in buf + data:
                return None, b""
            buf += data
        head, buf = buf.split(b"\r\n\r\n", 1)
        headers = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0") or 0)
        pattern = headers.get("x-test-pattern", "")
        m = re.fullmatch(r"h:([a-z0-9_]+):(\S+)", pattern)
        if m and m.group(1).startswith("early_") and m.group(1) in SCENARIOS:
            return (m.group(1), m.group(2)), b""  # answers without reading the body
        while len(buf) < n:
            data, how = recv_until(conn, deadline, stop=lambda d: len(buf) + len(d) >= n)
            if not data:
                return None, b""
            buf += data
        buf = buf[n:]
        if m and m.group(1) in SCENARIOS:
            return (m.group(1), m.group(2)), buf
        with self.lock:
            name = self.rng.choice(SCENARIO_NAMES)
            tag = "u%d" % self.rng.randrange(1 << 30)
        return (name if pattern != "valid" else "valid_chunked", tag), buf


class Blackhole:
    """A listener whose accept queue is full and never drained: a connect to
    it hangs (SYNs are dropped) until the connector's timeout."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(4):
            c = socket.socket()
            c.setblocking(False)
            try:
                c.connect(("127.0.0.1", self.port))
            except (BlockingIOError, OSError):
                pass
            self.fillers.append(c)
        time.sleep(0.1)

    def close(self):
        for c in self.fillers:
            c.close()
        self.sock.close()


class _UpCtx:
    """What a scenario writes with; every wait notices the daemon hanging up."""

    def __init__(self, up, conn, tag, born):
        self.up, self.conn, self.tag, self.born = up, conn, tag, born

    def send(self, data):
        try:
            self.conn.settimeout(5)
            self.conn.sendall(data)
            return True
        except OSError:
            self.hung_up()
            return False

    def send_split(self, data, rng, max_piece=64):
        pos = 0
        while pos < len(data):
            n = rng.randint(1, max_piece)
            if not self.send(data[pos:pos + n]):
                return False
            pos += n
            if rng.random() < 0.2:
                time.sleep(0.001)
        return True

    def wait(self, seconds):
        """Sleep up to `seconds`; True if the daemon hung up meanwhile."""
        end = min(now() + seconds, self.born + HostileUpstream.MAX_LIFE)
        while True:
            left = end - now()
            if left <= 0:
                return self.up.stopped
            try:
                r, _, _ = select.select([self.conn], [], [], min(left, 0.5))
            except (OSError, ValueError):
                self.hung_up()
                return True
            if r:
                try:
                    data = self.conn.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self.hung_up()
                    return True

    def hung_up(self):
        self.up.hangup_event(self.tag).set()

    def trickle(self, data, every):
        """One byte per `every` seconds, until done or the daemon hangs up."""
        for i in range(len(data)):
            if not self.send(data[i:i + 1]):
                return False
            if self.wait(every):
                return False
        return True

    def cut(self, rst=False):
        if rst:
            set_linger0(self.conn)
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return False


# Each scenario: fn(ctx, rng) -> keep the connection for another request?
def _sc_valid(framing):
    def fn(c, rng):
        evs = valid_events(rng)
        if framing == "chunked":
            return c.send(SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(evs))
        body = b"".join(evs)
        if framing == "length":
            return c.send(SSE_HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        if framing == "split":
            return c.send_split(SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(evs), rng)
        if framing == "http10":
            c.send(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + body)
            return c.cut()
        c.send(SSE_HEAD + b"Connection: close\r\n\r\n" + body)
        return c.cut()
    return fn


def _sc_head_then_close(*raws):
    def fn(c, rng):
        c.send(rng.choice(raws))
        return c.cut()
    return fn


def _sc_body(head_extra, body, close=True):
    """A 200 SSE head (+ head_extra) then raw body bytes, then close."""
    def fn(c, rng):
        data = body(rng) if callable(body) else body
        if not c.send(SSE_HEAD + head_extra + b"\r\n"):
            return False
        c.send(data)
        return c.cut() if close else True
    return fn


def _sc_chunked_events(make):
    """A valid chunked stream whose events `make(rng)` returns."""
    def fn(c, rng):
        return c.send(SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(make(rng)))
    return fn


def _with(rng, bad, before=2):
    return [oa_content(rng.choice(WORDS)) for _ in range(before)] + [bad] + valid_events(rng, 1)


def _last(rng, bad):
    """A valid stream with `bad` as its last event before [DONE] (a usage event
    that is not overwritten by a later one)."""
    return valid_events(rng, done=False) + [bad, b"data: [DONE]\n\n"]


SHAPES = [
    {"choices": 5}, {"choices": "s"}, {"choices": {}}, {"choices": [5]}, {"choices": ["s"]},
    {"choices": [None]}, {"choices": [[1]]}, {"choices": [{"delta": 5}]}, {"choices": [{"delta": "x"}]},
    {"choices": [{"delta": [1]}]}, {"choices": [{"delta": {"content": 5}}]},
    {"choices": [{"delta": {"content": ["a"]}}]}, {"choices": [{"delta": {"content": {"a": 1}}}]},
    {"choices": [{"finish_reason": 5}]}, {"choices": [{"finish_reason": {"a": 1}}]},
    {"choices": [{"delta": None}]}, {"choices": [{"delta": {"content": None}}]},
    {"usage": 5}, {"usage": "s"}, {"usage": [1]}, {"usage": {"prompt_tokens": "x"}},
    {"usage": {"prompt_tokens": 1e308}}, {"usage": {"total_tokens": None}},
    {"error": None}, {"error": False}, {"error": 0}, {"error": ""}, {"error": []},
    {"error": "boom"}, {"error": 5}, {"error": {"message": ["x"]}}, {"error": {"message": {"a": 1}}},
    {"error": {"type": 5, "message": 5}}, {"choices": [{"delta": {"content": "\ud800"}}]},
]


def _shape_events(rng):
    shape = rng.choice(SHAPES)
    try:
        bad = oa_chunk(shape)
    except (UnicodeEncodeError, ValueError):
        bad = b"data: " + json.dumps(shape).encode() + b"\n\n"
    return _last(rng, bad) if "usage" in shape else _with(rng, bad)


def _sc_interim(n, every=0.0, then_valid=True):
    def fn(c, rng):
        line = rng.choice([b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n",
                           b"HTTP/1.1 102 Processing\r\n\r\n"])
        if every:
            for _ in range(n):
                if not c.send(line) or c.wait(every):
                    return False
        elif then_valid:  # the interim heads and the real one in one packet
            return c.send(line * n + SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(valid_events(rng)))
        elif not c.send(line * n):
            return False
        return c.cut()
    return fn


def _sc_heartbeat_forever(c, rng):
    if not c.send(SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked([oa_content("hi")])[:-5]):
        return False
    while not c.up.stopped:
        if not c.send(b"8\r\n: ping\n\n\r\n") or c.wait(0.2):
            return False
    return False


def _sc_slowloris_head(c, rng):
    c.trickle(SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(valid_events(rng, 1)), 0.1)
    return False


def _sc_slowloris_body(c, rng):
    if c.send(SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"):
        c.trickle(chunked(valid_events(rng, 3)), 0.1)
    return False


def _sc_no_answer(c, rng):
    c.wait(HostileUpstream.MAX_LIFE)
    return False


def _sc_status_body(status_line, body, extra=b""):
    def fn(c, rng):
        b = body(rng) if callable(body) else body
        c.send(status_line + b"\r\nContent-Type: application/json\r\n" + extra
               + b"Content-Length: %d\r\n\r\n" % len(b) + b)
        return c.cut()
    return fn


def _sc_cut_mid_body(rst):
    def fn(c, rng):
        data = SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(valid_events(rng, 4))
        c.send(data[:len(SSE_HEAD) + 40 + rng.randrange(len(data) - len(SSE_HEAD) - 50)])
        time.sleep(0.01)
        return c.cut(rst)
    return fn


def _random_bytes(c, rng):
    c.send(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 4000))))
    if rng.random() < 0.5:
        c.wait(0.3)
    return c.cut()


SCENARIOS = {
    # valid streams: some proxied streams must succeed
    "valid_chunked": (_sc_valid("chunked"), DONE),
    "valid_length": (_sc_valid("length"), DONE),
    "valid_eof": (_sc_valid("eof"), DONE),
    "valid_split": (_sc_valid("split"), DONE),
    "valid_http10": (_sc_valid("http10"), DONE),
    "valid_big_header": (lambda c, rng: c.send(SSE_HEAD + b"X-Big: " + b"b" * 60000 + b"\r\n"
                                               b"Transfer-Encoding: chunked\r\n\r\n" + chunked(valid_events(rng))),
                         DONE),
    "valid_many_events": (_sc_chunked_events(lambda rng: [oa_content("x")] * 3000 + valid_events(rng, 1)), DONE),
    "valid_bad_utf8": (_sc_chunked_events(lambda rng: _with(rng, b'data: {"choices":[{"delta":{"content":"\xff\xfe'
                                                                 b'\xc3"}}]}\n\n')), Expect(done=True, errors={"upstream_error"})),
    "valid_surrogate": (_sc_chunked_events(lambda rng: _with(rng, b'data: {"choices":[{"delta":{"content":'
                                                                  b'"\\ud800x"}}]}\n\n')), DONE),
    # bad status lines and heads: a real status (502), never a 500
    "status_4": (_sc_head_then_close(b"HTTP/1.1 4\r\n\r\n", b"HTTP/1.1 4 Bad\r\n\r\n"), E502),
    "status_40000": (_sc_head_then_close(b"HTTP/1.1 40000\r\n\r\n", b"HTTP/1.1 40000 Huge\r\n\r\n"), E502),
    "status_99": (_sc_head_then_close(b"HTTP/1.1 99\r\n\r\n", b"HTTP/1.1 99 Low\r\nContent-Length: 0\r\n\r\n"), E502),
    "status_garbage": (_sc_head_then_close(b"garbage\r\n\r\n", b"garbage", b"HTTP/1.1\r\n\r\n",
                                           b"HTTP/1.1 \r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n"), E502),
    "status_http2": (_sc_head_then_close(b"HTTP/2 200\r\ncontent-type: text/event-stream\r\n\r\ndata: x\n\n",
                                         b"HTTP/2 200\r\n\r\n", b"HTTP/2.0 200 OK\r\n\r\n"), E502),
    "status_digits_unicode": (_sc_head_then_close("HTTP/1.1 ２００ OK\r\n\r\n".encode()), E502),
    "status_sign": (_sc_head_then_close(b"HTTP/1.1 +20 OK\r\n\r\n"), E502),
    "status_empty": (_sc_head_then_close(b"\r\n\r\n"), E502),
    "head_too_big": (_sc_head_then_close(SSE_HEAD + b"X-Big: " + b"b" * 70000 + b"\r\n\r\n"),
                     Expect(statuses={502}, deadline=3.0, note=True)),
    "head_bad_line": (_sc_head_then_close(SSE_HEAD + b"NoColonHere\r\n\r\n"), E502),
    "head_space_name": (_sc_head_then_close(SSE_HEAD + b" Folded: x\r\n\r\n"), E502),
    "head_many": (_sc_head_then_close(SSE_HEAD + b"".join(b"X-%d: y\r\n" % i for i in range(5000))
                                      + b"\r\n"), Expect(statuses={502}, errors={"upstream_error"}, deadline=3.0)),
    "cl_5000_digits": (_sc_head_then_close(SSE_HEAD + b"Content-Length: " + b"9" * 5000 + b"\r\n\r\ndata: x\n\n"),
                       E502),
    "cl_negative": (lambda c, rng: c.send(SSE_HEAD + b"Content-Length: -1\r\n\r\n" + b"".join(valid_events(rng)))
                    and c.cut(), E502),
    "cl_conflict": (lambda c, rng: c.send(SSE_HEAD + b"Content-Length: 5\r\nContent-Length: 900\r\n\r\n"
                                          + b"".join(valid_events(rng))) and c.cut(), E502),
    "cl_plus": (lambda c, rng: (lambda body: c.send(SSE_HEAD + b"Content-Length: +%d\r\n\r\n" % len(body) + body)
                                and c.cut())(b"".join(valid_events(rng))),
                Expect(statuses={502}, deadline=3.0, note=True)),
    "cl_underscore": (lambda c, rng: (lambda body: c.send(SSE_HEAD + b"Content-Length: %s\r\n\r\n"
                                                          % ("{:_}".format(len(body)).encode()) + body)
                                      and c.cut())(b"".join(valid_events(rng, 300))),
                      Expect(statuses={502}, deadline=3.0, note=True)),
    "content_encoding": (lambda c, rng: c.send(SSE_HEAD + b"Content-Encoding: gzip\r\nContent-Length: 4\r\n\r\nabcd")
                         and c.cut(), E502),
    # chunked framing
    "chunk_bad_hex": (_sc_body(b"Transfer-Encoding: chunked\r\n", b"zz\r\nhello\r\n0\r\n\r\n"), UPERR),
    "chunk_giant_hex": (_sc_body(b"Transfer-Encoding: chunked\r\n",
                                 lambda rng: b"f" * 5000 + b"\r\n" + b"".join(valid_events(rng))), UPERR_OR_TIMEOUT),
    "chunk_giant_hex_open": (_sc_body(b"Transfer-Encoding: chunked\r\n",
                                      lambda rng: b"f" * 5000 + b"\r\n" + b"".join(valid_events(rng)), close=False),
                             UPERR_OR_TIMEOUT),
    "chunk_negative": (_sc_body(b"Transfer-Encoding: chunked\r\n", b"-1\r\nx\r\n0\r\n\r\n"), UPERR),
    "chunk_0x": (_sc_body(b"Transfer-Encoding: chunked\r\n",
                          lambda rng: b"".join(b"0x%x\r\n%s\r\n" % (len(e), e) for e in valid_events(rng))
                          + b"0\r\n\r\n"), Expect(errors={"upstream_error"}, deadline=3.0, note=True)),
    "chunk_overlong_data": (_sc_body(b"Transfer-Encoding: chunked\r\n",
                                     lambda rng: b"5\r\n" + valid_events(rng)[0] + b"\r\n0\r\n\r\n"), UPERR),
    "chunk_header_huge": (_sc_body(b"Transfer-Encoding: chunked\r\n", b"1" + b";ext=" + b"e" * 9000), UPERR),
    # SSE and JSON
    "sse_line_1mib": (_sc_body(b"Connection: close\r\n", b"data: " + b"x" * (1024 * 1024 + 100)), UPERR),
    "sse_event_1mib": (_sc_body(b"Connection: close\r\n", (b"data: " + b"y" * 1000 + b"\n") * 1100), UPERR),
    "deep_json": (_sc_chunked_events(lambda rng: _with(rng, b"data: " + b"[" * 100000 + b"\n\n")), UPERR),
    "deep_json_object": (_sc_chunked_events(lambda rng: _with(rng, b"data: " + b'{"a":' * 50000 + b"1\n\n")), UPERR),
    "non_json": (_sc_chunked_events(lambda rng: _with(rng, b"data: hello there\n\n")), UPERR),
    "not_object": (_sc_chunked_events(lambda rng: _with(rng, b"data: [1,2]\n\n")), UPERR),
    "nan_json": (_sc_chunked_events(lambda rng: _last(rng, b'data: {"choices":[{"delta":{"content":"x"}}],'
                                                            b'"usage":{"prompt_tokens":NaN}}\n\n')),
                 Expect(done=True, errors={"upstream_error"})),
    "error_midstream": (_sc_chunked_events(lambda rng: _with(rng, oa_chunk(
        {"error": {"message": "boom mid-stream", "type": "server_error"}}))), UPERR),
    "error_event_name": (_sc_chunked_events(lambda rng: _with(rng, b"event: error\ndata: {}\n\n")), UPERR),
    "shape_fuzz": (_sc_chunked_events(_shape_events), Expect(done=True, errors={"upstream_error"})),
    "no_done": (_sc_chunked_events(lambda rng: valid_events(rng, done=False)), UPERR),
    "done_then_garbage": (_sc_chunked_events(lambda rng: valid_events(rng) + [b"data: garbage\n\n"]),
                          Expect(done=True, errors={"upstream_error"})),
    "html_body": (lambda c, rng: c.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 13\r\n\r\n"
                                        b"<html></html>") and c.cut(), UPERR),
    # cut connections, random bytes
    "random_bytes": (_random_bytes, Expect(statuses={502, 504}, deadline=HEADER_TIMEOUT + 1.5)),
    "close_at_once": (lambda c, rng: c.cut(rng.random() < 0.5), E502),
    "cut_mid_head": (_sc_head_then_close(SSE_HEAD[:30]), E502),
    "cut_mid_body": (_sc_cut_mid_body(False), UPERR),
    "rst_mid_body": (_sc_cut_mid_body(True), UPERR),
    # error statuses
    "status_400_json": (_sc_status_body(b"HTTP/1.1 400 Bad", b'{"error":{"message":"nope","type":"x"}}'), E502),
    "status_500_deep": (_sc_status_body(b"HTTP/1.1 500 Oops", b"[" * 4000), E502),
    "status_500_text": (_sc_status_body(b"HTTP/1.1 500 Oops", lambda rng: bytes(rng.getrandbits(8) for _ in range(300))),
                        E502),
    "status_429": (_sc_status_body(b"HTTP/1.1 429 Slow down", b"{}", b"Retry-After: 99999999999999999999\r\n"),
                   Expect(statuses={503}, deadline=3.0)),
    "status_503_nan": (_sc_status_body(b"HTTP/1.1 503 Busy", b"{}", b"Retry-After: nan\r\nretry-after-ms: inf\r\n"),
                       Expect(statuses={503}, deadline=3.0)),
    "valid_then_junk": (lambda c, rng: c.send(SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
                                              + chunked(valid_events(rng)) + b"junk after the response")
                        and c.wait(0.5) and False, DONE),
    "flood": (_sc_chunked_events(lambda rng: [oa_content("f" * 1000)] * 600 + valid_events(rng, 1)),
              Expect(done=True, deadline=8.0)),
    "usage_inf": (_sc_chunked_events(lambda rng: _last(rng, b'data: {"choices":[],"usage":{"prompt_tokens":1e999,'
                                                             b'"completion_tokens":-1e999,"total_tokens":1}}\n\n')),
                  Expect(done=True, errors={"upstream_error"})),
    "usage_huge_int": (_sc_chunked_events(lambda rng: _last(rng, b'data: {"choices":[],"usage":{"prompt_tokens":'
                                                                  + b"9" * 5000 + b"}}\n\n")),
                       Expect(done=True, errors={"upstream_error"})),
    "interim_with_body": (_sc_head_then_close(b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\nhello"
                                              + SSE_HEAD + b"\r\n"), Expect(statuses={502}, errors={"upstream_error"})),
    "te_gzip_chunked": (lambda c, rng: c.send(SSE_HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n"
                                              + chunked([b"\x1f\x8b\x08\x00garbage"])) and c.cut(),
                        Expect(statuses={502}, errors={"upstream_error"})),
    "status_204": (_sc_head_then_close(b"HTTP/1.1 204 No Content\r\n\r\n"), Expect(statuses={502}, errors={"upstream_error"})),
    "status_101": (_sc_head_then_close(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n\x00\x00\x12\x04"),
                   Expect(statuses={502, 504})),
    # answers before reading the request body (a big prompt is still being sent)
    "early_response": (lambda c, rng: c.send(SSE_HEAD + b"Connection: close\r\n\r\n" + b"".join(valid_events(rng)))
                       and c.wait(0.3) and False, Expect(done=True, statuses={502}, errors={"upstream_error"})),
    "early_rst": (lambda c, rng: c.cut(rst=True), Expect(statuses={502})),
    "early_never_read": (lambda c, rng: c.wait(HostileUpstream.MAX_LIFE) and False,
                         Expect(statuses={504}, deadline=HEADER_TIMEOUT + 1.0)),
    "early_error_status": (lambda c, rng: c.send(b"HTTP/1.1 413 Too Large\r\nContent-Length: 2\r\n\r\n{}")
                           and c.wait(0.3) and False, Expect(statuses={502})),
    "trailers_forever": (lambda c, rng: c.send(SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
                                               + chunked(valid_events(rng))[:-2])
                         and all(c.send(b"X-T: %d\r\n" % i) and not c.wait(0.2) for i in range(200)) and False, OPEN),
    # interim responses
    "interim_flood": (_sc_interim(2000), Expect(done=True, statuses={502})),
    "interim_one": (_sc_interim(1), DONE),   # one 1xx and the real head in the same packet
    "interim_few": (_sc_interim(3), DONE),
    "interim_slow_forever": (_sc_interim(100, every=0.3, then_valid=False),
                             Expect(statuses={502, 504}, deadline=HEADER_TIMEOUT + 1.0)),
    # slow and silent upstreams
    "no_answer": (_sc_no_answer, Expect(statuses={504}, deadline=HEADER_TIMEOUT + 1.0)),
    "slowloris_head": (_sc_slowloris_head, Expect(statuses={504}, deadline=HEADER_TIMEOUT + 1.0)),
    "slowloris_body": (_sc_slowloris_body, OPEN),
    "heartbeat_forever": (_sc_heartbeat_forever, OPEN),
}
SCENARIO_NAMES = sorted(SCENARIOS)
OPEN_SCENARIOS = [n for n in SCENARIO_NAMES if SCENARIOS[n][1].open]


def check_expect(exp, kind, status, etype):
    """None if (kind, status, error type) is what `exp` allows, else why not."""
    if kind == "done":
        return None if exp.done else "got [DONE], expected %r" % exp
    if kind == "status":
        if status == 500 or etype == "internal_error":
            return "got a 500/internal_error for an upstream's fault (expected %r)" % exp
        return None if status in exp.statuses else "got status %s, expected %r" % (status, exp)
    if kind == "error":
        if etype == "internal_error":
            return "got an internal_error event for an upstream's fault (expected %r)" % exp
        return None if etype in exp.errors else "got error event %s, expected %r" % (etype, exp)
    if exp.open and kind in ("incomplete", "none"):
        return None
    return "got %s (status %s), expected %r" % (kind, status, exp)


# ---------------------------------------------------------------- the cases --

class Env:
    """What the cases share: the daemon, the upstream, counters, findings."""

    def __init__(self, daemon, upstream, seed):
        self.d, self.up, self.seed = daemon, upstream, seed
        self.lock = threading.Lock()
        self.violations = []
        self.notes = []
        self.harness_errors = []
        self.expected_reasons = collections.Counter()
        self.counts = collections.Counter()     # by class
        self.kinds = collections.Counter()      # by class.kind
        self.local = threading.local()

    def violation(self, case, category, message, note=False):
        v = {"seed": self.seed, "case": case.index, "cls": case.cls, "kind": case.kind,
             "category": category, "message": message, "desc": case.desc}
        with self.lock:
            (self.notes if note else self.violations).append(v)

    def expect_reason(self, reason):
        with self.lock:
            self.expected_reasons[reason] += 1

    def tcp_pair(self):
        """(client end, server end) of a real TCP connection, via a listener
        of this thread (so concurrent threads never take each other's)."""
        lst = getattr(self.local, "listener", None)
        if lst is None:
            lst = self.local.listener = socket.socket()
            lst.bind(("127.0.0.1", 0))
            lst.listen(16)
            lst.settimeout(5)
        c = socket.create_connection(lst.getsockname(), timeout=5)
        try:
            s, _ = lst.accept()
        except BaseException:
            c.close()
            raise
        return c, s

    def close_thread(self):
        lst = getattr(self.local, "listener", None)
        if lst is not None:
            lst.close()
            self.local.listener = None


class Case:
    def __init__(self, index, cls, kind, desc, run):
        self.index, self.cls, self.kind, self.desc, self.run = index, cls, kind, desc, run

    def __repr__(self):
        return "case %d %s.%s: %s" % (self.index, self.cls, self.kind, self.desc)


# -- handoff helpers --

def send_handoff(env, data, fds, timeout=5.0, sndbuf=None):
    """One SEQPACKET handoff message (`data`, SCM_RIGHTS `fds`); returns the Unix socket, still open."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        if sndbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        s.settimeout(timeout)
        s.connect(env.d.path)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        s.sendmsg([data] if data else [], anc)
    except BaseException:
        s.close()
        raise
    return s


def wait_closed_by_daemon(sock, deadline):
    """True once the daemon closed its end of our Unix socket."""
    _, how = recv_until(sock, deadline)
    return how in ("eof", "reset")


def mock_request(rng):
    req = {"prompt": rng.choice(["hi", "Hello there", "ünïcode 😀", "x" * rng.randint(0, 3000)])}
    if rng.random() < 0.3:
        req["include_usage"] = True
    if rng.random() < 0.2:
        req["messages"] = [{"role": "user", "content": [{"type": "text", "text": "part"}]}]
    if rng.random() < 0.2:
        req["request_id"] = "r%d" % rng.randrange(1 << 20)
    return req


# Bad handoff data: (label, bytes, expected status: 400 or (200, 400) for either)
def _bad_data(rng):
    surrogate = b'"\\ud800"'
    fields_wrong = [
        b'{"prompt": 5}', b'{"prompt": ["x"]}', b'{"messages": "x"}', b'{"messages": [5]}',
        b'{"messages": [{"role": "", "content": "x"}]}', b'{"messages": [{"role": "user", "content": 5}]}',
        b'{"messages": [{"role": "user", "content": [{"type": "image", "text": "x"}]}]}',
        b'{"messages": [{"role": "user", "content": [5]}]}', b'{"max_tokens": 0}', b'{"max_tokens": "5"}',
        b'{"max_tokens": true}', b'{"max_tokens": 1.5}', b'{"temperature": "hot"}', b'{"top_p": [1]}',
        b'{"user_id": 1.5}', b'{"user_id": {}}', b'{"include_usage": "yes"}', b'{"include_usage": 1}',
        b'{"response_headers": []}', b'{"response_headers": "x"}', b'{"langgraph_input": []}',
        b'{"stream_mode": 5}', b'{"stream_mode": []}', b'{"stream_mode": [1]}', b'{"model": 5}',
        b'{"backend": 5}', b'{"request_id": 5}', b'{"test_pattern": 5}', b'{"system": {}}',
        b'{"thread_id": []}', b'{"assistant_id": 1}',
    ]
    choices = [
        ("random_bytes", lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000))), (200, 400)),
        ("invalid_utf8", lambda: b'{"prompt": "\xff\xfe\xc3("}', 400),
        ("overlong_utf8", lambda: b'{"prompt": "\xc0\xaf"}', 400),
        ("deep_array", lambda: b"[" * rng.choice([1000, 5000, 100000]), 400),
        ("deep_object", lambda: b'{"a":' * rng.choice([1000, 5000, 50000]), 400),
        ("deep_in_messages", lambda: b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
        ("giant_int_5000", lambda: b'{"max_tokens": ' + b"9" * 5000 + b"}", 400),
        ("giant_int_user", lambda: b'{"user_id": ' + b"7" * rng.choice([4301, 10000]) + b"}", 400),
        ("float_1e400", lambda: b'{"temperature": 1e400}', 400),
        ("nan", lambda: b'{"temperature": NaN}', 400),
        ("infinity", lambda: b'{"top_p": -Infinity}', 400),
        ("wrong_type", lambda: rng.choice(fields_wrong), 400),
        ("not_object", lambda: rng.choice([b"[]", b"1", b'"s"', b"null", b"true", b"[{}]"]), 400),
        ("surrogate_name", lambda: b'{"%s": %s}' % (rng.choice([b"request_id", b"model", b"backend", b"test_pattern",
                                                                 b"thread_id", b"assistant_id"]), surrogate), 400),
        ("control_test_pattern", lambda: b'{"test_pattern": "a\\r\\nX-Injected: 1"}', 400),
        ("unknown_backend", lambda: b'{"backend": "%s"}' % rng.choice([b"gemini", b"nope", b"", b"MOCK", b"mock "]), 400),
        ("trailing_garbage", lambda: b'{"prompt": "x"} {"prompt": "y"}', 400),
        ("nul_inside", lambda: b'{"prompt":\0"x"}', 400),
        ("bom", lambda: b'\xef\xbb\xbf{"prompt":"x"}', (200, 400)),
        ("utf16", lambda: '{"prompt":"x"}'.encode("utf-16-le"), 400),
        ("truncated", lambda: b'{"prompt": "x', 400),
    ]
    label, make, expected = rng.choice(choices)
    data = make()
    if label == "random_bytes":
        try:  # random bytes are (almost) never a JSON object; decide exactly
            obj = json.loads(data.strip(b"\x00 \t\r\n") or b"{}")
            expected = (200, 400) if isinstance(obj, dict) else 400
        except (ValueError, RecursionError):
            expected = 400
    return label, data, expected


def _odd_valid(rng):
    """Handoff data streamd must serve (200), with odd contents."""
    ctrl = "".join(chr(c) for c in list(range(0, 32)) + [127, 0x85, 0x9b, 0x2028, 0x202e])
    choices = [
        ("control_request_id", {"request_id": "id" + ctrl + "\x1b[31mred"}),
        ("control_bare", {"request_id": "\x1b[2J\x1b[31mred\x7f\x9b1m\x00", "user_id": "\x1b]0;t\x07"}),
        ("big_request_id", {"request_id": "r" * 100000}),
        ("control_model", {"model": "m\x1b]0;title\x07" + ctrl, "user_id": "u\r\nlevel=critical msg=forged"}),
        ("surrogate_prompt", None),
        ("int_4000", {"user_id": 10 ** 3999, "max_tokens": 10 ** 100}),
        ("header_injection", {"response_headers": {"X-A": "v\r\nX-Injected: 1", "X-B\r\nX-Injected": "v",
                                                   "Content-Length": "0", "Connection": "keep-alive",
                                                   "Transfer-Encoding": "chunked", "Proxy-X": "1",
                                                   "X-Ok": "fine", "X-Uni": "ünï", "": "e", "X-Nul": "a\0b"}}),
        ("empty", b""), ("nul", b"\0"), ("whitespace", b" \t\r\n "),
        ("unknown_keys", {"zzz": [1, {"a": None}], "prompt": None, "messages": None}),
        ("empty_messages", {"messages": []}),
        ("long_prompt", {"prompt": "p" * 120000}),
    ]
    label, obj = rng.choice(choices)
    if label == "surrogate_prompt":
        data = b'{"prompt": "a\\ud800b", "system": "\\udfff", "user_id": "\\ud83d"}'
    elif isinstance(obj, bytes):
        data = obj
    else:
        data = json.dumps(obj).encode()
    return label, data


FD_KINDS = ["socketpair", "pipe_r", "pipe_w", "devnull", "listen_tcp", "udp", "unconnected_tcp", "unix_dgram",
            "seqpacket_pair", "file"]
BAD_FD_KINDS = {"pipe_r", "pipe_w", "devnull", "udp", "unix_dgram", "seqpacket_pair", "file", "listen_tcp"}


class FdBag:
    """fds made for one handoff, the ends we keep to watch them close, and
    cleanup of everything."""

    def __init__(self, env):
        self.env = env
        self.to_send = []    # raw fds we send (and close after sending)
        self.objects = []    # socket objects owning sent fds
        self.watch = []      # (kind, object we keep) whose EOF proves the daemon closed its copy
        self.keep = []       # other things to close at the end

    def make(self, kind, client_wanted=False):
        if kind == "socketpair":
            a, b = socket.socketpair()
            self.objects.append(b)
            self.to_send.append(b.fileno())
            (self.keep if client_wanted else self.watch).append(("socketpair", a) if not client_wanted else a)
            return a
        if kind == "seqpacket_pair":
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.objects.append(b)
            self.to_send.append(b.fileno())
            self.watch.append(("seqpacket_pair", a))
            return None
        if kind in ("pipe_r", "pipe_w"):
            r, w = os.pipe()
            sent, kept = (r, w) if kind == "pipe_r" else (w, r)
            self.to_send.append(sent)
            self.objects.append(sent)
            self.watch.append((kind, kept))
            return None
        if kind in ("devnull", "file"):
            fd = os.open(os.devnull if kind == "devnull" else __file__, os.O_RDONLY)
            self.to_send.append(fd)
            self.objects.append(fd)
            return None
        sock = {"listen_tcp": lambda: socket.socket(), "udp": lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
                "unconnected_tcp": lambda: socket.socket(),
                "unix_dgram": lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)}[kind]()
        if kind == "listen_tcp":
            sock.bind(("127.0.0.1", 0))
            sock.listen(4)
        self.objects.append(sock)
        self.to_send.append(sock.fileno())
        return None

    def sent(self):
        """After sendmsg: close our copies of the sent fds."""
        for o in self.objects:
            if isinstance(o, int):
                os.close(o)
            else:
                o.close()
        self.objects = []

    def check_watched_closed(self, case, deadline):
        """Every watched fd's peer sees the daemon's copy closed by `deadline`."""
        for kind, obj in self.watch:
            ok = False
            while now() < deadline and not ok:
                if kind == "pipe_r":          # we sent the read end, kept the write end: POLLERR once no reader is left
                    p = select.poll()
                    p.register(obj, select.POLLERR)  # (POLLERR is reported whatever the mask)
                    ok = any(ev & select.POLLERR for _, ev in p.poll(200))
                elif kind == "pipe_w":        # we sent the write end, kept the read end: EOF once no writer is left
                    r, _, _ = select.select([obj], [], [], 0.2)
                    ok = bool(r) and os.read(obj, 1) == b""
                else:
                    r, _, _ = select.select([obj], [], [], 0.2)
                    if r:
                        try:
                            ok = obj.recv(1) == b""
                        except OSError:
                            ok = True
            if not ok:
                self.env.violation(case, "fd_not_closed",
                                   "an extra/bad fd (%s) handed to the daemon was still open %.1fs later"
                                   % (kind, SLACK))

    def close(self):
        self.sent()
        for item in self.watch:
            obj = item[1]
            if isinstance(obj, int):
                os.close(obj)
            else:
                obj.close()
        for o in self.keep:
            o.close()
        self.watch, self.keep = [], []


def read_stream(sock, deadline):
    data, how = recv_until(sock, deadline)
    return classify(data, how)


def check_outcome(env, case, out, allowed, what="", note=False):
    """`allowed`: a set of (kind, status) pairs, status None for any.  The outcome
    must be allowed; never a 500 unless allowed.  What a client got must be
    strict JSON (check_client_json)."""
    ok = any(k == out.kind and (s is None or s == out.status) for k, s in allowed)
    if not ok:
        cat = "stall" if out.how == "timeout" else "wrong_answer"
        if out.status == 500:
            cat = "status_500"
        env.violation(case, cat, "%sgot %r, expected one of %s; first bytes %s"
                      % (what, out, sorted(allowed, key=str), short(out.data, 200)), note=note)
    check_client_json(env, case, out.data)
    return ok


def _no_constant(name):
    raise ValueError("%s is not JSON" % name)


def strict_json(text):
    """RFC 8259 only (no NaN, Infinity): what a browser's JSON.parse takes."""
    return json.loads(text, parse_constant=_no_constant)


def check_client_json(env, case, data):
    """Every SSE `data:` line streamd sent (but [DONE]) and every JSON error
    body must be strict JSON: a browser's JSON.parse throws on NaN."""
    while data.startswith(CONTINUE):
        data = data[len(CONTINUE):]
    end = data.find(b"\r\n\r\n")
    if end < 0 or not _STATUS.match(data):
        return
    head, body = data[:end].lower(), data[end + 4:]
    if b"text/event-stream" in head:
        texts = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ") and line != b"data: [DONE]"]
        if body and not body.endswith(b"\n\n"):
            texts = texts[:-1]  # (a last line cut off by our own deadline)
    elif b"application/json" in head:
        texts = [body] if body else []
    else:
        return
    for t in texts:
        try:
            strict_json(t.decode("utf-8"))
        except (ValueError, RecursionError) as e:
            env.violation(case, "client_json_invalid", "streamd sent a client invalid JSON (%s): %s" % (e, short(t, 200)))
            return


def scenario_deadline(name):
    return now() + SCENARIOS[name][1].deadline + SLACK


def check_scenario(env, case, name, kind, status, etype, how, data=b""):
    if data:
        check_client_json(env, case, data)
    exp = SCENARIOS[name][1]
    why = check_expect(exp, kind, status, etype)
    if why is None and kind in ("status", "error", "done") and how == "timeout":
        why = "answered but the connection was not closed"
    if why is not None:
        if how == "timeout" and kind not in ("done",) and not exp.open:
            cat = "stall"
        elif status == 500 or etype == "internal_error":
            cat = "status_500"
        else:
            cat = "wrong_answer"
        env.violation(case, cat, "upstream scenario %s: %s (%s)" % (name, why, how), note=exp.note)


def check_hangup(env, case, tag, what):
    """The daemon closed the upstream connection soon after its client left."""
    if not env.up.hangup_event(tag).wait(1.0 + SLACK):
        env.violation(case, "upstream_not_cancelled",
                      "%s: the upstream request was still open %.1fs after the client left" % (what, 1.0 + SLACK))


# -- (a) handoff cases --

def handoff_case(index, rng):
    kind = rng.choices(
        ["no_message", "silent", "no_fd", "many_fds", "bad_fd", "too_large", "bad_data", "odd_valid",
         "mock", "mock_tcp", "openai", "close_at_once", "close_mid_stream", "two_messages", "same_fd_twice",
         "self_connect", "slow_reader", "client_talks", "pending_connect"],
        [3, 2, 3, 5, 5, 2, 10, 5, 4, 3, 14, 4, 5, 2, 1, 2, 2, 2, 3])[0]

    if kind == "no_message":
        def run(env, case):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(env.d.path)
            s.close()
            env.expect_reason("no_fd")
        return Case(index, "handoff", kind, "connect, close without a message", run)

    if kind == "silent":
        def run(env, case):
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.connect(env.d.path)
                if not wait_closed_by_daemon(s, now() + HANDOFF_TIMEOUT + SLACK):
                    env.violation(case, "stall", "a silent handoff connection was not closed within "
                                  "handoff_timeout + %gs" % SLACK)
            env.expect_reason("timeout")
        return Case(index, "handoff", kind, "connect, send nothing, wait for the daemon to close", run)

    if kind == "no_fd":
        data = rng.choice([b"\0", b"{}", json.dumps(mock_request(rng)).encode(), b"x" * rng.randint(1, 5000)])

        def run(env, case):
            with send_handoff(env, data, []) as s:
                if not wait_closed_by_daemon(s, now() + SLACK):
                    env.violation(case, "stall", "the Unix connection of a message without fd stayed open")
            env.expect_reason("no_fd")
        return Case(index, "handoff", kind, "message %s without fd" % short(data, 60), run)

    if kind in ("many_fds", "bad_fd"):
        if kind == "many_fds":
            n = rng.randint(2, 20)
            first = rng.choice(["socketpair"] * 3 + FD_KINDS)
            kinds = [first] + [rng.choice(FD_KINDS) for _ in range(n - 1)]
        else:
            kinds = [rng.choice(sorted(BAD_FD_KINDS) + ["unconnected_tcp", "listen_tcp"])]
        req = mock_request(rng)
        data = json.dumps(req).encode()

        def run(env, case):
            bag = FdBag(env)
            try:
                client = bag.make(kinds[0], client_wanted=True)
                for k in kinds[1:]:
                    bag.make(k)
                with send_handoff(env, data, bag.to_send):
                    pass
                bag.sent()
                truncated = len(kinds) > MAX_FDS
                if truncated:
                    env.expect_reason("ctrunc")
                elif kinds[0] in BAD_FD_KINDS:
                    env.expect_reason("bad_fd")
                if client is not None:
                    out = read_stream(client, now() + 2 + SLACK)
                    if truncated:
                        check_outcome(env, case, out, {("none", None)}, "MSG_CTRUNC: ")
                    else:
                        check_outcome(env, case, out, {("done", 200)})
                bag.check_watched_closed(case, now() + SLACK)
            finally:
                bag.close()
        return Case(index, "handoff", kind, "%d fds %s, data %s" % (len(kinds), kinds, short(data, 60)), run)

    if kind == "pending_connect":
        # the upstream connect hangs (anthropic -> Blackhole); leave first, or wait for the 504
        leave = rng.choice([0.0, 0.3, 1.0, None])
        data = json.dumps(dict(mock_request(rng), backend="anthropic")).encode()

        def run(env, case):
            a, b = socket.socketpair()
            try:
                with send_handoff(env, data, [b.fileno()]):
                    pass
                b.close()
                if leave is None:
                    out = read_stream(a, now() + 2.0 + SLACK)  # connect_timeout 2s
                    check_outcome(env, case, out, {("status", 504), ("status", 502)})
                else:
                    time.sleep(leave)
            finally:
                a.close()
                b.close()
        return Case(index, "handoff", "pending_connect", "leave after %s s: %s" % (leave, short(data, 80)), run)

    if kind == "two_messages":
        # two messages on one Unix connection: the daemon takes the first and
        # closes; the second's fd dies with the connection (closed by the kernel)
        data = json.dumps(mock_request(rng)).encode()

        def run(env, case):
            a1, b1 = socket.socketpair()
            a2, b2 = socket.socketpair()
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                    s.settimeout(5)
                    s.connect(env.d.path)
                    for b in (b1, b2):
                        s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [b.fileno()]))])
                b1.close()
                b2.close()
                check_outcome(env, case, read_stream(a1, now() + 2 + SLACK), {("done", 200)})
                out2 = read_stream(a2, now() + SLACK)
                if out2.how == "timeout":
                    env.violation(case, "fd_not_closed", "the fd of a second message on the same connection stayed open")
            finally:
                for x in (a1, b1, a2, b2):
                    x.close()
        return Case(index, "handoff", kind, "two messages %s" % short(data, 80), run)

    if kind == "same_fd_twice":
        data = json.dumps(mock_request(rng)).encode()

        def run(env, case):
            a, b = socket.socketpair()
            try:
                with send_handoff(env, data, [b.fileno()] * rng_n(index, 2, 16)):
                    pass
                b.close()
                check_outcome(env, case, read_stream(a, now() + 2 + SLACK), {("done", 200)})
            finally:
                a.close()
                b.close()
        return Case(index, "handoff", kind, "the same fd several times, %s" % short(data, 80), run)

    if kind == "self_connect":
        # the client socket is a connection to the daemon's own front or metrics port
        target = rng.choice(["front", "metrics"])
        data = json.dumps(mock_request(rng)).encode()

        def run(env, case):
            c = socket.create_connection(getattr(env.d, target), timeout=5)
            try:
                with send_handoff(env, data, [c.fileno()]):
                    pass
            finally:
                c.close()
        return Case(index, "handoff", kind, "a TCP connection to the daemon's own %s port, %s"
                    % (target, short(data, 80)), run)

    if kind == "slow_reader":
        # a client that does not read for a while: back-pressure, then the rest
        backend = rng.choice(["mock", "openai"])
        req = dict(mock_request(rng), backend=backend)
        if backend == "openai":
            req["test_pattern"] = "h:flood:%d" % index
        else:
            req["prompt"] = "z" * 60000
        data = json.dumps(req).encode()
        pause = rng.choice([0.5, 1.5, 3.0])

        def run(env, case):
            a, b = socket.socketpair()
            try:
                for x in (a, b):
                    x.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    x.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                with send_handoff(env, data, [b.fileno()]):
                    pass
                b.close()
                time.sleep(pause)
                out = read_stream(a, now() + 6 + SLACK)
                check_outcome(env, case, out, {("done", 200)})
            finally:
                a.close()
                b.close()
        return Case(index, "handoff", "slow_reader." + backend, "pause %gs, %s" % (pause, short(data, 80)), run)

    if kind == "client_talks":
        # the client writes while it is streamed to (a pipelined request, junk), or half-closes
        req = mock_request(rng)
        data = json.dumps(req).encode()
        talk = rng.choice([b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", b"x" * 300000, b"\0" * 10])
        half = rng.random() < 0.3

        def run(env, case):
            a, b = socket.socketpair()
            try:
                with send_handoff(env, data, [b.fileno()]):
                    pass
                b.close()
                send_quiet(a, talk, now() + 2)
                if half:
                    a.shutdown(socket.SHUT_WR)  # EOF: the client left (SPEC section 4)
                out = read_stream(a, now() + 2 + SLACK)
                check_outcome(env, case, out, {("done", 200)} if not half else
                              {("done", 200), ("none", None), ("incomplete", 200)})
            finally:
                a.close()
                b.close()
        return Case(index, "handoff", "client_talks", "%s%s, %s" % (short(talk, 40), " + SHUT_WR" if half else "",
                                                                    short(data, 80)), run)

    if kind == "too_large":
        size = rng.choice([MAX_HANDOFF + 1, MAX_HANDOFF + 2, rng.randint(MAX_HANDOFF + 1, 190 * 1024)])
        data = (b'{"prompt": "' + b"x" * size + b'"}')[:size]

        def run(env, case):
            a, b = socket.socketpair()
            try:
                try:
                    s = send_handoff(env, data, [b.fileno()], sndbuf=1 << 20)
                except OSError as e:  # EMSGSIZE: bigger than the socket's send buffer allows
                    env.violation(case, "harness", "could not send %d bytes: %s" % (size, e), note=True)
                    return
                s.close()
                b.close()
                env.expect_reason("too_large")
                check_outcome(env, case, read_stream(a, now() + 1 + SLACK), {("status", 413)})
            finally:
                a.close()
                b.close()
        return Case(index, "handoff", kind, "%d bytes of data" % size, run)

    if kind == "bad_data" and rng.random() < 0.05:
        # exactly max_handoff_bytes: not too large (a prompt-length limit may say 400)
        data = b'{"prompt": "' + b"x" * (MAX_HANDOFF - 14) + b'"}'

        def run(env, case):
            check_outcome(env, case, handoff_pair_stream(env, data, 2 + SLACK), {("done", 200), ("status", 400)})
        return Case(index, "handoff", "exact_max_size", "%d bytes" % len(data), run)

    if kind == "bad_data":
        label, data, expected = _bad_data(rng)
        allowed = {("status", 400)} if expected == 400 else {("status", 400), ("done", 200)}

        def run(env, case):
            out = handoff_pair_stream(env, data, 1 + SLACK)
            if expected == 400:
                env.expect_reason("bad_json")
            check_outcome(env, case, out, allowed, note=label == "utf16")
        return Case(index, "handoff", "bad_data." + label, short(data, 200), run)

    if kind == "odd_valid":
        label, data = _odd_valid(rng)
        allowed = {("done", 200)}
        if label in ("int_4000", "big_request_id", "long_prompt"):
            allowed.add(("status", 400))  # a length limit is a fair answer (naming the field)

        def run(env, case):
            out = handoff_pair_stream(env, data, 2 + SLACK)
            if check_outcome(env, case, out, allowed) and label == "header_injection":
                head = out.data.split(b"\r\n\r\n", 1)[0].lower()
                if b"x-injected" in head or b"content-length" in head or b"transfer-encoding" in head \
                        or b"keep-alive" in head or b"proxy-x" in head:
                    env.violation(case, "header_injection", "response head carries a dropped header: %s" % short(head, 400))
        return Case(index, "handoff", "odd_valid." + label, short(data, 200), run)

    if kind in ("mock", "mock_tcp"):
        req = mock_request(rng)
        data = json.dumps(req).encode()

        def run(env, case):
            if kind == "mock":
                out = handoff_pair_stream(env, data, 2 + SLACK)
            else:
                c, s = env.tcp_pair()
                try:
                    with send_handoff(env, data, [s.fileno()]):
                        pass
                    s.close()
                    out = read_stream(c, now() + 2 + SLACK)
                finally:
                    c.close()
                    s.close()
            if check_outcome(env, case, out, {("done", 200)}) and req.get("include_usage"):
                if b'"usage":' not in out.data:
                    env.violation(case, "wrong_answer", "include_usage but no usage event")
        return Case(index, "handoff", kind, short(data, 120), run)

    if kind == "openai":
        name = rng.choice(SCENARIO_NAMES)
        req = dict(mock_request(rng), backend="openai", test_pattern="h:%s:%d" % (name, index))
        if rng.random() < 0.6:
            req["include_usage"] = True
        if rng.random() < 0.15 or name.startswith("early_"):
            req["prompt"] = "p" * rng.choice([1000, 100000])
        data = json.dumps(req).encode()
        linger = rng.uniform(0.5, 2.5)

        def run(env, case):
            a, b = socket.socketpair()
            try:
                with send_handoff(env, data, [b.fileno()]):
                    pass
                b.close()
                exp = SCENARIOS[name][1]
                deadline = now() + linger if exp.open else scenario_deadline(name)
                out = read_stream(a, deadline)
                if exp.open:
                    if out.kind in ("done", "status", "error"):
                        check_scenario(env, case, name, out.kind, out.status, out.error_type, out.how, out.data)
                    a.close()
                    if out.how == "timeout":
                        check_hangup(env, case, str(index), "open upstream stream")
                else:
                    check_scenario(env, case, name, out.kind, out.status, out.error_type, out.how, out.data)
            finally:
                a.close()
                b.close()
        return Case(index, "handoff", "openai." + name, short(data, 200), run)

    if kind == "close_at_once":
        backend = rng.choice(["mock", "openai"])
        name = rng.choice(SCENARIO_NAMES)
        req = dict(mock_request(rng), backend=backend)
        if backend == "openai":
            req["test_pattern"] = "h:%s:%d" % (name, index)
        data = json.dumps(req).encode()
        rst = rng.random() < 0.5

        def run(env, case):
            c, s = env.tcp_pair() if rst else socket.socketpair()
            try:
                if rst:
                    set_linger0(c)
                c.close()  # before the daemon gets it
                with send_handoff(env, data, [s.fileno()]):
                    pass
            finally:
                c.close()
                s.close()
        return Case(index, "handoff", "close_at_once." + backend, "%s%s" % ("RST, " if rst else "", short(data, 120)),
                    run)

    # close_mid_stream
    backend = rng.choice(["mock", "openai", "openai"])
    name = rng.choice(OPEN_SCENARIOS + ["valid_chunked", "valid_split", "slowloris_head", "no_answer"])
    req = dict(mock_request(rng), backend=backend)
    if backend == "mock":
        req["prompt"] = "x" * 2000  # a longer stream, so there is a middle
    else:
        req["test_pattern"] = "h:%s:%d" % (name, index)
    data = json.dumps(req).encode()
    after = rng.choice([1, 50, 300, 2000])
    rst = rng.random() < 0.5

    def run(env, case):
        c, s = env.tcp_pair() if rst else socket.socketpair()
        try:
            with send_handoff(env, data, [s.fileno()]):
                pass
            s.close()
            recv_until(c, now() + (0.8 if backend == "openai" else 2), stop=lambda d: len(d) >= after)
            if rst:
                set_linger0(c)
            c.close()
            if backend == "openai" and name in OPEN_SCENARIOS + ["slowloris_head", "no_answer"]:
                check_hangup(env, case, str(index), "client left mid-stream")
        finally:
            c.close()
            s.close()
    return Case(index, "handoff", "close_mid_stream." + (backend if backend == "mock" else name),
                "after %d bytes%s: %s" % (after, ", RST" if rst else "", short(data, 120)), run)


def rng_n(index, lo, hi):
    return random.Random("n:%d" % index).randint(lo, hi)


def handoff_pair_stream(env, data, seconds):
    a, b = socket.socketpair()
    try:
        with send_handoff(env, data, [b.fileno()]):
            pass
        b.close()
        return read_stream(a, now() + seconds)
    finally:
        a.close()
        b.close()


# -- (b) the HTTP front --

METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT", "PRI", "get", "X-Y"]
ROUTES = {"/": ("GET", "HEAD"), "/healthz": ("GET", "HEAD"), "/v1/backends": ("GET", "HEAD"),
          "/v1/stream": ("GET", "POST"), "/v1/ws": ("GET",)}
TLS_HELLO = bytes.fromhex(
    "16030100f8010000f40303" + "ab" * 32 + "20" + "cd" * 32 + "0008130213031301c02f0100"
    "00a3000000100000e0000d6c6f63616c686f73742e636f6d000b000403000102000a000c000a001d0017001e"
    "00190018002300000016000000170000000d001e001c040305030603080708080809080a080b080408050806"
    "040105010601002b0003020304002d00020101003300260024001d0020" + "ef" * 32)
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def split_plan(rng, n):
    """Where to cut n bytes into packets, and the pause after each: state
    changes between two reads are where a parser's caller goes wrong."""
    if n < 2 or rng.random() < 0.6:
        return None
    cuts = sorted(set(rng.randrange(1, n) for _ in range(rng.randint(1, 4))))
    return [(c, rng.choice([0.002, 0.01, 0.03])) for c in cuts]


def send_split(s, raw, plan, deadline):
    pos = 0
    for cut, pause in plan or ():
        if not send_quiet(s, raw[pos:cut], deadline):
            return False
        pos = cut
        time.sleep(pause)
    return send_quiet(s, raw[pos:], deadline)


def front_exchange(env, raw, seconds, rst=False, trickle=None, read=True, plan=None, after=b""):
    """Connect to the front, send `raw` (all at once, in the packets of `plan`,
    or `trickle` seconds per byte), then `after` (bytes a client keeps sending),
    read the answer until EOF or `seconds`.  Returns an Outcome."""
    with socket.create_connection(env.d.front, timeout=5) as s:
        deadline = now() + seconds
        if trickle:
            for i in range(len(raw)):
                if not send_quiet(s, raw[i:i + 1], deadline):
                    break
                time.sleep(trickle)
                if now() > deadline:
                    break
        elif raw:
            send_split(s, raw, plan, deadline)
        if after:
            time.sleep(0.01)
            send_quiet(s, after, min(deadline, now() + 1))
        if rst:
            set_linger0(s)
            return Outcome("none", how="rst")
        if not read:
            return Outcome("none", how="noread")
        data, how = recv_until(s, deadline)
        return classify(data, how)


def http_get(path, headers=""):
    return ("GET %s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (path, headers)).encode("latin-1")


def http_post(path, body, headers=""):
    return ("POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n" % (path, len(body), headers)
            ).encode("latin-1") + body


FRONT_REFUSALS = {("status", s) for s in (400, 408, 411, 413, 414, 431, 505)} | {("none", None)}


def route_expectation(method, path):
    """(allowed outcomes) for METHOD path with a valid request otherwise."""
    methods = ROUTES.get(path)
    if methods is None:
        return {("status", 404)}
    if method not in methods:
        return {("status", 405)}
    if path == "/v1/ws":
        return {("status", 426)}
    if path == "/v1/stream":
        return {("done", 200)}
    return {("status", 200)}


def http_case(index, rng):
    kind = rng.choices(
        ["random_bytes", "tls_hello", "cl_digits", "deep_messages", "bad_percent", "huge_headers",
         "many_headers", "pipelining", "half_request", "reset", "expect", "h2_preface", "routes",
         "bad_request_line", "slowloris", "bad_body", "query_types", "openai"],
        [6, 2, 4, 4, 4, 3, 3, 3, 4, 3, 3, 2, 10, 6, 2, 5, 4, 8])[0]
    seconds = REQUEST_TIMEOUT + SLACK

    def simple(label, raw, allowed, **kw):
        extra = kw.pop("extra", 0)
        plan = kw.pop("plan", split_plan(rng, len(raw)) if not kw.get("trickle") else None)
        junk = rng.random() < 0.15 and allowed is not None  # a client that keeps sending after its request
        after = bytes(rng.getrandbits(8) for _ in range(rng.choice([10, 3000, 200000]))) if junk else b""

        def run(env, case):
            out = front_exchange(env, raw, seconds + extra, plan=plan, after=after, **kw)
            if allowed is not None:
                # bytes after the request may reset a connection that already answered
                check_outcome(env, case, out, allowed | (FRONT_REFUSALS if junk else set()))
        desc = short(raw, 240) + (" in packets cut at %s" % [c for c, _ in plan] if plan else "") + \
            (" then %d junk bytes" % len(after) if after else "")
        return Case(index, "http", label, desc, run)

    if kind == "random_bytes":
        raw = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000)))
        if rng.random() < 0.3:  # random bytes after a plausible start
            raw = b"GET /" + raw
        return simple("random_bytes", raw, FRONT_REFUSALS)
    if kind == "tls_hello":
        return simple("tls_hello", TLS_HELLO, FRONT_REFUSALS)
    if kind == "h2_preface":
        return simple("h2_preface", H2_PREFACE, {("status", 505), ("status", 400)})
    if kind == "cl_digits":
        digits = rng.choice([20, 4300, 4301, 5000, 7000])
        raw = (b"POST /v1/stream HTTP/1.1\r\nHost: t\r\nContent-Length: " + b"9" * digits + b"\r\n\r\n{}")
        if rng.random() < 0.3:
            raw = raw.replace(b"9" * digits, b"0" * (digits - 1) + b"2")  # a small number, many digits
            return simple("cl_digits.zeros_%d" % digits, raw, {("status", 400), ("done", 200)})
        return simple("cl_digits.%d" % digits, raw, {("status", 400), ("status", 413)})
    if kind == "deep_messages":
        unit = rng.choice(["%5B", "%7B%22a%22%3A", "["])
        path = "/v1/stream?prompt=x&messages=" + unit * rng.choice([1100, 7800 // len(unit)])
        return simple("deep_messages", http_get(path), {("status", 400), ("status", 414)})
    if kind == "bad_percent":
        bad = rng.choice(["%zz", "%z", "%", "%%", "%e9", "%ed%a0%80", "%c0%af", "%G0", "%0"])
        where = rng.choice(["prompt=a%s_", "%s_=x&prompt=y", "request_id=%s"]) % bad  # ("_": never a hex digit)
        return simple("bad_percent.%s" % bad, http_get("/v1/stream?" + where), {("status", 400)})
    if kind == "huge_headers":
        size = rng.choice([17000, 40000, 70000, 200000])
        raw = ("GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: %s\r\n\r\n" % ("b" * size)).encode()
        return simple("huge_headers", raw, {("status", 431)})
    if kind == "many_headers":
        n = rng.choice([65, 100, 1000])
        raw = ("GET /healthz HTTP/1.1\r\nHost: t\r\n%s\r\n" % "".join("X-%d: v\r\n" % i for i in range(n))).encode()
        return simple("many_headers", raw, {("status", 431)})
    if kind == "pipelining":
        first = rng.choice([(http_get("/healthz"), ("status", 200)),
                            (http_get("/v1/stream?prompt=pipe"), ("done", 200)),
                            (http_post("/v1/stream", b'{"prompt":"p"}'), ("done", 200)),
                            (http_get("/nope"), ("status", 404))])
        rest = b"".join(rng.choice([http_get("/healthz"), http_get("/v1/stream?prompt=2"), b"garbage\r\n\r\n",
                                    http_post("/v1/stream", b"{}")]) for _ in range(rng.randint(1, 5)))
        raw = first[0] + rest

        def run(env, case):
            out = front_exchange(env, raw, seconds + 2)
            if check_outcome(env, case, out, {first[1]}):
                if out.data.count(b"HTTP/1.1 ") != 1:
                    env.violation(case, "wrong_answer", "pipelined requests got %d responses (expected 1)"
                                  % out.data.count(b"HTTP/1.1 "))
        return Case(index, "http", "pipelining", short(raw, 240), run)
    if kind == "half_request":
        full = rng.choice([http_get("/v1/stream?prompt=x"), http_post("/v1/stream", b'{"prompt":"x"}'),
                           http_get("/healthz")])
        cut = rng.randint(1, len(full) - 1)
        raw = full[:cut]
        allowed = {("status", 408)}
        if raw.endswith(b"\r\n\r\n") or raw.endswith(b"\n\n"):
            allowed = route_expectation("GET", "/v1/stream") | {("status", 408), ("status", 200)}
        if raw.strip() == b"":
            allowed = {("none", None), ("status", 408)}
        return simple("half_request", raw, allowed)
    if kind == "reset":
        raw = rng.choice([http_get("/v1/stream?prompt=x" + "y" * rng.randint(0, 2000)),
                          http_post("/v1/stream", b'{"prompt":"x","backend":"openai","test_pattern":"h:valid_chunked:%d"}'
                                    % index), ws_upgrade_request("/v1/ws?prompt=x"), http_get("/")])
        return simple("reset_after_request", raw, None, rst=True)
    if kind == "expect":
        variant = rng.choice(["get", "post_no_body", "post_body_after"])
        if variant == "get":
            raw = http_get("/v1/stream?prompt=x", "Expect: 100-continue\r\n")
            return simple("expect.get", raw, {("done", 200)})
        if variant == "post_no_body":
            raw = b"POST /v1/stream HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n"
            return simple("expect.post_no_body", raw, {("status", 408)})
        head = b"POST /v1/stream HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 14\r\n\r\n"

        def run(env, case):
            with socket.create_connection(env.d.front, timeout=5) as s:
                deadline = now() + seconds + 2
                send_quiet(s, head, deadline)
                got, how = recv_until(s, deadline, stop=lambda d: b"\r\n\r\n" in d)
                if not got.startswith(CONTINUE):
                    env.violation(case, "wrong_answer", "no 100 Continue: %s" % short(got))
                    return
                send_quiet(s, b'{"prompt":"x"}', deadline)
                data, how = recv_until(s, deadline)
                check_outcome(env, case, classify(got + data, how), {("done", 200)})
        return Case(index, "http", "expect.post_body_after", short(head), run)
    if kind == "routes":
        method = rng.choice(METHODS)
        path = rng.choice(list(ROUTES) + ["/nope", "/v1", "/v1/stream/", "//", "/healthz?x=1", "/%2e%2e/"])
        base = path.split("?")[0]
        body = b""
        if method == "POST":
            body = json.dumps(mock_request(rng)).encode()
        if method == "GET" and base == "/v1/stream":
            path += ("&" if "?" in path else "?") + "prompt=route"
        raw = ("%s %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (method, path, len(body))).encode() + body
        if method in ("GET", "HEAD", "DELETE", "OPTIONS", "TRACE", "CONNECT") and rng.random() < 0.5:
            raw = ("%s %s HTTP/1.1\r\nHost: t\r\n\r\n" % (method, path)).encode()
        if method in ("get", "X-Y", "PRI", "CONNECT"):
            allowed = route_expectation(method, base) | {("status", 400), ("status", 505)}
        else:
            allowed = route_expectation(method, base)
        if method == "HEAD":
            allowed = {("status", s) for k, s in allowed if k == "status"} | (
                {("status", 200)} if ("status", 200) in allowed else set())
        return simple("routes.%s" % method, raw, allowed, extra=1)
    if kind == "bad_request_line":
        choices = [
            (b"GET  / HTTP/1.1\r\nHost: t\r\n\r\n", {("status", 400)}),
            (b"GET / HTTP/1.1 extra\r\nHost: t\r\n\r\n", {("status", 400)}),
            (b"GET /\x00 HTTP/1.1\r\nHost: t\r\n\r\n", {("status", 400)}),
            (b"GET /\xff HTTP/1.1\r\nHost: t\r\n\r\n", {("status", 400)}),
            (b"GET / HTTP/1.1\r\n\r\n", {("status", 400)}),
            (b"GET / HTTP/1.0\r\n\r\n", {("status", 200)}),
            (b"GET /healthz HTTP/3.0\r\nHost: t\r\n\r\n", {("status", 505)}),
            (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", {("status", 400)}),
            (b"GET /healthz HTTP/1.1\r\nHost: t\r\n folded\r\n\r\n", {("status", 400)}),
            (b"GET /healthz HTTP/1.1\r\nHost: t\rX: y\r\n\r\n", {("status", 400)}),
            (b"GET /healthz HTTP/1.1\r\nHost: t\r\nX: a\x01b\r\n\r\n", {("status", 400)}),
            (b"GET /healthz HTTP/1.1\r\nHost: t\r\nBad Name: v\r\n\r\n", {("status", 400)}),
            (b"GET /healthz HTTP/1.1\r\nHost: t\r\n: v\r\n\r\n", {("status", 400)}),
            (b"POST /v1/stream HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", {("status", 411)}),
            (b"POST /v1/stream HTTP/1.1\r\nHost: t\r\n\r\n", {("status", 411)}),
            (b"POST /v1/stream HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
             {("status", 400)}),
            (b"POST /v1/stream HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n", {("status", 400)}),
            (b"POST /v1/stream HTTP/1.1\r\nHost: t\r\nContent-Length: +2\r\n\r\n{}", {("status", 400)}),
            (b"POST /v1/stream HTTP/1.1\r\nHost: t\r\nContent-Length: 999999999\r\n\r\n", {("status", 413)}),
            (b"GET http://evil/healthz HTTP/1.1\r\nHost: t\r\n\r\n", {("status", 200)}),
            (b"GET * HTTP/1.1\r\nHost: t\r\n\r\n", {("status", 400)}),
            (b"\r\n" * 9 + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n", {("status", 400)}),
            (b"\n\nGET /healthz HTTP/1.1\nHost: t\n\n", {("status", 200)}),
            (("GET /" + "a" * 9000 + " HTTP/1.1\r\nHost: t\r\n\r\n").encode(), {("status", 414)}),
            (b"G" * 20000, {("status", 414)}),
            (b"GET /v1/ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n", {("status", 400)}),
            (b"GET /v1/ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n\r\n", {("status", 426)}),
            (b"GET /v1/ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Version: 13\r\n\r\n", {("status", 400)}),
        ]
        raw, allowed = rng.choice(choices)
        return simple("bad_request_line", raw, allowed)
    if kind == "slowloris":
        raw = http_get("/v1/stream?prompt=slow")
        return Case(index, "http", "slowloris", "a byte per 0.1s of %s" % short(raw), _slowloris_run(raw))
    if kind == "bad_body":
        label, data, expected = _bad_data(rng)
        if len(data) > 128 * 1024:
            expected = 413
        allowed = {("status", 400)} if expected == 400 else {("status", 400), ("done", 200)}
        if expected == 413:
            allowed = {("status", 413)}
        return simple("bad_body." + label, http_post("/v1/stream", data), allowed, extra=1)
    if kind == "query_types":
        q = rng.choice([
            ("max_tokens=" + "9" * 5000, 400), ("max_tokens=-1", 400), ("max_tokens=1e3", 400),
            ("temperature=nan", 400), ("temperature=1e400", 400), ("top_p=inf", 400), ("temperature=0x10", 400),
            ("messages=%5B1%5D", 400), ("messages=null", (200, 400)), ("messages=NaN", 400),
            ("messages=%5B%7B%22role%22%3A%22user%22%2C%22content%22%3A%22%5Cud800%22%7D%5D", 200),
            ("backend=nope", 400), ("backend=", 400), ("request_id=%1b%5b31m%00", 200),
            ("test_pattern=a%0d%0aX-Injected%3A1&backend=openai", 400),
            ("model=%ed%a0%80", 400), ("prompt=" + "a" * 7000, 200), ("include_usage=maybe", 200),
            ("stream_mode=x&thread_id=%F0%9F%98%80", 200), ("&&&=&=", 200),
            ("&".join("k%d=v" % i for i in range(65)), 400),
        ])
        query, expected = q
        allowed = {("status", 400)} if expected == 400 else {("done", 200)} if expected == 200 else \
            {("status", 400), ("done", 200)}
        return simple("query_types", http_get("/v1/stream?" + query), allowed, extra=1)
    # openai through the front
    name = rng.choice(SCENARIO_NAMES)
    post = rng.random() < 0.5
    pattern = "h:%s:%d" % (name, index)
    raw = (http_post("/v1/stream", json.dumps({"prompt": "x", "backend": "openai", "test_pattern": pattern}).encode())
           if post else http_get("/v1/stream?prompt=x&backend=openai&test_pattern=" + pattern.replace(":", "%3A")))

    def run(env, case):
        exp = SCENARIOS[name][1]
        out = front_exchange(env, raw, rng_linger(index) if exp.open else exp.deadline + SLACK)
        if exp.open:
            if out.kind in ("done", "status", "error"):
                check_scenario(env, case, name, out.kind, out.status, out.error_type, out.how, out.data)
            if out.how == "timeout":
                check_hangup(env, case, str(index), "front client left an open stream")
        else:
            check_scenario(env, case, name, out.kind, out.status, out.error_type, out.how, out.data)
    return Case(index, "http", "openai." + name, short(raw, 200), run)


def rng_linger(index):
    return random.Random("linger:%d" % index).uniform(0.5, 2.0)


def _slowloris_run(raw):
    def run(env, case):
        with socket.create_connection(env.d.front, timeout=5) as s:
            start = now()
            deadline = start + REQUEST_TIMEOUT + SLACK
            for i in range(len(raw)):
                if not send_quiet(s, raw[i:i + 1], deadline):
                    break
                r, _, _ = select.select([s], [], [], 0.1)
                if r or now() > deadline:
                    break
            data, how = recv_until(s, deadline)
            out = classify(data, how)
            check_outcome(env, case, out, {("status", 408)})
    return run


# -- (c) WebSocket --

def ws_case(index, rng):
    kind = rng.choices(
        ["random_frames", "unmasked", "oversize", "fragmented_control", "close_codes", "invalid_utf8",
         "ping_flood", "valid_then_close", "valid", "binary", "bad_continuation", "reserved_opcode",
         "big_message", "openai", "split_frames", "frame_soup", "url_prompt"],
        [6, 3, 4, 3, 5, 3, 3, 4, 4, 2, 3, 3, 2, 5, 3, 8, 3])[0]
    seconds = REQUEST_TIMEOUT + SLACK
    request = json.dumps(mock_request(rng)).encode()
    P1002 = {1002}

    def frames_case(label, payload, codes, wait_done=False, extra_deadline=0.0):
        """Upgrade, send `payload` bytes, read until EOF: the close code must be in `codes`."""
        plan = split_plan(rng, len(payload))

        def run(env, case):
            out = ws_session(env, payload, seconds + extra_deadline, plan=plan)
            if out is None:
                env.violation(case, "wrong_answer", "upgrade refused")
                return
            if out.how == "timeout":
                env.violation(case, "stall", "WebSocket not closed within %gs: %r" % (seconds + extra_deadline, out))
            elif codes is not None and out.close_code not in codes:
                env.violation(case, "wrong_answer", "close code %s, expected %s: %r" % (out.close_code, sorted(codes), out))
            if wait_done and out.kind() != "done":
                env.violation(case, "wrong_answer", "no done message: %r" % out)
            err = out.error()
            if err.get("type") == "internal_error" or err.get("status") == 500:
                env.violation(case, "status_500", "internal error over WebSocket: %r" % err)
            check_ws_json(env, case, out)
        return Case(index, "ws", label, short(payload, 240), run)

    if kind == "random_frames":
        payload = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 4000)))
        return frames_case("random_frames", payload, None)
    if kind == "split_frames":
        # a valid request split into many frames (continuations), pings in between
        parts = [request[i:i + 7] for i in range(0, len(request), 7)]
        payload = b""
        for i, p in enumerate(parts):
            payload += ws_frame(0x1 if i == 0 else 0x0, p, fin=(i == len(parts) - 1))
            if rng.random() < 0.3:
                payload += ws_frame(0x9, b"p")
        return frames_case("split_frames", payload, {1000}, wait_done=True, extra_deadline=2)
    if kind == "frame_soup":
        # well-formed frames in a random order: the connection's states, not the parser
        payload = b""
        for _ in range(rng.randint(1, 12)):
            op = rng.choice([0x0, 0x1, 0x1, 0x2, 0x8, 0x9, 0x9, 0xA])
            fin = rng.random() < 0.7 or op >= 0x8
            body = rng.choice([b"", b"x", request, b'{"prompt":"soup"}', b"[" * 3000, b"\x03\xe8",
                               b"\x0f\xa0bye", b"\x03\xe9"]) if op != 0x8 else rng.choice([b"", b"\x03\xe8", b"\x0b\xb8x"])
            payload += ws_frame(op, body[:125] if op >= 0x8 else body, fin=fin)
        return frames_case("frame_soup", payload, None, extra_deadline=2)
    if kind == "url_prompt":
        # the request in the URL: the stream starts at once; the client sends frames meanwhile
        frames = b"".join(rng.choice([ws_frame(0x9, b"p"), ws_frame(0xA, b""), ws_frame(0x1, request),
                                      ws_frame(0x8, b"\x03\xe8"), ws_frame(0x2, b"b")]) for _ in range(rng.randint(0, 4)))

        def run(env, case):
            out = ws_session(env, frames, seconds + 2, path="/v1/ws?prompt=url&include_usage=1")
            if out is None:
                env.violation(case, "wrong_answer", "upgrade refused")
            elif out.how == "timeout":
                env.violation(case, "stall", "WebSocket not closed: %r" % out)
            else:
                check_ws_json(env, case, out)
        return Case(index, "ws", "url_prompt", short(frames, 200), run)
    if kind == "unmasked":
        return frames_case("unmasked", ws_frame(0x1, request, mask=False), P1002)
    if kind == "oversize":
        n = rng.choice([1 << 63, (1 << 64) - 1, 1 << 40, 200000])
        payload = ws_frame(0x1, b"", length=n)[:10] if n >= 65536 else ws_frame(0x1, b"", length=n)
        return frames_case("oversize.%d" % n, payload, {1002} if n >> 63 else {1009})
    if kind == "fragmented_control":
        payload = rng.choice([ws_frame(0x9, b"x", fin=False), ws_frame(0x8, b"\x03\xe8", fin=False),
                              ws_frame(0x9, b"x" * 126), ws_frame(0xA, b"y" * 200)])
        return frames_case("fragmented_control", payload, P1002)
    if kind == "close_codes":
        code = rng.choice([0, 1, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535, 1000, 1001, 3000, 4999, None])
        if code is None:
            return frames_case("close_codes.1byte", ws_frame(0x8, b"\x03"), P1002)
        if rng.random() < 0.2 and code == 1000:
            return frames_case("close_codes.bad_reason", ws_frame(0x8, b"\x03\xe8\xff\xfe"), {1007})
        valid = not (code < 1000 or code in (1004, 1005, 1006, 1015) or 1016 <= code < 3000 or code >= 5000)
        return frames_case("close_codes.%d" % code, ws_frame(0x8, code.to_bytes(2, "big") + b"bye"),
                           {code} if valid else P1002)
    if kind == "invalid_utf8":
        payload = rng.choice([ws_frame(0x1, b'{"prompt":"\xff"}'),
                              ws_frame(0x1, b'{"prompt":"\xed\xa0\x80"}'),
                              ws_frame(0x1, b"\xe2\x82", fin=False) + ws_frame(0x0, b"\x28")])
        return frames_case("invalid_utf8", payload, {1007})
    if kind == "binary":
        return frames_case("binary", ws_frame(0x2, request), {1003})
    if kind == "bad_continuation":
        payload = rng.choice([ws_frame(0x0, b"x"), ws_frame(0x1, b"{", fin=False) + ws_frame(0x1, b"}")])
        return frames_case("bad_continuation", payload, P1002)
    if kind == "reserved_opcode":
        payload = rng.choice([ws_frame(0x3, b"x"), ws_frame(0xB, b"x"), ws_frame(0x1, request, rsv=4),
                              ws_frame(0x1, request, rsv=1)])
        return frames_case("reserved_opcode", payload, P1002)
    if kind == "big_message":
        n = rng.choice([128 * 1024 + 1, 300000])
        parts = ws_frame(0x1, b"a" * 60000, fin=False) + ws_frame(0x0, b"b" * (n - 60000))
        return frames_case("big_message", parts, {1009}, extra_deadline=2)
    if kind == "valid":
        bad_req = rng.random() < 0.3
        body = rng.choice([b"[]", b'{"prompt": 5}', b"[" * 5000, b'{"backend":"x"}']) if bad_req else request
        return frames_case("valid" if not bad_req else "bad_request", ws_frame(0x1, body),
                           {1008} if bad_req else {1000}, wait_done=not bad_req, extra_deadline=2)
    if kind == "valid_then_close":
        rst = rng.random() < 0.5

        def run(env, case):
            with socket.create_connection(env.d.front, timeout=5) as s:
                send_quiet(s, ws_upgrade_request())
                head, how = recv_until(s, now() + seconds, stop=lambda d: b"\r\n\r\n" in d)
                if not head.startswith(b"HTTP/1.1 101"):
                    env.violation(case, "wrong_answer", "upgrade refused: %s" % short(head))
                    return
                send_quiet(s, ws_frame(0x1, request))
                recv_until(s, now() + 0.5, stop=lambda d: len(d) > 20)
                if rst:
                    set_linger0(s)
        return Case(index, "ws", "valid_then_close", "request %s, then %s" % (short(request, 80),
                                                                             "RST" if rst else "close"), run)
    if kind == "ping_flood":
        n = rng.choice([1000, 5000, 20000])
        size = rng.choice([0, 125])

        def run(env, case):
            with socket.create_connection(env.d.front, timeout=5) as s:
                send_quiet(s, ws_upgrade_request())
                head, how = recv_until(s, now() + seconds, stop=lambda d: b"\r\n\r\n" in d)
                if not head.startswith(b"HTTP/1.1 101"):
                    env.violation(case, "wrong_answer", "upgrade refused: %s" % short(head))
                    return
                frame = ws_frame(0x9, b"p" * size, key=b"\x01\x02\x03\x04")
                deadline = now() + 2.0
                batch = frame * 100
                for _ in range(n // 100):
                    if now() > deadline or not send_quiet(s, batch, deadline):
                        break
                set_linger0(s)
        return Case(index, "ws", "ping_flood", "%d pings of %d bytes, never reading" % (n, size), run)
    # openai over WebSocket
    name = rng.choice(SCENARIO_NAMES)
    req = json.dumps({"prompt": "x", "backend": "openai", "test_pattern": "h:%s:%d" % (name, index)}).encode()

    def run(env, case):
        exp = SCENARIOS[name][1]
        out = ws_session(env, ws_frame(0x1, req), rng_linger(index) if exp.open else exp.deadline + SLACK)
        if out is None:
            env.violation(case, "wrong_answer", "upgrade refused")
            return
        kind2 = out.kind()
        err = out.error()
        if exp.open and kind2 == "incomplete":
            if out.how == "timeout":
                check_hangup(env, case, str(index), "WebSocket client left an open stream")
            return
        how = out.how if out.close_code is None else "eof"
        check_ws_json(env, case, out)
        check_scenario(env, case, name, kind2, err.get("status"), err.get("type"), how)
    return Case(index, "ws", "openai." + name, short(req, 200), run)


def check_ws_json(env, case, out):
    for m in out.messages:
        if isinstance(m, bytes):
            env.violation(case, "client_json_invalid", "a WebSocket text message is not strict JSON: %s" % short(m, 200))
            return


def ws_session(env, payload, seconds, plan=None, path="/v1/ws"):
    """Upgrade, send `payload` (in the packets of `plan`), read frames until EOF
    or `seconds`; None if not upgraded."""
    with socket.create_connection(env.d.front, timeout=5) as s:
        deadline = now() + seconds
        send_quiet(s, ws_upgrade_request(path), deadline)
        head, how = recv_until(s, deadline, stop=lambda d: b"\r\n\r\n" in d)
        if not head.startswith(b"HTTP/1.1 101"):
            return None
        rest = head.split(b"\r\n\r\n", 1)[1]
        send_split(s, payload, plan, deadline)
        data, how = recv_until(s, deadline)
        frames, messages, code, _ = ws_read_bytes(rest + data)
        return WSOutcome(True, 101, messages, code, how, frames)


def ws_read_bytes(data):
    frames = ws_parse_server(data)
    messages, code = [], None
    for op, payload in frames:
        if op == 0x1:
            try:
                messages.append(strict_json(payload.decode("utf-8")))
            except (ValueError, RecursionError):
                messages.append(payload)  # (bytes: reported as client_json_invalid)
        elif op == 0x8 and code is None:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
    return frames, messages, code, None


# -- (d) the metrics port --

def metrics_case(index, rng):
    kind = rng.choices(["random_bytes", "slow", "huge", "valid", "no_read"], [4, 2, 2, 4, 1])[0]
    if kind == "random_bytes":
        raw = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 9000)))
        allowed = {("status", 400), ("status", 404), ("status", 405), ("status", 431), ("none", None)}
        return Case(index, "metrics", kind, short(raw), _metrics_run(raw, allowed))
    if kind == "slow":
        raw = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
        every = rng.choice([0.02, 0.05, 0.2])
        allowed = {("status", 200), ("none", None)}
        return Case(index, "metrics", kind, "a byte per %gs of %s" % (every, short(raw)),
                    _metrics_run(raw, allowed, trickle=every))
    if kind == "huge":
        raw = b"GET /metrics HTTP/1.1\r\nHost: t\r\nX: " + b"h" * rng.choice([9000, 100000, 1000000])
        return Case(index, "metrics", kind, short(raw), _metrics_run(raw, {("status", 431), ("none", None)}))
    if kind == "no_read":
        raw = b"GET /metrics HTTP/1.1\r\n\r\n" * 50
        return Case(index, "metrics", kind, "50 pipelined scrapes, never read", _metrics_run(raw, None, read=False))
    method = rng.choice(["GET", "HEAD", "POST", "DELETE"])
    path = rng.choice(["/metrics", "/healthz", "/", "/metrics?x=1", "/nope"])
    raw = ("%s %s HTTP/1.1\r\nHost: t\r\n\r\n" % (method, path)).encode()
    base = path.split("?")[0]
    if base not in ("/metrics", "/healthz"):
        allowed = {("status", 404)}
    elif method not in ("GET", "HEAD"):
        allowed = {("status", 405)}
    else:
        allowed = {("status", 200)}
    return Case(index, "metrics", "valid.%s" % method, short(raw), _metrics_run(raw, allowed))


def _metrics_run(raw, allowed, trickle=None, read=True):
    def run(env, case):
        with socket.create_connection(env.d.metrics, timeout=5) as s:
            deadline = now() + METRICS_TIMEOUT + SLACK
            if trickle:
                for i in range(len(raw)):
                    if not send_quiet(s, raw[i:i + 1], deadline):
                        break
                    time.sleep(trickle)
            else:
                send_quiet(s, raw, deadline)
            if not read:
                time.sleep(0.5)
                return
            data, how = recv_until(s, deadline)
            if allowed is not None:
                out = classify(data, how)
                check_outcome(env, case, out, allowed)
    return run


# ---------------------------------------------------------------- the mix --

CLASSES = [("handoff", handoff_case, 40), ("http", http_case, 33), ("ws", ws_case, 17), ("metrics", metrics_case, 10)]


def make_case(seed, index):
    rng = random.Random("%s:%d" % (seed, index))
    _, make, _ = rng.choices(CLASSES, [w for _, _, w in CLASSES])[0]
    return make(index, rng)


def run_case(env, case):
    with env.lock:
        env.counts[case.cls] += 1
        env.kinds["%s.%s" % (case.cls, case.kind.split(".")[0])] += 1
    try:
        case.run(env, case)
    except (ConnectionRefusedError, FileNotFoundError) as e:
        if env.d.alive():
            env.violation(case, "refused", "daemon refused a connection: %s" % e)
    except (OSError, socket.timeout):
        pass  # the daemon closed or reset us: a fair answer to a hostile peer
    except Exception:
        with env.lock:
            env.harness_errors.append("%r\n%s" % (case, traceback.format_exc()))


class Mix:
    """Run cases from `seed` on `threads` threads for `seconds` (or only
    `indexes`); the daemon's death stops the mix and names the cases in flight."""

    def __init__(self, env, seed, seconds, threads=16, indexes=None, max_cases=1000000):
        self.env, self.seed, self.seconds, self.threads = env, seed, seconds, threads
        self.indexes = list(indexes) if indexes is not None else None
        self.max_cases = max_cases
        self.next = 0
        self.lock = threading.Lock()
        self.in_flight = {}
        self.recent = collections.deque(maxlen=50)
        self.died_with = None  # cases in flight when the daemon died
        self.stop = False

    def take(self):
        with self.lock:
            if self.stop:
                return None
            if self.indexes is not None:
                if not self.indexes:
                    return None
                return self.indexes.pop(0)
            if self.next >= self.max_cases:
                return None
            self.next += 1
            return self.next - 1

    def worker(self):
        me = threading.current_thread()
        try:
            while True:
                index = self.take()
                if index is None:
                    return
                case = make_case(self.seed, index)
                with self.lock:
                    self.in_flight[me] = case
                run_case(self.env, case)
                with self.lock:
                    self.in_flight.pop(me, None)
                    self.recent.append(case)
        except Exception:
            self.env.harness_errors.append(traceback.format_exc())
        finally:
            self.env.close_thread()

    def run(self):
        end = now() + self.seconds
        workers = [threading.Thread(target=self.worker, name="hostile-%d" % i, daemon=True)
                   for i in range(self.threads)]
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):
            if now() > end:
                with self.lock:
                    self.stop = True
            if not self.env.d.alive() and self.died_with is None:
                with self.lock:
                    self.died_with = list(self.in_flight.values()) + list(self.recent)[-10:]
                    self.stop = True
            time.sleep(0.05)
        for w in workers:
            w.join(30)
        return self


# ------------------------------------------------------------ after the mix --

def log_findings(log_bytes):
    """Lines of the daemon's log that are failures: a traceback outside an
    `internal error` line, level=critical, 'event loop crashed', a line that
    is not a log record (a raw traceback), or raw control bytes."""
    bad = []
    ctrl = re.compile(rb"[\x00-\x1f\x7f]|\xc2[\x80-\x9f]")
    separators = re.compile(b"\xe2\x80[\xa8\xa9\xaa-\xae]|\xe2\x81[\xa6-\xa9]")  # U+2028/9, bidi controls
    record = re.compile(r"ts=\S+ level=(\w+) msg=")
    for line in log_bytes.split(b"\n"):
        if not line:
            continue
        text = line.decode("utf-8", "replace")
        m = record.match(text)
        if m is None:
            bad.append(("not_a_log_line", text))  # a raw traceback, a thread's exception
        elif m.group(1) == "critical" or text[m.end():].startswith(('"event loop crashed', '"worker crashed')):
            bad.append(("crash", text))
        elif "Traceback" in text:
            # the containment line (msg="internal error" where=…): allowed, but listed
            contained = text[m.end():].startswith('"internal error')
            bad.append(("internal_error" if contained else "traceback", text))
        if ctrl.search(line):
            bad.append(("control_bytes", text))
        elif separators.search(line):
            bad.append(("unicode_separators", text))
    return bad


SEVERITY = ["crash", "traceback", "not_a_log_line", "control_bytes", "internal_error", "unicode_separators"]
FAILING_LOG_KINDS = {"crash", "traceback", "not_a_log_line", "control_bytes"}


def log_summary(findings, limit=30):
    """Group log findings by (kind, msg, exception) with a count and one example
    each, the worst first.  Lines of a raw traceback count as one group."""
    groups = collections.OrderedDict()
    for kind, text in findings:
        msg = re.search(r'msg=("(?:[^"\\]|\\.)*"|\S+)', text)
        exc = re.findall(r"\\n(\w+(?:\.\w+)*(?:Error|Exception|Warning)\b[^\\]*)", text)
        exc = re.sub(r"\d+", "N", exc[-1][:120]) if exc else ""
        key = (kind, msg.group(1) if msg else "(raw stderr)", exc)
        groups.setdefault(key, [0, text])
        groups[key][0] += 1
    out = []
    order = sorted(groups.items(), key=lambda kv: SEVERITY.index(kv[0][0]) if kv[0][0] in SEVERITY else 99)
    for (kind, msg, exc), (n, text) in order[:limit]:
        out.append("%dx %s msg=%s %s\n    e.g. %s" % (n, kind, msg, exc, text[:900]))
    return out


def scrape_metrics(d):
    with socket.create_connection(d.metrics, timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        data, _ = recv_until(s, now() + 10)
    reasons = {}
    for m in re.finditer(rb'^daemon_handoff_errors_total\{reason="(\w+)"\} ([0-9.e+]+)', data, re.M):
        reasons[m.group(1).decode()] = int(float(m.group(2)))
    return reasons


def final_stream_checks(d, up):
    """A normal mock handoff, a normal POST on the front, a valid openai
    handoff (keep-alive: leaves exactly one pooled upstream connection, as
    the warm-up did).  Returns a list of problems."""
    problems = []

    def handoff(data, what):
        a, b = socket.socketpair()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.settimeout(5)
                s.connect(d.path)
                s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [b.fileno()]))])
            b.close()
            out = read_stream(a, now() + 10)
            if out.kind != "done":
                problems.append("%s after the mix: %r %s" % (what, out, short(out.data, 300)))
        finally:
            a.close()
            b.close()

    handoff(b'{"prompt":"final","include_usage":true}', "mock handoff")
    with socket.create_connection(d.front, timeout=5) as s:
        s.sendall(http_post("/v1/stream", b'{"prompt":"final"}'))
        data, how = recv_until(s, now() + 10)
    out = classify(data, how)
    if out.kind != "done":
        problems.append("POST /v1/stream after the mix: %r %s" % (out, short(out.data, 300)))
    handoff(b'{"prompt":"final","backend":"openai","test_pattern":"h:valid_chunked:final"}', "openai handoff")
    return problems


def warm_up(d, up):
    """Touch every path once (imports, helper threads, the upstream pool),
    then return the daemon's settled fd count: the baseline."""
    problems = final_stream_checks(d, up)
    with socket.create_connection(d.metrics, timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        recv_until(s, now() + 5)
    out = ws_session(Env(d, up, 0), ws_frame(0x1, b'{"prompt":"warm"}'), 10)
    if out is None or out.kind() != "done":
        problems.append("warm-up WebSocket stream: %r" % out)
    return problems, settle_fds(d, None, 3.0)


def settle_fds(d, target, timeout):
    """Poll the daemon's fd count until it equals `target` (or, without a
    target, until it stops changing for 0.5 s); return the last count."""
    end = now() + timeout
    last, since = d.fd_count(), now()
    while now() < end:
        time.sleep(0.1)
        n = d.fd_count()
        if target is not None and n == target:
            return n
        if n != last:
            last, since = n, now()
        elif target is None and now() - since >= 0.5:
            return n
    return last


def report(env, mix, seconds):
    lines = ["hostile mix: seed=%s, %.1fs, %d cases" % (env.seed, seconds, sum(env.counts.values())),
             "  by class: " + ", ".join("%s=%d" % kv for kv in sorted(env.counts.items())),
             "  by kind:  " + ", ".join("%s=%d" % kv for kv in sorted(env.kinds.items())),
             "  upstream scenarios served: %d (%d kinds)" % (sum(env.up.counts.values()), len(env.up.counts))]
    return "\n".join(lines)


def group_violations(vs, limit=40):
    groups = collections.OrderedDict()
    for v in vs:
        key = (v["category"], v["cls"], v["kind"])
        groups.setdefault(key, []).append(v)
    out = []
    for (cat, cls, kind), items in list(groups.items())[:limit]:
        v = items[0]
        out.append("%dx %s in %s.%s: %s\n    replay: --seed %s --case %d   input: %s"
                   % (len(items), cat, cls, kind, v["message"][:400], v["seed"], v["case"], v["desc"][:300]))
    if len(groups) > limit:
        out.append("... and %d more groups" % (len(groups) - limit))
    return out


# ------------------------------------------------------------- command line --

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", default=None)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--case", type=int, action="append", help="run only this case index (repeatable)")
    p.add_argument("--kind", help="run only cases whose class.kind starts with this (among the first 20000)")
    p.add_argument("--show", action="store_true", help="print the cases and exit")
    p.add_argument("--streamd", default=STREAMD, help="streamd.py to run")
    p.add_argument("--keep", action="store_true", help="keep the work directory (log)")
    a = p.parse_args(argv)
    seed = a.seed if a.seed is not None else str(random.SystemRandom().randrange(1 << 32))
    if a.kind:
        a.case = a.case or []
        for i in range(20000):
            c = make_case(seed, i)
            if ("%s.%s" % (c.cls, c.kind)).startswith(a.kind):
                a.case.append(i)
                if len(a.case) >= 50:
                    break
    if a.show:
        for i in a.case or range(20):
            print(make_case(seed, i))
        return 0
    work = tempfile.mkdtemp(prefix="hostile-")
    up = HostileUpstream(seed)
    hole = Blackhole()
    try:
        d = StreamdProcess(work, up.port, streamd=a.streamd, blackhole_port=hole.port)
    except BaseException:
        up.close()
        hole.close()
        raise
    try:
        problems, baseline = warm_up(d, up)
        env = Env(d, up, seed)
        start = now()
        mix = Mix(env, seed, a.seconds, threads=min(4, a.threads) if a.case else a.threads, indexes=a.case).run()
        print(report(env, mix, now() - start))
        up.close_connections()
        if d.alive():
            problems += final_stream_checks(d, up)
            fds = settle_fds(d, baseline, 10)
            if fds != baseline:
                problems.append("daemon fds: %d after, %d baseline\n  %s" % (fds, baseline, "\n  ".join(d.fd_listing())))
            reasons = scrape_metrics(d)
            for r, n in sorted(env.expected_reasons.items()):
                if reasons.get(r, 0) < n:
                    problems.append("handoff_errors{reason=%s} = %d, but %d such handoffs were sent"
                                    % (r, reasons.get(r, 0), n))
        else:
            problems.append("daemon died (exit %s); cases in flight / just before: %s"
                            % (d.proc.returncode, "\n  ".join(map(repr, mix.died_with or []))))
        for line in group_violations(env.violations):
            print("VIOLATION", line)
        for line in group_violations(env.notes):
            print("NOTE", line)
        for line in log_summary(log_findings(d.log_bytes())):
            print("LOG", line)
        for e in env.harness_errors + up.errors:
            print("HARNESS", e)
        for pr in problems:
            print("PROBLEM", pr)
        print("log: %s" % d.log_path)
    finally:
        d.stop()
        up.close()
        hole.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
