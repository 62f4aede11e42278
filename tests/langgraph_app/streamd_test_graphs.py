"""Offline LangGraph graphs for tests/test_langgraph_real.py (served by `langgraph dev`).

Every graph is one node that calls a fake chat model (ScriptedChatModel below).  The
model streams its answer token by token through LangChain's callbacks, exactly as a
real provider integration does, so the server's `messages` / `messages-tuple` stream
modes carry real AIMessageChunk deltas.  Nothing here touches the network.

  agent    fixed text, streamed as several tokens; also writes one `custom` event
  history  says how many human messages the thread state holds (MessagesState,
           add_messages), so a second turn on the same thread can prove it saw the first
  fail     raises RuntimeError inside the node (a graph error)
  tools    an AIMessage with tool_calls (get_weather {"city": "Paris"}), streamed as
           tool_call_chunks the way OpenAI-style providers stream them
  canned   a node that returns a finished AIMessage without calling a model (no token
           stream: `messages-tuple` carries one whole "ai" message, `messages` mode a
           messages/complete event)
  slow     60 tokens, 0.1 s apart (for heartbeat and client-disconnect tests)
"""
import asyncio
import json
from typing import Any, AsyncIterator, Callable, Iterator, List, Optional

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, MessagesState, StateGraph

AGENT_TEXT = "Hello from the fake LangGraph agent."


class ScriptedChatModel(BaseChatModel):
    """reply(messages) -> (text, tool_calls); streamed as whitespace-split tokens,
    then one chunk per tool call carrying its name and id, then its JSON args in pieces."""

    reply: Callable[[List[BaseMessage]], Any]
    delay: float = 0.0

    @property
    def _llm_type(self) -> str:
        return "streamd-scripted-fake"

    def _chunks(self, messages) -> List[AIMessageChunk]:
        text, tool_calls = self.reply(messages)
        chunks = []
        for token in [t for t in text.replace(" ", " \0").split("\0") if t]:
            chunks.append(AIMessageChunk(content=token))
        for index, call in enumerate(tool_calls):
            args = json.dumps(call["args"])
            half = len(args) // 2
            chunks.append(AIMessageChunk(content="", tool_call_chunks=[
                {"name": call["name"], "args": "", "id": call["id"], "index": index, "type": "tool_call_chunk"}]))
            for piece in (args[:half], args[half:]):
                chunks.append(AIMessageChunk(content="", tool_call_chunks=[
                    {"name": None, "args": piece, "id": None, "index": index, "type": "tool_call_chunk"}]))
        if chunks:
            chunks[-1].chunk_position = "last"
        return chunks

    def _generate(self, messages, stop=None, run_manager: Optional[CallbackManagerForLLMRun] = None,
                  **kwargs) -> ChatResult:
        text, tool_calls = self.reply(messages)
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text, tool_calls=tool_calls))])

    def _stream(self, messages, stop=None, run_manager: Optional[CallbackManagerForLLMRun] = None,
                **kwargs) -> Iterator[ChatGenerationChunk]:
        for chunk in self._chunks(messages):
            gen = ChatGenerationChunk(message=chunk)
            if run_manager:
                run_manager.on_llm_new_token(chunk.content, chunk=gen)
            yield gen

    async def _astream(self, messages, stop=None, run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                       **kwargs) -> AsyncIterator[ChatGenerationChunk]:
        for chunk in self._chunks(messages):
            if self.delay:
                await asyncio.sleep(self.delay)
            gen = ChatGenerationChunk(message=chunk)
            if run_manager:
                await run_manager.on_llm_new_token(chunk.content, chunk=gen)
            yield gen


def _one_node(model: BaseChatModel, before: Optional[Callable[[], None]] = None):
    async def call_model(state: MessagesState):
        if before:
            before()
        return {"messages": [await model.ainvoke(state["messages"])]}

    g = StateGraph(MessagesState)
    g.add_node("call_model", call_model)
    g.add_edge(START, "call_model")
    g.add_edge("call_model", END)
    return g.compile()


def _custom_progress():
    get_stream_writer()({"progress": "thinking"})


def _count_humans(messages):
    n = sum(1 for m in messages if isinstance(m, HumanMessage))
    return "You have sent %d human messages in this thread." % n, []


def _fail_node(state: MessagesState):
    raise RuntimeError("fake graph failure for streamd tests")


def _make_fail():
    g = StateGraph(MessagesState)
    g.add_node("explode", _fail_node)
    g.add_edge(START, "explode")
    g.add_edge("explode", END)
    return g.compile()


agent = _one_node(ScriptedChatModel(reply=lambda m: (AGENT_TEXT, [])), before=_custom_progress)
history = _one_node(ScriptedChatModel(reply=_count_humans))
fail = _make_fail()
tools = _one_node(ScriptedChatModel(reply=lambda m: (
    "Let me check.", [{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_weather_1",
                       "type": "tool_call"}])))
slow = _one_node(ScriptedChatModel(reply=lambda m: (" ".join("tok%d" % i for i in range(60)), []), delay=0.1))


def _canned_node(state: MessagesState):
    return {"messages": [AIMessage(content="A canned answer, not streamed.")]}


def _make_canned():
    g = StateGraph(MessagesState)
    g.add_node("canned", _canned_node)
    g.add_edge(START, "canned")
    g.add_edge("canned", END)
    return g.compile()


canned = _make_canned()
