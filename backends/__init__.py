"""streamd's upstream backends, one module each, imported on first use.

Every backend has the shape of `MockBackend` in streamd.py (read that first):

    NAME = "openai"

    def run(req, cfg):
        # req: streamd.Request (the validated handoff data)
        # cfg: the daemon's config dict, {"backend.openai.api_base": ..., ...}
        ...
        yield ("readable", sock, timeout)   # wait for the upstream
        yield ("event", {"content": text})   # one SSE event to the client
        ...
        return {"finish_reason": "stop", "usage": {...}}   # complete: [DONE] follows

`run` is a generator. It yields operations to the event loop and is resumed with
their result; it never blocks. Returning means the upstream stream completed
(its end marker arrived); raising streamd.BackendError ends the stream with an
HTTP status (before the first event) or an error event (after). When the client
leaves, the loop closes the generator: release sockets in try/finally.

streamd.BACKENDS maps each name to its module path here.
"""
