"""One assistant turn, as every LLM backend reports it to the client.

A backend parses its provider's stream and tells a Turn what arrived: text,
reasoning, pieces of tool calls, the provider's finish reason, usage.  The
Turn returns the client events to send (a backend yields each as ("event", e))
and, at the end, the backend's return value: so the client sees one protocol
whichever provider answered.

    content        {"content": "..."}
    reasoning      {"reasoning": "..."}            only when the handoff asked include_reasoning
    a tool call    {"tool_call": {"id", "name", "arguments": "<complete JSON text>"}}
                   one per call, when it is complete, in the provider's order (with
                   "extra_content" when the provider needs something back with it:
                   Gemini's thought signature, Anthropic's signed thinking)
    the end        {"finish_reason", ["stop_reason"], ["usage"]}  (sent by the daemon, from
                   result(): with include_usage, or when the turn ended to call tools)

A tool call whose arguments are not JSON is not sent: the client could not run
it.  That is what a turn cut at max_tokens leaves (the arguments stop mid-
object); the finish reason is then "length", which wins over "tool_calls":
the client learns that the turn was cut, not that it is complete.

finish_reason uses OpenAI's words (stop, length, tool_calls, content_filter);
the provider's own, when it differs, is kept as stop_reason.  usage has one
meaning for every provider, OpenAI's: prompt_tokens counts every input token
(cached ones too), completion_tokens every output token (reasoning too),
total_tokens their sum; reasoning_tokens, cache_read_input_tokens and
cache_creation_input_tokens when the provider reports them.
"""

import json

FINISH = ("stop", "length", "tool_calls", "content_filter")


class Turn:
    __slots__ = ("reasoning_on", "calls", "emitted", "dropped", "last", "texts", "finish", "raw_finish", "usage")

    def __init__(self, req):
        self.reasoning_on = bool(req.include_reasoning)
        self.calls = {}       # key (an index, a block number) -> [id, name, [argument pieces], extra]
        self.emitted = 0      # tool calls sent
        self.dropped = 0      # tool calls not sent: their arguments were not JSON
        self.last = None      # the key of the call last given a piece
        self.texts = 0        # content events sent
        self.finish = None    # normalised finish reason
        self.raw_finish = None
        self.usage = None

    # -- what arrived --

    def text(self, text) -> list:
        if not isinstance(text, str) or not text:
            return []
        self.texts += 1
        return [{"content": text}]

    def reasoning(self, text) -> list:
        if not self.reasoning_on or not isinstance(text, str) or not text:
            return []
        return [{"reasoning": text}]

    def call_piece(self, key, call_id=None, name=None, arguments=None, extra=None) -> None:
        """A piece of the tool call `key`: its id, name, a piece of its
        arguments' JSON text, or what the provider needs back with it
        (extra_content), whichever the provider sent this time."""
        call = self.calls.get(key)
        if call is None:
            call = self.calls[key] = ["", "", [], None]
        if isinstance(call_id, str) and call_id:
            call[0] = call_id
        if isinstance(name, str) and name and not call[1]:
            call[1] = name  # (sent once, in the call's first piece; some servers repeat it)
        if isinstance(arguments, str) and arguments:
            call[2].append(arguments)
        if extra:
            call[3] = extra

        self.last = key

    def indexed_piece(self, index, call_id=None, name=None, arguments=None, extra=None) -> list:
        """A piece of a tool call in OpenAI's form (OpenAI, LangGraph's
        tool_call_chunks): keyed by its index.  Some servers send no index (a
        new id then starts a new call; a piece without one continues the last)
        or index every call 0, each whole with its own id (a new id at an index
        whose call has a name completes that call).  Returns the events of the
        calls so completed."""
        new_id = isinstance(call_id, str) and call_id
        if type(index) is not int:
            index = self.last
            if index is None or (new_id and self.calls.get(index, (call_id,))[0] not in ("", call_id)):
                index = ("unindexed", self.emitted + self.dropped + len(self.calls))
        out = []
        call = self.calls.get(index)
        if call is not None and new_id and call[0] and call[0] != call_id and call[1]:
            out = self.call_done(index)
        self.call_piece(index, call_id, name, arguments, extra)
        return out

    def call_done(self, key) -> list:
        """Tool call `key` is complete: its event (none if it never got a
        name, or its arguments are not JSON)."""
        call = self.calls.pop(key, None)
        if call is None or not call[1]:
            return []
        arguments = "".join(call[2]) or "{}"
        try:
            json.loads(arguments)
        except ValueError:  # (a turn cut mid-call: max_tokens)
            self.dropped += 1
            return []
        return [self._call_event(call[0], call[1], arguments, call[3])]

    def whole_call(self, call_id, name, arguments: str, extra=None) -> list:
        """A tool call that arrived whole (Gemini)."""
        if not isinstance(name, str) or not name:
            return []
        return [self._call_event(call_id if isinstance(call_id, str) and call_id else "", name, arguments, extra)]

    def open_calls_done(self) -> list:
        """Every call still being assembled is complete (OpenAI: at the finish), in key order."""
        out = []
        # Indexed calls by index, then the others in the order they came.
        for key in sorted(k for k in self.calls if type(k) is int) + [k for k in self.calls if type(k) is not int]:
            out += self.call_done(key)
        return out

    def _call_event(self, call_id, name, arguments, extra) -> dict:
        if not call_id:
            call_id = "call_%d" % self.emitted
        self.emitted += 1
        call = {"id": call_id, "name": name, "arguments": arguments}
        if extra:
            # What the provider needs back with the call (Gemini's thought
            # signature, Anthropic's signed thinking), where Google's
            # OpenAI-compatible API puts such things: the client hands it
            # back with the call in its next turn, as it got it.
            call["extra_content"] = extra
        return {"tool_call": call}

    def finished(self, raw, normalised) -> None:
        if isinstance(raw, str) and raw:
            self.raw_finish, self.finish = raw, normalised

    def set_usage(self, prompt, completion, total=None, reasoning=None, cache_read=None, cache_creation=None):
        u = {"prompt_tokens": prompt, "completion_tokens": completion,
             "total_tokens": total if total is not None else prompt + completion}
        for name, v in (("reasoning_tokens", reasoning), ("cache_read_input_tokens", cache_read),
                        ("cache_creation_input_tokens", cache_creation)):
            if v is not None:
                u[name] = v
        self.usage = u

    # -- the end --

    def result(self, **extra) -> dict:
        """The backend's return value: the daemon sends the final event from it."""
        finish = self.finish or "stop"
        if finish != "length":
            # (tool_calls only with a call sent: one whose arguments were not JSON is not)
            finish = "tool_calls" if self.emitted else "stop" if finish == "tool_calls" else finish
        out = {"finish_reason": finish, "usage": self.usage, "tool_calls": self.emitted,
               "empty": not self.texts and not self.emitted}
        if self.dropped:
            out["dropped_tool_calls"] = self.dropped
        if self.raw_finish and self.raw_finish != finish:
            out["stop_reason"] = self.raw_finish
        out.update(extra)
        return out
