"""The demo page in a real browser: headless Chromium, driven over the
DevTools protocol (a WebSocket: the `websockets` test dependency), against a
live daemon.  The text appears, the numbers are shown, and Stop closes the
stream, which cancels the upstream request."""
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request

import pytest

from upstream import TestUpstream

websockets_sync = pytest.importorskip("websockets.sync.client")

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (CI installs the Debian 'chromium' package)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
         "--disable-extensions", "--disable-sync", "--no-first-run", "--no-default-browser-check",
         "--mute-audio", "--remote-allow-origins=*", "--remote-debugging-port=0"]


class CDP:
    """A minimal Chrome DevTools Protocol client: call() and wait_event()."""

    def __init__(self, ws):
        self.ws = ws
        self.n = 0
        self.events = []

    def call(self, method, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self.n:
                assert "error" not in msg, msg["error"]
                return msg["result"]
            self.events.append(msg)

    def wait_event(self, method):
        while True:
            for i, msg in enumerate(self.events):
                if msg.get("method") == method:
                    return self.events.pop(i)
            self.events.append(json.loads(self.ws.recv(timeout=30)))

    def js(self, expr, wait=False):
        r = self.call("Runtime.evaluate", expression=expr, awaitPromise=wait, returnByValue=True)
        assert "exceptionDetails" not in r, r["exceptionDetails"]
        return r["result"].get("value")

    def until(self, cond, timeout_ms=20000):
        """Wait, without polling, until the JS expression `cond` is true:
        a MutationObserver re-checks it whenever the page changes."""
        return self.js("""new Promise((resolve, reject) => {
            const check = () => { try { return %s; } catch (e) { return false; } };
            if (check()) return resolve(true);
            const obs = new MutationObserver(() => { if (check()) { obs.disconnect(); resolve(true); } });
            obs.observe(document.documentElement, {subtree: true, childList: true, characterData: true,
                                                   attributes: true});
            setTimeout(() => { obs.disconnect();
                reject(new Error("timed out waiting for %s; status: " + document.getElementById("status").textContent)); },
                %d);
        })""" % (cond, json.dumps(cond)[1:-1].replace('"', "'"), timeout_ms), wait=True)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium")
    log = open(profile / "chromium.log", "wb")
    proc = subprocess.Popen([CHROMIUM, *FLAGS, "--user-data-dir=%s" % profile, "about:blank"],
                            stdout=log, stderr=log)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 30
    while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.close()
            pytest.fail("Chromium did not start:\n" + (profile / "chromium.log").read_text()[-2000:])
        time.sleep(0.05)  # an external process writing a file: nothing to wait on but the file
    port = int(port_file.read_text().split("\n")[0])
    with urllib.request.urlopen("http://127.0.0.1:%d/json/list" % port, timeout=10) as r:
        page = next(t for t in json.load(r) if t["type"] == "page")
    with websockets_sync.connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
        cdp = CDP(ws)
        cdp.call("Page.enable")
        yield cdp
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def front_url(daemon):
    daemon.wait_log('msg=listening')
    return "http://" + re.search(r"msg=listening addr=(\S+)", daemon.logs()).group(1)


def open_page(cdp, url):
    cdp.call("Page.navigate", url=url + "/")
    cdp.wait_event("Page.loadEventFired")
    cdp.until("document.querySelectorAll('#backend option').length > 0")


def start(cdp, transport, prompt):
    cdp.js("document.getElementById('prompt').value = %s;"
           "document.getElementById('transport').value = %s;"
           "document.getElementById('start').click()" % (json.dumps(prompt), json.dumps(transport)))


def text(cdp, id_):
    return cdp.js("document.getElementById(%s).textContent" % json.dumps(id_))


@pytest.mark.parametrize("transport", ["fetch", "eventsource", "websocket"])
def test_demo_page_streams_the_text_and_shows_the_numbers(browser, daemon_proc, transport):
    d = daemon_proc("--listen", "127.0.0.1:0", "--message-delay", "20ms")
    open_page(browser, front_url(d))
    start(browser, transport, "hello from a browser")
    browser.until("document.getElementById('status').textContent === 'Done.'")
    out = text(browser, "output")
    assert out.startswith("Hello from streamd! Prompt: hello from a browser\n")
    assert out.endswith("This is message 18 of 18.")
    assert text(browser, "events") == "18"
    ttft, rate, total = float(text(browser, "ttft")), float(text(browser, "rate")), float(text(browser, "total"))
    assert 0 <= ttft < 5000
    # 17 events after the first, 20 ms apart: roughly 50/s (loose: a busy CI machine)
    assert 5 < rate < 100
    assert 0.3 <= total < 10
    d.wait_log("outcome=done")


@pytest.mark.parametrize("transport", ["fetch", "eventsource", "websocket"])
def test_demo_page_stop_cancels_the_upstream(browser, daemon_proc, transport):
    up = TestUpstream()
    up.default_delay = 0.5  # 8 words: 4 s unless stopped
    try:
        d = daemon_proc("--listen", "127.0.0.1:0", "--backend", "openai",
                        "--openai-base", up.base + "/v1", env={"OPENAI_API_KEY": "test-key"})
        open_page(browser, front_url(d))
        start(browser, transport, "stop me")
        browser.until("Number(document.getElementById('events').textContent) >= 1")
        browser.js("document.getElementById('stop').click()")
        assert text(browser, "status") == "Stopped."
        # The daemon noticed the client leave and closed its upstream request.
        assert up.last().hung_up.wait(5), "the upstream request was not cancelled"
        d.wait_log("outcome=client_disconnected")
        assert int(text(browser, "events")) < 8
    finally:
        up.close()
