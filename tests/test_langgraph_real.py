"""The langgraph backend against a REAL LangGraph Agent Server (`langgraph dev`,
in-memory runtime) serving the offline graphs in tests/langgraph_app/, through a
real streamd process and real handoffs.

The server lives in its own venv (its dependencies would clash with ours):
$STREAMD_LANGGRAPH_VENV, else .venv-langgraph (made by .ci/run from
requirements-langgraph.txt).  Without it, or if the server does not come up,
every test here is skipped, with the reason.

What the real server sends (langgraph-api 0.16.7; README "Backends"):
  200, `Transfer-Encoding: chunked`, `Content-Type: text/event-stream;
  charset=utf-8`, `Connection: keep-alive`, `Location`/`Content-Location` naming
  the run; events framed with CRLF: `event: metadata` ({"run_id", "attempt"})
  first, then one event per stream mode item (`messages-tuple` arrives as
  `event: messages`), `: heartbeat` comments every 5 s, `event: error`
  ({"error": "RuntimeError", "message": ...}) on a graph exception; and the end
  of a run is just the end of the body: the chunked terminator `0\\r\\n\\r\\n`,
  no `event: end`.
"""
import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import pytest

from conftest import ROOT, handoff_pair, read_until_eof

VENV = os.environ.get("STREAMD_LANGGRAPH_VENV") or os.path.join(ROOT, ".venv-langgraph")
LANGGRAPH = os.path.join(VENV, "bin", "langgraph")
APP_DIR = os.path.join(ROOT, "tests", "langgraph_app")
READY_TIMEOUT = 60.0  # `langgraph dev` is ready in 2-3 s on this machine; room for a slow one
AGENT_TEXT = "Hello from the fake LangGraph agent."  # tests/langgraph_app/streamd_test_graphs.py

# Everything that would make the server (or the CLI) talk to the internet is off:
# this machine has loopback only, and CI must not depend on anything else.
SERVER_ENV = {
    "LANGGRAPH_CLI_NO_ANALYTICS": "1",      # the CLI's usage beacon
    "LANGSMITH_TRACING": "false",           # LangSmith tracing, under each of its names
    "LANGSMITH_TRACING_V2": "false",
    "LANGCHAIN_TRACING_V2": "false",
    "LANGCHAIN_TRACING": "false",
    "LANGGRAPH_DISABLE_FILE_PERSISTENCE": "true",  # no threads carried over between runs
    "PYTHONDONTWRITEBYTECODE": "1",         # no __pycache__ in tests/langgraph_app
}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


class Server:
    def __init__(self, port, log_path):
        self.port = port
        self.base = "http://127.0.0.1:%d" % port
        self.log_path = log_path

    def log_tail(self, n=40):
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def request(self, method, path, body=None, timeout=15.0):
        """(status, headers with lower-case names, body) of a direct request to the server."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


@pytest.fixture(scope="module")
def lg(tmp_path_factory):
    """One real `langgraph dev` for the module; stopped (terminate, then kill) at the end."""
    if not os.access(LANGGRAPH, os.X_OK):
        pytest.skip("no LangGraph server: %s is missing (bash .ci/run installs requirements-langgraph.txt "
                    "into .venv-langgraph; or set STREAMD_LANGGRAPH_VENV)" % LANGGRAPH)
    port = _free_port()
    log_path = tmp_path_factory.mktemp("langgraph") / "langgraph-dev.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LANGSMITH_", "LANGCHAIN_", "LANGGRAPH_"))}
    env.update(SERVER_ENV)
    cmd = [LANGGRAPH, "dev", "--no-browser", "--no-reload", "--host", "127.0.0.1", "--port", str(port),
           # `langgraph dev` runs ONE run at a time unless told otherwise (its
           # --help says 10; langgraph_api/cli.py passes 1): other runs queue.
           "--n-jobs-per-worker", "10"]
    server = Server(port, log_path)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=APP_DIR, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = time.monotonic()
        while True:
            if proc.poll() is not None:
                pytest.skip("the LangGraph server exited with status %s before it was ready; its log:\n%s"
                            % (proc.returncode, server.log_tail()))
            try:
                if _get(server.base + "/ok", timeout=1.0)[0] == 200:
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() - started > READY_TIMEOUT:
                pytest.skip("the LangGraph server was not ready (GET /ok) within %gs; its log:\n%s"
                            % (READY_TIMEOUT, server.log_tail()))
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---- talking to streamd ----

def start_streamd(daemon_proc, lg, *args):
    return daemon_proc("--backend", "langgraph", "--langgraph-base", lg.base, *args)


def split_response(raw):
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, "no HTTP head in %r" % raw[:200]
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v for k, v in (l.split(": ", 1) for l in lines[1:])}
    return status, headers, body


def sse_events(body):
    """[(event, data)] by the WHATWG rules (CRLF, CR or LF line ends); comments dropped."""
    text = body.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    out = []
    for block in text.split("\n\n"):
        event, data = "message", []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
        if data:
            out.append((event, "\n".join(data)))
    return out


def stream(d, handoff, timeout=30.0):
    """Hand one client to streamd; (status, headers, body, access log line) once it is done."""
    before = d.logs().count('msg="stream done"')
    c = handoff_pair(d.path, handoff)
    try:
        raw = read_until_eof(c, timeout)
    finally:
        c.close()
    d.wait_log('msg="stream done"', count=before + 1)
    line = [l for l in d.logs().splitlines() if 'msg="stream done"' in l][before]
    status, headers, body = split_response(raw)
    return status, headers, body, line


def content_of(body):
    """The uniform stream: the joined content, and the list of data payloads."""
    datas = [data for _, data in sse_events(body)]
    text = "".join(json.loads(x).get("content", "") for x in datas if x != "[DONE]")
    return text, datas


def explain(body, line):
    tail = body[-300:].decode("utf-8", "replace")
    return "\n  stream tail: %r\n  access log: %s" % (tail, line)


def assert_done(body, line):
    """A complete uniform stream: [DONE] last, no error event, outcome=done."""
    datas = [data for _, data in sse_events(body)]
    errors = [x for x in datas if x.startswith('{"error"')]
    assert not errors, "the stream ended with streamd's error event %s%s" % (errors, explain(body, line))
    assert datas and datas[-1] == "[DONE]", "no data: [DONE] at the end" + explain(body, line)
    assert "outcome=done" in line, explain(body, line)


# ---- the tests ----

def test_server_facts(lg):
    """The facts streamd's backend is built on, straight from the server (no streamd)."""
    status, headers, body = lg.request("POST", "/runs/stream", {
        "assistant_id": "agent", "input": {"messages": [{"type": "human", "content": "hi"}]},
        "stream_mode": ["messages-tuple"], "stream_subgraphs": False, "on_disconnect": "cancel",
        "on_completion": "delete"})
    assert status == 200, body
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert headers["transfer-encoding"] == "chunked"
    events = sse_events(body)
    assert events[0][0] == "metadata" and "run_id" in json.loads(events[0][1])
    assert headers["content-location"] == "/runs/%s" % json.loads(events[0][1])["run_id"]
    names = [e for e, _ in events]
    assert set(names) == {"metadata", "messages"}, names  # messages-tuple arrives as `event: messages`
    assert "end" not in names  # a run ends with its body; there is no end event
    chunks = [json.loads(d)[0] for e, d in events if e == "messages"]
    assert "".join(c["content"] for c in chunks) == AGENT_TEXT
    assert len(chunks) >= 5 and {c["type"] for c in chunks} == {"AIMessageChunk"}
    # Thread ids must be UUIDs; an unknown assistant is 422 (a name) or 404 (a UUID).
    assert lg.request("POST", "/threads", {"thread_id": "abc", "if_exists": "do_nothing"})[0] == 422
    tid = str(uuid.uuid4())
    assert lg.request("POST", "/threads", {"thread_id": tid, "if_exists": "do_nothing"})[0] == 200
    assert lg.request("POST", "/threads", {"thread_id": tid, "if_exists": "do_nothing"})[0] == 200
    assert lg.request("POST", "/threads", {"thread_id": tid, "if_exists": "raise"})[0] == 409
    assert lg.request("POST", "/runs/stream", {"assistant_id": "nope", "input": {}})[0] == 422
    assert lg.request("POST", "/threads/%s/runs/stream" % uuid.uuid4(),
                      {"assistant_id": "agent", "input": {}})[0] == 404


def test_tokens_mode_streams_the_text_then_done(daemon_proc, lg):
    d = start_streamd(daemon_proc, lg, "--langgraph-assistant", "agent")
    status, headers, body, line = stream(d, {"prompt": "hi"})
    assert status == 200 and headers["content-type"] == "text/event-stream", (status, headers, body[:300])
    text, datas = content_of(body)
    assert text == AGENT_TEXT, explain(body, line)
    assert sum(1 for x in datas if '"content"' in x) >= 5  # token by token, not one blob
    assert_done(body, line)


def test_tokens_mode_messages_partial(daemon_proc, lg):
    """stream_mode "messages": messages/partial events, each the whole text so far."""
    d = start_streamd(daemon_proc, lg)
    status, _, body, line = stream(d, {"prompt": "hi", "stream_mode": ["messages"]})
    assert status == 200
    assert content_of(body)[0] == AGENT_TEXT, explain(body, line)
    assert_done(body, line)


def test_tokens_mode_unstreamed_message(daemon_proc, lg):
    """A node that returns a finished AIMessage (no model call): messages-tuple
    carries one whole {"type": "ai"} message instead of chunks."""
    d = start_streamd(daemon_proc, lg, "--langgraph-assistant", "canned")
    status, _, body, line = stream(d, {"prompt": "hi"})
    assert status == 200
    assert content_of(body)[0] == "A canned answer, not streamed.", explain(body, line)
    assert_done(body, line)


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_RAW_EVENT = re.compile(rb"event: [^\r\n]+\r\ndata: [^\r\n]*\r\n\r\n|: heartbeat\r\n\r\n")


def _normalized(events):
    return [(e, json.loads(_UUID.sub("UUID", d))) for e, d in events]


def test_raw_mode_passes_upstream_bytes_verbatim(daemon_proc, lg):
    d = start_streamd(daemon_proc, lg, "--langgraph-output", "raw")
    status, headers, body, line = stream(d, {"prompt": "hi"})
    assert status == 200, body[:300]
    # Byte for byte the server's framing (CRLF lines, its event names), nothing of
    # streamd's own in between.  The stream must be the upstream's and nothing else:
    # streamd's error event would follow the last upstream event.
    blocks = _RAW_EVENT.findall(body)
    assert b"".join(blocks) == body, "not the upstream's SSE bytes alone" + explain(body, line)
    assert body.startswith(b'event: metadata\r\ndata: {"run_id":"')
    # The same events as a direct request for the same run body (ids aside).
    _, _, direct = lg.request("POST", "/runs/stream", {
        "assistant_id": "agent", "input": {"messages": [{"type": "human", "content": "hi"}]},
        "stream_mode": ["messages-tuple"], "stream_subgraphs": False, "on_disconnect": "cancel",
        "on_completion": "delete"})
    assert _normalized(sse_events(body)) == _normalized(sse_events(direct))
    assert "[DONE]" not in body.decode()
    assert "outcome=done" in line, explain(body, line)


@pytest.mark.parametrize("mode", ["values", ["updates"]], ids=["values", "updates"])
def test_other_stream_modes_complete(daemon_proc, lg, mode):
    """values / updates carry no tokens (nothing in the uniform stream) but must complete."""
    d = start_streamd(daemon_proc, lg)
    status, _, body, line = stream(d, {"prompt": "hi", "stream_mode": mode})
    assert status == 200, body[:300]
    assert_done(body, line)


def test_thread_second_turn_sees_the_first(daemon_proc, lg):
    tid = str(uuid.uuid4())  # the server takes UUIDs only ("abc" is 422 on POST /threads)
    d = start_streamd(daemon_proc, lg, "--langgraph-assistant", "history")
    answers = []
    for turn in (1, 2):
        status, _, body, line = stream(d, {"prompt": "turn %d" % turn, "thread_id": tid})
        assert status == 200, body[:300]
        answers.append(content_of(body)[0])
        assert answers[-1] == "You have sent %d human messages in this thread." % turn, explain(body, line)
    # The thread on the server holds both turns.
    status, _, state = lg.request("GET", "/threads/%s/state" % tid)
    msgs = json.loads(state)["values"]["messages"]
    assert [(m["type"], m["content"]) for m in msgs] == [
        ("human", "turn 1"), ("ai", answers[0]), ("human", "turn 2"), ("ai", answers[1])]
    assert_done(body, line)  # (the second turn's stream; the first one's content was checked above)


def test_graph_exception_is_an_error_event(daemon_proc, lg):
    d = start_streamd(daemon_proc, lg, "--langgraph-assistant", "fail")
    status, _, body, line = stream(d, {"prompt": "hi"})
    assert status == 200  # the server answers 200 and reports the failure in the stream
    datas = [data for _, data in sse_events(body)]
    assert "[DONE]" not in datas
    err = json.loads(datas[-1])["error"]
    assert err["type"] == "upstream_error"
    assert "RuntimeError" in err["message"] and "fake graph failure for streamd tests" in err["message"]
    assert "outcome=done" not in line


def test_unknown_assistant_is_502(daemon_proc, lg):
    d = start_streamd(daemon_proc, lg, "--langgraph-assistant", "no-such-assistant")
    status, _, body, line = stream(d, {"prompt": "hi"})
    assert status == 502, body[:300]
    err = json.loads(body)["error"]
    assert "422" in err["message"] and "Invalid assistant" in err["message"], err


def test_server_down_is_502(daemon_proc):
    with socket.socket() as s:  # bound, not listening: connection refused, and the port stays ours
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        d = daemon_proc("--backend", "langgraph", "--langgraph-base", "http://127.0.0.1:%d" % port,
                        "--retry-base", "10ms", "--retry-cap", "50ms")
        status, _, body, line = stream(d, {"prompt": "hi"})
    assert status == 502, body[:300]
    assert json.loads(body)["error"]["type"] == "upstream_error"


def test_client_leaving_cancels_the_run(daemon_proc, lg):
    """on_disconnect: cancel: streamd closing its upstream connection interrupts the run."""
    tid = str(uuid.uuid4())
    d = start_streamd(daemon_proc, lg, "--langgraph-assistant", "slow")
    c = handoff_pair(d.path, {"prompt": "hi", "thread_id": tid})
    try:
        c.setblocking(True)
        c.settimeout(15)
        got = b""
        while got.count(b'"content"') < 3:  # a few tokens of 60 (0.1 s apart)
            chunk = c.recv(65536)
            assert chunk, "stream ended early: %r" % got[-300:]
            got += chunk
    finally:
        c.close()
    d.wait_log('msg="stream done"')
    end = time.monotonic() + 10
    while True:
        runs = json.loads(lg.request("GET", "/threads/%s/runs" % tid)[2])
        if runs and runs[0]["status"] != "running" and runs[0]["status"] != "pending":
            break
        assert time.monotonic() < end, "the run was not cancelled: %s" % runs
        time.sleep(0.1)
    assert [r["status"] for r in runs] == ["interrupted"]
    assert "outcome=client_disconnected" in [l for l in d.logs().splitlines() if 'msg="stream done"' in l][0]


def test_tool_calls_become_tool_call_events(daemon_proc, lg):
    """The "tools" graph answers "Let me check." plus a get_weather tool call,
    streamed as tool_call_chunks: one tool_call event, finish_reason tool_calls."""
    d = start_streamd(daemon_proc, lg, "--langgraph-assistant", "tools")
    status, _, body, line = stream(d, {"prompt": "hi"})
    assert status == 200
    assert content_of(body)[0] == "Let me check."
    datas = [json.loads(data) for _, data in sse_events(body) if data != "[DONE]"]
    calls = [e["tool_call"] for e in datas if "tool_call" in e]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0]["id"] == "call_weather_1" and datas[-1] == {"finish_reason": "tool_calls"}
    assert_done(body, line)


def test_a_thread_id_that_is_not_a_uuid_still_keeps_its_history(daemon_proc, lg):
    """The server takes only UUID thread ids: streamd sends uuid5 of any other
    id, the same on every turn; and with a thread, only the new turn goes (a
    PHP side that resends the whole conversation does not repeat it)."""
    d = start_streamd(daemon_proc, lg, "--langgraph-assistant", "history")
    conversation = "conversation-%s" % uuid.uuid4().hex[:8]  # (not a UUID; new per run: the server may keep threads)
    history = []
    for turn in (1, 2, 3):
        history.append({"role": "user", "content": "turn %d" % turn})
        status, _, body, line = stream(d, {"messages": history, "thread_id": conversation})
        assert status == 200, body[:300]
        answer = content_of(body)[0]
        assert answer == "You have sent %d human messages in this thread." % turn, explain(body, line)
        history.append({"role": "assistant", "content": answer})
