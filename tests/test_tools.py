"""Tools, round trip, for every provider: the handoff's tools go upstream in
the provider's format; the provider's tool-call stream reaches the client as
one tool_call event per call and finish_reason "tool_calls"; the follow-up
handoff with the assistant's calls and the tool results goes upstream in the
provider's format again.  Real test upstream on 127.0.0.1, recording requests."""
import json
import logging

import pytest

from conftest import client
from test_backends import settings, stream, upstream  # noqa: F401  (fixture)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string"}}}}}


def events(c):
    body = c.data.split(b"\r\n\r\n", 1)[1]
    out = []
    for block in body.split(b"\n\n"):
        if block.startswith(b"data: "):
            out.append(block[6:] if block[6:] == b"[DONE]" else json.loads(block[6:]))
    return out


@pytest.mark.parametrize("name", ["openai", "anthropic", "gemini"])
def test_tools_round_trip(daemon, upstream, name, fdcheck):  # noqa: F811
    up = upstream()
    ip = daemon(**settings(name, up))
    c = stream(ip, {"prompt": "Weather and time in Paris?", "tools": [WEATHER, TIME], "tool_choice": "auto",
                    "test_pattern": "tools"})
    evs = events(c)
    calls = [e["tool_call"] for e in evs if isinstance(e, dict) and "tool_call" in e]
    assert [(tc["name"], json.loads(tc["arguments"])) for tc in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert evs[-2]["finish_reason"] == "tool_calls" and evs[-1] == b"[DONE]"
    assert not any("content" in e for e in evs if isinstance(e, dict))
    sent = up.last().body
    if name == "openai":
        assert sent["tools"] == [WEATHER, TIME] and sent["tool_choice"] == "auto"
        assert [tc["id"] for tc in calls] == ["call_a", "call_b"]
    elif name == "anthropic":
        assert sent["tools"] == [
            {"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER["function"]["parameters"]},
            {"name": "get_time", "description": "", "input_schema": TIME["function"]["parameters"]}]
        assert sent["tool_choice"] == {"type": "auto"} and [tc["id"] for tc in calls] == ["toolu_a", "toolu_b"]
        assert evs[-2]["stop_reason"] == "tool_use"
    else:
        assert sent["tools"] == [{"functionDeclarations": [
            {"name": "get_weather", "description": "Weather in a city",
             "parametersJsonSchema": WEATHER["function"]["parameters"]},
            {"name": "get_time", "description": "", "parametersJsonSchema": TIME["function"]["parameters"]}]}]
        assert sent["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}
        assert [tc["id"] for tc in calls] == ["call_0", "call_1"]  # Gemini sent no ids
        assert calls[0]["extra_content"] == {"google": {"thought_signature": "c2ln"}}
        assert "extra_content" not in calls[1]

    # The next turn: PHP ran the tools and hands off the results.
    follow = {"tools": [WEATHER, TIME], "messages": [
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": tc["id"], "type": "function", "function": {"name": tc["name"], "arguments": tc["arguments"]},
             **({"extra_content": tc["extra_content"]} if "extra_content" in tc else {})} for tc in calls]},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": '{"temp_c": 21}'},
        {"role": "tool", "tool_call_id": calls[1]["id"], "content": "14:00"}]}
    c2 = stream(ip, follow)
    assert c2.data.endswith(b"data: [DONE]\n\n")
    sent = up.last().body
    if name == "openai":
        assert sent["messages"][1:] == [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"tz":"CET"}'}}]},
            {"role": "tool", "tool_call_id": "call_a", "content": '{"temp_c": 21}'},
            {"role": "tool", "tool_call_id": "call_b", "content": "14:00"}]
    elif name == "anthropic":
        assert sent["messages"][1:] == [
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_b", "name": "get_time", "input": {"tz": "CET"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_a", "content": '{"temp_c": 21}'},
                {"type": "tool_result", "tool_use_id": "toolu_b", "content": "14:00"}]}]
    else:
        assert sent["contents"][1:] == [
            {"role": "model", "parts": [
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2ln"},
                {"functionCall": {"name": "get_time", "args": {"tz": "CET"}}}]},
            {"role": "user", "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"temp_c": 21}}},
                {"functionResponse": {"name": "get_time", "response": {"content": "14:00"}}}]}]
    c.close()
    c2.close()
    ip.finish(fdcheck, up)


@pytest.mark.parametrize("name, choice, expected", [
    ("openai", "required", "required"),
    ("openai", {"type": "function", "function": {"name": "get_time"}}, {"type": "function", "function": {"name": "get_time"}}),
    ("anthropic", "required", {"type": "any"}),
    ("anthropic", "none", {"type": "none"}),
    ("anthropic", {"type": "function", "function": {"name": "get_time"}}, {"type": "tool", "name": "get_time"}),
    ("gemini", "required", {"functionCallingConfig": {"mode": "ANY"}}),
    ("gemini", "none", {"functionCallingConfig": {"mode": "NONE"}}),
    ("gemini", {"type": "function", "function": {"name": "get_time"}},
     {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_time"]}}),
])
def test_tool_choice_in_each_providers_words(daemon, upstream, name, choice, expected):  # noqa: F811
    up = upstream()
    ip = daemon(**settings(name, up))
    stream(ip, {"prompt": "x", "tools": [WEATHER, TIME], "tool_choice": choice})
    sent = up.last().body
    assert sent["toolConfig" if name == "gemini" else "tool_choice"] == expected


def test_langgraph_tool_calls_from_its_chunks(daemon, upstream):  # noqa: F811
    """LangGraph's graph has its own tools: their calls (tool_call_chunks in
    messages-tuple events) still reach the client as tool_call events."""
    up = upstream()
    ip = daemon(**settings("langgraph", up))
    c = stream(ip, {"prompt": "x", "test_pattern": "tools"})
    evs = events(c)
    assert [e["tool_call"] for e in evs if isinstance(e, dict) and "tool_call" in e] == [
        {"id": "lc_a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"id": "lc_b", "name": "get_time", "arguments": '{"tz":"CET"}'}]
    assert evs[-2] == {"finish_reason": "tool_calls"} and evs[-1] == b"[DONE]"
    follow = stream(ip, {"messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "lc_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "lc_a", "content": "sunny"}]})
    assert follow.data.endswith(b"data: [DONE]\n\n")
    assert up.last().body["input"]["messages"][1:] == [
        {"type": "ai", "content": "", "tool_calls": [
            {"id": "lc_a", "name": "get_weather", "args": {"city": "Paris"}, "type": "tool_call"}]},
        {"type": "tool", "content": "sunny", "tool_call_id": "lc_a"}]
    bad = client(ip.path, {"prompt": "x", "tools": [WEATHER]})
    ip.pump(bad.done)
    assert bad.parsed().status == 400 and b"the graph defines its own tools" in bad.parsed().body
    bad.close()


@pytest.mark.parametrize("data, message", [
    ({"tools": "get_weather"}, b"tools: expected a list of at most 128 function tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, b"tools[0].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     b"tool_choice: 'nope' is not one of the tools"),
    ({"tools": [WEATHER], "tool_choice": "always"}, b"tool_choice: expected"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, b"only an assistant message calls tools"),
    ({"messages": [{"role": "tool", "content": "x"}]}, b"messages[0].tool_call_id"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "a", "function": {"name": "f",
                                                                                                 "arguments": {}}}]}]},
     b"messages[0].tool_calls[0].function.arguments: expected the arguments as a JSON text"),
])
def test_bad_tools_are_400_naming_the_field(daemon, fdcheck, data, message):
    ip = daemon()
    c = client(ip.path, data)
    ip.pump(c.done)
    r = c.parsed()
    assert r.status == 400 and message in r.body, r.body
    c.close()
    ip.finish(fdcheck)


@pytest.mark.parametrize("name", ["anthropic", "gemini"])
def test_arguments_that_are_not_a_json_object_are_400_for_providers_that_want_one(daemon, upstream, name):  # noqa: F811
    up = upstream()
    ip = daemon(**settings(name, up))
    c = stream(ip, {"messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": "not json"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "r"}]})
    r = c.parsed()
    assert r.status == 400 and b"arguments must be a JSON object" in r.body and not up.requests


def test_an_answer_with_neither_text_nor_tool_calls_logs_a_warning(daemon, upstream, caplog):  # noqa: F811
    up = upstream()
    ip = daemon(**settings("openai", up))
    c = stream(ip, {"test_pattern": "empty"})  # the finish and [DONE], nothing else
    assert c.data.endswith(b"data: [DONE]\n\n")
    assert any(r.getMessage() == "stream ended with neither text nor tool calls" for r in caplog.records)


# ---- reasoning, opt-in ----

@pytest.mark.parametrize("name", ["anthropic", "gemini", "openai"])
def test_include_reasoning_asks_the_provider_for_it(daemon, upstream, name):  # noqa: F811
    up = upstream()
    ip = daemon(**settings(name, up))
    stream(ip, {"prompt": "x", "include_reasoning": True, "max_tokens": 500})
    sent = up.last().body
    if name == "anthropic":
        # extended thinking, and max_tokens raised above the budget (the API wants room for the answer)
        assert sent["thinking"] == {"type": "enabled", "budget_tokens": 2048} and sent["max_tokens"] == 2548
    elif name == "gemini":
        assert sent["generationConfig"]["thinkingConfig"] == {"includeThoughts": True}
    else:
        assert "reasoning" not in sent  # OpenAI-compatible vendors stream it unasked (reasoning_content)
    stream(ip, {"prompt": "x"})
    assert "thinking" not in up.last().body and "thinkingConfig" not in up.last().body.get("generationConfig", {})


@pytest.mark.parametrize("extra, why", [
    ({"temperature": 0.2}, "temperature 0.2"),
    ({"top_p": 0.5}, "top_p 0.5"),
    ({"tools": [WEATHER], "tool_choice": "required"}, "a forced tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
     "a forced tool_choice"),
])
def test_anthropic_thinking_is_not_asked_for_with_what_it_refuses(daemon, upstream, caplog, extra, why):  # noqa: F811
    """Extended thinking is a 400 with temperature != 1, top_p < 0.95 or a
    forced tool: such a request goes without it, and the log says why."""
    caplog.set_level(logging.INFO, logger="streamd")
    up = upstream()
    ip = daemon(**settings("anthropic", up))
    c = stream(ip, dict({"prompt": "x", "include_reasoning": True}, **extra))
    assert c.data.endswith(b"data: [DONE]\n\n")
    assert "thinking" not in up.last().body
    assert any(r.getMessage().endswith("does not allow " + why) for r in caplog.records)
    stream(ip, {"prompt": "x", "include_reasoning": True, "temperature": 1, "top_p": 0.95,
                "tools": [WEATHER], "tool_choice": "auto"})
    assert up.last().body["thinking"]["type"] == "enabled"


def test_anthropic_gets_its_signed_thinking_back_with_the_tool_calls(daemon, upstream):  # noqa: F811
    """With extended thinking and tools, Anthropic wants the turn's thinking
    blocks back, unmodified, before its tool_use blocks: the tool_call event
    carried them as extra_content.anthropic.thinking_blocks."""
    blocks = [{"type": "thinking", "thinking": "call it", "signature": "c2lnbmVk"},
              {"type": "redacted_thinking", "data": "cmVkYWN0ZWQ="}]
    up = upstream()
    ip = daemon(**settings("anthropic", up))
    stream(ip, {"tools": [WEATHER], "include_reasoning": True, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
             "extra_content": {"anthropic": {"thinking_blocks": blocks}}}]},
        {"role": "tool", "tool_call_id": "toolu_a", "content": "sunny"}]})
    assert up.last().body["messages"][1] == {"role": "assistant", "content": blocks + [
        {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {"city": "Paris"}}]}
