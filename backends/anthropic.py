"""anthropic: the Anthropic Messages API.

POST {api_base}/v1/messages with "stream": true.  Text arrives in
content_block_delta events of type text_delta; message_stop ends the stream;
an `error` event (e.g. overloaded_error) fails it.
"""

from streamd import BackendError
from backends import _http

NAME = "anthropic"
close = _http.close_all  # the daemon calls close() at exit: pooled connections


def request_body(req, cfg):
    system = [text for role, text in req.conversation() if role == "system"]
    if req.system:
        system.insert(0, req.system)
    messages = [{"role": "assistant" if role == "assistant" else "user", "content": text}
                for role, text in req.conversation() if role != "system"]
    body = {"model": req.model or cfg["backend.anthropic.default_model"],
            "max_tokens": req.max_tokens or cfg["backend.anthropic.max_tokens"],
            "messages": messages, "stream": True}
    if system:
        body["system"] = "\n\n".join(system)
    for field in ("temperature", "top_p"):
        if getattr(req, field) is not None:
            body[field] = getattr(req, field)
    return body


def run(req, cfg):
    target = _http.target(cfg, NAME)
    key = cfg["backend.anthropic.api_key"]
    headers = _http.headers(req, "x-api-key", key)
    headers["anthropic-version"] = cfg["backend.anthropic.version"]
    stream = yield from _http.open_stream(target, cfg, "POST", target.path + "/v1/messages", headers,
                                          request_body(req, cfg), secrets=(key,))
    try:
        yield ("head",)
        stopped, finish, usage = False, None, {"prompt_tokens": 0, "completion_tokens": 0}
        while True:
            events = yield from _http.json_events(stream)
            if events is None:
                break
            for name, data in events:
                if not isinstance(data, dict):
                    continue
                kind = name if name != "message" else data.get("type")
                if kind == "content_block_delta":
                    delta = _http.obj(data.get("delta"))
                    if delta.get("type") == "text_delta" and _http.text(delta.get("text")):
                        yield ("event", {"content": delta["text"]})
                elif kind == "message_start":
                    u = _http.obj(_http.obj(data.get("message")).get("usage"))
                    usage["prompt_tokens"] = _http.count(u.get("input_tokens"))
                    usage["completion_tokens"] = _http.count(u.get("output_tokens"))
                elif kind == "message_delta":
                    finish = _http.text(_http.obj(data.get("delta")).get("stop_reason")) or finish
                    out = _http.obj(data.get("usage")).get("output_tokens")
                    if out is not None:
                        usage["completion_tokens"] = _http.count(out)  # cumulative, not an increment
                elif kind == "message_stop":
                    stopped = True
                elif kind == "error":
                    raise _http.upstream_error("upstream sent an error event", data, (key,))
                # ping, content_block_start/stop and unknown types are ignored
        if not stopped:
            raise BackendError("upstream stream ended without message_stop")
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"finish_reason": finish or "end_turn", "usage": usage}
    finally:
        stream.close()
