"""The systemd units: valid, hardened (exposure <= 2.0), and consistent with
the daemon's own defaults."""
import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT
import streamd

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze not installed (.ci/run installs it)")


@pytest.fixture
def units(tmp_path):
    for name in ("streamd.service", "streamd.socket"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    return tmp_path


def test_units_verify(units):
    out = subprocess.run(["systemd-analyze", "verify", "streamd.socket", "streamd.service"], cwd=units,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "streamd" not in out.stderr, out.stderr  # no warnings about our units


def test_service_exposure_score(units):
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", "streamd.service"], cwd=units,
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for streamd.service: ([\d.]+)", out.stdout)
    assert m, out.stdout[-500:] + out.stderr
    assert float(m.group(1)) <= 2.0


def directives(name):
    out = {}
    with open(os.path.join(ROOT, name)) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                k, _, v = line.partition("=")
                out.setdefault(k, []).append(v)
    return out


def test_service_settings():
    d = directives("streamd.service")
    assert d["Type"] == ["notify"] and d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    stop = int(d["TimeoutStopSec"][0])
    assert stop > streamd.OPTION_BY_KEY["server.shutdown_timeout"].default
    assert int(d["LimitNOFILE"][0]) >= 65536
    assert d["Group"] == ["www-data"] and d["RuntimeDirectory"] == ["streamd"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups"):
        assert d[key] == ["yes"], key
    assert d["ProtectSystem"] == ["strict"]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert "@system-service" in d["SystemCallFilter"] and d["CapabilityBoundingSet"] == [""]


def test_socket_matches_service():
    sock = directives("streamd.socket")
    svc = directives("streamd.service")
    path = sock["ListenSequentialPacket"][0]
    assert "--socket %s" % path in svc["ExecStart"][0]
    assert sock["SocketMode"] == ["0660"] and sock["SocketGroup"] == ["www-data"]
    assert sock["Backlog"] == ["4096"]
