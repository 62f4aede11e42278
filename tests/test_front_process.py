"""The direct front in a real daemon process, with real clients: Python's
`websockets` (a test-only dependency) for the WebSocket, raw sockets for
HTTP, a real upstream; SIGHUP reloads the API keys; keys never reach the log."""
import json
import re
import signal
import socket

import pytest

from conftest import read_until_eof
from upstream import TestUpstream

ws_client = pytest.importorskip("websockets.sync.client")
from websockets.exceptions import ConnectionClosed  # noqa: E402


def addr(d):
    d.wait_log("msg=listening")
    host, port = re.search(r"msg=listening .*?addr=(\S+):(\d+)", d.logs()).groups()
    return host, int(port)


def http(d, raw: bytes) -> bytes:
    with socket.create_connection(addr(d), timeout=10) as s:
        s.sendall(raw)
        return read_until_eof(s)


def get(path, headers=""):
    return ("GET %s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (path, headers)).encode()


def status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1])


def ws_url(d, path="/v1/ws"):
    return "ws://%s:%d%s" % (addr(d) + (path,))


@pytest.fixture
def openai_front(daemon_proc):
    """start(*args, delay=s) -> (daemon with --listen and the openai backend, its test upstream)."""
    made = []

    def start(*args, delay=0.0):
        up = TestUpstream()
        up.default_delay = delay
        made.append(up)
        d = daemon_proc("--listen", "127.0.0.1:0", "--backend", "openai", "--openai-base", up.base + "/v1", *args,
                        env={"OPENAI_API_KEY": "sk-test"})
        return d, up
    yield start
    for up in made:
        up.close()


def test_websocket_with_a_real_client(daemon_proc):
    d = daemon_proc("--listen", "127.0.0.1:0", "--message-delay", "5ms")
    with ws_client.connect(ws_url(d)) as ws:
        ws.send(json.dumps({"prompt": "from websockets", "request_id": "ws-1"}))
        msgs = [json.loads(m) for m in ws]
        assert ws.close_code == 1000
    assert msgs[0] == {"type": "chunk", "content": "Hello from streamd! Prompt: from websockets"}
    assert [m["type"] for m in msgs] == ["chunk"] * 18 + ["done"]
    d.wait_log("request_id=ws-1")
    assert re.search(r"request_id=ws-1 backend=mock status=101 .*outcome=done peer=127.0.0.1 path=/v1/ws",
                     d.logs())


def test_websocket_ping_and_early_close_cancel_the_upstream(openai_front):
    d, up = openai_front(delay=0.5)
    with ws_client.connect(ws_url(d, "/v1/ws?prompt=hi")) as ws:
        assert json.loads(ws.recv(timeout=10)) == {"type": "chunk", "content": "Hello"}
        assert ws.ping().wait(5), "no pong"
        ws.close(1000)
    assert up.last().hung_up.wait(5), "closing the WebSocket did not cancel the upstream request"
    d.wait_log("outcome=client_disconnected")


def test_websocket_upstream_failure_is_an_error_message(openai_front):
    d, up = openai_front("--max-retries", "0")
    with ws_client.connect(ws_url(d)) as ws:
        ws.send(json.dumps({"prompt": "x", "test_pattern": "status:400"}))
        msg = json.loads(ws.recv(timeout=10))
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 1011
    assert msg["type"] == "error" and msg["error"]["status"] == 502


def test_direct_client_leaving_cancels_the_upstream(openai_front):
    d, up = openai_front(delay=0.5)
    s = socket.create_connection(addr(d), timeout=10)
    s.sendall(get("/v1/stream?prompt=hi"))
    data = b""
    while b'data: {"content":"Hello"}' not in data:  # the stream is live
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    s.close()
    assert up.last().hung_up.wait(5)
    d.wait_log("outcome=client_disconnected")


def test_api_keys_reload_on_sighup_and_never_reach_the_log(daemon_proc, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("old-secret-key\n")
    config = tmp_path / "c.yaml"
    config.write_text("http:\n  listen: [\"127.0.0.1:0\"]\n  api_keys_file: %s\n" % keys)
    d = daemon_proc("--message-delay", "1ms", config=config)
    assert status(http(d, get("/v1/stream", "X-API-Key: new-secret-key\r\n"))) == 403
    assert status(http(d, get("/v1/stream", "Authorization: Bearer old-secret-key\r\n"))) == 200
    keys.write_text("# rotated\nnew-secret-key\n")
    d.signal(signal.SIGHUP)
    d.wait_log("API keys loaded", 2)  # the first was at start
    assert status(http(d, get("/v1/stream", "X-API-Key: new-secret-key\r\n"))) == 200
    assert status(http(d, get("/v1/stream?api_key=old-secret-key"))) == 403
    # An unreadable file on reload keeps the keys we have.
    keys.unlink()
    d.signal(signal.SIGHUP)
    d.wait_log("keeping the previous API keys")
    assert status(http(d, get("/v1/stream", "X-API-Key: new-secret-key\r\n"))) == 200
    d.wait_log("client=key:", 2)
    assert "secret" not in d.logs()


def test_workers_share_the_http_listener(daemon_proc):
    d = daemon_proc("--listen", "127.0.0.1:0", "--workers", "2", "--message-delay", "1ms")
    d.wait_log("worker ready", 2)
    for _ in range(6):
        resp = http(d, get("/v1/stream?prompt=w"))
        assert resp.startswith(b"HTTP/1.1 200 OK") and resp.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("args,message", [
    (["--listen", "nonsense"], "--listen: expected a list of HOST:PORT, got ['127.0.0.1:0', 'nonsense']"),
    (["--api-keys", "/nonexistent/keys"], "http.api_keys_file: cannot read /nonexistent/keys"),
    (["--trusted-proxies", "10.0.0.300"], "--trusted-proxies: expected a list of IP addresses"),
])
def test_bad_front_settings_stop_the_start(args, message, tmp_path):
    import subprocess
    import sys
    from conftest import STREAMD
    out = subprocess.run([sys.executable, STREAMD, "--socket", str(tmp_path / "s.sock"), "--metrics-addr", "",
                          "--listen", "127.0.0.1:0", *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert message in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_port_in_use_is_a_start_error(tmp_path):
    import subprocess
    import sys
    from conftest import STREAMD
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, STREAMD, "--socket", str(tmp_path / "s.sock"), "--metrics-addr", "",
                              "--listen", "127.0.0.1:%d" % port], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "http.listen: cannot listen on '127.0.0.1:%d': Address already in use" % port in out.stderr
