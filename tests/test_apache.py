"""The real thing: Apache 2.4 with mod_socket_handoff and PHP in front of a
streamd process.  PHP sets X-Socket-Handoff / X-Handoff-Data, the module
passes the client's TCP socket over SOCK_SEQPACKET, streamd answers.

mod_socket_handoff is not packaged anywhere, so this module runs only when
STREAMD_APACHE_MODULE names a built mod_socket_handoff.so (`apxs -c
mod_socket_handoff.c`, see README "Testing").  It needs `apache2` (or the
binary in STREAMD_APACHE_BIN) with mod_php."""
import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from conftest import DaemonProcess, handoff_pair, read_until_eof

MODULE = os.environ.get("STREAMD_APACHE_MODULE", "")
APACHE = os.environ.get("STREAMD_APACHE_BIN") or shutil.which("apache2") or shutil.which("httpd")
MODULE_DIRS = ("/usr/lib/apache2/modules", "/usr/lib64/httpd/modules", "/usr/lib/httpd/modules")


def find_module(pattern):
    for d in MODULE_DIRS:
        hits = sorted(glob.glob(os.path.join(d, pattern)))
        if hits:
            return hits[-1]
    return None


PHP = find_module("libphp*.so")
if not MODULE:
    pytest.skip("STREAMD_APACHE_MODULE is not set (path to a built mod_socket_handoff.so)",
                allow_module_level=True)
if not (os.path.exists(MODULE) and APACHE and PHP and find_module("mod_mpm_prefork.so")):
    pytest.skip("Apache with mod_php and mod_socket_handoff is not installed here "
                "(module=%r apache=%r php=%r)" % (MODULE, APACHE, PHP), allow_module_level=True)

# The page PHP runs: `data` is passed through as X-Handoff-Data untouched;
# `big=N` sends a prompt of N bytes; a POST takes the prompt from its JSON body.
HANDOFF_PHP = r"""<?php
header('X-Socket-Handoff: ' . getenv('STREAMD_SOCKET'));
if (isset($_GET['big'])) {
    header('X-Handoff-Data: ' . json_encode(['prompt' => str_repeat('a', (int)$_GET['big'])]));
} elseif ($_SERVER['REQUEST_METHOD'] === 'POST') {
    $body = json_decode(file_get_contents('php://input'), true);
    header('X-Handoff-Data: ' . json_encode(['prompt' => $body['prompt'], 'request_id' => 'post'],
                                            JSON_UNESCAPED_UNICODE));
} elseif (isset($_GET['data'])) {
    header('X-Handoff-Data: ' . $_GET['data']);
}
echo "PHP output that the handoff discards";
"""

CONF = """\
ServerRoot {root}
PidFile {root}/httpd.pid
DefaultRuntimeDir {root}
Mutex file:{root}
Listen 127.0.0.1:{port}
ServerName localhost
{user}
ErrorLog {root}/error.log
LogLevel info
LoadModule mpm_prefork_module {mods}/mod_mpm_prefork.so
LoadModule authz_core_module {mods}/mod_authz_core.so
LoadModule env_module {mods}/mod_env.so
LoadModule php_module {php}
LoadModule socket_handoff_module {module}
SocketHandoffAllowedPrefix {root}/
PassEnv STREAMD_SOCKET
DocumentRoot {root}/www
<Directory {root}/www>
    Require all granted
</Directory>
<FilesMatch "\\.php$">
    SetHandler application/x-httpd-php
</FilesMatch>
StartServers 10
MinSpareServers 10
MaxSpareServers 40
MaxRequestWorkers 150
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Apache:
    def __init__(self, root, socket_path):
        self.root, self.port = root, free_port()
        (root / "www").mkdir()
        (root / "www" / "h.php").write_text(HANDOFF_PHP)
        user = "User www-data\nGroup www-data" if os.geteuid() == 0 else ""
        (root / "httpd.conf").write_text(CONF.format(
            root=root, port=self.port, user=user, mods=os.path.dirname(find_module("mod_mpm_prefork.so")),
            php=PHP, module=os.path.abspath(MODULE)))
        env = dict(os.environ, STREAMD_SOCKET=socket_path)
        self.log = open(root / "stderr.log", "wb")
        # A session of its own: prefork's parent signals its whole process group on exit.
        self.proc = subprocess.Popen([APACHE, "-f", str(root / "httpd.conf"), "-DFOREGROUND"],
                                     env=env, stdout=self.log, stderr=self.log, start_new_session=True)
        end = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    self.stop()
                    raise AssertionError("apache did not start:\n%s%s" % (
                        (root / "stderr.log").read_text(), self.errors()))
                time.sleep(0.05)  # an external process starting: nothing to wait on but the port

    def errors(self):
        p = self.root / "error.log"
        return p.read_text() if p.exists() else ""

    def request(self, raw, timeout=10):
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(raw)
            return read_until_eof(s, timeout)

    def get(self, query=""):
        return self.request(b"GET /h.php%s HTTP/1.1\r\nHost: localhost\r\n\r\n" % query.encode())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def stack():
    # Apache's children must be able to traverse the directory.
    root = Path(tempfile.mkdtemp(prefix="streamd-apache-"))
    os.chmod(root, 0o755)
    d = a = None
    try:
        # Apache's children run as www-data when we are root: the socket's group lets them in.
        access = ["--socket-group", "www-data"] if os.geteuid() == 0 else ["--socket-mode", "0666"]
        d = DaemonProcess(root, access + ["--message-delay", "30ms"])
        a = Apache(root, d.path)
        yield d, a
    finally:
        if a is not None:
            a.stop()
        if d is not None:
            d.stop()
        shutil.rmtree(root, ignore_errors=True)


def split(response):
    head, _, body = response.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body


def direct(d, data):
    """The same handoff data sent straight to streamd, as the module would."""
    c = handoff_pair(d.path, data)
    try:
        return read_until_eof(c)
    finally:
        c.close()


def q(data):
    return "?data=" + urllib.parse.quote(data)


def test_stream_through_apache_is_byte_exact(stack):
    d, a = stack
    data = json.dumps({"prompt": "héllo ✓", "request_id": "ap-1", "include_usage": True,
                       "response_headers": {"X-Trace": "t-1", "Content-Length": "9"}},
                      ensure_ascii=False)
    got = a.get(q(data))
    head, body = split(got)
    assert head == [b"HTTP/1.1 200 OK", b"Content-Type: text/event-stream", b"Cache-Control: no-cache",
                    b"Connection: close", b"X-Accel-Buffering: no", b"X-Trace: t-1"]
    assert body.count(b"data: {\"content\"") == 18 and body.endswith(b"data: [DONE]\n\n")
    assert "héllo ✓".encode() in body and b"PHP output" not in got
    assert got == direct(d, data.encode())
    d.wait_log("request_id=ap-1")


def test_no_handoff_data_streams_with_defaults(stack):
    _, a = stack
    head, body = split(a.get())
    assert head[0] == b"HTTP/1.1 200 OK" and body.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("data, status, words", [
    ("{not json", 400, b"not valid JSON"),
    ('{"max_tokens": "lots"}', 400, b"max_tokens"),
    ('{"backend": "nope"}', 400, b"'nope' is not configured"),
    ('["a list"]', 400, b"JSON object"),
])
def test_bad_handoff_data_gets_a_json_error(stack, data, status, words):
    _, a = stack
    head, body = split(a.get(q(data)))
    assert head[0].startswith(b"HTTP/1.1 %d " % status), head
    assert b"Content-Type: application/json" in head and words in body, body
    json.loads(body)


def test_handoff_data_over_the_limit_gets_413(stack):
    _, a = stack
    head, body = split(a.get("?big=140000"))
    assert head[0] == b"HTTP/1.1 413 Content Too Large" and b"131072" in body


def test_data_too_big_for_the_socket_is_apaches_500_and_costs_streamd_nothing(stack):
    """sendmsg() fails with EMSGSIZE: the fd never leaves Apache."""
    d, a = stack
    head, _ = split(a.get("?big=400000"))
    assert head[0] == b"HTTP/1.1 500 Internal Server Error"
    assert split(a.get())[0][0] == b"HTTP/1.1 200 OK"


def test_post_body_read_by_php_after_100_continue(stack):
    """curl sends `Expect: 100-continue` for bodies over 1 KiB: Apache's
    interim 100 comes first, then streamd's response on the same socket."""
    _, a = stack
    body = json.dumps({"prompt": "ünïcode " + "x" * 5000}).encode()
    with socket.create_connection(("127.0.0.1", a.port), timeout=10) as s:
        s.sendall(b"POST /h.php HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body))
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            interim += s.recv(1)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(body)
        got = read_until_eof(s)
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"data: [DONE]\n\n")
    assert "ünïcode".encode() in got


def test_pipelined_request_after_a_handoff_is_not_answered(stack):
    """streamd owns the connection after the handoff and closes it when done."""
    _, a = stack
    got = a.request(b"GET /h.php HTTP/1.1\r\nHost: localhost\r\n\r\n" * 2)
    assert got.count(b"HTTP/1.1 ") == 1 and got.endswith(b"data: [DONE]\n\n")


def test_client_leaving_cancels_the_stream(stack):
    d, a = stack
    s = socket.create_connection(("127.0.0.1", a.port), timeout=10)
    s.sendall(b"GET /h.php%s HTTP/1.1\r\nHost: localhost\r\n\r\n"
              % q('{"request_id": "ap-leaver"}').encode())
    got = b""
    while b"data: " not in got:
        got += s.recv(4096)
    s.close()
    d.wait_log('request_id=ap-leaver')
    line = [l for l in d.logs().splitlines() if "request_id=ap-leaver" in l][0]
    assert "outcome=client_disconnected" in line  # 17 events of 30 ms were still to come


def test_many_concurrent_streams_through_apache(stack):
    d, a = stack
    n, results, errors = 150, [], []
    expected = direct(d, b'{"request_id": "ap-many"}')

    def one():
        try:
            results.append(a.get(q('{"request_id": "ap-many"}')))
        except Exception as e:  # collected and reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert len(results) == n and all(r == expected for r in results)
