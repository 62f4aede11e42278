"""The one-file bundle (`streamd.py bundle [--with-deps] -o streamd.pyz`): the
same sources give the same bytes; it carries what it says; and copied alone
into an empty directory it runs under `python3 -S` (no site-packages: only
what is inside it) the demo, an openai stream against a local upstream, and
the direct front with its demo page."""
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import zipfile

import pytest

from conftest import STREAMD, handoff_pair, read_until_eof
from test_backends import upstream  # noqa: F401  (fixture)


def build(out, *flags):
    r = subprocess.run([sys.executable, STREAMD, "bundle", "-o", str(out)] + list(flags), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("bundles")
    return {"plain": build(d / "plain.pyz"), "deps": build(d / "deps.pyz", "--with-deps")}


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_the_same_sources_give_the_same_bytes(bundles, tmp_path):
    again = build(tmp_path / "again.pyz", "--with-deps")
    assert sha(again) == sha(bundles["deps"])
    assert sha(build(tmp_path / "plain2.pyz")) == sha(bundles["plain"])


def test_what_the_bundle_carries(bundles):
    with zipfile.ZipFile(bundles["plain"]) as z:
        names = set(z.namelist())
        with open(STREAMD, "rb") as f:
            assert z.read("streamd.py") == f.read()
    backends = {"backends/" + n for n in os.listdir(os.path.join(os.path.dirname(STREAMD), "backends"))
                if n.endswith(".py")}
    assert backends <= names and {"__main__.py", "demo.html", "LICENSE", "BUNDLE.txt"} <= names
    assert not any(n.startswith(("yaml/", "urllib3/", "tests/")) or "__pycache__" in n for n in names)
    with zipfile.ZipFile(bundles["deps"]) as z:
        names = set(z.namelist())
        manifest = z.read("BUNDLE.txt").decode().splitlines()
    for pkg in ("yaml/__init__.py", "prometheus_client/__init__.py", "urllib3/__init__.py"):
        assert pkg in names
    assert not any(n.endswith((".so", ".pyc")) for n in names)
    for dist in ("PyYAML", "prometheus-client", "urllib3"):
        line = [m for m in manifest if m.startswith(dist + " ")]
        assert line, manifest
        assert any(n.startswith("licenses/%s-%s/" % (dist, line[0].split()[1])) for n in names)
    with open(bundles["deps"], "rb") as f:
        assert f.readline() == b"#!/usr/bin/env python3\n"
    assert os.stat(bundles["deps"]).st_mode & 0o111


def test_bundle_refuses_a_package_that_is_not_the_pin(tmp_path):
    """--with-deps takes this Python's installed copies only if they are the
    versions requirements.txt pins."""
    import streamd
    with pytest.raises(streamd.ConfigError, match=r"bundle: urllib3 .* is installed, requirements.txt pins 0\.0\.1"):
        streamd.bundle_dependency("urllib3", ("urllib3",), {"urllib3": "0.0.1"})
    req = tmp_path / "r.txt"
    req.write_text('a==1.0\nb==2.0; python_version < "3.0"\nc==3.0; python_version >= "3.0"\n'
                   "# Optional: HTTP/2 (upstream.http2): h2==4.4.1\n# just a comment\n")
    assert streamd.requirement_pins(str(req)) == {"a": "1.0", "c": "3.0", "h2": "4.4.1"}


@pytest.fixture
def alone(bundles, tmp_path):
    """An empty directory holding only the bundle with its dependencies."""
    d = tmp_path / "empty"
    d.mkdir()
    shutil.copy(bundles["deps"], d / "streamd.pyz")
    return d


def run_bundle(alone, *args, **kw):
    return subprocess.run([sys.executable, "-S", "streamd.pyz"] + list(args), cwd=str(alone), capture_output=True,
                          text=True, timeout=60, env={"PATH": os.environ["PATH"]}, **kw)


def test_demo_runs_from_the_bundle_alone(alone):
    r = run_bundle(alone, "demo", "--message-delay", "1ms")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith("data: [DONE]") and "Hello from streamd!" in r.stdout
    assert os.listdir(str(alone)) == ["streamd.pyz"]  # it wrote nothing beside itself
    r = run_bundle(alone, "check", "--listen", "127.0.0.1:0")
    assert r.returncode == 0 and "demo page %s" % os.path.join(str(alone), "streamd.pyz", "demo.html") in r.stdout


class Served:
    """`python3 -S streamd.pyz serve ...` in the empty directory, until READY=1."""

    def __init__(self, alone, tmp_path, *args):
        self.sock = str(tmp_path / "s.sock")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(20)
        self.notify = notify
        self.proc = subprocess.Popen([sys.executable, "-S", "streamd.pyz", "serve", "--socket", self.sock]
                                     + list(args), cwd=str(alone), stderr=subprocess.PIPE,
                                     env={"PATH": os.environ["PATH"], "NOTIFY_SOCKET": str(tmp_path / "notify")})
        try:
            assert notify.recv(64) == b"READY=1"
        except Exception:
            self.stop()
            raise

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        self.notify.close()
        return self.proc.returncode, err.decode()


def test_an_openai_stream_from_the_bundle_alone(alone, tmp_path, upstream):  # noqa: F811
    """urllib3 (the LLM backends) and PyYAML (the config file) from inside the bundle."""
    up = upstream()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backend:\n  provider: openai\n  openai:\n    api_base: %s/v1\n    api_key: sk-bundle\n"
                   "metrics:\n  listen_addr: '127.0.0.1:0'\n" % up.base)
    s = Served(alone, tmp_path, "--config", str(cfg))
    try:
        c = handoff_pair(s.sock, b'{"prompt": "from the bundle"}')
        data = read_until_eof(c)
        c.close()
    finally:
        status, err = s.stop()
    assert b"data: [DONE]\n\n" in data and b'"content"' in data
    assert up.last().headers["authorization"] == "Bearer sk-bundle"
    assert status == 0, err


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_front_and_its_page_from_the_bundle_alone(alone, tmp_path):
    port = free_port()
    s = Served(alone, tmp_path, "--listen", "127.0.0.1:%d" % port, "--message-delay", "1ms", "--metrics-addr", "")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/")
        r = conn.getresponse()
        page = r.read()
        assert r.status == 200 and b"<html" in page.lower()
        conn.request("POST", "/v1/stream", body=json.dumps({"prompt": "hi"}), headers={"Content-Type":
                                                                                       "application/json"})
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200 and body.endswith(b"data: [DONE]\n\n")
        conn.close()
    finally:
        status, err = s.stop()
    assert status == 0, err
