"""The demo page in a real browser: headless Chromium, driven over the
DevTools protocol (a WebSocket: the `websockets` test dependency), against a
live daemon.  The text appears, the numbers are shown (real token counts from
the usage the page asks for), reasoning, tool calls and errors are shown, Stop
closes the stream (which cancels the upstream request), the page fits a
1200x900 window and a phone (screenshots saved under the test's tmp_path) and
loads nothing from anywhere but the daemon."""
import base64
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

import streamd
from conftest import DaemonProcess
from upstream import OpenAI, TestUpstream

websockets_sync = pytest.importorskip("websockets.sync.client")

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (CI installs the Debian 'chromium' package)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
         "--disable-extensions", "--disable-sync", "--no-first-run", "--no-default-browser-check",
         "--mute-audio", "--hide-scrollbars", "--remote-allow-origins=*", "--remote-debugging-port=0"]

DESKTOP = {"width": 1200, "height": 900, "deviceScaleFactor": 1, "mobile": False}
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 3, "mobile": True}


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

    def take_events(self, prefix):
        """Remove and return the events received so far whose method is `prefix`
        or, when it ends with a dot, starts with it."""
        def match(m):
            method = m.get("method", "")
            return method.startswith(prefix) if prefix.endswith(".") else method == prefix
        taken = [m for m in self.events if match(m)]
        self.events = [m for m in self.events if not match(m)]
        return taken

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

    def screenshot(self, path):
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path


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
        cdp.call("Emulation.setDeviceMetricsOverride", **DESKTOP)
        yield cdp
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def mock_front(tmp_path_factory):
    """One daemon for the mock-stream tests: the mock backend, 30 ms between events."""
    d = DaemonProcess(tmp_path_factory.mktemp("mockd"), ["--listen", "127.0.0.1:0", "--message-delay", "30ms"])
    yield d, front_url(d)
    d.stop()


def front_url(daemon):
    daemon.wait_log('msg=listening')
    return "http://" + re.search(r"msg=listening addr=(\S+)", daemon.logs()).group(1)


def open_page(cdp, url):
    cdp.call("Page.navigate", url=url + "/")
    cdp.wait_event("Page.loadEventFired")
    cdp.until("document.querySelectorAll('#backend option').length > 0")


def start(cdp, transport, prompt, reasoning=False, key=None):
    cdp.js("document.getElementById('prompt').value = %s;"
           "document.getElementById('transport').value = %s;"
           "document.getElementById('show-reasoning').checked = %s;"
           "if (%s !== null) document.getElementById('apikey').value = %s;"
           "document.getElementById('start').click()"
           % (json.dumps(prompt), json.dumps(transport), json.dumps(reasoning), json.dumps(key), json.dumps(key)))


def text(cdp, id_):
    return cdp.js("document.getElementById(%s).textContent" % json.dumps(id_))


def wait_finished(cdp):
    """Until the stream is over (the Send button is back), whatever the outcome."""
    cdp.until("!document.getElementById('start').disabled && "
              "document.getElementById('status').textContent !== 'Ready.'")


def mock_tokens(prompt):
    """The completion tokens the mock backend reports for `prompt` (its usage is words)."""
    return streamd._MOCK_WORDS + len(prompt.split())


@pytest.mark.parametrize("transport", ["fetch", "eventsource", "websocket"])
def test_demo_page_streams_the_text_and_shows_the_numbers(browser, mock_front, transport):
    d, url = mock_front
    done = d.logs().count("outcome=done")
    open_page(browser, url)
    prompt = "hello from a browser"
    start(browser, transport, prompt)
    browser.until("document.getElementById('status').textContent === 'Done.'")
    out = text(browser, "output")
    assert out.startswith("Hello from streamd! Prompt: hello from a browser\n")
    assert out.endswith("This is message 18 of 18.")
    assert text(browser, "events") == "18"
    ttft, rate, total = float(text(browser, "ttft")), float(text(browser, "rate")), float(text(browser, "total"))
    assert 0 <= ttft < 5000
    # 17 events after the first, 30 ms apart: roughly 33/s (loose: a busy CI machine)
    assert 5 < rate < 100
    assert 0.3 <= total < 10
    # The page asked for usage: the real token counts, and tokens/s from them
    # (completion tokens over the time from the first token to the end).
    n = mock_tokens(prompt)
    assert text(browser, "tokens") == str(n)
    assert text(browser, "tokens-total") == "/ %d" % (n + len(prompt.split()))
    tps = float(text(browser, "tps"))
    assert n / 10 < tps < n / 0.3, tps  # 17 x 30 ms of streaming: about n / 0.51 s
    assert "finish: stop" in text(browser, "meta")
    d.wait_log("outcome=done", count=done + 1)


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
        assert text(browser, "tps") == "—"  # no final event, no usage: no made-up number
    finally:
        up.close()


# ---- reasoning, tool calls, stalls and errors, from a scripted upstream ----

class ScriptedUpstream(TestUpstream):
    """An OpenAI-compatible upstream whose answer the prompt picks:

      think   two reasoning pieces, 6 words 20 ms apart, a 500 ms stall, 5 more
              words, a tool call, finish "tool_calls" and (when asked) usage
      quick   the same without the stall
      error   two words, then the provider's mid-stream error event
    """
    __test__ = False
    STALL = 0.5
    USAGE = {"prompt_tokens": 7, "completion_tokens": 42, "total_tokens": 49}

    def respond(self, conn, rec):
        fmt = OpenAI()
        prompt = rec.body["messages"][-1]["content"]

        def chunk(delta, finish=None):
            return fmt.ev({"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0,
                           "model": "test-model", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        steps = [chunk({"role": "assistant", "reasoning_content": "The user asks about loops."}), 0.02,
                 chunk({"reasoning_content": " One thread, many sockets."}), 0.02]
        words = ["An", " event", " loop", " waits", " for", " sockets", " and", " runs", " what", " is", " ready."]
        for i, w in enumerate(words):
            steps += [chunk({"content": w}), 0.02]
            if i == 5 and prompt == "think":
                steps.append(self.STALL)
            if i == 1 and prompt == "error":
                steps.append(fmt.error())
                break
        else:
            steps += [chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris"}'}}]}), chunk({}, "tool_calls")]
            if (rec.body.get("stream_options") or {}).get("include_usage"):
                steps.append(fmt.ev({"id": "chatcmpl-test", "choices": [], "usage": self.USAGE}))
            steps.append(fmt.end())
        head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        if not self.send(conn, rec, head.encode()):
            return False
        for step in steps:
            if isinstance(step, float):
                if self.wait_hangup(conn, rec, step):
                    return False
            elif not self.send(conn, rec, b"%x\r\n%s\r\n" % (len(step), step)):
                return False
        self.send(conn, rec, b"0\r\n\r\n")
        rec.finished.set()
        return False


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """A daemon whose openai backend is the scripted upstream; API keys on ('good-key')."""
    up = ScriptedUpstream()
    tmp = tmp_path_factory.mktemp("scriptedd")
    (tmp / "keys").write_text("good-key\n")
    d = DaemonProcess(tmp, ["--listen", "127.0.0.1:0", "--backend", "openai", "--openai-base", up.base + "/v1",
                            "--api-keys", str(tmp / "keys")], env={"OPENAI_API_KEY": "test-key"})
    yield up, front_url(d)
    d.stop()
    up.close()


@pytest.mark.parametrize("transport", ["fetch", "eventsource", "websocket"])
def test_demo_page_shows_reasoning_tool_calls_and_a_stall(browser, scripted, transport, tmp_path):
    up, url = scripted
    open_page(browser, url)
    start(browser, transport, "think", reasoning=True, key="good-key")
    wait_finished(browser)
    assert text(browser, "status") == "Done.", text(browser, "status")
    assert text(browser, "output") == "An event loop waits for sockets and runs what is ready."
    # reasoning: shown, apart from the answer, dimmed
    assert text(browser, "reasoning") == "The user asks about loops. One thread, many sockets."
    assert browser.js("!document.getElementById('reasoning').hidden && "
                      "getComputedStyle(document.getElementById('reasoning')).color !== "
                      "getComputedStyle(document.getElementById('output')).color")
    # one compact line per tool call: name and arguments
    assert browser.js("[...document.querySelectorAll('#tools li')].map((li) => li.textContent)") == [
        'get_weather({"city": "Paris"})']
    assert "finish: tool_calls" in text(browser, "meta")
    # the usage the page asked for (the upstream sends it only when asked)
    assert (up.last().body.get("stream_options") or {}).get("include_usage") is True
    assert text(browser, "tokens") == "42" and text(browser, "tokens-total") == "/ 49"
    tps = float(text(browser, "tps"))
    assert 42 / 5 < tps < 42 / ScriptedUpstream.STALL, tps  # the stall is inside the streaming time
    # 2 reasoning + 11 text + 1 tool call events; the stall is a gap on the timeline
    assert text(browser, "events") == "14"
    kinds = browser.js("streamd.marks.map((m) => m.kind)")
    assert kinds.count("content") == 11 and kinds.count("reasoning") == 2 and kinds.count("tool") == 1
    assert "head" in kinds and "final" in kinds
    note = text(browser, "tlnote")
    m = re.search(r"(\d+) stalls?, the longest (\d+\.\d+) s", note)
    assert m and 0.45 <= float(m.group(2)) < 3, note  # the scripted 0.5 s pause
    if transport == "fetch":
        print("screenshot (reasoning, tool call, stall): %s" % browser.screenshot(tmp_path / "demo-reasoning-tools.png"))


def test_demo_page_hides_reasoning_unless_asked(browser, scripted):
    up, url = scripted
    open_page(browser, url)
    start(browser, "fetch", "quick", reasoning=False, key="good-key")
    wait_finished(browser)
    assert text(browser, "status") == "Done."
    assert text(browser, "reasoning") == ""
    assert browser.js("document.getElementById('reasoning').hidden")
    assert text(browser, "events") == "12"
    assert "stall" not in text(browser, "tlnote")


def test_demo_page_shows_errors(browser, scripted, tmp_path):
    up, url = scripted
    open_page(browser, url)
    assert browser.js("!document.getElementById('keyrow').hidden")  # this daemon wants a key
    # An HTTP refusal: the status and the JSON body's type and message.
    req = urllib.request.Request(url + "/v1/stream", data=b"{}", headers={"Authorization": "Bearer bad"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    message = json.load(e.value)["error"]["message"]
    e.value.close()
    for transport in ("fetch", "eventsource"):  # (EventSource: the page asks again with fetch to see why)
        start(browser, transport, "quick", key="bad")
        wait_finished(browser)
        assert text(browser, "status") == "HTTP 403 · forbidden: " + message, transport
        assert browser.js("document.getElementById('statusbar').classList.contains('error')")
    start(browser, "websocket", "quick", key="bad")
    wait_finished(browser)
    assert text(browser, "status").startswith("WebSocket refused")
    # An error event mid-stream: its type and message; the text so far stays.
    for transport in ("fetch", "websocket"):
        start(browser, transport, "error", key="good-key")
        wait_finished(browser)
        status = text(browser, "status")
        assert status.startswith("Error") and "upstream_error: " in status, status
        assert text(browser, "output") == "An event"
        assert text(browser, "tokens") == "—" and text(browser, "tps") == "—"
        assert "error" in browser.js("streamd.marks.map((m) => m.kind)")
    print("screenshot (error event): %s" % browser.screenshot(tmp_path / "demo-error.png"))


class BufferingProxy:
    """What a proxy with buffering on does to a stream: it forwards each request,
    reads the whole answer, then sends it in one piece."""

    def __init__(self, target):
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def accept_loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn):
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            m = re.search(rb"(?im)^content-length:\s*(\d+)", data.split(b"\r\n\r\n", 1)[0])
            while len(data.split(b"\r\n\r\n", 1)[1]) < (int(m.group(1)) if m else 0):
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            answer = b""
            with socket.create_connection(self.target, timeout=10) as up:
                up.sendall(data)
                while True:  # (the daemon always answers Connection: close)
                    chunk = up.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
            conn.sendall(answer)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        except OSError:
            pass
        self.sock.close()


def test_demo_page_shows_a_buffering_proxy(browser, mock_front):
    _, url = mock_front
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    proxy = BufferingProxy((host, int(port)))
    try:
        open_page(browser, proxy.url)
        start(browser, "fetch", "through a buffering proxy")
        browser.until("document.getElementById('status').textContent === 'Done.'")
        assert text(browser, "events") == "18"
        note = text(browser, "tlnote")
        assert note.startswith("All 18 events arrived in one burst"), note
        assert "buffering" in note
        # 17 x 30 ms of streaming went by before the first byte: the first token was late,
        # and no rate can be measured from a burst
        assert float(text(browser, "ttft")) >= 17 * 30
        assert text(browser, "tps") == "—" and text(browser, "rate") == "–"
        assert text(browser, "tokens") == str(mock_tokens("through a buffering proxy"))
    finally:
        proxy.close()


# ---- layout: a 1200x900 window and a phone ----

LAYOUT_FACTS = """(() => {
  const vw = window.innerWidth, vh = window.innerHeight, $ = (id) => document.getElementById(id);
  const box = (el) => { const r = el.getBoundingClientRect();
                        return {top: r.top, bottom: r.bottom, left: r.left, right: r.right, height: r.height}; };
  const visible = (el) => { const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
  const name = (el) => el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") +
                       (typeof el.className === "string" && el.className ? "." + el.className.split(" ").join(".") : "");
  const outbox = $("outbox");
  const cv = $("timeline"), px = cv.getContext("2d").getImageData(0, 0, cv.width, cv.height).data;
  let ink = 0;  // pixels of the accent colour (the text ticks): blue well above red
  for (let i = 0; i < px.length; i += 4) if (px[i + 3] > 200 && px[i + 2] > px[i] + 60) ink++;
  return {
    vw, vh, status: $("status").textContent,
    scrollWidth: document.documentElement.scrollWidth, scrollHeight: document.documentElement.scrollHeight,
    // every visible element inside the viewport horizontally
    sticking_out: [...document.body.querySelectorAll("*")].filter((el) => visible(el) &&
        (el.getBoundingClientRect().right > vw + 0.5 || el.getBoundingClientRect().left < -0.5)).map(name),
    cards: [...document.querySelectorAll(".stat")].map((el) => Object.assign(box(el), {label: el.querySelector(".k").textContent})),
    statusbar: box($("statusbar")), timeline: box(cv), outbox: Object.assign(box(outbox),
        {scrollHeight: outbox.scrollHeight, clientHeight: outbox.clientHeight}),
    labels: [...document.querySelectorAll(".stat .k, label, .box-head h2, .legend span, #status")].filter(visible).map((el) =>
        ({text: el.textContent.trim(), height: el.getBoundingClientRect().height,
          lineHeight: parseFloat(getComputedStyle(el).lineHeight)})),
    truncated: [...document.querySelectorAll(".stat .k")].filter((el) => el.scrollWidth > el.clientWidth + 1)
        .map((el) => el.textContent),
    tps: $("tps").textContent, ink, drawn: streamd.drawn,
    content_marks: streamd.marks.filter((m) => m.kind === "content").length,
  };
})()"""


def check_no_horizontal_overflow(f, where):
    assert f["scrollWidth"] <= f["vw"], "%s: the page scrolls sideways (%d > %d)" % (where, f["scrollWidth"], f["vw"])
    assert not f["sticking_out"], "%s: elements past the viewport's edge: %s" % (where, f["sticking_out"])


def check_in_viewport(f, where, what=("cards", "statusbar", "timeline", "outbox")):
    boxes = []
    for k in what:
        boxes += [(c["label"], c) for c in f[k]] if k == "cards" else [(k, f[k])]
    for label, b in boxes:
        assert b["top"] >= 0 and b["bottom"] <= f["vh"] and b["left"] >= 0 and b["right"] <= f["vw"], \
            "%s: %s is not fully inside the %dx%d viewport: %s" % (where, label, f["vw"], f["vh"], b)


def check_stream_shown(f, where):
    assert re.fullmatch(r"\d+(\.\d+)?", f["tps"]), "%s: tokens/s shows %r" % (where, f["tps"])
    assert f["content_marks"] == 18 and f["drawn"] >= 18, "%s: the timeline drew %d marks" % (where, f["drawn"])
    assert f["ink"] > 100, "%s: the timeline canvas is blank (%d accent pixels)" % (where, f["ink"])


def test_demo_page_fits_a_window_and_a_phone(browser, mock_front, tmp_path):
    _, url = mock_front
    shots = {}
    browser.take_events("Network.")
    browser.call("Network.enable")
    try:
        # -- 1200 x 900 --
        open_page(browser, url)
        external = browser.js("""[...document.querySelectorAll("[src], [href]")].map((el) => el.getAttribute("src") ||
            el.getAttribute("href")).filter((u) => !u.startsWith("data:") && !u.startsWith("#") &&
            new URL(u, location.href).origin !== location.origin)""")
        assert external == [], external
        start(browser, "fetch", "How does it look?")
        browser.until("Number(document.getElementById('events').textContent) >= 3")
        f = browser.js(LAYOUT_FACTS)
        assert f["status"] == "Streaming…"  # (17 x 30 ms: the stream is still going)
        check_no_horizontal_overflow(f, "1200x900, streaming")
        check_in_viewport(f, "1200x900, streaming")
        browser.until("document.getElementById('status').textContent === 'Done.'")
        f = browser.js(LAYOUT_FACTS)
        assert (f["vw"], f["vh"]) == (1200, 900)
        check_no_horizontal_overflow(f, "1200x900")
        check_in_viewport(f, "1200x900")  # every stat card, the status line, the timeline, the answer box
        assert f["scrollHeight"] <= f["vh"], "1200x900: the page scrolls (%d)" % f["scrollHeight"]
        check_stream_shown(f, "1200x900")
        shots["desktop"] = browser.screenshot(tmp_path / "demo-1200x900.png")

        # A long answer scrolls inside its box and pushes nothing off the screen.
        browser.js("document.getElementById('output').textContent += '\\n' + "
                   "Array.from({length: 300}, (_, i) => 'line ' + i + ' ' + 'x'.repeat(i % 150)).join('\\n')")
        f = browser.js(LAYOUT_FACTS)
        check_no_horizontal_overflow(f, "1200x900, long answer")
        check_in_viewport(f, "1200x900, long answer")
        assert f["outbox"]["scrollHeight"] > f["outbox"]["clientHeight"], f["outbox"]
        assert f["scrollHeight"] <= f["vh"], "1200x900, long answer: the page scrolls (%d)" % f["scrollHeight"]

        # -- a phone: 390 x 844 CSS pixels at 3x, mobile emulation --
        browser.call("Emulation.setDeviceMetricsOverride", **PHONE)
        browser.call("Emulation.setTouchEmulationEnabled", enabled=True, maxTouchPoints=5)
        open_page(browser, url)
        start(browser, "fetch", "And on a phone?")
        browser.until("Number(document.getElementById('events').textContent) >= 3")
        f = browser.js(LAYOUT_FACTS)
        assert f["status"] == "Streaming…"
        check_no_horizontal_overflow(f, "phone, streaming")
        browser.until("document.getElementById('status').textContent === 'Done.'")
        f = browser.js(LAYOUT_FACTS)
        assert (f["vw"], f["vh"]) == (390, 844)
        check_no_horizontal_overflow(f, "phone")
        check_in_viewport(f, "phone", ("cards", "statusbar"))  # the numbers, without scrolling
        for lab in f["labels"]:  # short labels: at most two lines, and none cut off
            assert lab["height"] <= 2 * lab["lineHeight"] + 1, "phone: %r wraps: %s" % (lab["text"], lab)
        assert not f["truncated"], "phone: stat labels cut off: %s" % f["truncated"]
        check_stream_shown(f, "phone")
        shots["phone"] = browser.screenshot(tmp_path / "demo-390x844-phone.png")
    finally:
        browser.call("Emulation.setTouchEmulationEnabled", enabled=False)
        browser.call("Emulation.setDeviceMetricsOverride", **DESKTOP)
        browser.call("Network.disable")
    # Nothing was fetched from anywhere but the daemon (the page, /v1/backends, the streams).
    urls = [e["params"]["request"]["url"] for e in browser.take_events("Network.requestWillBeSent")]
    urls += [e["params"]["url"] for e in browser.take_events("Network.webSocketCreated")]
    browser.take_events("Network.")
    assert url + "/" in urls and url + "/v1/stream" in urls
    origin = url.split("//", 1)[1]
    elsewhere = [u for u in urls if not (u.startswith("data:") or re.match(r"(http|ws)://%s/" % re.escape(origin), u))]
    assert elsewhere == [], "the page loaded something from elsewhere: %s" % elsewhere
    for name, path in shots.items():
        assert path.stat().st_size > 10_000, (name, path)
        print("screenshot (%s): %s" % (name, path))
