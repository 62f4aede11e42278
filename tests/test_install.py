"""The systemd install, as README's "Install" section has it: install.sh into a
temporary root (DESTDIR), every path, owner and mode it makes, then the daemon
started from the installed files the way systemd starts streamd.service: as
its unprivileged user and group, with its UMask, its EnvironmentFile, its keys
as credentials (LoadCredential=keys:/etc/streamd/keys: systemd's copies, named
keys_<file>, readable by that user alone), NOTIFY_SOCKET for Type=notify.
Then a real handoff: an openai stream against a local upstream that must get
the key from the credential.  (No systemd as PID 1 here: the unit's settings
are read from the installed file and applied by the test.)"""
import grp
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile

import pytest

from conftest import ROOT
from test_backends import upstream  # noqa: F401  (fixture)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the install test needs root (install.sh chowns; a user is made)"),
    pytest.mark.skipif(shutil.which("useradd") is None, reason="useradd not installed"),
]
GROUP = "www-data"


@pytest.fixture
def service_user():
    """A system user like install.sh's own, removed afterwards."""
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        pytest.skip("no %s group on this machine" % GROUP)
    name = "sdtest%d" % os.getpid()
    subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell",
                    "/usr/sbin/nologin", "--gid", GROUP, name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False)


@pytest.fixture
def dest():
    """A DESTDIR the service's user can traverse (pytest's tmp dirs are 0700)."""
    d = tempfile.mkdtemp(prefix="streamd-install-")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def install(dest, user):
    return subprocess.run(["sh", os.path.join(ROOT, "install.sh")], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, DESTDIR=dest, STREAMD_USER=user))


def mode_of(path):
    st = os.lstat(path)
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, stat.S_IMODE(st.st_mode)


def unit_settings(path):
    out = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith(("#", "[")) and "=" in line:
                k, _, v = line.partition("=")
                out.setdefault(k, []).append(v)
    return out


def as_user(pw, gid, argv, **kw):
    return subprocess.run(argv, user=pw.pw_uid, group=gid, extra_groups=[], capture_output=True, text=True,
                          timeout=30, **kw)


def python_for_the_unit():
    """The unit's interpreter (Debian's /usr/bin/python3 with python3-yaml & co.),
    or this one when that lacks the packages (a machine without the apt step)."""
    try:
        subprocess.run(["/usr/bin/python3", "-c", "import yaml, urllib3"], check=True, capture_output=True)
        return "/usr/bin/python3"
    except (OSError, subprocess.CalledProcessError):
        return sys.executable


def test_install_sh_makes_every_path_with_its_owner_and_mode(dest, service_user):
    user = service_user.pw_name
    r = install(dest, user)
    assert r.returncode == 0, r.stderr
    want = {
        "opt/streamd": ("root", "root", 0o755),
        "opt/streamd/streamd.py": ("root", "root", 0o644),
        "opt/streamd/demo.html": ("root", "root", 0o644),
        "opt/streamd/README.md": ("root", "root", 0o644),
        "opt/streamd/LICENSE": ("root", "root", 0o644),
        "opt/streamd/backends": ("root", "root", 0o755),
        "etc/streamd": ("root", "root", 0o755),
        "etc/streamd/config.yaml": (user, "root", 0o400),
        "etc/streamd/keys": ("root", "root", 0o700),
        "etc/streamd/env": ("root", "root", 0o600),
        "etc/systemd/system/streamd.service": ("root", "root", 0o644),
        "etc/systemd/system/streamd.socket": ("root", "root", 0o644),
    }
    for name in sorted(os.listdir(os.path.join(ROOT, "backends"))):
        if name.endswith(".py"):
            want["opt/streamd/backends/" + name] = ("root", "root", 0o644)
    got = {p: mode_of(os.path.join(dest, p)) for p in want}
    assert got == want
    made = {os.path.relpath(os.path.join(top, n), dest) for top, dirs, files in os.walk(dest) for n in dirs + files}
    assert made - set(want) == {"opt", "etc", "etc/systemd", "etc/systemd/system"}  # nothing else
    with open(os.path.join(ROOT, "streamd.service")) as a, open(os.path.join(dest, "etc/systemd/system/"
                                                                               "streamd.service")) as b:
        assert a.read() == b.read()
    # Again (an upgrade): code replaced, the operator's config, keys and env kept.
    cfg = os.path.join(dest, "etc/streamd/config.yaml")
    with open(cfg, "w") as f:
        f.write("backend:\n  provider: typing\n")
    with open(os.path.join(dest, "etc/streamd/env"), "a") as f:
        f.write("OPENAI_API_BASE=http://127.0.0.1:9/v1\n")
    r = install(dest, user)
    assert r.returncode == 0, r.stderr
    with open(cfg) as f:
        assert f.read() == "backend:\n  provider: typing\n"
    with open(os.path.join(dest, "etc/streamd/env")) as f:
        assert "OPENAI_API_BASE" in f.read()
    assert mode_of(cfg) == (user, "root", 0o400)


def test_install_sh_refuses_without_the_user_under_destdir(dest):
    r = install(dest, "no-such-user-here")
    assert r.returncode == 1 and "user no-such-user-here does not exist" in r.stderr
    assert not os.path.exists(os.path.join(dest, "opt"))


def test_the_installed_service_runs_as_its_user_with_its_credentials(dest, service_user, upstream):  # noqa: F811
    """README's steps: install.sh, the key into /etc/streamd/keys/openai, the
    config edited, `check` as the user, then the service as systemd runs it."""
    pw = service_user
    gid = grp.getgrnam(GROUP).gr_gid
    assert install(dest, pw.pw_name).returncode == 0
    up = upstream()
    etc = os.path.join(dest, "etc/streamd")
    # The operator's part: a key (root only) and the config.
    old = os.umask(0o077)
    try:
        with open(os.path.join(etc, "keys/openai"), "w") as f:
            f.write("sk-from-the-credential\n")
    finally:
        os.umask(old)
    with open(os.path.join(etc, "config.yaml"), "w") as f:
        f.write("backend:\n  provider: openai\n  openai:\n    api_base: %s/v1\n"
                "upstream:\n  max_retries: 0\nmetrics:\n  listen_addr: ''\n" % up.base)
    py = python_for_the_unit()
    streamd_py = os.path.join(dest, "opt/streamd/streamd.py")
    config = os.path.join(etc, "config.yaml")

    # Who can read what: the user its config, not the keys; Apache's group neither.
    probe = [py, "-S", "-c", "import sys; open(sys.argv[1]).read()"]
    assert as_user(pw, gid, probe + [config]).returncode == 0
    assert "PermissionError" in as_user(pw, gid, probe + [os.path.join(etc, "keys/openai")]).stderr
    nobody = pwd.getpwnam("nobody")
    assert "PermissionError" in as_user(nobody, gid, probe + [config]).stderr  # www-data's group: no

    check = as_user(pw, gid, [py, streamd_py, "check", "--config", config])
    assert check.returncode == 0, check.stderr
    assert "config OK" in check.stdout and "backends openai" in check.stdout

    # What systemd does for streamd.service, read from the installed unit.
    unit = unit_settings(os.path.join(dest, "etc/systemd/system/streamd.service"))
    assert unit["User"] == ["streamd"] and unit["Group"] == [GROUP] and unit["Type"] == ["notify"]
    cred_id, _, cred_dir = unit["LoadCredential"][0].partition(":")
    assert (cred_id, cred_dir) == ("keys", "/etc/streamd/keys")
    run = tempfile.mkdtemp(prefix="streamd-run-")
    try:
        os.chmod(run, 0o755)
        runtime = os.path.join(run, "streamd")  # RuntimeDirectory=streamd, RuntimeDirectoryMode
        os.mkdir(runtime, int(unit["RuntimeDirectoryMode"][0], 8))
        os.chown(runtime, pw.pw_uid, gid)
        creds = os.path.join(run, "credentials")  # systemd's copies: the user's alone, read-only
        os.mkdir(creds, 0o500)
        for name in os.listdir(dest + cred_dir):
            copy = os.path.join(creds, "%s_%s" % (cred_id, name))
            shutil.copyfile(os.path.join(dest + cred_dir, name), copy)
            os.chmod(copy, 0o400)
            os.chown(copy, pw.pw_uid, gid)
        os.chown(creds, pw.pw_uid, gid)
        env = {"PATH": "/usr/bin:/bin", "CREDENTIALS_DIRECTORY": creds, "NOTIFY_SOCKET": os.path.join(run, "notify")}
        envfile = unit["EnvironmentFile"][0].lstrip("-")
        with open(dest + envfile) as f:
            for line in f:
                if line.strip() and not line.startswith("#"):
                    k, _, v = line.strip().partition("=")
                    env[k] = v
        argv = unit["ExecStart"][0].split()
        argv = [py if a == "/usr/bin/python3" else dest + a if a.startswith(("/opt/", "/etc/")) else
                a.replace("/run/streamd", runtime) for a in argv]
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(env["NOTIFY_SOCKET"])
        os.chmod(env["NOTIFY_SOCKET"], 0o777)
        notify.settimeout(20)
        umask = int(unit["UMask"][0], 8)
        proc = subprocess.Popen(argv, user=pw.pw_uid, group=gid, extra_groups=[], umask=umask, env=env,
                                stderr=subprocess.PIPE, text=True)
        try:
            while notify.recv(256) != b"READY=1":
                pass
            sock = os.path.join(runtime, "streamd.sock")
            owner, group, mode = mode_of(sock)
            assert (owner, group) == (pw.pw_name, GROUP) and mode & 0o060 == 0o060  # Apache's group connects
            out = subprocess.run([sys.executable, os.path.join(ROOT, "streamd.py"), "send", "--socket", sock,
                                  "Hello"], capture_output=True, text=True, timeout=30)
            assert out.returncode == 0 and "data: [DONE]" in out.stdout, out.stderr
            assert up.last().headers["authorization"] == "Bearer sk-from-the-credential"
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
            notify.close()
        assert proc.returncode == 0, err
        assert "sk-from-the-credential" not in err  # (never logged)
    finally:
        shutil.rmtree(run, ignore_errors=True)
