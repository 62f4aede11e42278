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
                block = _http.text(_http.obj(chunk.get("promptFeedback")).get("blockReason"))
                if block and not chunk.get("candidates"):
                    raise BackendError("upstream blocked the prompt: %s" % block[:80], kind="content_filter")
                for cand in _http.arr(chunk.get("candidates")):
                    cand = _http.obj(cand)
                    for part in _http.arr(_http.obj(cand.get("content")).get("parts")):
                        part = _http.obj(part)
                        if _http.text(part.get("text")) and not part.get("thought"):
                            yield ("event", {"content": part["text"]})
                    if _http.text(cand.get("finishReason")):
                        finish = cand["finishReason"]
                meta = _http.obj(chunk.get("usageMetadata"))
                if meta:
                    usage = {"prompt_tokens": _http.count(meta.get("promptTokenCount")),
                             "completion_tokens": _http.count(meta.get("candidatesTokenCount")),
                             "total_tokens": _http.count(meta.get("totalTokenCount"))}
        if finish is None:
            raise BackendError("upstream stream ended without a finishReason")
        return {"finish_reason": finish.lower(), "usage": usage}
    finally:
        stream.close()
