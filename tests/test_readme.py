"""README's commands are the ones that work: the "Coming from the Go daemon"
commands run through `check` (the config and flags a start would take), and
the "Install" steps are the ones tests/test_install.py performs.  (The quick
start is run literally by .ci/run.)"""
import os
import re
import shlex
import subprocess
import sys

from conftest import ROOT, STREAMD

GO_EXAMPLE = os.path.join(ROOT, "tests", "fixtures", "go", "example.yaml")


def section_blocks(title):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index("\n## %s\n" % title)
    end = text.find("\n## ", start + 1)
    return re.findall(r"```sh\n(.*?)```", text[start:end], re.S)


def commands(block):
    for line in block.splitlines():
        line = line.split("  #", 1)[0].strip()
        if line:
            yield line


def test_the_go_sections_commands_would_start():
    lines = [c for b in section_blocks("Coming from the Go daemon") for c in commands(b)]
    assert len(lines) == 2
    for line in lines:
        argv = shlex.split(line.replace("/etc/streaming-daemon/config.yaml", GO_EXAMPLE))
        assert argv[:2] == ["python3", "streamd.py"]
        out = subprocess.run([sys.executable, STREAMD, "check"] + argv[2:], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, (line, out.stderr)
        assert "config OK" in out.stdout


def test_the_install_steps_are_the_tested_ones():
    (block,) = section_blocks("Install")
    assert list(commands(block)) == [
        "apt install python3-yaml python3-prometheus-client python3-urllib3 python3-h2",
        "sh install.sh",
        "umask 077; echo 'sk-...' > /etc/streamd/keys/openai",
        "editor /etc/streamd/config.yaml",
        "runuser -u streamd -- python3 /opt/streamd/streamd.py check --config /etc/streamd/config.yaml",
        "systemctl enable --now streamd.socket streamd.service",
    ]
    # The packages: the ones .ci/run installs for the Debian run.
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "python3-yaml python3-prometheus-client \\\n     python3-urllib3 python3-h2" in f.read()
