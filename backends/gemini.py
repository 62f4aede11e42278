"""gemini: Google's Gemini API, streamGenerateContent with alt=sse.

Events are CRLF-framed JSON chunks with candidates[].content.parts[].text
(deltas); a candidate's finishReason ends the stream.  A mid-stream
{"error": …} chunk fails it.
"""
from urllib.parse import quote

from streamd import BackendError
from backends import _http

NAME = "gemini"
close = _http.close_all  # the daemon calls close() at exit: pooled connections


def request_body(req, cfg):
    contents, system = [], []
    for role, text in req.conversation():
        if role == "system":
            system.append(text)
        else:
            contents.append({"role": "model" if role == "assistant" else "user", "parts": [{"text": text}]})
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
    if gen:
        body["generationConfig"] = gen
    return body


def run(req, cfg):
    target = _http.target(cfg, NAME)
    key = cfg["backend.gemini.api_key"]
    model = req.model or cfg["backend.gemini.default_model"]
    path = "%s/v1beta/models/%s:streamGenerateContent?alt=sse" % (target.path, quote(model, safe=""))
    headers = _http.headers(req, "x-goog-api-key", key)
    stream = yield from _http.open_stream(target, cfg, "POST", path, headers, request_body(req, cfg),
                                          secrets=(key,))
    try:
        yield ("head",)
        finish, usage = None, None
        while True:
            events = yield from _http.json_events(stream)
            if events is None:
                break
            for _, chunk in events:
                if not isinstance(chunk, dict):
                    continue
                if chunk.get("error"):
                    raise _http.upstream_error("upstream sent an error", chunk, (key,))
                block = (chunk.get("promptFeedback") or {}).get("blockReason")
                if block and not chunk.get("candidates"):
                    raise BackendError("upstream blocked the prompt: %s" % block, kind="content_filter")
                for cand in chunk.get("candidates") or ():
                    for part in (cand.get("content") or {}).get("parts") or ():
                        if part.get("text") and not part.get("thought"):
                            yield ("event", {"content": part["text"]})
                    if cand.get("finishReason"):
                        finish = cand["finishReason"]
                meta = chunk.get("usageMetadata")
                if meta:
                    usage = {"prompt_tokens": meta.get("promptTokenCount", 0),
                             "completion_tokens": meta.get("candidatesTokenCount", 0),
                             "total_tokens": meta.get("totalTokenCount", 0)}
        if finish is None:
            raise BackendError("upstream stream ended without a finishReason")
        return {"finish_reason": finish.lower(), "usage": usage}
    finally:
        stream.close()
