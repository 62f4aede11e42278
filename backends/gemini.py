"""gemini: Google's Gemini API, streamGenerateContent with alt=sse.

Sends   POST {api_base}/v1beta/models/{model}:streamGenerateContent?alt=sse:
        `contents` (roles user and model), system messages as
        `systemInstruction`, attachments as `inlineData` parts, an assistant's
        tool calls as `functionCall` parts (with their thought signatures),
        tool results as `functionResponse` parts, tools as
        `functionDeclarations`, tool_choice as toolConfig.functionCallingConfig;
        with include_reasoning, thinkingConfig.includeThoughts.
Reads   CRLF-framed JSON chunks: candidates[0].content.parts[] — text (a
        thought when `thought` is true), functionCall {name, args, id?} whole
        in one part; candidates[0].finishReason; usageMetadata (promptTokenCount,
        candidatesTokenCount, thoughtsTokenCount, toolUsePromptTokenCount,
        cachedContentTokenCount); {"error": ...} fails the stream, and so does
        promptFeedback.blockReason without candidates.
Complete when a candidate's finishReason arrived.
"""
import json
from urllib.parse import quote

from streamd import BackendError
from backends import _http
from backends._turn import Turn

NAME = "gemini"
REQUIRES = _http.REQUIRES  # checked at start: a missing package is a start error, not a 502 per request
close = _http.close_all  # the daemon calls close() at exit: pooled connections
FILTERED = frozenset(("SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"))


def parts(m) -> list:
    out = []
    for p in m.parts:
        if p[0] == "text":
            if p[1]:
                out.append({"text": p[1]})
        else:
            out.append({"inlineData": {"mimeType": p[1], "data": p[2]}})
    for call_id, name, arguments, extra in m.tool_calls:
        call = {"name": name, "args": _http.arguments_object(arguments, NAME)}
        if not call_id.startswith("call_"):  # (ours are made up: Gemini's own ids go back)
            call["id"] = call_id
        part = {"functionCall": call}
        signature = _http.text(_http.obj(_http.obj(extra).get("google")).get("thought_signature"))
        if signature:
            part["thoughtSignature"] = signature
        out.append(part)
    return out


def function_response(m, names: dict) -> dict:
    """A tool result as a functionResponse part: Gemini wants the function's
    name (found by the call id) and an object (a JSON object result as it is,
    anything else as {"content": text})."""
    text = m.text()
    value = _http.client_json_object(text)
    resp = {"name": names.get(m.tool_call_id, m.tool_call_id),
            "response": value if value is not None else {"content": text}}
    if m.tool_call_id and not m.tool_call_id.startswith("call_"):
        resp["id"] = m.tool_call_id
    return {"functionResponse": resp}


def request_body(req, cfg):
    contents, system, names = [], [], {}
    for m in req.conversation():
        if m.role == "system":
            system.append(m.text())
            continue
        if m.role == "tool":
            role, content = "user", [function_response(m, names)]
        else:
            role, content = ("model" if m.role == "assistant" else "user"), parts(m)
            names.update((c[0], c[1]) for c in m.tool_calls)
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"] += content  # one turn per role in a row (parallel calls' results)
        else:
            contents.append({"role": role, "parts": content})
    for c in contents:
        if not c["parts"]:
            c["parts"] = [{"text": ""}]  # (the API refuses a turn without parts)
    if req.system:
        system.insert(0, req.system)
    body = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": [{"text": "\n\n".join(system)}]}
    gen = {}
    if req.temperature is not None:
        gen["temperature"] = req.temperature
    if req.top_p is not None:
        gen["topP"] = req.top_p
    if req.max_tokens is not None:
        gen["maxOutputTokens"] = req.max_tokens
    if req.include_reasoning:
        gen["thinkingConfig"] = {"includeThoughts": True}
    if gen:
        body["generationConfig"] = gen
    if req.tools:
        body["tools"] = [{"functionDeclarations": [declaration(t["function"]) for t in req.tools]}]
        choice = req.tool_choice
        if choice is not None:
            if isinstance(choice, str):
                config = {"mode": {"auto": "AUTO", "none": "NONE", "required": "ANY"}[choice]}
            else:
                config = {"mode": "ANY", "allowedFunctionNames": [choice["function"]["name"]]}
            body["toolConfig"] = {"functionCallingConfig": config}
    return body


def declaration(fn: dict) -> dict:
    out = {"name": fn["name"], "description": fn.get("description", "")}
    if fn.get("parameters"):
        # parametersJsonSchema takes JSON Schema as OpenAI tools carry it; the
        # older `parameters` takes only an OpenAPI subset (no additionalProperties).
        out["parametersJsonSchema"] = fn["parameters"]
    return out


def run(req, cfg):
    target = _http.target(cfg, NAME, req.profile)
    key = _http.api_key(cfg, NAME, req.profile)
    model = req.model or _http.setting(cfg, NAME, req.profile, "default_model")
    path = "%s/v1beta/models/%s:streamGenerateContent?alt=sse" % (target.path, quote(model, safe=""))
    headers = _http.headers(req, "x-goog-api-key", key)
    stream = yield from _http.open_stream(target, cfg, "POST", path, headers, request_body(req, cfg),
                                          secrets=(key,), heavy=req.heavy())
    try:
        yield ("head",)
        turn, finished = Turn(req), False
        while True:
            events = yield from _http.json_events(stream)
            if events is None:
                break
            for _, chunk in events:
                if not isinstance(chunk, dict):
                    continue
                if chunk.get("error"):
                    raise _http.upstream_error("upstream sent an error", chunk, (key,))
                block = _http.text(_http.obj(chunk.get("promptFeedback")).get("blockReason"))
                if block and not chunk.get("candidates"):
                    raise BackendError("upstream blocked the prompt: %s" % block[:80], kind="content_filter")
                for ev in read_chunk(turn, chunk):
                    yield ("event", ev)
                finished = finished or turn.finish is not None
        if not finished:
            raise BackendError("upstream stream ended without a finishReason")
        return turn.result()
    finally:
        stream.close()


def read_chunk(turn, chunk) -> list:
    out = []
    for cand in _http.arr(chunk.get("candidates")):
        cand = _http.obj(cand)
        if cand.get("index", 0) != 0:
            continue
        for part in _http.arr(_http.obj(cand.get("content")).get("parts")):
            part = _http.obj(part)
            call = _http.obj(part.get("functionCall"))
            if call:
                args = call.get("args") if isinstance(call.get("args"), dict) else {}
                sig = _http.text(part.get("thoughtSignature"))
                out += turn.whole_call(call.get("id"), call.get("name"),
                                       json.dumps(args, ensure_ascii=False, separators=(",", ":")),
                                       {"google": {"thought_signature": sig}} if sig else None)
            elif part.get("thought") is True:
                out += turn.reasoning(part.get("text"))
            else:
                out += turn.text(part.get("text"))
        raw = _http.text(cand.get("finishReason"))
        if raw:
            turn.finished(raw, "length" if raw == "MAX_TOKENS" else "content_filter" if raw in FILTERED else "stop")
    meta = _http.obj(chunk.get("usageMetadata"))
    if meta:
        c = _http.count
        thoughts = meta.get("thoughtsTokenCount")
        turn.set_usage(c(meta.get("promptTokenCount")) + c(meta.get("toolUsePromptTokenCount")),
                       c(meta.get("candidatesTokenCount")) + c(thoughts),
                       reasoning=c(thoughts) if thoughts is not None else None,
                       cache_read=c(meta["cachedContentTokenCount"]) if "cachedContentTokenCount" in meta else None)
    return out
