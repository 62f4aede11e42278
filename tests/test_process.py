"""The daemon as a real process: signals, drain, reload, systemd, the CLI."""
import json
import re
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading

import pytest

from conftest import STREAMD, handoff_pair, read_until_eof, raw_handoff
import streamd


def run_cli(*args, env=None, timeout=30):
    return subprocess.run([sys.executable, STREAMD] + list(args), capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_help_runs_without_site_packages():
    out = subprocess.run([sys.executable, "-S", STREAMD, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "--max-connections" in out.stdout


def test_mock_runs_from_a_lone_copy_without_site_packages(tmp_path):
    """streamd.py copied alone, stdlib only, serves the mock; the front's /
    is a 404 that says why (no demo.html beside it)."""
    lone = tmp_path / "alone"
    lone.mkdir()
    shutil.copy(STREAMD, str(lone / "streamd.py"))
    sock = str(tmp_path / "s.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "n"))
    notify.settimeout(10)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-S", str(lone / "streamd.py"), "--socket", sock,
                             "--message-delay", "1ms", "--metrics-addr", "127.0.0.1:0",
                             "--listen", "127.0.0.1:%d" % port], cwd=str(lone),
                            env={"NOTIFY_SOCKET": str(tmp_path / "n"), "PATH": os.environ["PATH"]},
                            stderr=subprocess.PIPE)
    try:
        assert notify.recv(64) == b"READY=1"
        c = handoff_pair(sock, b'{"prompt": "alone"}')
        data = read_until_eof(c)
        c.close()
        assert data.endswith(b"data: [DONE]\n\n") and b"Prompt: alone" in data
        with socket.create_connection(("127.0.0.1", port), timeout=10) as web:
            web.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            answer = read_until_eof(web)
        assert answer.startswith(b"HTTP/1.1 404 ") and b"no demo page: demo.html is missing" in answer
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        proc.stderr.close()
        notify.close()


def test_send_client(daemon_proc):
    d = daemon_proc("--message-delay", "1ms")
    out = run_cli("send", "--socket", d.path, "--data", '{"user_id": 9}', "hello from send")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "HTTP 200"
    assert json.loads(lines[1][6:]) == {"content": "Hello from streamd! Prompt: hello from send"}
    assert json.loads(lines[2][6:]) == {"content": "User ID: 9"}
    assert lines[-1] == "data: [DONE]" and len(lines) == 20
    summary = out.stderr.strip().splitlines()[-1]
    assert summary.startswith("status=200 events=19 bytes=") and "outcome=done" in summary
    assert "ttfb_ms=" in summary and "total_ms=" in summary


def test_send_client_shows_error_status(daemon_proc):
    d = daemon_proc()
    out = run_cli("send", "--socket", d.path, "--data", '{"max_tokens": "x"}')
    assert out.returncode == 1
    assert out.stdout.startswith("HTTP 400")
    assert "max_tokens: expected an integer" in out.stdout
    out = run_cli("send", "--socket", "/nonexistent/s.sock", "hi")
    assert out.returncode == 3 and "cannot hand off" in out.stderr


def test_demo():
    out = run_cli("demo", timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("data: [DONE]") and "This is message 18 of 18." in out.stdout


def test_socket_file_mode_and_cleanup(daemon_proc):
    d = daemon_proc()
    st = os.stat(d.path)
    assert oct(st.st_mode & 0o777) == oct(0o660)
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    assert not os.path.exists(d.path)


def other_group():
    """A group this process may give files to, other than its own."""
    import grp
    mine = os.getgid()
    allowed = [g.gr_gid for g in grp.getgrall()] if os.geteuid() == 0 else os.getgroups()
    others = [g for g in allowed if g != mine]
    if not others:
        pytest.skip("this user belongs to no second group")
    return grp.getgrgid(others[0]).gr_name, others[0]


def test_socket_group(daemon_proc):
    name, gid = other_group()
    d = daemon_proc("--socket-group", name)
    st = os.stat(d.path)
    assert st.st_gid == gid and oct(st.st_mode & 0o777) == oct(0o660)


def test_socket_group_by_number_and_errors(tmp_path, daemon_proc):
    _, gid = other_group()
    d = daemon_proc("--socket-group", str(gid))
    assert os.stat(d.path).st_gid == gid
    out = run_cli("--socket", str(tmp_path / "x.sock"), "--socket-group", "no-such-group", "--metrics-addr", "")
    assert out.returncode == 2
    assert out.stderr == ("streamd: --socket-group: expected an existing group name or a numeric gid, "
                          "or empty, got 'no-such-group'\n")


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"),
                    reason="needs root and a system python3 to run the daemon as 'nobody'")
def test_socket_group_refused_leaves_no_socket_file():
    """A user may only give a file to a group it belongs to: 'nobody' cannot
    give its socket to root's group, says so, exits 2 and removes the file."""
    import pwd
    import tempfile
    nobody = pwd.getpwnam("nobody")
    with tempfile.TemporaryDirectory() as tmp:  # (pytest's tmp_path is closed to other users)
        os.chmod(tmp, 0o777)
        shutil.copy(STREAMD, tmp)  # a lone copy runs the mock: nothing else to reach
        path = os.path.join(tmp, "x.sock")
        out = subprocess.run(["/usr/bin/python3", os.path.join(tmp, "streamd.py"), "--socket", path,
                              "--socket-group", "0", "--metrics-addr", ""], capture_output=True, text=True,
                             timeout=30, user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[])
        assert out.returncode == 2, out.stderr
        assert out.stderr == ("streamd: server.socket_group: cannot give %r to group '0': "
                              "Operation not permitted\n" % path)
        assert not os.path.exists(path)


def test_stale_socket_is_replaced(tmp_path, daemon_proc):
    path = tmp_path / "streamd.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens: stale
    d = daemon_proc()
    assert "removed stale socket" in d.logs()
    c = handoff_pair(d.path, b"\0")
    assert read_until_eof(c).startswith(b"HTTP/1.1 200")
    c.close()


def test_live_socket_refuses_second_daemon(daemon_proc):
    d = daemon_proc()
    out = run_cli("--socket", d.path, "--metrics-addr", "")
    assert out.returncode == 2
    assert out.stderr == "streamd: server.socket_path: %r: another daemon is listening there\n" % d.path


def test_non_socket_path_refuses(tmp_path):
    p = tmp_path / "file"
    p.write_text("precious")
    out = run_cli("--socket", str(p), "--metrics-addr", "")
    assert out.returncode == 2 and "exists and is not a socket" in out.stderr
    assert p.read_text() == "precious"


def test_socket_activation(tmp_path):
    """systemd passes the listening socket as fd 3; the daemon uses it and
    never unlinks the path (systemd owns it)."""
    path = str(tmp_path / "act.sock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lst.bind(path)
    lst.listen(16)
    wrapper = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
               "os.environ['LISTEN_FDS'] = '1'; os.execv(sys.executable, [sys.executable] + sys.argv[2:])")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "n"))
    notify.settimeout(10)
    proc = subprocess.Popen([sys.executable, "-c", wrapper, str(lst.fileno()), STREAMD,
                             "--socket", "/run/unused.sock", "--metrics-addr", "", "--message-delay", "1ms"],
                            pass_fds=[lst.fileno()], env=dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "n")),
                            stderr=subprocess.PIPE)
    try:
        assert notify.recv(64) == b"READY=1"
        c = handoff_pair(path, b"\0")
        assert read_until_eof(c).endswith(b"data: [DONE]\n\n")
        c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert os.path.exists(path)
        assert b"using socket from systemd" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        lst.close()
        notify.close()


def test_watchdog_pings(tmp_path, daemon_proc):
    d = daemon_proc(env={"WATCHDOG_USEC": "200000"})
    d.wait_notify("WATCHDOG=1")
    d.wait_notify("WATCHDOG=1")


def test_stream_socket_type_process(daemon_proc):
    d = daemon_proc("--socket-type", "stream", "--message-delay", "1ms")
    out = run_cli("send", "--socket", d.path, "--socket-type", "stream", "hi")
    assert out.returncode == 0, out.stderr


class Reader(threading.Thread):
    """Reads one handed-off stream to EOF in the background; `events` wakes the test."""

    def __init__(self, sock):
        super().__init__(daemon=True)
        self.sock, self.data = sock, b""
        self.got_first = threading.Event()
        self.start()

    def run(self):
        self.sock.setblocking(True)
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.data += chunk
            if b"data: " in self.data:
                self.got_first.set()
        self.sock.close()


def test_sigterm_drains(daemon_proc):
    """Streams that can finish within shutdown_timeout end with [DONE]; the
    rest get the shutdown error event; exit 0; the socket file is gone."""
    d = daemon_proc("--message-delay", "200ms", "--shutdown-timeout", "2500ms")
    early = Reader(handoff_pair(d.path, b'{"user_id": 1}'))
    early.got_first.wait(5)
    # The early stream is ~3.4 s long; the late one starts 2 s later, so at
    # the drain deadline (~4.5 s) the early one has ~1.1 s to spare and the
    # late one ~1.1 s still to go: margins a loaded machine cannot eat.
    threading.Event().wait(2)
    late = Reader(handoff_pair(d.path, b'{"user_id": 2}'))
    late.got_first.wait(5)
    d.signal(signal.SIGTERM)
    d.wait_notify("STOPPING=1")
    assert not os.path.exists(d.path)  # no new handoffs during the drain
    with pytest.raises(OSError):
        handoff_pair(d.path, b"\0")
    assert d.wait(15) == 0
    early.join(5), late.join(5)
    assert early.data.endswith(b"data: [DONE]\n\n")
    assert late.data.endswith(b'data: {"error":{"type":"shutdown","message":"server is shutting down"}}\n\n')
    assert b"[DONE]" not in late.data
    assert "draining" in d.logs() and "drain timeout" in d.logs()


def test_second_signal_stops_at_once(daemon_proc):
    d = daemon_proc("--message-delay", "1s", "--shutdown-timeout", "60s")
    r = Reader(handoff_pair(d.path, b"\0"))
    r.got_first.wait(5)
    d.signal(signal.SIGTERM)
    d.wait_notify("STOPPING=1")
    d.signal(signal.SIGINT)
    assert d.wait(5) == 0
    r.join(5)
    assert r.data.endswith(b'data: {"error":{"type":"shutdown","message":"server is shutting down"}}\n\n')
    assert "second signal" in d.logs()


def test_sighup_reloads(tmp_path, daemon_proc):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backend:\n  mock:\n    message_delay: 1ms\nlogging:\n  level: info\n")
    d = daemon_proc(config=cfg)
    cfg.write_text("backend:\n  mock:\n    message_delay: 2ms\nserver:\n  socket_mode: '0600'\n"
                   "  max_connections: 10\nlogging:\n  level: info\n  format: json\n")
    d.signal(signal.SIGHUP)
    d.wait_log("config reloaded")
    c = handoff_pair(d.path, b"\0")  # served after the reload: json logs
    read_until_eof(c)
    c.close()
    cfg.write_text("server:\n  max_connections: lots\n")  # invalid: the daemon keeps its config
    d.signal(signal.SIGHUP)
    d.wait_log("reload failed")
    c = handoff_pair(d.path, b"\0")
    assert read_until_eof(c).endswith(b"data: [DONE]\n\n")
    c.close()
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    logs = d.logs()
    assert "msg=SIGHUP connections=0 streams=0" in logs
    assert "keys=server.socket_mode" in logs  # needs a restart: kept
    assert '"changed": "server.max_connections,backend.mock.message_delay,logging.format"' in logs
    json_lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert any(rec["msg"] == "stream done" for rec in json_lines)
    fail = [rec for rec in json_lines if rec["msg"] == "reload failed; keeping the current config"]
    assert fail and "server.max_connections: expected an integer >= 1, got 'lots'" in fail[0]["error"]


def test_access_log_line(daemon_proc):
    d = daemon_proc("--message-delay", "1ms")
    c = handoff_pair(d.path, b'{"request_id": "req-7", "prompt": "top secret prompt"}')
    read_until_eof(c)
    c.close()
    d.signal(signal.SIGTERM)
    d.wait()
    line = [l for l in d.logs().splitlines() if 'msg="stream done"' in l][0]
    assert "request_id=req-7 backend=mock status=200" in line and "chunks=18" in line
    assert "outcome=done" in line and "ttfb_ms=" in line and "duration_ms=" in line
    assert "secret" not in d.logs()


def test_no_fd_leak_in_daemon_process(daemon_proc):
    d = daemon_proc("--message-delay", "1ms")
    # The baseline is taken when the daemon is idle: after one stream whose
    # access line is logged (it is written once the socket is closed), and not
    # right after READY=1, which comes from a socket closed a moment later.
    c = handoff_pair(d.path, b"\0")
    read_until_eof(c)
    c.close()
    d.wait_log("msg=\"stream done\"", 1)
    base = d.fd_count()
    for data in (b"{bad", b'{"prompt": 1}', b"\0"):
        c = handoff_pair(d.path, data)
        read_until_eof(c)
        c.close()
    raw_handoff(d.path, b"no fd", [])
    with open(os.devnull) as f:
        raw_handoff(d.path, b"\0", [f.fileno()])
    c = handoff_pair(d.path, b"\0")
    read_until_eof(c)
    c.close()
    d.wait_log("msg=\"stream done\"", 5)
    d.wait_log("reason=no_fd")
    d.wait_log("reason=bad_fd")
    assert d.fd_count() == base


def test_sigusr1_logs_the_state(daemon_proc):
    d = daemon_proc("--message-delay", "10s")
    c = handoff_pair(d.path, b'{"prompt": "x"}')
    d.wait_log('msg="stream done"', count=0)
    import time
    end = time.monotonic() + 10
    while True:  # (the stream has started once its first event arrived)
        try:
            if c.recv(4096):
                break
        except BlockingIOError:
            pass
        assert time.monotonic() < end
        time.sleep(0.02)
    d.signal(signal.SIGUSR1)
    d.wait_log('msg=state')
    line = [l for l in d.logs().splitlines() if "msg=state" in l][0]
    assert "connections=1" in line and "states=streaming:1" in line and "streams=mock:1" in line
    assert "max_loop_lag_ms=" in line and "fds=" in line and d.proc.poll() is None
    c.close()


@pytest.mark.parametrize("command", [[], ["serve"], ["send"], ["demo"], ["check"], ["bundle"]])
def test_every_help_exits_0(command):
    out = subprocess.run([sys.executable, STREAMD] + command + ["--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("usage: streamd.py" + (" " + command[0] if command and
                                                                                 command[0] != "serve" else ""))


def test_help_shows_every_default():
    out = subprocess.run([sys.executable, STREAMD, "--help"], capture_output=True, text=True, timeout=30).stdout
    flat = "".join(out.split())  # (argparse wraps lines, at hyphens too)
    for o in streamd.OPTIONS:
        if o.flag:
            assert "config:%s" % o.key in flat and "default:%s)" % streamd.shown_default(o).replace(" ", "") in flat, o.key
    assert "default:50ms)" in flat and "default:64KiB)" in flat and "default:0660)" in flat


def test_under_journald_each_line_starts_with_its_priority(tmp_path):
    """systemd's JOURNAL_STREAM names our stderr: a syslog priority prefix per
    line (<3> error, <4> warning, <6> info), so journalctl -p works."""
    log = tmp_path / "journal"
    with open(log, "wb") as f:
        st = os.fstat(f.fileno())
        env = dict(os.environ, JOURNAL_STREAM="%d:%d" % (st.st_dev, st.st_ino))
        out = subprocess.run([sys.executable, STREAMD, "--socket", str(tmp_path / "s"), "--metrics-addr", "",
                              "--config", str(tmp_path / "missing.yaml")], stderr=f, env=env, timeout=30)
    assert out.returncode == 2  # (a config error is printed before logging is set up: no prefix)
    f = tmp_path / "c.yaml"
    f.write_text("server:\n  pprof_addr: localhost:6060\n")
    with open(log, "wb") as out_f:
        st = os.fstat(out_f.fileno())
        env = dict(os.environ, JOURNAL_STREAM="%d:%d" % (st.st_dev, st.st_ino))
        p = subprocess.Popen([sys.executable, STREAMD, "--socket", str(tmp_path / "s"), "--metrics-addr", "",
                              "--config", str(f)], stderr=out_f, env=env)
        import time
        end = time.monotonic() + 20
        while b"msg=ready" not in log.read_bytes():
            assert time.monotonic() < end
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        p.wait(30)
    lines = log.read_text().splitlines()
    assert lines and all(re.match(r"<[2-7]>ts=", line) for line in lines), lines
    assert any(line.startswith("<4>") and "pprof_addr: ignored" in line for line in lines)
    assert any(line.startswith("<6>") and "msg=ready" in line for line in lines)


def test_send_retries_until_the_daemon_is_there(tmp_path):
    """--retries: a daemon that is not listening yet (a restart) is tried again
    with backoff; the summary line says how many retries it took."""
    sock = str(tmp_path / "late.sock")
    send = subprocess.Popen([sys.executable, STREAMD, "send", "--socket", sock, "--retries", "40",
                             "--retry-base", "0.05", "--quiet", "hi"], stderr=subprocess.PIPE, text=True)
    first = send.stderr.readline() + send.stderr.readline()  # the first failure, and its "retrying in"
    assert "cannot hand off" in first and "retrying in" in first
    d = subprocess.Popen([sys.executable, STREAMD, "--socket", sock, "--metrics-addr", "", "--message-delay", "1ms"],
                         stderr=subprocess.DEVNULL)
    try:
        err = first + send.communicate(timeout=60)[1]
    finally:
        d.send_signal(signal.SIGTERM)
        d.wait(30)
    assert send.returncode == 0, err
    summary = err.strip().splitlines()[-1]
    retries = int(re.search(r"retries=(\d+)", summary).group(1))
    assert summary.startswith("status=200 ") and summary.endswith("outcome=done") and retries >= 1
    assert err.count("retrying in") == retries


def test_send_without_retries_fails_at_once(tmp_path):
    out = subprocess.run([sys.executable, STREAMD, "send", "--socket", str(tmp_path / "none.sock"), "hi"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 3 and "retrying" not in out.stderr


def test_check_says_whether_the_daemon_would_start(tmp_path):
    ok = subprocess.run([sys.executable, STREAMD, "check", "--backend", "openai", "--listen", "127.0.0.1:0"],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert "config OK: no config file; backends openai" in ok.stdout and "front 127.0.0.1:0" in ok.stdout
    bad = tmp_path / "c.yaml"
    bad.write_text("server:\n  max_connections: abc\n")
    out = subprocess.run([sys.executable, STREAMD, "check", "--config", str(bad)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2 and "server.max_connections: expected an integer >= 1, got 'abc'" in out.stderr
    # A configured backend whose module is missing: streamd.py alone has no backends/.
    lone = tmp_path / "alone"
    lone.mkdir()
    shutil.copy(STREAMD, str(lone / "streamd.py"))
    out = subprocess.run([sys.executable, "-S", str(lone / "streamd.py"), "check", "--backend", "openai"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "backend 'openai' cannot be loaded" in out.stderr and not out.stdout
