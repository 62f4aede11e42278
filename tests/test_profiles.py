"""Profiles: named upstreams per backend (backend.<name>.profiles.<profile>),
chosen per request with "profile"; never a URL from a request."""
import subprocess
import sys

import pytest

from conftest import STREAMD, client
from test_backends import settings, stream, upstream  # noqa: F401  (fixture)
import streamd


def profiles(name, **profs):
    return {"backend__%s__profiles" % name: streamd.OPTION_BY_KEY["backend.%s.profiles" % name].parse(profs)}


def test_a_profile_chooses_its_upstream_key_and_model(daemon, upstream, monkeypatch):  # noqa: F811
    main, other = upstream(), upstream()
    monkeypatch.setenv("LOCAL_KEY", "sk-from-env")
    ip = daemon(**settings("openai", main), **profiles("openai", local={
        "api_base": other.base + "/v1", "api_key_env": "LOCAL_KEY", "default_model": "llama3"}))
    assert stream(ip, {"prompt": "x"}).data.endswith(b"[DONE]\n\n")
    assert main.last().headers["authorization"] == "Bearer sk-test-key" and main.last().body["model"] == "gpt-4o-mini"
    assert stream(ip, {"prompt": "x", "profile": "local"}).data.endswith(b"[DONE]\n\n")
    rec = other.last()
    assert rec.headers["authorization"] == "Bearer sk-from-env" and rec.body["model"] == "llama3"
    assert len(main.requests) == 1
    assert stream(ip, {"prompt": "x", "lg": "local||"}).data.endswith(b"[DONE]\n\n")  # the Go daemon's short form
    assert len(other.requests) == 2
    ip.pump(lambda: all(conn.state.name == "DRAINING" for conn in ip.d.conns))


@pytest.mark.parametrize("name, header", [("openai", "authorization"), ("anthropic", "x-api-key"),
                                          ("gemini", "x-goog-api-key"), ("langgraph", "x-api-key")])
def test_a_profile_with_its_own_upstream_does_not_get_the_backends_key(daemon, upstream, name, header):  # noqa: F811
    """The backend's key goes to the backend's server only: a profile naming
    another api_base gets a key only if it sets one."""
    main, other = upstream(), upstream()
    base = other.base + ("/v1" if name == "openai" else "")
    ip = daemon(**settings(name, main), **profiles(name, elsewhere={"api_base": base},
                                                   same={"default_model": "m2"}))
    assert stream(ip, {"prompt": "x", "profile": "elsewhere"}).data.endswith(b"\n\n")
    assert other.requests and all(header not in r.headers for r in other.requests)
    assert stream(ip, {"prompt": "x", "profile": "same"}).data.endswith(b"\n\n")  # same server: same key
    assert "sk-test-key" in main.last().headers[header]


def test_a_langgraph_profile_sets_its_assistant_and_stream_mode(daemon, upstream):  # noqa: F811
    main, research = upstream(), upstream()
    ip = daemon(**settings("langgraph", main), **profiles("langgraph", research={
        "api_base": research.base, "assistant_id": "researcher", "stream_mode": ["messages-tuple", "updates"]}))
    stream(ip, {"prompt": "x", "profile": "research"})
    body = research.last().body
    assert body["assistant_id"] == "researcher" and body["stream_mode"] == ["messages-tuple", "updates"]
    stream(ip, {"prompt": "x", "profile": "research", "assistant_id": "mine"})  # the request's own still wins
    assert research.last().body["assistant_id"] == "mine"


@pytest.mark.parametrize("data, message", [
    ({"profile": "nope"}, b"profile: 'nope' is not a profile of backend openai (profiles: local)"),
    ({"lg": "local|http://evil.example|"}, b"lg: only a profile name is accepted"),
    ({"langgraph_url": "http://evil.example"}, b"langgraph_url: per-request upstream URLs and keys are not accepted"),
    ({"langgraph_api_key": "sk-x"}, b"langgraph_api_key: per-request upstream URLs and keys are not accepted"),
])
def test_no_unknown_profile_and_no_url_from_a_request(daemon, upstream, fdcheck, data, message):  # noqa: F811
    up = upstream()
    ip = daemon(**settings("openai", up), **profiles("openai", local={"api_base": up.base}))
    c = client(ip.path, data)
    ip.pump(c.done)
    assert c.parsed().status == 400 and message in c.parsed().body, c.parsed().body
    assert not up.requests
    c.close()
    ip.finish(fdcheck, up)


@pytest.mark.parametrize("yaml, message", [
    ("backend:\n  openai:\n    profiles:\n      local:\n        api_base: ftp://x\n",
     "backend.openai.profiles.local.api_base: expected an http:// or https:// URL, got 'ftp://x'"),
    ("backend:\n  openai:\n    profiles:\n      local:\n        assistant_id: a\n",
     "backend.openai.profiles.local.assistant_id: expected one of api_base, api_key, api_key_credential, api_key_env, api_socket, "
     "default_model, http2, http2_enabled, insecure_ssl, got 'assistant_id'"),
    ("backend:\n  openai:\n    profiles:\n      local:\n        api_key_env: 'not a name'\n",
     "backend.openai.profiles.local.api_key_env: expected an environment variable name, got 'not a name'"),
    ("backend:\n  openai:\n    profiles: [a]\n", "backend.openai.profiles: expected a mapping of profile names"),
])
def test_bad_profiles_stop_the_start_naming_the_key(tmp_path, yaml, message):
    f = tmp_path / "c.yaml"
    f.write_text(yaml)
    out = subprocess.run([sys.executable, STREAMD, "--config", str(f), "--socket", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stderr.startswith("streamd: %s: " % f) and message in out.stderr, out.stderr
