"""A drop-in for the Go reference daemon: its config file, its flags, its
environment variables, its handoff JSON (keys in any case) and, with
server.error_format: go, the error shape its clients read."""
import array
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, STREAMD, client, read_until_eof
import streamd

GO_EXAMPLE = os.path.join(ROOT, "tests", "fixtures", "go", "example.yaml")


def test_the_go_daemons_example_config_loads_unchanged():
    cfg = streamd.load_config({}, env={}, path=GO_EXAMPLE)
    assert cfg["server.max_stream_duration"] == 300.0 and cfg["backend.mock.message_delay"] == 0.05
    assert cfg["server.socket_mode"] == 0o660  # unquoted 0660: YAML's octal 432
    assert cfg["backend.openai.http2"] == "true" and cfg["backend.openai.insecure_ssl"] is False
    assert cfg["backend.langgraph.stream_mode"] == ["messages-tuple"]
    assert cfg["metrics.listen_addr"] == "127.0.0.1:9090" and cfg["server.data_dir"] == "/run/handoff-data"
    profiles = cfg["backend.langgraph.profiles"]
    assert profiles["claude-agent"] == {"api_base": "https://claude-agent.example.com/v1", "content_format": "anthropic"}
    assert profiles["support"]["http2"] == "false" and profiles["support"]["insecure_ssl"] is True
    # the Go runtime's knobs and what streamd does otherwise: accepted, one warning each
    assert [w.split(": ")[1] for w in cfg["config_warnings"]] == [
        "server.pprof_addr", "server.mem_limit", "server.gc_percent", "server.data_dir_max_age_ms",
        "backend.typing.use_api", "backend.typing.default_model"]


def test_metrics_enabled_false_means_nothing_listens(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("metrics:\n  enabled: false\n  listen_addr: 127.0.0.1:9090\n")
    assert streamd.load_config({}, env={}, path=str(f))["metrics.listen_addr"] == ""
    f.write_text("metrics:\n  enabled: maybe\n")
    with pytest.raises(streamd.ConfigError, match="metrics.enabled: expected true or false, got 'maybe'"):
        streamd.load_config({}, env={}, path=str(f))


def test_a_daemon_starts_from_the_go_config_and_says_what_it_ignores(tmp_path):
    text = pathlib.Path(GO_EXAMPLE).read_text().replace("/run/streaming-daemon.sock", str(tmp_path / "s.sock")).replace(
        "provider: openai", "provider: mock").replace("127.0.0.1:9090", "127.0.0.1:0").replace(
        "/run/handoff-data", str(tmp_path))
    cfg = tmp_path / "go.yaml"
    cfg.write_text(text)
    log = open(tmp_path / "log", "wb")
    p = subprocess.Popen([sys.executable, STREAMD, "-config", str(cfg)], stderr=log)
    try:
        deadline = time.monotonic() + 20
        while b"msg=ready" not in (tmp_path / "log").read_bytes():  # (no NOTIFY_SOCKET here: as a Go user runs it)
            assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.05)
        mine, theirs = socket.socketpair()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(str(tmp_path / "s.sock"))
        s.sendmsg([b'{"Prompt":"hi"}'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [theirs.fileno()]))])
        s.close()
        theirs.close()
        assert read_until_eof(mine).endswith(b"data: [DONE]\n\n")
        mine.close()
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)
        log.close()
    text = (tmp_path / "log").read_text()
    for key in ("server.pprof_addr", "server.mem_limit", "server.gc_percent"):
        assert text.count("%s: ignored" % key) == 1


# The Go daemon's flags (streaming_daemon.go and its backends), each with a value.
GO_FLAG_LIST = [["-config", GO_EXAMPLE], ["-socket", "/tmp/x.sock"], ["-metrics-addr", "127.0.0.1:9191"],
                ["-socket-mode", "0660"], ["-max-connections", "100"], ["-pprof-addr", "localhost:6060"],
                ["-benchmark"], ["-benchmark=true"], ["-backend", "mock"], ["-max-stream-duration-ms", "1500"],
                ["-memlimit", "512MiB"], ["-gc-percent", "50"], ["-message-delay", "10ms"],
                ["-openai-base", "http://127.0.0.1:1/v1"], ["-openai-socket", "/tmp/o.sock"], ["-http2-enabled=false"],
                ["-langgraph-base", "http://127.0.0.1:2"], ["-langgraph-socket", "/tmp/l.sock"],
                ["-langgraph-assistant", "agent"], ["--backend", "mock"], ["-backend=mock"]]


@pytest.mark.parametrize("flag", GO_FLAG_LIST, ids=[" ".join(f) for f in GO_FLAG_LIST])
def test_every_go_flag_is_taken(flag):
    args = vars(streamd.build_arg_parser().parse_args(streamd.go_flags(flag)))
    args.pop("config", None)
    cfg = streamd.load_config(args, env={})
    name = flag[0].lstrip("-").split("=")[0]
    expect = {"max-stream-duration-ms": ("server.max_stream_duration", 1.5), "http2-enabled": ("backend.openai.http2", "false"),
              "socket-mode": ("server.socket_mode", 0o660), "benchmark": ("server.benchmark", True),
              "message-delay": ("backend.mock.message_delay", 0.01)}.get(name)
    if expect:
        assert cfg[expect[0]] == expect[1]
    if name in ("memlimit", "gc-percent", "pprof-addr"):
        assert cfg["config_warnings"] == ["%s: ignored (a Go runtime setting)" % name]


@pytest.mark.parametrize("value, http2, insecure", [("false", "false", False), ("OFF", "false", False),
                                                    ("0", "false", False), ("yes", "true", False),
                                                    ("1", "true", True), ("true", "true", True)])
def test_go_environment_variables(value, http2, insecure):
    env = {"OPENAI_HTTP2_ENABLED": value, "OPENAI_INSECURE_SSL": value, "LANGGRAPH_HTTP2_ENABLED": value,
           "LANGGRAPH_INSECURE_SSL": value}
    cfg = streamd.load_config({}, env=env)
    for name in ("openai", "langgraph"):
        assert cfg["backend.%s.http2" % name] == http2 and cfg["backend.%s.insecure_ssl" % name] is insecure


def test_handoff_keys_in_any_case_as_go_reads_them():
    req = streamd.parse_handoff(json.dumps({
        "PROMPT": "first", "Prompt": "last wins", "User_Id": 7, "Include_Usage": True, "thread_ID": "t",
        "Messages": [{"Role": "user", "CONTENT": "hi"}], "Attachments": {"Note": "n.txt"},
        "Response_Headers": {"X-Keep-Case": "v"}}).encode())
    assert (req.prompt, req.user_id, req.include_usage, req.thread_id) == ("last wins", 7, True, "t")
    assert req.messages == [{"role": "user", "content": "hi"}]
    assert req.attachments == {"Note": "n.txt"}  # a map's own keys are kept as sent
    assert req.response_headers == [("X-Keep-Case", "v")]


def test_go_error_format(daemon, fdcheck, tmp_path):
    ip = daemon(server__error_format="go")
    c = client(ip.path, b'{"max_tokens": "many"}')
    ip.pump(c.done)
    r = c.parsed()
    assert r.status == 400 and json.loads(r.body) == {"error": "max_tokens: expected an integer >= 1, got string"}
    assert streamd.sse_error("upstream_error", "upstream went away", "go") == \
        b'data: {"error":"upstream went away"}\n\n'
    c.close()
    ip.finish(fdcheck)
