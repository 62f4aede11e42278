"""langgraph: a LangGraph Platform (Agent Server) deployment, or `langgraph dev`.

Sends   POST {api_base}/runs/stream, or with a thread_id POST
        /threads/{id}/runs/stream after making sure the thread exists:
        {assistant_id, input: {messages, ...langgraph_input}, stream_mode,
        on_disconnect: cancel}.  Messages go in LangChain's dict form (human,
        ai with tool_calls, tool with tool_call_id, system); attachments as
        content blocks (content_format: OpenAI-style image_url parts, or
        Anthropic-style image and document blocks).  The graph has its own
        tools: a handoff's `tools` is refused.
Reads   with output "uniform": the text of AI message chunks from `messages`
        events (stream_mode messages-tuple: [chunk, metadata], chunk a delta)
        or `messages/partial` (stream_mode messages: the text so far), and
        their tool_call_chunks; other events (metadata, values, updates, ...)
        carry no text for us.  With output "raw": the upstream's SSE bytes
        verbatim.  An `error` event fails the stream in both.
Complete when the run's stream closes cleanly (its chunked framing ends)
        without an `error` event.  LangGraph sends no end marker (an `end`
        event, which older deployments send, is accepted as the same).
"""
import uuid
from urllib.parse import quote

from streamd import BackendError
from backends import _http
from backends._turn import Turn

NAME = "langgraph"
REQUIRES = _http.REQUIRES  # checked at start: a missing package is a start error, not a 502 per request
close = _http.close_all  # the daemon calls close() at exit: pooled connections
_TYPES = {"user": "human", "assistant": "ai", "system": "system", "tool": "tool"}


def bad_request(message: str) -> BackendError:
    return BackendError(message, status=400, kind="invalid_request", reason="bad_request")


def message(m, content_format: str) -> dict:
    """A streamd Message as a LangChain message dict."""
    if m.only_text():
        content = m.text()
    else:
        content = [block(p, content_format) for p in m.parts]
    out = {"type": _TYPES.get(m.role, m.role), "content": content}
    if m.tool_calls:
        out["tool_calls"] = [{"id": i, "name": n, "args": _http.arguments_object(a, NAME), "type": "tool_call"}
                             for i, n, a, _ in m.tool_calls]
    if m.role == "tool":
        out["tool_call_id"] = m.tool_call_id
    return out


def block(p, content_format: str) -> dict:
    if p[0] == "text":
        return {"type": "text", "text": p[1]}
    if content_format == "anthropic":
        return {"type": "image" if p[0] == "image" else "document",
                "source": {"type": "base64", "media_type": p[1], "data": p[2]}}
    if p[0] == "image":
        return {"type": "image_url", "image_url": {"url": "data:%s;base64,%s" % (p[1], p[2])}}
    raise bad_request("langgraph: a %s attachment needs content_format anthropic "
                      "(OpenAI-style content has no document part)" % p[1])


def request_body(req, cfg, stateful):
    if req.tools:
        raise bad_request("langgraph: the graph defines its own tools; a handoff's 'tools' cannot be sent to it")
    fmt = _http.setting(cfg, NAME, req.profile, "content_format")
    conv = req.conversation()
    last = max((i for i, m in enumerate(conv) if m.role == "assistant"), default=-1)
    if stateful:
        # The thread holds the conversation (the graph's add_messages appends
        # what it is given): send only the new turn, the messages after the
        # handoff's last assistant message, or the whole history would repeat.
        conv = conv[last + 1:]
    messages = [message(m, fmt) for m in conv]
    # The system prompt: always without a thread; on a thread, with its first
    # turn only (no assistant message yet), since the thread keeps it.
    if req.system and (not stateful or last < 0) and not any(m.role == "system" for m in conv):
        messages.insert(0, {"type": "system", "content": req.system})
    inp = {"messages": messages}
    for k in sorted(req.langgraph_input or {}):
        inp[k] = req.langgraph_input[k]
    body = {"assistant_id": req.assistant_id or _http.setting(cfg, NAME, req.profile, "assistant_id"),
            "input": inp, "stream_mode": req.stream_mode or _http.setting(cfg, NAME, req.profile, "stream_mode"),
            "stream_subgraphs": False, "on_disconnect": "cancel"}
    if not stateful:
        body["on_completion"] = "delete"
    return body


def chunk_text(chunk) -> str:
    """The text of an AI message chunk: string content, or its text blocks."""
    if not isinstance(chunk, dict) or chunk.get("type") not in ("AIMessageChunk", "ai"):
        return ""
    content = chunk.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_http.text(b.get("text")) for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def thread_uuid(thread_id: str) -> str:
    """LangGraph wants thread ids to be UUIDs (anything else is 422): a UUID
    is sent as it is, any other id as a UUID made from it (uuid5, so the same
    id is the same thread on every turn)."""
    try:
        return str(uuid.UUID(thread_id))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, "streamd:thread:" + thread_id))


def ensure_thread(target, cfg, headers, thread_id, key):
    """Create the thread if it does not exist (200 whether or not it did; 409
    from servers that answer so for an existing one)."""
    try:
        stream = yield from _http.open_stream(target, cfg, "POST", target.path + "/threads", headers,
                                              {"thread_id": thread_id, "if_exists": "do_nothing"},
                                              secrets=(key,))
    except BackendError as e:
        if str(e) == "upstream answered 409":
            return
        raise
    try:
        while (yield from stream.read_body(cfg["upstream.idle_timeout"])) is not None:
            pass
    finally:
        stream.close()


def run(req, cfg):
    target = _http.target(cfg, NAME, req.profile)
    key = _http.api_key(cfg, NAME, req.profile)
    headers = _http.headers(req, "X-Api-Key", key)
    body = request_body(req, cfg, bool(req.thread_id))
    if req.thread_id:
        thread = thread_uuid(req.thread_id)
        yield from ensure_thread(target, cfg, headers, thread, key)
        path = "%s/threads/%s/runs/stream" % (target.path, quote(thread, safe=""))
    else:
        path = target.path + "/runs/stream"
    stream = yield from _http.open_stream(target, cfg, "POST", path, headers, body, secrets=(key,),
                                          heavy=req.heavy())
    raw = _http.setting(cfg, NAME, req.profile, "output") == "raw"
    try:
        yield ("head",)
        turn = Turn(req)
        reader = Reader(turn)
        timeout = cfg["upstream.idle_timeout"]
        while True:
            if raw:
                data = yield from stream.read_body(timeout)
                if data is None:
                    events = stream.sse.close()
                else:
                    yield ("raw", data)
                    try:
                        events = stream.sse.feed(data)
                    except _http.UpstreamProtocolError as e:
                        raise BackendError("upstream broke SSE framing: %s" % e) from None
            else:
                data = events = yield from stream.next_events()
            for ev in events or ():
                name = ev.event.split("|", 1)[0]  # (subgraph events: "messages|<namespace>")
                if name == "error":
                    raise _http.upstream_error("upstream sent an error event", ev.data, (key,))
                if not raw:
                    for out in reader.event(name, ev.data):
                        yield ("event", out)
            if data is None:
                break
        # The body's framing ended cleanly (read_body raises if the upstream
        # cut it) and no error event came: the run is complete.
        if raw:
            # The upstream's bytes went out as they were: no final event of
            # ours, no [DONE] (its stream has neither).
            return {"raw": True, "send_done": False}
        for out in turn.open_calls_done():
            yield ("event", out)
        return turn.result()
    finally:
        stream.close()


class Reader:
    """The uniform output of a run's events."""

    def __init__(self, turn):
        self.turn = turn
        self.seen = {}      # message id -> text so far (messages mode sends the whole text each time)
        self.message = None  # the id of the AI message whose tool calls are being assembled

    def event(self, name, data) -> list:
        if name not in ("messages", "messages/partial"):
            return []  # metadata, values, updates, messages/complete, ...
        try:
            payload = _http.parse_json(data)
        except ValueError:
            raise BackendError("upstream sent an event that is not JSON") from None
        turn, out = self.turn, []
        if name == "messages":  # messages-tuple: [chunk, metadata], the chunk a delta
            chunk = payload[0] if isinstance(payload, list) and payload else payload
            out += self.new_message(chunk)
            out += turn.text(chunk_text(chunk))
            for tc in _http.arr(_http.obj(chunk).get("tool_call_chunks")):
                tc = _http.obj(tc)
                out += turn.indexed_piece(tc.get("index"), tc.get("id"), tc.get("name"), tc.get("args"))
            return out
        for msg in _http.arr(payload):  # messages mode: each message with its whole text so far
            full, mid = chunk_text(msg), _http.text(_http.obj(msg).get("id"))
            before = self.seen.get(mid, "")
            out += turn.text(full[len(before):] if full.startswith(before) else full)
            self.seen[mid] = full
        return out

    def new_message(self, chunk) -> list:
        """A chunk of another AI message: the calls of the one before are complete."""
        mid = _http.text(_http.obj(chunk).get("id"))
        if not mid or mid == self.message:
            return []
        self.message = mid
        return self.turn.open_calls_done()
