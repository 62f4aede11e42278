"""openai: any OpenAI-compatible Chat Completions API (OpenAI, Groq, Ollama, vLLM, DeepSeek, OpenRouter).

Sends   POST {api_base}/chat/completions with "stream": true: the messages
        (an assistant's tool_calls and "tool" results as they are), tools and
        tool_choice as they are, attachments as content parts (image_url and
        file data URLs), stream_options.include_usage (unless
        backend.openai.stream_usage is off and the handoff did not ask for usage).
Reads   one JSON chunk per SSE event: choices[0].delta.content (text), .refusal
        (text), .reasoning_content / .reasoning (the reasoning that DeepSeek-,
        vLLM- and OpenRouter-style vendors stream), .tool_calls (pieces, by
        index), choices[0].finish_reason; usage in the last chunk (choices
        empty); {"error": ...} in a chunk fails the stream.
Complete when `data: [DONE]` arrived and the body's framing ended cleanly.
"""
from streamd import BackendError
from backends import _http
from backends._turn import FINISH, Turn

NAME = "openai"
REQUIRES = _http.REQUIRES  # checked at start: a missing package is a start error, not a 502 per request
close = _http.close_all  # the daemon calls close() at exit: pooled connections


def message(m) -> dict:
    """A streamd Message in OpenAI's shape."""
    out = {"role": m.role}
    if m.role == "tool":
        out["tool_call_id"] = m.tool_call_id
    if m.only_text():
        out["content"] = m.text() if m.parts or not m.tool_calls else None
    else:
        out["content"] = [content_part(p) for p in m.parts]
    if m.tool_calls:
        out["tool_calls"] = [tool_call(*c) for c in m.tool_calls]
    return out


def tool_call(call_id, name, arguments, extra) -> dict:
    out = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    if extra:  # (Gemini's OpenAI-compatible API wants its thought signature back here)
        out["extra_content"] = extra
    return out


def content_part(p) -> dict:
    if p[0] == "text":
        return {"type": "text", "text": p[1]}
    if p[0] == "image":
        return {"type": "image_url", "image_url": {"url": "data:%s;base64,%s" % (p[1], p[2])}}
    return {"type": "file", "file": {"filename": p[3], "file_data": "data:%s;base64,%s" % (p[1], p[2])}}


def request_body(req, cfg):
    conv = req.conversation()
    messages = [message(m) for m in conv]
    if req.system and not any(m.role == "system" for m in conv):
        messages.insert(0, {"role": "system", "content": req.system})
    body = {"model": req.model or _http.setting(cfg, NAME, req.profile, "default_model") or cfg["backend.default_model"],
            "messages": messages, "stream": True}
    for field in ("max_tokens", "temperature", "top_p"):
        if getattr(req, field) is not None:
            body[field] = getattr(req, field)
    if req.tools:
        body["tools"] = req.tools
        if req.tool_choice is not None:
            body["tool_choice"] = req.tool_choice
    if req.include_usage or cfg["backend.openai.stream_usage"]:
        body["stream_options"] = {"include_usage": True}
    return body


def finish_reason(raw: str) -> str:
    if raw == "function_call":  # the pre-tools name of the same thing
        return "tool_calls"
    return raw if raw in FINISH else "stop"


def usage(turn, u: dict) -> None:
    prompt_details, completion_details = _http.obj(u.get("prompt_tokens_details")), \
        _http.obj(u.get("completion_tokens_details"))
    turn.set_usage(_http.count(u.get("prompt_tokens")), _http.count(u.get("completion_tokens")),
                   reasoning=_http.count(completion_details["reasoning_tokens"])
                   if "reasoning_tokens" in completion_details else None,
                   cache_read=_http.count(prompt_details["cached_tokens"])
                   if "cached_tokens" in prompt_details else None)


def run(req, cfg):
    target = _http.target(cfg, NAME, req.profile)
    key = _http.api_key(cfg, NAME, req.profile)
    headers = _http.headers(req, "Authorization", "Bearer " + key if key else "")
    stream = yield from _http.open_stream(target, cfg, "POST", target.path + "/chat/completions", headers,
                                          request_body(req, cfg), secrets=(key,),
                                          heavy=req.heavy())
    try:
        yield ("head",)
        turn = Turn(req)
        done = False
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
                for ev in read_chunk(turn, chunk):
                    yield ("event", ev)
        if not done:
            raise BackendError("upstream stream ended without [DONE]")
        for ev in turn.open_calls_done():  # (a server that sent no finish_reason)
            yield ("event", ev)
        return turn.result()
    finally:
        stream.close()


def read_chunk(turn, chunk) -> list:
    out = []
    for choice in _http.arr(chunk.get("choices")):
        choice = _http.obj(choice)
        if choice.get("index", 0) != 0:
            continue  # (n > 1: only the first choice is streamed)
        delta = _http.obj(choice.get("delta"))
        out += turn.reasoning(_http.text(delta.get("reasoning_content")) or _http.text(delta.get("reasoning")))
        out += turn.text(delta.get("content"))
        out += turn.text(delta.get("refusal"))
        for tc in _http.arr(delta.get("tool_calls")):
            tc = _http.obj(tc)
            fn = _http.obj(tc.get("function"))
            out += turn.indexed_piece(tc.get("index"), tc.get("id"), fn.get("name"), fn.get("arguments"),
                                      _http.obj(tc.get("extra_content")))
        raw = _http.text(choice.get("finish_reason"))
        if raw:
            out += turn.open_calls_done()
            turn.finished(raw, finish_reason(raw))
    u = _http.obj(chunk.get("usage"))
    if u:
        usage(turn, u)
    return out
