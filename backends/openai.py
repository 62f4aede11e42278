"""openai: any OpenAI-compatible Chat Completions API (OpenAI, Groq, Ollama, vLLM).

POST {api_base}/chat/completions with "stream": true.  Each SSE event is one
JSON chunk; text is in choices[].delta.content; `data: [DONE]` ends the stream.
"""
from streamd import BackendError
from backends import _http

NAME = "openai"
close = _http.close_all  # the daemon calls close() at exit: pooled connections


def request_body(req, cfg):
    messages = [{"role": role, "content": text} for role, text in req.conversation()]
    if req.system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": req.system})
    body = {"model": req.model or cfg["backend.openai.default_model"] or cfg["backend.default_model"],
            "messages": messages, "stream": True}
    for field in ("max_tokens", "temperature", "top_p"):
        if getattr(req, field) is not None:
            body[field] = getattr(req, field)
    if req.include_usage:
        body["stream_options"] = {"include_usage": True}
    return body


def run(req, cfg):
    target = _http.target(cfg, NAME)
    key = cfg["backend.openai.api_key"]
    headers = _http.headers(req, "Authorization", "Bearer " + key if key else "")
    stream = yield from _http.open_stream(target, cfg, "POST", target.path + "/chat/completions", headers,
                                          request_body(req, cfg), secrets=(key,))
    try:
        yield ("head",)
        done, finish, usage = False, None, None
        while True:
            events = yield from _http.json_events(stream)
            if events is None:
                break
            for name, chunk in events:
                if chunk == "[DONE]":
                    done = True
                    continue
                if not isinstance(chunk, dict):
                    raise BackendError("upstream sent an event that is not a JSON object")
                if chunk.get("error") or name == "error":
                    raise _http.upstream_error("upstream sent an error event", chunk, (key,))
                for choice in _http.arr(chunk.get("choices")):
                    choice = _http.obj(choice)
                    text = _http.text(_http.obj(choice.get("delta")).get("content"))
                    if text:
                        yield ("event", {"content": text})
                    if _http.text(choice.get("finish_reason")):
                        finish = choice["finish_reason"]
                u = _http.obj(chunk.get("usage"))
                if u:
                    usage = {k: _http.count(u.get(k)) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        if not done:
            raise BackendError("upstream stream ended without [DONE]")
        return {"finish_reason": finish or "stop", "usage": usage}
    finally:
        stream.close()
