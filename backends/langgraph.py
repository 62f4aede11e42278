"""langgraph: a LangGraph Platform (Agent Server) deployment.

POST {api_base}/runs/stream, or with a thread_id POST /threads/{id}/runs/stream
after making sure the thread exists.  Output is either the uniform content
events (the text of AIMessageChunks from `messages` events; `event: end`
completes) or, with backend.langgraph.output: raw, the upstream SSE verbatim.
"""
from urllib.parse import quote

from streamd import BackendError
from backends import _http

NAME = "langgraph"
close = _http.close_all  # the daemon calls close() at exit: pooled connections
_TYPES = {"user": "human", "assistant": "ai", "system": "system"}


def request_body(req, cfg, stateful):
    messages = [{"type": _TYPES.get(role, role), "content": text} for role, text in req.conversation()]
    if req.system and not any(m["type"] == "system" for m in messages):
        messages.insert(0, {"type": "system", "content": req.system})
    inp = {"messages": messages}
    for k in sorted(req.langgraph_input or {}):
        inp[k] = req.langgraph_input[k]
    body = {"assistant_id": req.assistant_id or cfg["backend.langgraph.assistant_id"], "input": inp,
            "stream_mode": req.stream_mode or cfg["backend.langgraph.stream_mode"],
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


def ensure_thread(target, cfg, headers, thread_id, key):
    """Create the thread if it does not exist (200, 201, or 409 if it does)."""
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
    target = _http.target(cfg, NAME)
    key = cfg["backend.langgraph.api_key"]
    headers = _http.headers(req, "X-Api-Key", key)
    if req.thread_id:
        yield from ensure_thread(target, cfg, headers, req.thread_id, key)
        path = "%s/threads/%s/runs/stream" % (target.path, quote(req.thread_id, safe=""))
    else:
        path = target.path + "/runs/stream"
    stream = yield from _http.open_stream(target, cfg, "POST", path, headers,
                                          request_body(req, cfg, bool(req.thread_id)), secrets=(key,))
    raw = cfg["backend.langgraph.output"] == "raw"
    try:
        yield ("head",)
        ended = False
        seen = {}  # message id -> text so far, for the accumulating messages/partial mode
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
                events = yield from stream.next_events()
            for ev in events or ():
                name = ev.event.split("|", 1)[0]
                if name == "end":
                    ended = True
                elif name == "error":
                    raise _http.upstream_error("upstream sent an error event", ev.data, (key,))
                elif not raw and name in ("messages", "messages/partial"):
                    try:
                        payload = _http.parse_json(ev.data)
                    except ValueError:
                        raise BackendError("upstream sent an event that is not JSON") from None
                    if name == "messages":  # messages-tuple: [chunk, metadata], chunk is a delta
                        chunk = payload[0] if isinstance(payload, list) and payload else payload
                        text = chunk_text(chunk)
                    else:  # messages mode: a list of messages, each the whole text so far
                        text = ""
                        for msg in payload if isinstance(payload, list) else ():
                            full = chunk_text(msg)
                            mid = _http.text(_http.obj(msg).get("id"))
                            text += full[len(seen.get(mid, "")):] if full.startswith(seen.get(mid, "")) else full
                            seen[mid] = full
                    if text:
                        yield ("event", {"content": text})
            if (raw and data is None) or (not raw and events is None):
                break
        if not ended:  # in raw mode too: the error event follows the upstream's bytes
            raise BackendError("upstream stream ended without event: end")
        return {"finish_reason": "stop", "send_done": not raw}
    finally:
        stream.close()
