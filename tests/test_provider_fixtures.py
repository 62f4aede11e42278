"""Provider conformance: real provider streams (tests/fixtures/streams/, written
from each provider's documentation) fed through streamd, compared with what
streamd's client must receive (the expectations in <case>.json; the layout and
schema are in tests/fixtures/streams/README.md).

Each fixture body is served by a raw HTTP/1.1 upstream with Transfer-Encoding:
chunked, once as a single HTTP chunk and once as one byte per HTTP chunk (so
every SSE line, JSON token and UTF-8 character is split).  Fixtures that ask
for include_reasoning / include_usage are also run with the flag off, with the
expectation derived from the output rules (reasoning dropped; the final event
kept only for a turn that ended with tool calls, then without usage)."""
import copy
import json
import os
import socket
import threading

import pytest

from conftest import client
from test_backends import PATHS, settings

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "streams")
PROVIDERS = ("anthropic", "openai", "gemini")
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable", 529: "Overloaded"}


def fixture_cases():
    out = []
    for provider in PROVIDERS:
        for name in sorted(os.listdir(os.path.join(FIXTURES, provider))):
            if name.endswith(".sse"):
                out.append("%s/%s" % (provider, name[:-4]))
    return out


CASES = fixture_cases()


def load(case):
    with open(os.path.join(FIXTURES, case + ".json"), encoding="utf-8") as f:
        expected = json.load(f)
    with open(os.path.join(FIXTURES, case + ".sse"), "rb") as f:
        body = f.read()
    return body, expected


class ChunkedUpstream:
    """A raw HTTP/1.1 upstream on 127.0.0.1: reads each request whole, answers it
    with `body` in Transfer-Encoding: chunked (one chunk, or one byte per
    chunk), half-closes, and waits for the peer to close (a threaded server,
    one thread per connection)."""

    def __init__(self, body: bytes, status: int = 200, content_type: str = "text/event-stream; charset=utf-8",
                 chunking: str = "whole"):
        if chunking == "whole":
            framed = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
        elif chunking == "bytewise":
            framed = b"".join(b"1\r\n" + body[i:i + 1] + b"\r\n" for i in range(len(body)))
        else:
            raise ValueError(chunking)
        self.answer = (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n"
                       b"Cache-Control: no-cache\r\n\r\n" % (status, REASONS.get(status, "Status").encode(),
                                                           content_type.encode())
                       + framed + b"0\r\n\r\n")
        self.requests = []  # (request line, {header: value}, body)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)  # (a blocking accept() would outlive close())
        self.base = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.stopped = False
        self.lock = threading.Lock()
        self.conns, self.threads = [], []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while not self.stopped:
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                if self.stopped:
                    c.close()
                    return
                t = threading.Thread(target=self.handle, args=(c,), daemon=True)
                self.conns.append(c)
                self.threads.append(t)
            t.start()

    def handle(self, c):
        try:
            c.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                got = c.recv(65536)
                if not got:
                    return
                data += got
            head, _, rest = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            length = int(headers.get("content-length", "0"))
            while len(rest) < length:
                got = c.recv(65536)
                if not got:
                    return
                rest += got
            self.requests.append((lines[0], headers, rest[:length]))
            c.sendall(self.answer)
            c.shutdown(socket.SHUT_WR)
            while c.recv(65536):  # until streamd closes its end
                pass
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        with self.lock:
            self.stopped = True
            conns, threads = list(self.conns), list(self.threads)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in threads:
            t.join(5)
        self.thread.join(5)
        self.sock.close()


def parse_stream(raw: bytes) -> dict:
    """What a client of streamd got: status, and for a stream its events sorted
    into content / reasoning / tool_calls / final / error / [DONE], with
    anything outside the output rules listed under "problems"."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, "no complete response head in %r" % raw[:200]
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    status = int(status_line.split(" ")[1])
    got = {"status": status, "content": "", "reasoning": "", "tool_calls": [], "final": None,
           "complete": False, "error": None, "problems": [], "kinds": []}
    if status != 200:
        try:
            err = json.loads(rest)["error"]
        except (ValueError, KeyError, TypeError):
            got["problems"].append("error response body is not {\"error\": {...}}: %r" % rest[:300])
        else:
            got["error"] = {"type": err.get("type"), "message": err.get("message", "")}
        return got
    blocks = rest.split(b"\n\n")
    if blocks[-1] != b"":
        got["problems"].append("stream ends inside an event: %r" % blocks[-1][:200])
    for block in blocks[:-1]:
        if block.startswith(b":"):  # ": ping" heartbeat
            continue
        if not block.startswith(b"data: ") or b"\n" in block:
            got["problems"].append("not a one-line data event: %r" % block[:200])
            continue
        payload = block[6:]
        if got["complete"] or got["error"] is not None:
            got["problems"].append("event after [DONE] or the error event: %r" % payload[:200])
        if payload == b"[DONE]":
            got["complete"] = True
            got["kinds"].append("done")
            continue
        try:
            ev = json.loads(payload)
        except ValueError:
            got["problems"].append("event data is not JSON: %r" % payload[:200])
            continue
        if not isinstance(ev, dict):
            got["problems"].append("event is not a JSON object: %r" % payload[:200])
        elif set(ev) == {"content"} and isinstance(ev["content"], str):
            got["content"] += ev["content"]
            got["kinds"].append("content")
        elif set(ev) == {"reasoning"} and isinstance(ev["reasoning"], str):
            got["reasoning"] += ev["reasoning"]
            got["kinds"].append("reasoning")
        elif set(ev) == {"tool_call"} and isinstance(ev["tool_call"], dict):
            got["tool_calls"].append(ev["tool_call"])
            got["kinds"].append("tool_call")
        elif "finish_reason" in ev:
            if got["final"] is not None:
                got["problems"].append("a second final event: %r" % ev)
            got["final"] = ev
            got["kinds"].append("final")
        elif set(ev) == {"error"} and isinstance(ev["error"], dict):
            got["error"] = {"type": ev["error"].get("type"), "message": ev["error"].get("message", "")}
            got["kinds"].append("error")
        else:
            got["problems"].append("event outside the output rules: %r" % ev)
    kinds = got["kinds"]
    if "final" in kinds and kinds[-2:] != ["final", "done"]:
        got["problems"].append("the final event is not the one just before [DONE] (event order %s)" % kinds)
    if "tool_call" in kinds and "final" in kinds and kinds.index("final") < len(kinds) - 1 - kinds[::-1].index("tool_call"):
        got["problems"].append("a tool_call event after the final event")
    return got


def mismatches(got: dict, exp: dict) -> list:
    out = ["%s" % p for p in got["problems"]]
    if got["status"] != exp["status"]:
        out.append("status: got %r, expected %r" % (got["status"], exp["status"]))
    for key in ("content", "reasoning", "tool_calls", "final", "complete"):
        if got[key] != exp[key]:
            out.append("%s:\n    got      %s\n    expected %s" % (key, json.dumps(got[key], ensure_ascii=False),
                                                                 json.dumps(exp[key], ensure_ascii=False)))
    want = exp["error"]
    if want is None:
        if got["error"] is not None:
            out.append("error: got %s, expected none" % json.dumps(got["error"], ensure_ascii=False))
    elif got["error"] is None:
        out.append("error: got none, expected %s" % json.dumps(want, ensure_ascii=False))
    else:
        if got["error"]["type"] != want["type"]:
            out.append("error type: got %r, expected %r" % (got["error"]["type"], want["type"]))
        pieces = want["message_contains"]
        for piece in [pieces] if isinstance(pieces, str) else pieces:
            if piece not in (got["error"]["message"] or ""):
                out.append("error message %r does not contain %r" % (got["error"]["message"], piece))
    return out


def derived(exp: dict, flag: str) -> dict:
    """The expectation for the same stream with `flag` (include_reasoning or
    include_usage) turned off, by the output rules."""
    exp = copy.deepcopy(exp)
    exp["request"][flag] = False
    if flag == "include_reasoning":
        exp["reasoning"] = ""
    elif exp["final"] is not None:
        if exp["tool_calls"]:
            exp["final"].pop("usage", None)
        else:
            exp["final"] = None
    return exp


def run(daemon, fdcheck, case, body, exp, chunking):
    provider = case.split("/")[0]
    upstream = exp.get("upstream", {})
    up = ChunkedUpstream(body, upstream.get("status", 200),
                         upstream.get("content_type", "text/event-stream; charset=utf-8"), chunking)
    try:
        ip = daemon(**settings(provider, up))
        c = client(ip.path, dict({"prompt": "Hello"}, **exp["request"]))
        ip.pump(c.done, timeout=10)
        raw = c.data
        c.close()
        got = parse_stream(raw)
        assert len(up.requests) == 1, "streamd sent %d requests upstream" % len(up.requests)
        line = up.requests[0][0]
        assert line.startswith("POST " + PATHS[provider].split("?")[0]), line
        problems = mismatches(got, exp)
        assert not problems, "%s (%s, request %s):\n  %s\n  (events: %s)" % (
            case, chunking, json.dumps(exp["request"]), "\n  ".join(problems), got["kinds"])
        ip.finish(fdcheck, up)
    finally:
        up.close()


@pytest.mark.parametrize("chunking", ["whole", "bytewise"])
@pytest.mark.parametrize("case", CASES)
def test_provider_stream(daemon, fdcheck, case, chunking):
    body, exp = load(case)
    run(daemon, fdcheck, case, body, exp, chunking)


def _flag_variants():
    out = []
    for case in CASES:
        _, exp = load(case)
        if exp["status"] != 200:
            continue
        for flag in ("include_reasoning", "include_usage"):
            if exp["request"].get(flag):
                out.append(pytest.param(case, flag, id="%s-%s_off" % (case, flag.split("_")[1])))
    return out


@pytest.mark.parametrize("case, flag", _flag_variants())
def test_provider_stream_with_flag_off(daemon, fdcheck, case, flag):
    body, exp = load(case)
    run(daemon, fdcheck, case, body, derived(exp, flag), "whole")


def test_every_fixture_has_a_complete_expectation():
    keys = {"doc", "request", "content", "reasoning", "tool_calls", "final", "complete", "error", "status"}
    assert CASES
    for case in CASES:
        body, exp = load(case)
        assert keys <= set(exp), "%s.json lacks %s" % (case, keys - set(exp))
        assert set(exp["request"]) <= {"include_usage", "include_reasoning"}
        if case.startswith("gemini/") and exp["status"] == 200:
            assert b"\r\n\r\n" in body and b"\n" not in body.replace(b"\r\n", b""), case + ": Gemini framing is CRLF"
        if exp["status"] == 200 and not case.startswith("gemini/"):
            assert b"\r\n" not in body.replace(b"\\r\\n", b""), case + ": LF framing"
        for call in exp["tool_calls"]:
            assert {"id", "name", "arguments"} <= set(call) <= {"id", "name", "arguments", "extra_content"}
            json.loads(call["arguments"])
        assert exp["complete"] == (exp["error"] is None and exp["status"] == 200)
