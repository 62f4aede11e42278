"""Config: parsers, precedence, one-line errors naming the value, docs in step."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, STREAMD
import streamd
from streamd import ConfigError, load_config


@pytest.mark.parametrize("raw, seconds", [
    ("50ms", 0.05), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0), ("1.5s", 1.5), (3, 3.0), ("7", 7.0),
    (" 10 ms ", 0.01),
])
def test_durations(raw, seconds):
    assert streamd.p_duration()(raw) == pytest.approx(seconds)


@pytest.mark.parametrize("raw", ["", "5x", "-1s", "s", True, [1], "1e3", "nan", "5s\nx"])
def test_bad_durations(raw):
    with pytest.raises(ValueError):
        streamd.p_duration()(raw)


def test_zero_duration_only_where_allowed():
    assert streamd.p_duration(allow_zero=True)("0") == 0
    with pytest.raises(ValueError):
        streamd.p_duration()("0s")


@pytest.mark.parametrize("raw, n", [("64KiB", 65536), ("1MiB", 1 << 20), (100, 100), ("100", 100),
                                    ("2k", 2048), ("3 MB", 3 << 20)])
def test_sizes(raw, n):
    assert streamd.p_size(raw) == n


def test_modes():
    assert streamd.p_mode("0660") == 0o660 and streamd.p_mode("600") == 0o600
    # YAML reads an unquoted 0660 as the octal integer 432: that is the mode
    assert streamd.p_mode(432) == 0o660 and streamd.p_mode(0o600) == 0o600
    for bad in (0, 0o1000, -1, True, "0999", "rw", "07777"):
        with pytest.raises(ValueError):
            streamd.p_mode(bad)


def test_unquoted_yaml_socket_mode_is_octal(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("server:\n  socket_mode: 0660\n")
    assert streamd.load_config({}, env={}, path=str(f))["server.socket_mode"] == 0o660


def test_addr():
    assert streamd.p_addr("") == "" and streamd.p_addr("[::1]:9090") == "[::1]:9090"
    for bad in ("9090", "host:", "host:99999", ":80", 80, "h:1\n"):
        with pytest.raises(ValueError):
            streamd.p_addr(bad)


def test_defaults():
    cfg = load_config({}, env={})
    assert cfg["server.socket_path"] == "/run/streamd.sock" and cfg["server.socket_mode"] == 0o660
    assert cfg["server.max_connections"] == 50000 and cfg["server.max_handoff_bytes"] == 128 * 1024
    assert cfg["server.handoff_timeout"] == 5 and cfg["server.write_timeout"] == 30
    assert cfg["metrics.listen_addr"] == "127.0.0.1:9090"


def test_precedence_flag_env_file_default(tmp_path, monkeypatch):
    opt = streamd.OPTION_BY_KEY["backend.default_model"]
    monkeypatch.setattr(opt, "env", "STREAMD_TEST_MODEL")
    f = tmp_path / "c.yaml"
    f.write_text("backend:\n  default_model: from-file\n")
    assert load_config({}, env={}, path=str(f))["backend.default_model"] == "from-file"
    env = {"STREAMD_TEST_MODEL": "from-env"}
    assert load_config({}, env=env, path=str(f))["backend.default_model"] == "from-env"
    flags = {"backend.default_model": "from-flag"}
    assert load_config(flags, env=env, path=str(f))["backend.default_model"] == "from-flag"


def test_flag_error_names_flag_and_value():
    with pytest.raises(ConfigError) as e:
        load_config({"server.max_connections": "abc"}, env={})
    assert str(e.value) == "--max-connections: expected an integer >= 1, got 'abc'"


def test_file_error_names_file_key_and_value(tmp_path):
    f = tmp_path / "config.yaml"
    f.write_text("server:\n  max_connections: abc\n")
    with pytest.raises(ConfigError) as e:
        load_config({}, env={}, path=str(f))
    assert str(e.value) == "%s: server.max_connections: expected an integer >= 1, got 'abc'" % f


@pytest.mark.parametrize("text, message", [
    ("server:\n  max_conections: 5\n", "server.max_conections: unknown key"),
    ("nonsense: 1\n", "nonsense: unknown key"),
    ("server: [1]\n", "server: unknown key"),
    ("- 1\n", "top level: expected a mapping"),
    ("server:\n  socket_mode: 660\n", "server.socket_mode: expected an octal file mode like 0660, got 660"),
    ("server: {a: [}\n", "invalid YAML at line 1"),
    ("server:\n  write_high_water: 1MiB\n", "must not exceed server.write_buffer_limit"),
    ("backend:\n  provider: nope\n", "unknown backend 'nope'"),
])
def test_file_errors(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config({}, env={}, path=str(f))


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read: No such file"):
        load_config({}, env={}, path="/nonexistent.yaml")


@pytest.mark.parametrize("args, line", [
    (["--max-connections", "abc"], "streamd: --max-connections: expected an integer >= 1, got 'abc'"),
    (["--write-timeout", "soon"], "streamd: --write-timeout: expected a duration like 50ms, 5s, 2m or 1h "
                                  "above 0, got 'soon'"),
    (["--no-such-flag"], "streamd: unrecognized arguments: --no-such-flag"),
    (["--socket", "relative.sock"], "streamd: --socket: expected an absolute path, got 'relative.sock'"),
])
def test_cli_errors_are_one_line_exit_2(args, line):
    out = subprocess.run([sys.executable, STREAMD] + args, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr == line + "\n"


def test_config_without_pyyaml_is_a_clear_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("server: {}\n")
    out = subprocess.run([sys.executable, "-S", STREAMD, "--config", str(f)], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr == "streamd: %s: reading a config file needs PyYAML (pip install PyYAML)\n" % f


def test_example_config_is_valid_and_lists_every_key():
    path = os.path.join(ROOT, "config.example.yaml")
    raw = streamd.read_config_file(path)
    assert sorted(raw) == sorted(o.key for o in streamd.OPTIONS), "config.example.yaml must show every key"
    cfg = load_config({}, env={}, path=path)
    defaults = load_config({}, env={})
    assert {k: v for k, v in cfg.items() if k != "config_path"} == \
        {k: v for k, v in defaults.items() if k != "config_path"}, "the example shows the defaults"


def test_readme_documents_every_flag_and_key():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for o in streamd.OPTIONS:
        assert "`%s`" % o.key in readme, "README.md does not document key %s" % o.key
        if o.flag is not None:  # (mappings are config-file only)
            assert "`%s`" % o.flag in readme or "`%s " % o.flag in readme, "README.md does not document %s" % o.flag
        if o.env:
            assert "`%s`" % o.env in readme


@pytest.mark.parametrize("args", [["--backend", "openai"], ["--enable-backends", "anthropic"],
                                  ["--backend", "gemini", "--workers", "2"]])
def test_a_configured_backend_without_its_package_stops_the_start(tmp_path, args):
    """Without site-packages (-S) urllib3 is missing: the start fails naming it,
    instead of a daemon that says ready and answers every request 502."""
    out = subprocess.run([sys.executable, "-S", STREAMD, "--socket", str(tmp_path / "s"), "--metrics-addr", ""]
                         + args, capture_output=True, text=True, timeout=30)
    name = args[1]
    assert out.returncode == 2
    assert out.stderr.endswith("streamd: backend %r needs the urllib3 package: pip install urllib3 "
                               "(or apt install python3-urllib3)\n" % name), out.stderr
    assert not (tmp_path / "s").exists()


# ---- systemd credentials (LoadCredential=keys:/etc/streamd/keys) ----

def credentials(tmp_path, **files):
    d = tmp_path / "creds"
    d.mkdir()
    for name, text in files.items():
        (d / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return {"CREDENTIALS_DIRECTORY": str(d)}


def test_a_backends_key_from_its_credential(tmp_path):
    env = credentials(tmp_path, keys_openai="sk-cred\n", anthropic="sk-ant\n")
    cfg = streamd.load_config({}, env)
    assert cfg["backend.openai.api_key"] == "sk-cred" and cfg["backend.anthropic.api_key"] == "sk-ant"
    assert cfg["backend.gemini.api_key"] == ""
    # the file < the credential < the environment < a flag
    f = tmp_path / "c.yaml"
    f.write_text("backend:\n  openai:\n    api_key: sk-file\n")
    assert streamd.load_config({}, env, str(f))["backend.openai.api_key"] == "sk-cred"
    assert streamd.load_config({}, dict(env, OPENAI_API_KEY="sk-env"), str(f))["backend.openai.api_key"] == "sk-env"
    assert streamd.load_config({"backend.openai.api_key": "sk-flag"}, dict(env, OPENAI_API_KEY="sk-env"),
                               str(f))["backend.openai.api_key"] == "sk-flag"
    assert streamd.load_config({}, {}, str(f))["backend.openai.api_key"] == "sk-file"  # no credentials at all


def test_a_profiles_key_from_the_credential_it_names(tmp_path):
    env = credentials(tmp_path, keys_groq="gsk-1\n")
    f = tmp_path / "c.yaml"
    f.write_text("backend:\n  openai:\n    profiles:\n      groq:\n        api_base: https://g.example/v1\n"
                 "        api_key_credential: groq\n")
    cfg = streamd.load_config({}, env, str(f))
    assert cfg["backend.openai.profiles"] == {"groq": {"api_base": "https://g.example/v1", "api_key": "gsk-1"}}
    with pytest.raises(streamd.ConfigError, match=r"backend.openai.profiles.groq.api_key_credential: no credential "
                                                  r"'keys_groq' \(nor 'groq'\) in \$CREDENTIALS_DIRECTORY \(not set\)"):
        streamd.load_config({}, {}, str(f))
    f.write_text("backend:\n  openai:\n    profiles:\n      groq:\n        api_key: a\n        api_key_credential: g\n")
    with pytest.raises(streamd.ConfigError, match="api_key or api_key_credential, not both"):
        streamd.load_config({}, env, str(f))


@pytest.mark.parametrize("content", [b"", b"\n", b"two\nlines\n", b"\xff\xfe", b"k" * (64 * 1024 + 1)])
def test_a_bad_credential_stops_the_start_without_showing_it(tmp_path, content):
    env = credentials(tmp_path, keys_openai=content)
    with pytest.raises(streamd.ConfigError) as e:
        streamd.load_config({}, env)
    assert str(e.value).startswith("credential keys_openai: expected one line of printable text (an API key)")
    assert "lines" not in str(e.value) and "kkk" not in str(e.value)
