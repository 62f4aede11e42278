"""A test upstream that speaks the four providers' real wire formats.

Standard library only: a listening socket (TCP on 127.0.0.1, optionally TLS, or
a Unix socket) and one thread per connection.  It serves HTTP/1.1 keep-alive,
chunked SSE by default.  The X-Test-Pattern request header picks a scenario:

  (none)        8 words, finish "stop", the provider's end marker
  unicode       emoji, CJK and 4-byte characters
  short         the whole body in 1-byte HTTP chunks (splits lines and UTF-8)
  long          3 events of 4096 ASCII characters
  abort:N       N content events, then the connection is cut (no framing end)
  cut:N         N content events, clean framing end, but no end marker (for LangGraph, which
                has none, that is a complete stream)
  finish:R      finish reason R
  status:C      HTTP status C with the provider's JSON error body (+ retry-after: 7)
  fail:N:C[:RA[:SR]]  the first N such requests get status C (retry-after RA, x-should-retry SR),
                then the default stream
  slow:MS       MS milliseconds between events
  silent        response head, then nothing until the client leaves
  nohead        reads the request, never answers
  error         2 events, then the provider's mid-stream error event
  flood:N       N events of 1 KiB, as fast as the client takes them
  burst:SIZE    SIZE bytes of content in events of 1,100 B, all written at once (one send)
  echo:C        HTTP status C with an error body that quotes the request's prompt (as upstreams do)
  empty         a complete stream with no content at all
  tools         the provider's stream of two tool calls, get_weather {"city": "Paris"} and
                get_time {"tz": "CET"}, in its own format, and no text
  length        Content-Length framing instead of chunked
  eof           no framing: Connection: close, body ends at EOF
  lateend:MS    MS milliseconds between the last event and the end of the framing
  goaway        (HTTP/2) GOAWAY after the stream: the connection takes no new streams

It records every request (path, headers, JSON body) and, per request, when
the client hung up.
"""
import json
import os
import select
import socket
import ssl
import threading
import time

WORDS = ["Hello", " from", " the", " test", " upstream", ",", " streamd", "!"]
UNICODE = ["😀", "🚀", "中", "文", "𝐀", "𝐁", "Hello 世界! 🌍", "naïve café"]


class Recorded:
    def __init__(self, path, headers, body):
        self.path, self.headers, self.body = path, headers, body
        self.hung_up = threading.Event()
        self.hung_up_at = None
        self.bytes_sent = 0
        self.protocol = "http/1.1"
        self.finished = threading.Event()


class Format:
    """How one provider frames content, the finish, usage, errors, the end."""
    eol = b"\n"

    def ev(self, obj, event=None):
        out = b""
        if event:
            out += b"event: " + event.encode() + self.eol
        out += b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode())
        return out + self.eol + self.eol


class OpenAI(Format):
    def start(self): return b""

    def content(self, text):
        return self.ev({"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0,
                        "model": "test-model", "choices": [{"index": 0, "delta": {"content": text},
                                                            "finish_reason": None}]})

    def finish(self, reason, n, body):
        out = self.ev({"id": "chatcmpl-test", "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            out += self.ev({"id": "chatcmpl-test", "choices": [],
                            "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}})
        return out

    def end(self): return self.ev(b"[DONE]")

    def tool_calls(self):
        def delta(calls):
            return self.ev({"id": "chatcmpl-test", "choices": [{"index": 0, "delta": {"tool_calls": calls},
                                                               "finish_reason": None}]})
        return [delta([{"index": 0, "id": "call_a", "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}]),
                delta([{"index": 0, "function": {"arguments": '{"city":'}}]),
                delta([{"index": 1, "id": "call_b", "type": "function",
                        "function": {"name": "get_time", "arguments": '{"tz":"CET"}'}}]),
                delta([{"index": 0, "function": {"arguments": ' "Paris"}'}}]),
                self.ev({"id": "chatcmpl-test", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})]

    def error(self): return self.ev({"error": {"message": "boom mid-stream", "type": "server_error"}})

    def status_body(self, code):
        return {"error": {"message": "test error %d" % code, "type": "test_error", "code": None}}


class Anthropic(Format):
    def start(self):
        return (self.ev({"type": "message_start", "message": {"id": "msg_test", "role": "assistant", "content": [],
                                                             "usage": {"input_tokens": 5, "output_tokens": 1}}},
                        "message_start")
                + self.ev({"type": "content_block_start", "index": 0,
                           "content_block": {"type": "text", "text": ""}}, "content_block_start")
                + self.ev({"type": "ping"}, "ping"))

    def content(self, text):
        return self.ev({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
                       "content_block_delta")

    def finish(self, reason, n, body):
        return (self.ev({"type": "content_block_stop", "index": 0}, "content_block_stop")
                + self.ev({"type": "message_delta", "delta": {"stop_reason": reason},
                           "usage": {"output_tokens": n}}, "message_delta"))

    def end(self): return self.ev({"type": "message_stop"}, "message_stop")

    def tool_calls(self):
        def ev(obj):
            return self.ev(obj, obj["type"])
        return [ev({"type": "content_block_stop", "index": 0}),
                ev({"type": "content_block_start", "index": 1, "content_block": {
                    "type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {}}}),
                ev({"type": "content_block_delta", "index": 1,
                    "delta": {"type": "input_json_delta", "partial_json": ""}}),
                ev({"type": "content_block_delta", "index": 1,
                    "delta": {"type": "input_json_delta", "partial_json": '{"city":'}}),
                ev({"type": "content_block_delta", "index": 1,
                    "delta": {"type": "input_json_delta", "partial_json": ' "Paris"}'}}),
                ev({"type": "content_block_stop", "index": 1}),
                ev({"type": "content_block_start", "index": 2, "content_block": {
                    "type": "tool_use", "id": "toolu_b", "name": "get_time", "input": {}}}),
                ev({"type": "content_block_delta", "index": 2,
                    "delta": {"type": "input_json_delta", "partial_json": '{"tz":"CET"}'}}),
                ev({"type": "content_block_stop", "index": 2}),
                ev({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}})]

    def error(self):
        return self.ev({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, "error")

    def status_body(self, code):
        return {"type": "error", "error": {"type": "rate_limit_error", "message": "test error %d" % code}}


class Gemini(Format):
    eol = b"\r\n"  # Gemini frames events with CRLF

    def start(self): return b""

    def content(self, text):
        return self.ev({"candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}],
                        "usageMetadata": {"promptTokenCount": 5, "totalTokenCount": 5}})

    def finish(self, reason, n, body):
        return self.ev({"candidates": [{"content": {"parts": [{"text": ""}], "role": "model"},
                                        "finishReason": reason.upper(), "index": 0}],
                        "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": n,
                                          "totalTokenCount": 5 + n}})

    def end(self): return b""  # the finishReason is Gemini's end marker

    def tool_calls(self):
        return [self.ev({"candidates": [{"content": {"role": "model", "parts": [
                    {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2ln"},
                    {"functionCall": {"name": "get_time", "args": {"tz": "CET"}}}]},
                    "finishReason": "STOP", "index": 0}],
                    "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 9, "totalTokenCount": 14}})]

    def error(self): return self.ev({"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}})

    def status_body(self, code):
        return {"error": {"code": code, "message": "test error %d" % code, "status": "RESOURCE_EXHAUSTED"}}


class LangGraph(Format):
    def start(self):
        return self.ev({"run_id": "run-1", "attempt": 1}, "metadata") + b": heartbeat\n\n"

    def content(self, text):
        return self.ev([{"content": text, "type": "AIMessageChunk", "id": "m1"},
                        {"langgraph_node": "agent"}], "messages")

    def finish(self, reason, n, body):
        # a tool message in between: must not reach the client as text
        return self.ev([{"content": "TOOL OUTPUT", "type": "tool", "id": "t1"}, {}], "messages")

    def end(self): return b""  # a real LangGraph server sends no end marker: the stream just closes

    def tool_calls(self):
        def chunk(tcc):
            return self.ev([{"content": "", "type": "AIMessageChunk", "id": "m2", "tool_call_chunks": tcc},
                            {"langgraph_node": "agent"}], "messages")
        return [chunk([{"name": "get_weather", "args": "", "id": "lc_a", "index": 0}]),
                chunk([{"name": None, "args": '{"city":', "id": None, "index": 0}]),
                chunk([{"name": None, "args": ' "Paris"}', "id": None, "index": 0}]),
                chunk([{"name": "get_time", "args": '{"tz":"CET"}', "id": "lc_b", "index": 1}])]

    def error(self): return self.ev({"error": "ValueError", "message": "boom"}, "error")

    def status_body(self, code): return {"detail": "test error %d" % code}


def route(path):
    if path.endswith("/chat/completions"):
        return OpenAI()
    if path.endswith("/v1/messages"):
        return Anthropic()
    if ":streamGenerateContent" in path:
        return Gemini()
    if path.endswith("/runs/stream"):
        return LangGraph()
    return None


class TestUpstream:
    __test__ = False  # not a pytest test class
    def __init__(self, tls_context=None, unix_path=None, h2=False):
        if unix_path:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(unix_path)
        else:
            self.sock = socket.socket()
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.tls = tls_context
        self.h2 = h2  # speak HTTP/2: h2c prior knowledge, or h2 when ALPN picks it
        self.h2_max_streams = None  # SETTINGS_MAX_CONCURRENT_STREAMS to announce
        self.unix_path = unix_path
        self.port = None if unix_path else self.sock.getsockname()[1]
        self.requests = []
        self.failed = {}  # fail:… pattern -> requests seen
        self.connections = 0
        self.handshake_delay = 0.0  # seconds before the TLS handshake (a slow upstream)
        self.default_delay = 0.0    # seconds between events when no pattern says otherwise
        self.lock = threading.Lock()
        self.stopped = False
        self.conns = []
        threading.Thread(target=self.accept_loop, daemon=True).start()

    @property
    def base(self):
        return "%s://127.0.0.1:%d" % ("https" if self.tls else "http", self.port)

    def close(self):
        self.stopped = True
        self.sock.close()
        for c in list(self.conns):
            try:
                c.close()
            except OSError:
                pass

    def accept_loop(self):
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        self.conns.append(conn)
        try:
            if self.tls:
                if self.handshake_delay:
                    time.sleep(self.handshake_delay)
                conn = self.tls.wrap_socket(conn, server_side=True)
                self.conns.append(conn)
            if self.h2 and (not self.tls or conn.selected_alpn_protocol() == "h2"):
                return self.serve_h2(conn)
            buf = b""
            while not self.stopped:
                req, buf = self.read_request(conn, buf)
                if req is None:
                    return
                if not self.respond(conn, req):
                    return
        except (OSError, ssl.SSLError):
            return
        except Exception as e:  # h2 protocol errors: the client went away mid-frame
            if type(e).__module__.startswith("h2"):
                return
            raise
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def read_request(self, conn, buf):
        while b"\r\n\r\n" not in buf:
            data = conn.recv(65536)
            if not data:
                return None, b""
            buf += data
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0"))
        while len(buf) < n:
            data = conn.recv(65536)
            if not data:
                return None, b""
            buf += data
        body, buf = buf[:n], buf[n:]
        rec = Recorded(path, headers, json.loads(body) if body else None)
        with self.lock:
            self.requests.append(rec)
        return rec, buf

    # -- responses --

    def wait_hangup(self, conn, rec, seconds):
        """Sleep up to `seconds`, noticing if the client hangs up meanwhile."""
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return False
            poller = select.poll()  # not select(): fds above 1024 under load
            try:
                poller.register(conn, select.POLLIN)
            except ValueError:  # closed under us: the server is shutting down
                return True
            if poller.poll(left * 1000):
                try:
                    data = conn.recv(1)
                except (OSError, ssl.SSLError):
                    data = b""
                if not data:
                    rec.hung_up_at = time.monotonic()
                    rec.hung_up.set()
                    return True

    def send(self, conn, rec, data):
        try:
            conn.sendall(data)
        except (OSError, ssl.SSLError):
            rec.hung_up_at = time.monotonic()
            rec.hung_up.set()
            return False
        rec.bytes_sent += len(data)
        return True

    def plan(self, rec):
        """What to answer, whatever the protocol: ("json", code, extra headers, body),
        ("nohead",), or ("sse", events, options)."""
        if rec.path.endswith("/threads") and rec.body is not None:
            return ("json", 200, {}, json.dumps({"thread_id": rec.body.get("thread_id")}).encode())
        fmt = route(rec.path)
        pattern = rec.headers.get("x-test-pattern", "")
        name, _, arg = pattern.partition(":")
        if fmt is None:
            return ("json", 404, {}, b"")
        if name == "nohead":
            return ("nohead",)
        if name == "fail":
            # fail:N:CODE[:RETRY_AFTER[:SHOULD_RETRY]]: the first N requests with this
            # pattern get CODE, later ones the default stream
            parts = arg.split(":")
            with self.lock:
                self.failed[pattern] = self.failed.get(pattern, 0) + 1
                failing = self.failed[pattern] <= int(parts[0])
            if failing:
                extra = {}
                if len(parts) > 2 and parts[2]:
                    extra["retry-after"] = parts[2]
                if len(parts) > 3:
                    extra["x-should-retry"] = parts[3]
                code = int(parts[1])
                return ("json", code, extra, json.dumps(fmt.status_body(code)).encode())
            name = ""
        if name == "status":
            code = int(arg)
            return ("json", code, {"retry-after": "7"}, json.dumps(fmt.status_body(code)).encode())
        if name == "echo":
            quoted = json.dumps(rec.body, ensure_ascii=False)[:500]
            body = {"error": {"message": "invalid request: %s" % quoted, "type": "invalid_request_error"}}
            return ("json", int(arg), {}, json.dumps(body).encode())
        pieces, finish, end, delay = list(WORDS), "stop", True, self.default_delay
        cut_connection = error = False
        if name == "unicode":
            pieces = UNICODE
        elif name == "long":
            pieces = ["x" * 4096] * 3
        elif name == "abort":
            pieces, cut_connection = WORDS[:int(arg)], True
        elif name == "cut":
            pieces, end = WORDS[:int(arg)], False
        elif name == "finish":
            finish = arg or "stop"
        elif name == "slow":
            delay = int(arg) / 1000
        elif name == "error":
            pieces, error = WORDS[:2], True
        elif name == "empty":
            pieces = []
        elif name == "flood":
            pieces = ["y" * 1024] * int(arg)
        elif name == "burst":
            size = int(arg)
            pieces = ["z" * min(1100, size - i) for i in range(0, size, 1100)]
        if name == "tools":  # two tool calls (get_weather Paris, get_time CET) and no text
            events = [fmt.start()] + fmt.tool_calls() + [fmt.end()]
            return ("sse", [e for e in events if e], {
                "name": name, "arg": arg, "delay": delay, "cut": False, "framing": "chunked"})
        events = [fmt.start()] + [fmt.content(p) for p in pieces]
        if error:
            events.append(fmt.error())
        elif not cut_connection:
            if end or not isinstance(fmt, Gemini):
                events.append(fmt.finish(finish, len(pieces), rec.body or {}))
            if end:
                events.append(fmt.end())
        return ("sse", [e for e in events if e], {
            "name": name, "arg": arg, "delay": delay, "cut": cut_connection,
            "framing": {"length": "length", "eof": "eof"}.get(name, "chunked")})

    def respond(self, conn, rec):
        """HTTP/1.1."""
        plan = self.plan(rec)
        if plan[0] == "nohead":
            self.wait_hangup(conn, rec, 30)
            return False
        if plan[0] == "json":
            _, code, extra, body = plan
            head = "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n" % (code, "OK" if code == 200 else "Error")
            head += "".join("%s: %s\r\n" % kv for kv in extra.items())
            return self.send(conn, rec, (head + "Content-Length: %d\r\n\r\n" % len(body)).encode() + body)
        _, events, o = plan
        name, framing = o["name"], o["framing"]
        head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        if framing == "chunked":
            head += "Transfer-Encoding: chunked\r\n"
        elif framing == "length":
            head += "Content-Length: %d\r\n" % sum(len(e) for e in events)
        else:
            head += "Connection: close\r\n"
        if not self.send(conn, rec, (head + "\r\n").encode()):
            return False
        if name == "silent":
            self.wait_hangup(conn, rec, 30)
            return False
        if name == "burst":  # everything in one send: the daemon reads it as fast as it can
            events = [b"".join(b"%x\r\n%s\r\n" % (len(ev), ev) if framing == "chunked" else ev for ev in events)]
            framing_done = framing == "chunked"
        else:
            framing_done = False
        for i, ev in enumerate(events):
            if i > 1 and o["delay"] and self.wait_hangup(conn, rec, o["delay"]):
                return False
            if framing_done:
                out = ev
            elif framing != "chunked":
                out = ev
            elif name == "short":
                out = b"".join(b"1\r\n%s\r\n" % ev[j:j + 1] for j in range(len(ev)))
            else:
                out = b"%x\r\n%s\r\n" % (len(ev), ev)
            if not self.send(conn, rec, out):
                return False
        if o["cut"]:
            rec.finished.set()
            conn.shutdown(socket.SHUT_RDWR)
            return False
        if framing == "chunked":
            if name == "lateend" and self.wait_hangup(conn, rec, int(o["arg"]) / 1000):
                return False
            if not self.send(conn, rec, b"0\r\n\r\n"):
                return False
        rec.finished.set()
        return framing != "eof"

    # -- HTTP/2 (h2c prior knowledge, or ALPN h2 over TLS) --

    def serve_h2(self, conn):
        """One reader thread per connection feeds h2; each request is answered
        by its own thread, so streams interleave on the connection."""
        import h2.config
        import h2.connection
        import h2.events
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        lock = threading.Condition()  # guards c; notified when flow-control windows open
        if self.h2_max_streams:  # announced in the first SETTINGS frame
            import h2.settings
            c.local_settings = h2.settings.Settings(client=False, initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.h2_max_streams})
        with lock:
            c.initiate_connection()
            conn.sendall(c.data_to_send())
        pending, resets = {}, {}
        try:
            while not self.stopped:
                data = conn.recv(65536)
                if not data:
                    break
                with lock:
                    events = c.receive_data(data)
                    conn.sendall(c.data_to_send())
                    if any(isinstance(e, h2.events.WindowUpdated) for e in events):
                        lock.notify_all()
                for e in events:
                    if isinstance(e, h2.events.RequestReceived):
                        pending[e.stream_id] = [dict(e.headers), b""]
                        resets[e.stream_id] = threading.Event()
                    elif isinstance(e, h2.events.DataReceived):
                        pending[e.stream_id][1] += e.data
                        with lock:
                            c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                            conn.sendall(c.data_to_send())
                    elif isinstance(e, h2.events.StreamEnded) and e.stream_id in pending:
                        headers, body = pending.pop(e.stream_id)
                        rec = Recorded(headers[":path"], {k: v for k, v in headers.items() if not k.startswith(":")},
                                       json.loads(body) if body else None)
                        rec.headers["host"] = headers.get(":authority", "")
                        rec.protocol = "h2"
                        rec.reset = resets[e.stream_id]
                        with self.lock:
                            self.requests.append(rec)
                        threading.Thread(target=self.respond_h2, args=(conn, c, lock, e.stream_id, rec),
                                         daemon=True).start()
                    elif isinstance(e, h2.events.StreamReset) and e.stream_id in resets:
                        resets[e.stream_id].set()
        finally:
            for ev in resets.values():
                ev.set()  # the connection is gone: every stream's client too
            with lock:
                lock.notify_all()

    def h2_send(self, conn, c, lock, rec, fn):
        """Run fn(c) under the connection lock and send what it produced."""
        if rec.reset.is_set():
            self.mark_hangup(rec)
            return False
        try:
            with lock:
                fn(c)
                out = c.data_to_send()
                conn.sendall(out)
        except Exception:  # the stream or connection is gone (h2 StreamClosedError, OSError)
            self.mark_hangup(rec)
            return False
        rec.bytes_sent += len(out)
        return True

    def mark_hangup(self, rec):
        if not rec.hung_up.is_set():
            rec.hung_up_at = time.monotonic()
            rec.hung_up.set()

    def h2_wait(self, rec, seconds):
        """Sleep, noticing a reset of this stream (the client went away)."""
        if rec.reset.wait(seconds):
            self.mark_hangup(rec)
            return True
        return False

    def respond_h2(self, conn, c, lock, sid, rec):
        plan = self.plan(rec)
        if plan[0] == "nohead":
            self.h2_wait(rec, 30)
            return
        if plan[0] == "json":
            _, code, extra, body = plan
            self.h2_send(conn, c, lock, rec, lambda c: (
                c.send_headers(sid, [(":status", str(code)), ("content-type", "application/json"),
                                     ("content-length", str(len(body)))] + list(extra.items())),
                c.send_data(sid, body, end_stream=True)))
            return
        _, events, o = plan
        if not self.h2_send(conn, c, lock, rec, lambda c: c.send_headers(
                sid, [(":status", "200"), ("content-type", "text/event-stream")])):
            return
        if o["name"] == "silent":
            self.h2_wait(rec, 30)
            return
        for i, ev in enumerate(events):
            if i > 1 and o["delay"] and self.h2_wait(rec, o["delay"]):
                return
            frames = [ev[j:j + 1] for j in range(len(ev))] if o["name"] == "short" else [ev]
            for f in frames:
                # Respect the client's flow-control window: wait for WINDOW_UPDATE.
                with lock:
                    while (not rec.reset.is_set() and not self.stopped
                           and c.local_flow_control_window(sid) < len(f)):
                        lock.wait(0.1)
                if not self.h2_send(conn, c, lock, rec, lambda c, f=f: c.send_data(sid, f)):
                    return
        if o["cut"]:
            self.h2_send(conn, c, lock, rec, lambda c: c.reset_stream(sid))  # breaks off this stream only
            rec.finished.set()
            return
        self.h2_send(conn, c, lock, rec, lambda c: c.end_stream(sid))
        if o["name"] == "goaway":  # then refuse new streams on this connection
            self.h2_send(conn, c, lock, rec, lambda c: c.close_connection())
        rec.finished.set()

    def last(self):
        with self.lock:
            return self.requests[-1]
