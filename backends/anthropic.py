"""anthropic: the Anthropic Messages API.

Sends   POST {api_base}/v1/messages with "stream": true: system messages as the
        top-level `system`, tool results as `tool_result` blocks in a user
        message, an assistant's tool calls as `tool_use` blocks, attachments as
        `image` / `document` blocks (base64), tools as {name, description,
        input_schema}, tool_choice as {type: auto|any|none|tool}; with
        include_reasoning, extended thinking (backend.anthropic.thinking_budget;
        not with a temperature other than 1, top_p < 0.95 or a forced tool,
        which the API refuses with thinking on).
Reads   message_start (usage), content_block_start/delta/stop (text_delta,
        thinking_delta, input_json_delta of a tool_use block; signature_delta,
        redacted_thinking and server-tool blocks carry no text for us),
        message_delta (stop_reason; usage, cumulative: the last one wins for
        every field it carries), ping (ignored); `event: error` fails it.
Complete when message_stop arrived.
"""
import logging

from streamd import BackendError, log
from backends import _http
from backends._turn import Turn

NAME = "anthropic"
REQUIRES = _http.REQUIRES  # checked at start: a missing package is a start error, not a 502 per request
close = _http.close_all  # the daemon calls close() at exit: pooled connections
STOP = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
        "model_context_window_exceeded": "length", "tool_use": "tool_calls", "refusal": "content_filter"}
USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def blocks(m, where: str) -> list:
    """A streamd Message as Anthropic content blocks."""
    out = []
    for p in m.parts:
        if p[0] == "text":
            if p[1]:  # (the API refuses empty text blocks)
                out.append({"type": "text", "text": p[1]})
        else:
            out.append({"type": "image" if p[0] == "image" else "document",
                        "source": {"type": "base64", "media_type": p[1], "data": p[2]}})
    for i, (call_id, name, arguments, extra) in enumerate(m.tool_calls):
        if i == 0:  # the signed thinking that led to these calls goes back first
            out[:0] = thinking_blocks(extra, where)
        out.append({"type": "tool_use", "id": call_id, "name": name, "input": _http.arguments_object(arguments, NAME)})
    return out


def thinking_blocks(extra, where: str) -> list:
    blocks = _http.arr(_http.obj(_http.obj(extra).get("anthropic")).get("thinking_blocks"))
    for b in blocks:
        if not (isinstance(b, dict) and b.get("type") in ("thinking", "redacted_thinking")):
            raise BackendError("%s: extra_content.anthropic.thinking_blocks holds something that is no thinking "
                               "block" % where, status=400, kind="invalid_request", reason="bad_request")
    return blocks


def thinking_allowed(req) -> bool:
    """Extended thinking refuses (400) a temperature other than 1, a top_p
    below 0.95 and a forced tool: with any of them the request goes without
    thinking (the answer matters more than seeing the reasoning), logged."""
    why = ("temperature %r" % req.temperature if req.temperature not in (None, 1) else
           "top_p %r" % req.top_p if req.top_p is not None and req.top_p < 0.95 else
           "a forced tool_choice" if req.tools and (req.tool_choice == "required" or isinstance(req.tool_choice, dict))
           else None)
    if why:
        log(logging.INFO, "anthropic: include_reasoning ignored: extended thinking does not allow " + why,
            request_id=req.request_id)
    return why is None


def request_body(req, cfg):
    conv = req.conversation()
    system = [m.text() for m in conv if m.role == "system"]
    if req.system:
        system.insert(0, req.system)
    messages = []
    for i, m in enumerate(conv):
        if m.role == "system":
            continue
        where = "messages[%d]" % i
        if m.role == "tool":
            role, content = "user", [{"type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.text()}]
        else:
            role, content = ("assistant" if m.role == "assistant" else "user"), blocks(m, where)
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += content  # one turn per role in a row (tool results, then text)
        else:
            messages.append({"role": role, "content": content})
    for msg in messages:  # a turn of one text block is sent as a plain string
        c = msg["content"]
        if len(c) == 1 and c[0]["type"] == "text":
            msg["content"] = c[0]["text"]
    max_tokens = req.max_tokens or cfg["backend.anthropic.max_tokens"]
    body = {"model": req.model or _http.setting(cfg, NAME, req.profile, "default_model"),
            "max_tokens": max_tokens, "messages": messages, "stream": True}
    if system:
        body["system"] = "\n\n".join(system)
    for field in ("temperature", "top_p"):
        if getattr(req, field) is not None:
            body[field] = getattr(req, field)
    budget = cfg["backend.anthropic.thinking_budget"]
    if req.include_reasoning and budget and thinking_allowed(req):
        body["thinking"] = {"type": "enabled", "budget_tokens": budget}
        if max_tokens <= budget:  # the API wants room for the answer beyond the thinking
            body["max_tokens"] = budget + max_tokens
    if req.tools:
        body["tools"] = [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
                          "input_schema": t["function"].get("parameters") or {"type": "object", "properties": {}}}
                         for t in req.tools]
        choice = req.tool_choice
        if choice is not None:
            body["tool_choice"] = {"auto": {"type": "auto"}, "none": {"type": "none"},
                                   "required": {"type": "any"}}.get(choice) if isinstance(choice, str) else \
                {"type": "tool", "name": choice["function"]["name"]}
    return body


def run(req, cfg):
    target = _http.target(cfg, NAME, req.profile)
    key = _http.api_key(cfg, NAME, req.profile)
    headers = _http.headers(req, "x-api-key", key)
    headers["anthropic-version"] = cfg["backend.anthropic.version"]
    stream = yield from _http.open_stream(target, cfg, "POST", target.path + "/v1/messages", headers,
                                          request_body(req, cfg), secrets=(key,),
                                          heavy=req.heavy())
    try:
        yield ("head",)
        reader, stopped = Reader(Turn(req)), False
        while True:
            events = yield from _http.json_events(stream)
            if events is None:
                break
            for name, data in events:
                if not isinstance(data, dict):
                    continue
                kind = name if name != "message" else data.get("type")
                if kind == "error":
                    raise _http.upstream_error("upstream sent an error event", data, (key,))
                if kind == "message_stop":
                    stopped = True
                for ev in reader.event(kind, data):
                    yield ("event", ev)
        if not stopped:
            raise BackendError("upstream stream ended without message_stop")
        return reader.result()
    finally:
        stream.close()


class Reader:
    """One message's events: the Turn, the latest value of each usage field,
    the tool_use blocks still open, and the turn's thinking blocks, which
    Anthropic wants back, signed, with the tool calls they led to."""

    def __init__(self, turn):
        self.turn, self.usage, self.tools, self.thinking, self.blocks = turn, {}, set(), {}, []

    def event(self, kind, data) -> list:
        index = data.get("index")
        turn, index = self.turn, index if type(index) is int else None  # (a list here would not hash)
        if kind == "content_block_delta":
            delta = _http.obj(data.get("delta"))
            dtype = delta.get("type")
            if dtype == "text_delta":
                return turn.text(delta.get("text"))
            if dtype == "thinking_delta":
                if index in self.thinking:
                    self.thinking[index]["thinking"] += _http.text(delta.get("thinking"))
                return turn.reasoning(delta.get("thinking"))
            if dtype == "signature_delta" and index in self.thinking:
                self.thinking[index]["signature"] += _http.text(delta.get("signature"))
            elif dtype == "input_json_delta" and index in self.tools:
                turn.call_piece(index, arguments=delta.get("partial_json"))
            return []  # citations_delta, a server tool's input
        if kind == "content_block_start":
            block = _http.obj(data.get("content_block"))
            btype = block.get("type")
            if btype == "tool_use" and isinstance(index, int):  # (server_tool_use is Anthropic's own)
                self.tools.add(index)
                extra = None
                if self.blocks and not turn.emitted and not turn.calls:  # the first call carries them
                    extra = {"anthropic": {"thinking_blocks": self.blocks}}
                turn.call_piece(index, block.get("id"), block.get("name"), extra=extra)
            elif btype == "thinking" and isinstance(index, int):
                self.thinking[index] = {"type": "thinking", "thinking": _http.text(block.get("thinking")),
                                        "signature": _http.text(block.get("signature"))}
                self.blocks.append(self.thinking[index])
            elif btype == "redacted_thinking":
                self.blocks.append({"type": "redacted_thinking", "data": _http.text(block.get("data"))})
            elif btype == "text":
                return turn.text(block.get("text"))
            return []
        if kind == "content_block_stop" and index in self.tools:
            self.tools.discard(index)
            return turn.call_done(index)
        if kind == "message_start":
            u = _http.obj(_http.obj(data.get("message")).get("usage"))
            self.usage.update((f, _http.count(u[f])) for f in USAGE_FIELDS if f in u)
        elif kind == "message_delta":
            raw = _http.text(_http.obj(data.get("delta")).get("stop_reason"))
            if raw:
                turn.finished(raw, STOP.get(raw, "stop"))
            u = _http.obj(data.get("usage"))  # cumulative: each field it carries replaces the earlier one
            self.usage.update((f, _http.count(u[f])) for f in USAGE_FIELDS if f in u)
        return []  # ping, and types added after this was written

    def result(self) -> dict:
        u = self.usage
        if u:
            cache_read, cache_creation = u.get("cache_read_input_tokens"), u.get("cache_creation_input_tokens")
            prompt = u.get("input_tokens", 0) + (cache_read or 0) + (cache_creation or 0)
            self.turn.set_usage(prompt, u.get("output_tokens", 0), cache_read=cache_read,
                                cache_creation=cache_creation)
        return self.turn.result()
