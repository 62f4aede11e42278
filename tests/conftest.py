"""Shared test helpers.  Everything here uses real kernel objects: Unix sockets,
socketpairs, SCM_RIGHTS, real processes.  Time is faked only where the daemon
lets us inject its clock (in-process tests); subprocess tests wait on events."""
import array
import gc
import json
import os
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import streamd  # noqa: E402

STREAMD = os.path.join(ROOT, "streamd.py")


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true",
                     help="tests/test_hostile.py: run the long hostile mix (300 s; "
                          "STREAMD_FUZZ_LONG=SECONDS for another length)")


def pytest_configure(config):
    if config.getoption("--fuzz-long") and not os.environ.get("STREAMD_FUZZ_LONG"):
        os.environ["STREAMD_FUZZ_LONG"] = "300"


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start=1000.0):
        self.now = start

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def open_fds():
    return len(os.listdir("/proc/self/fd"))


class FdCheck:
    """Counts this process's open fds; `assert_no_leak()` after an error path."""

    def __init__(self):
        gc.collect()
        self.before = open_fds()

    def assert_no_leak(self):
        gc.collect()
        after = open_fds()
        assert after == self.before, "fd leak: %d open before, %d after" % (self.before, after)


@pytest.fixture
def fdcheck():
    return FdCheck()


def make_config(tmp_path, **overrides):
    flags = {"server.socket_path": str(tmp_path / "d.sock"), "metrics.listen_addr": ""}
    cfg = streamd.load_config({k: v for k, v in flags.items()}, env={})
    for key, value in overrides.items():
        cfg[key.replace("__", ".")] = value
    return cfg


class InProcess:
    """A Daemon driven by the test: run_once() on demand, a fake clock."""

    def __init__(self, tmp_path, **overrides):
        self.clock = FakeClock()
        self.cfg = make_config(tmp_path, **overrides)
        self.d = streamd.Daemon(self.cfg, clock=self.clock)
        self.d.max_connections = self.cfg["server.max_connections"]
        self.d.open_listener()
        self.path = self.cfg["server.socket_path"]

    def pump(self, until, timeout=5.0, advance=0.0):
        """Run loop passes until until() is true (real time bounded).  With
        `advance`, move the fake clock by that much whenever a pass was idle."""
        end = time.monotonic() + timeout
        while not until():
            if time.monotonic() > end:
                raise AssertionError("condition not reached within %gs" % timeout)
            self.d.run_once(max_wait=0.005)
            if advance:
                self.clock.advance(advance)

    def run_for(self, passes=20):
        for _ in range(passes):
            self.d.run_once(max_wait=0.001)

    def close(self):
        self.d.close()

    def finish(self, fdcheck, *others):
        """The end of an error-path test: every connection released, the
        daemon closed (then `others`, e.g. the test upstream), and no fd left open."""
        self.pump(lambda: not self.d.conns)
        self.close()
        for o in others:
            o.close()
        fdcheck.assert_no_leak()


@pytest.fixture
def daemon(tmp_path):
    """An in-process daemon factory; every daemon is closed at the end."""
    made = []

    def make(**overrides):
        ip = InProcess(tmp_path, **overrides)
        made.append(ip)
        return ip
    yield make
    for ip in made:
        ip.close()


def raw_handoff(path, data, fds, sock_type=socket.SOCK_SEQPACKET):
    """Send one handoff message carrying `fds` (any number, any kind)."""
    with socket.socket(socket.AF_UNIX, sock_type) as s:
        s.connect(path)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        s.sendmsg([data] if data else [], anc)


def handoff_pair(path, data=b"", **kw):
    """Hand one end of a fresh socketpair to the daemon; return the other end."""
    if isinstance(data, dict):
        data = json.dumps(data).encode()
    mine, theirs = socket.socketpair()
    try:
        raw_handoff(path, data, [theirs.fileno()], **kw)
    except OSError:
        mine.close()
        raise
    finally:
        theirs.close()
    mine.setblocking(False)
    return mine


_open_clients = []


@pytest.fixture(autouse=True)
def close_clients():
    """Close every test client a test left open (before the next fd count)."""
    yield
    while _open_clients:
        _open_clients.pop().close()


class Client:
    """The test's end of a handed-off connection, read without blocking."""

    def __init__(self, sock):
        _open_clients.append(self)
        self.sock = sock
        self.data = b""
        self.eof = False

    def read(self):
        while not self.eof:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                return
            except ConnectionResetError:
                self.eof = True
                return
            if not chunk:
                self.eof = True
            self.data += chunk

    def done(self):
        self.read()
        return self.eof

    def count(self, needle):
        self.read()
        return self.data.count(needle)

    def has(self, needle):
        self.read()
        return needle in self.data

    def parsed(self):
        r = streamd.StreamReader()
        r.feed(self.data)
        return r

    def close(self):
        self.sock.close()


def client(path, data=b"", **kw):
    return Client(handoff_pair(path, data, **kw))


def small_buffer_client(path, data=b"\0", size=4096):
    """A client whose socket buffers are small, so back-pressure shows quickly."""
    if isinstance(data, dict):
        data = json.dumps(data).encode()
    mine, theirs = socket.socketpair()
    for s in (mine, theirs):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    raw_handoff(path, data, [theirs.fileno()])
    theirs.close()
    mine.setblocking(False)
    return Client(mine)


# ---- a real daemon process ----

class DaemonProcess:
    def __init__(self, tmp_path, args, env=None, config=None):
        self.tmp = tmp_path
        self.path = str(tmp_path / "streamd.sock")
        self.log_path = tmp_path / "daemon.log"
        notify_path = str(tmp_path / "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(notify_path)
        self.notify.settimeout(10)
        full_env = dict(os.environ, NOTIFY_SOCKET=notify_path, **(env or {}))
        cmd = [sys.executable, STREAMD, "serve", "--socket", self.path, "--metrics-addr", ""]
        if config:
            cmd += ["--config", str(config)]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd + list(args), env=full_env, stdout=subprocess.PIPE,
                                     stderr=self.log)
        self.wait_notify("READY=1")

    def wait_notify(self, state):
        while True:
            try:
                msg = self.notify.recv(256).decode()
            except socket.timeout:
                raise AssertionError("daemon never said %s; log:\n%s" % (state, self.logs()))
            if msg == state:
                return

    def logs(self):
        return self.log_path.read_text()

    def wait_log(self, needle, count=1, timeout=10):
        """Wait until the daemon has logged `needle` `count` times."""
        end = time.monotonic() + timeout
        while self.logs().count(needle) < count:
            if time.monotonic() > end or self.proc.poll() is not None:
                raise AssertionError("daemon never logged %r x%d; log:\n%s" % (needle, count, self.logs()))
            time.sleep(0.02)

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout=30):
        return self.proc.wait(timeout)

    def fd_count(self):
        return len(os.listdir("/proc/%d/fd" % self.proc.pid))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.log.close()
        self.notify.close()


@pytest.fixture
def daemon_proc(tmp_path):
    made = []

    def start(*args, **kw):
        p = DaemonProcess(tmp_path, args, **kw)
        made.append(p)
        return p
    yield start
    for p in made:
        p.stop()


def read_until_eof(sock, timeout=10.0):
    """Blocking read of a whole response (subprocess tests)."""
    sock.setblocking(True)
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
