#!/usr/bin/env python3
"""streamd: stream Server-Sent Events to clients handed off by Apache.

Apache's mod_socket_handoff passes a client's TCP socket to streamd over a Unix
socket (one SCM_RIGHTS message, with a JSON blob from PHP). streamd answers that
client with `text/event-stream` from a backend (the built-in mock here, LLM APIs in
backends/) while Apache's worker is already free for the next request. One thread
and one selectors loop hold tens of thousands of slow streams.

One pass of the loop (Daemon.run_once):
  1. timeout: 0 if a backend is runnable, else until the next timer is due;
  2. select();
  3. dispatch I/O: every registered socket's key.data is its handler;
  4. fire due timers, measuring how late they ran (the loop's lag);
  5. step runnable backends: generators that yield operations (sleep, emit an
     event, wait for a socket) and are resumed by the loop.

With --listen, streamd also serves HTTP/1.1 and WebSocket clients directly
(HTTPFront): their requests become the same streams as handoffs.

Reading order: Errors, Config, Logging, Wire protocol (pure functions: bytes in,
bytes or values out; the HTTP request parser and WebSocket framing too), Timers,
Connection state machine, Backend operations, Circuit breaker, Metrics, Direct
HTTP front, Event loop (Daemon.run_once is the heart), Workers,
Mock backend & registry (the tutorial backend), Signals & systemd, Client (send,
demo), main.  Newcomers: read MockBackend first, then Daemon.run_once and step.
"""
from __future__ import annotations

import array
import bisect
import collections
import enum
import errno
import gc
import heapq
import importlib
import importlib.util
import itertools
import json
import logging
import math
import operator
import os
import re
import selectors
import signal
import socket
import stat
import sys
import time

__version__ = "0.1.0"

# ---- Errors ----
#
# Three kinds of failure, three audiences: a ConfigError stops the start (the
# operator's fault), a ProtocolError is answered with an HTTP status (the peer's
# fault), a BackendError ends one stream (the upstream's fault).  Anything else
# raised by a backend is a bug in that backend and still ends only its stream;
# anything raised by the loop itself is a bug in streamd and stops the daemon.


class StreamdError(Exception):
    """Base class of streamd's own errors."""


class ConfigError(StreamdError):
    """A bad flag, key or value: the daemon refuses to start (exit status 2)."""


class ProtocolError(StreamdError):
    """Bad handoff data: answered with `status` before any stream begins."""

    def __init__(self, status: int, message: str, reason: str = "bad_json"):
        super().__init__(message)
        self.status = status
        self.reason = reason  # the handoff_errors{reason} label


class BackendError(StreamdError):
    """An upstream failure.  Before the response head it becomes `status`;
    after it, an error event of type `kind`.  `reason` is the stream_errors label.

    `str()` is our own words, safe to log.  What the upstream said about it
    goes in `detail`: the client is told (it explains the failure, and it is
    the client's own request), the log is not, above debug level: upstreams
    echo prompts and message text in their errors.  `upstream_type` is the
    provider's error type or code (`overloaded_error`, `RESOURCE_EXHAUSTED`),
    which is safe to log."""

    def __init__(self, message: str, status: int = 502, kind: str = "upstream_error",
                 reason: str = "upstream", retry_after: int | None = None,
                 detail: str = "", upstream_type: str = ""):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.reason = reason
        self.retry_after = retry_after
        self.detail = detail
        self.upstream_type = upstream_type

    def public(self) -> str:
        """The message for the client: ours, the upstream's type, its words."""
        text = str(self)
        if self.upstream_type:
            text += " (%s)" % self.upstream_type
        return text + ": " + self.detail if self.detail else text

    def log_fields(self) -> dict:
        fields = {"error": str(self)}
        if self.upstream_type:
            fields["upstream_error"] = self.upstream_type
        if self.detail:
            fields["upstream_message_len"] = len(self.detail)
        return fields


# ---- Config ----
#
# Every option is one row of OPTIONS: its YAML key, default, parser, command-line
# flag, environment variable, and whether SIGHUP may change it on a live daemon.
# Precedence: flag > environment > config file > default.  Parsers raise
# ValueError and the loader turns that into one line naming source, key and value.

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(b|k|kb|kib|m|mb|mib)?\s*$", re.I)
_SIZE_UNITS = {"b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20}


def _parser(expect):
    """Attach the "expected ..." phrase used in error messages to a parser."""
    def wrap(fn):
        fn.expect = expect
        return fn
    return wrap


def p_int(lo: int, hi: int | None = None):
    @_parser("an integer >= %d" % lo if hi is None else "an integer from %d to %d" % (lo, hi))
    def parse(v):
        if isinstance(v, bool):
            raise ValueError
        if isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v):
            v = int(v)
        if not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            raise ValueError
        return v
    return parse


def p_duration(allow_zero: bool = False):
    @_parser("a duration like 50ms, 5s, 2m or 1h" + (" (0 turns it off)" if allow_zero else " above 0"))
    def parse(v):
        if isinstance(v, bool):
            raise ValueError
        if isinstance(v, (int, float)):
            seconds = float(v)
        elif isinstance(v, str) and _DURATION.fullmatch(v):
            num, unit = _DURATION.fullmatch(v).groups()
            seconds = float(num) * _DURATION_UNITS[unit]
        else:
            raise ValueError
        if seconds < 0 or (seconds == 0 and not allow_zero) or seconds != seconds or seconds == float("inf"):
            raise ValueError
        return seconds
    return parse


@_parser("a size like 65536, 64KiB or 1MiB")
def p_size(v):
    if isinstance(v, bool):
        raise ValueError
    if isinstance(v, int):
        n = v
    elif isinstance(v, str) and _SIZE.fullmatch(v):
        num, unit = _SIZE.fullmatch(v).groups()
        n = int(num) * _SIZE_UNITS[(unit or "b").lower()]
    else:
        raise ValueError
    if n < 1:
        raise ValueError
    return n


def p_choice(*choices):
    @_parser("one of " + ", ".join(choices))
    def parse(v):
        if isinstance(v, str) and v.lower() in choices:
            return v.lower()
        raise ValueError
    return parse


@_parser("true or false")
def p_bool(v):
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError


@_parser("a string")
def p_str(v):
    if not isinstance(v, str):
        raise ValueError
    return v


@_parser("an absolute path")
def p_abspath(v):
    if not isinstance(v, str) or not v.startswith("/"):
        raise ValueError
    return v


@_parser("an absolute path, or empty")
def p_abspath_or_empty(v):
    if not isinstance(v, str) or (v and not v.startswith("/")):
        raise ValueError
    return v


@_parser("an octal file mode like 0660")
def p_mode(v):
    # YAML 1.1 (PyYAML, and Go's yaml.v3) reads an unquoted 0660 as an octal
    # integer: 432.  So an integer is the mode itself; a string is octal text.
    if isinstance(v, int) and not isinstance(v, bool):
        if not 0 < v <= 0o777:
            raise ValueError
        return v
    if not isinstance(v, str) or not re.fullmatch(r"0?[0-7]{3}", v.strip()):
        raise ValueError
    return int(v.strip(), 8)


@_parser("an existing group name or a numeric gid, or empty")
def p_group(v):
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise ValueError
    v = v.strip()
    if v:
        try:
            group_id(v)
        except KeyError:  # no such group
            raise ValueError from None
    return v


def group_id(name: str) -> int:
    """The gid for p_group's value: a number is taken as it is."""
    import grp
    return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid


@_parser("HOST:PORT, or empty to disable")
def p_addr(v):
    if not isinstance(v, str):
        raise ValueError
    if v == "":
        return v
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError
    return v


def _raise():
    raise ValueError


def _str_list(v) -> list:
    """A YAML list of strings, or one comma-separated string (env, flags)."""
    if isinstance(v, str):
        v = [s.strip() for s in v.split(",") if s.strip()]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ValueError
    return v


@_parser("a list of HOST:PORT")
def p_addrs(v):
    v = _str_list(v)
    if not all(s and p_addr(s) for s in v):
        raise ValueError
    return v


@_parser("a list of IP addresses")
def p_ips(v):
    import ipaddress
    return [str(ipaddress.ip_address(s)) for s in _str_list(v)]  # (ValueError if not an address)


@_parser("a file path, or empty")
def p_path_or_empty(v):
    if not isinstance(v, str):
        raise ValueError
    return os.path.abspath(v) if v else v


@_parser("an http:// or https:// URL")
def p_url(v):
    if not isinstance(v, str) or not re.fullmatch(r"https?://[^/?#\s]+(/[^?#\s]*)?", v):
        raise ValueError
    return v.rstrip("/")


@_parser("a list of backend names")
def p_names(v):
    return _str_list(v)


class Option:
    __slots__ = ("key", "default", "parse", "flag", "env", "env_parse", "live", "help")

    def __init__(self, key, default, parse, flag=None, env=None, live=False, help="", env_parse=None):
        self.key, self.default, self.parse = key, default, parse
        self.flag, self.env, self.live, self.help = flag, env, live, help
        self.env_parse = env_parse  # how to read the environment variable, when not as the flag is


class NestedValueError(ValueError):
    """A bad value inside a mapping option (a profile's api_base): names the sub-key."""

    def __init__(self, key: str, expect: str, value):
        super().__init__(key)
        self.key, self.expect, self.value = key, expect, value


# What a profile (backend.<name>.profiles.<profile>) may set, and how each is read.
PROFILE_KEYS = {"api_base": lambda: p_url, "api_key": lambda: p_str, "api_socket": lambda: p_abspath_or_empty,
                "default_model": lambda: p_str, "http2": lambda: p_choice("auto", "true", "false"),
                "insecure_ssl": lambda: p_bool}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def p_profiles(extra=()):
    """Named upstreams of one backend: {name: {api_base, api_key | api_key_env,
    api_socket, default_model, ...}}; each inherits what it does not set."""
    keys = dict(PROFILE_KEYS, **dict(extra))

    @_parser("a mapping of profile names to mappings")
    def parse(v):
        if not isinstance(v, dict):
            raise ValueError
        out = {}
        for name, prof in v.items():
            if not isinstance(name, str) or not _REF.fullmatch(name):
                raise NestedValueError(str(name)[:64], "a profile name (letters, digits, _.-)", name)
            if not isinstance(prof, dict):
                raise NestedValueError(name, "a mapping of settings", prof)
            parsed = {}
            for k, raw in prof.items():
                if k == "http2_enabled":  # the Go daemon's name: true is h2 (h2c for http://)
                    try:
                        k, raw = "http2", "true" if p_bool(raw) else "false"
                    except ValueError:
                        raise NestedValueError("%s.%s" % (name, k), p_bool.expect, raw) from None
                if k == "api_key_env":
                    if not isinstance(raw, str) or not _ENV_NAME.fullmatch(raw):
                        raise NestedValueError("%s.%s" % (name, k), "an environment variable name", raw)
                    parsed[k] = raw
                    continue
                if k == "api_key_credential":  # read at load: see credential()
                    if not isinstance(raw, str) or not _REF.fullmatch(raw):
                        raise NestedValueError("%s.%s" % (name, k), "a credential name (letters, digits, _.-)", raw)
                    if "api_key" in prof:
                        raise NestedValueError("%s.%s" % (name, k), "api_key or api_key_credential, not both", raw)
                    parsed[k] = raw
                    continue
                if k not in keys:
                    raise NestedValueError("%s.%s" % (name, k), "one of " + ", ".join(
                        sorted(set(keys) | {"api_key_env", "api_key_credential", "http2_enabled"})), k)
                parser = keys[k]()
                try:
                    parsed[k] = parser(raw)
                except (ValueError, TypeError):
                    raise NestedValueError("%s.%s" % (name, k), parser.expect, raw) from None
            out[name] = parsed
        return out
    return parse


def go_http2_env(v: str) -> str:
    """The Go daemon's *_HTTP2_ENABLED: false, 0, no, off (any case) turn it
    off; any other value turns it on (h2 over TLS, h2c for http://)."""
    return "false" if v.strip().lower() in ("false", "0", "no", "off") else "true"


def go_insecure_env(v: str) -> bool:
    """The Go daemon's *_INSECURE_SSL: only true or 1 turns it on."""
    return v.strip().lower() in ("true", "1")


def upstream_options(name, base, auth, path, model, model_note="", profile_keys=()):
    """The rows every HTTP backend has: key, base URL, Unix socket, default
    model, and named profiles (other upstreams a request may choose)."""
    up = name.upper()
    rows = [
        Option("backend.%s.api_key" % name, "", p_str, "--%s-key" % name, env=up + "_API_KEY",
               help="%s: API key (%s); prefer a systemd credential (keys_%s) or the environment"
                    % (name, auth, name)),
        Option("backend.%s.api_base" % name, base, p_url, "--%s-base" % name, env=up + "_API_BASE",
               help="%s: base URL (%s is appended)" % (name, path)),
        Option("backend.%s.api_socket" % name, "", p_abspath_or_empty, "--%s-socket" % name,
               env=up + "_API_SOCKET", help="%s: reach the API over this Unix socket instead of TCP" % name),
    ]
    if model is not None:
        rows.append(Option("backend.%s.default_model" % name, model, p_str, "--%s-model" % name,
                           help=("%s: model when the handoff names none " % name + model_note).strip()))
    rows.append(Option("backend.%s.http2" % name, "", p_choice("", "auto", "true", "false"), "--%s-http2" % name,
                       env=up + "_HTTP2_ENABLED", env_parse=go_http2_env, live=True,
                       help="%s: upstream.http2 for this backend only (empty: upstream.http2); the Go daemon's "
                            "http2_enabled" % name))
    rows.append(Option("backend.%s.insecure_ssl" % name, False, p_bool, "--%s-insecure-ssl" % name,
                       env=up + "_INSECURE_SSL", env_parse=go_insecure_env,
                       help="%s: do not verify this backend's TLS certificates (testing only; logged as a "
                            "warning)" % name))
    rows.append(Option("backend.%s.profiles" % name, {}, p_profiles(profile_keys), None, live=True,
                       help="%s: named upstreams a handoff may choose with \"profile\" (config file only): "
                            "each may set %s and inherits the rest (but not the api_key when it sets its own "
                            "api_base or api_socket)" % (
                                name, ", ".join(sorted(set(PROFILE_KEYS) | {"api_key_env", "api_key_credential"} | set(dict(profile_keys)))))))
    return rows


# The README's option table and config.example.yaml list exactly these rows
# (tests/test_config.py checks that they stay in step).
OPTIONS = [
    Option("server.socket_path", "/run/streamd.sock", p_abspath, "--socket",
           help="Unix socket Apache hands connections to"),
    Option("server.socket_mode", 0o660, p_mode, "--socket-mode",
           help="file mode of the socket; Apache's user needs write access"),
    Option("server.socket_group", "", p_group, "--socket-group",
           help="group to give the socket file (e.g. www-data) when streamd runs as another user; empty: unchanged"),
    Option("server.socket_type", "seqpacket", p_choice("seqpacket", "stream"), "--socket-type",
           help="seqpacket (current module) or stream (older module builds)"),
    Option("server.max_connections", 50000, p_int(1), "--max-connections", live=True,
           help="concurrent client connections; more get 503 (capped to the fd limit)"),
    Option("server.handoff_timeout", 5.0, p_duration(), "--handoff-timeout", live=True,
           help="time for Apache to send the handoff message after connecting"),
    Option("server.max_handoff_bytes", 128 * 1024, p_size, "--max-handoff-bytes", live=True,
           help="largest handoff data accepted; larger gets 413"),
    Option("server.write_timeout", 30.0, p_duration(), "--write-timeout", live=True,
           help="drop a client that accepts no bytes for this long while some are queued"),
    Option("server.write_high_water", 64 * 1024, p_size, "--write-high-water", live=True,
           help="queued bytes above which the backend is paused"),
    Option("server.write_buffer_limit", 256 * 1024, p_size, "--write-buffer-limit", live=True,
           help="queued bytes above which a client that does not read is dropped (on top of one backend "
                "step's output, which is delivered whole)"),
    Option("server.max_stream_duration", 300.0, p_duration(allow_zero=True), "--max-stream-duration",
           live=True, help="longest a stream may run before it ends with a timeout error event"),
    Option("server.shutdown_timeout", 120.0, p_duration(allow_zero=True), "--shutdown-timeout",
           live=True, help="on SIGTERM, how long live streams may still run"),
    Option("server.heartbeat_interval", 15.0, p_duration(allow_zero=True), "--heartbeat-interval",
           live=True, help="send ': ping' after this much silence"),
    Option("server.data_dir", "/run/handoff-data", p_abspath, "--data-dir", live=True,
           help="where PHP puts the files a handoff's 'attachments' name; each is deleted once read"),
    Option("server.max_attachment_bytes", 20 << 20, p_size, "--max-attachment-bytes", live=True,
           help="largest image or PDF attachment; larger is 400"),
    Option("server.max_text_attachment_bytes", 1 << 20, p_size, "--max-text-attachment-bytes", live=True,
           help="largest text attachment; larger is 400"),
    Option("server.max_attachments_bytes", 40 << 20, p_size, "--max-attachments-bytes", live=True,
           help="all the attachments of one request together; more is 400"),
    Option("server.error_format", "streamd", p_choice("streamd", "go"), "--error-format", live=True,
           help="streamd: errors as {\"error\":{\"type\",\"message\"}}; go: {\"error\":\"message\"}, for clients "
                "written for the Go daemon"),
    Option("server.workers", 1, p_int(1, 64), "--workers",
           help="worker processes sharing the socket; more than 1 adds a supervising parent"),
    Option("server.benchmark", False, p_bool, "--benchmark",
           help="skip metric updates; print a summary at exit"),
    Option("backend.provider", "mock", p_str, "--backend",
           help="default backend for handoffs that do not name one"),
    Option("backend.enabled", [], p_names, "--enable-backends",
           help="other backends a handoff may ask for with its 'backend' field"),
    Option("backend.default_model", "gpt-4o-mini", p_str, "--default-model", live=True,
           help="model when the handoff names none"),
    Option("backend.mock.message_delay", 0.05, p_duration(allow_zero=True), "--message-delay",
           live=True, help="mock: pause between events"),
    *upstream_options("openai", "https://api.openai.com/v1", "Authorization: Bearer", "/chat/completions",
                      "", "(empty: backend.default_model)"),
    Option("backend.openai.stream_usage", True, p_bool, "--openai-stream-usage", live=True,
           help="openai: always ask for the usage chunk (stream_options.include_usage), so token counts reach "
                "daemon_tokens_total; false for servers that refuse stream_options (then only with include_usage)"),
    *upstream_options("anthropic", "https://api.anthropic.com", "x-api-key", "/v1/messages", "claude-sonnet-4-5"),
    Option("backend.anthropic.max_tokens", 1024, p_int(1), "--anthropic-max-tokens", live=True,
           help="anthropic: max_tokens when the handoff sets none (the API requires one)"),
    Option("backend.anthropic.version", "2023-06-01", p_str, "--anthropic-version",
           help="anthropic: the anthropic-version header"),
    Option("backend.anthropic.thinking_budget", 2048, _parser("0, or a number of tokens >= 1024")(
           lambda v: p_int(0)(v) and p_int(1024)(v)), "--anthropic-thinking-budget", live=True,
           help="anthropic: with include_reasoning, ask for extended thinking with this many tokens "
                "(at least 1024; max_tokens is raised above it if needed); 0: never ask"),
    *upstream_options("gemini", "https://generativelanguage.googleapis.com", "x-goog-api-key",
                      "/v1beta/models/...", "gemini-2.5-flash"),
    *upstream_options("langgraph", "http://127.0.0.1:2024", "X-Api-Key", "/runs/stream", None,
                      profile_keys=(("assistant_id", lambda: p_str), ("stream_mode", lambda: p_names),
                                    ("output", lambda: p_choice("uniform", "raw")),
                                    ("content_format", lambda: p_choice("openai", "anthropic")))),
    Option("backend.langgraph.assistant_id", "agent", p_str, "--langgraph-assistant",
           env="LANGGRAPH_ASSISTANT_ID", help="langgraph: assistant when the handoff names none"),
    Option("backend.langgraph.stream_mode", ["messages-tuple"], p_names, "--langgraph-stream-mode",
           env="LANGGRAPH_STREAM_MODE", help="langgraph: stream_mode when the handoff sets none"),
    Option("backend.langgraph.output", "uniform", p_choice("uniform", "raw"), "--langgraph-output",
           help="langgraph: uniform content events, or raw (the upstream SSE bytes verbatim)"),
    Option("backend.langgraph.content_format", "openai", p_choice("openai", "anthropic"), "--langgraph-content-format",
           help="langgraph: attachments as OpenAI-style parts (image_url; no PDFs) or Anthropic-style "
                "blocks (image, document)"),
    Option("backend.typing.fortune_path", "/usr/games/fortune", p_abspath, "--fortune-path",
           help="typing: program whose output is typed (a built-in quote when missing)"),
    Option("backend.typing.char_delay", 0.04, p_duration(allow_zero=True), "--typing-delay", live=True,
           help="typing: base pause between characters (longer after .!?, shorter after spaces)"),
    Option("upstream.insecure_ssl", False, p_bool, "--insecure-ssl", env="STREAMD_INSECURE_SSL",
           help="do not verify upstream TLS certificates (testing only; logged as a warning)"),
    Option("upstream.connect_timeout", 10.0, p_duration(), "--connect-timeout", live=True,
           help="name resolution + TCP connect + TLS handshake"),
    Option("upstream.header_timeout", 60.0, p_duration(), "--header-timeout", live=True,
           help="from sending the request to the upstream's response head"),
    Option("upstream.idle_timeout", 60.0, p_duration(), "--idle-timeout", live=True,
           help="longest silence between upstream bytes once the body started"),
    Option("upstream.threads", 32, p_int(1, 256), "--upstream-threads",
           help="helper threads for connection setup (DNS, connect, TLS): new connections/s x handshake time"),
    Option("upstream.max_idle", 32, p_int(0), "--upstream-max-idle", live=True,
           help="idle keep-alive connections kept per upstream"),
    Option("upstream.http2", "auto", p_choice("auto", "true", "false"), "--http2", live=True,
           help="auto: offer h2 over TLS (ALPN) when the h2 package is installed; true: also h2c "
                "for http:// (prior knowledge); false: HTTP/1.1 only, with keep-alive"),
    Option("upstream.max_retries", 2, p_int(0), "--max-retries", live=True,
           help="retries of a failed upstream request, only before the first byte reached the client"),
    Option("upstream.retry_base", 0.5, p_duration(), "--retry-base", live=True,
           help="first retry waits up to this (full jitter), doubling each time"),
    Option("upstream.retry_cap", 8.0, p_duration(), "--retry-cap", live=True,
           help="longest wait between retries (unless the upstream's Retry-After says more)"),
    Option("upstream.retry_budget", 15.0, p_duration(allow_zero=True), "--retry-budget", live=True,
           help="no retry that would end later than this after the first attempt"),
    Option("upstream.breaker_failures", 5, p_int(0), "--breaker-failures", live=True,
           help="failures in a row that open a backend's circuit (0 disables the breaker)"),
    Option("upstream.breaker_window", 30.0, p_duration(), "--breaker-window", live=True,
           help="the failures must fall within this time"),
    Option("upstream.breaker_cooldown", 30.0, p_duration(), "--breaker-cooldown", live=True,
           help="how long an open circuit refuses before letting one probe through"),
    Option("http.listen", [], p_addrs, "--listen", env="STREAMD_LISTEN",
           help="HOST:PORT for the direct HTTP front (repeatable; off when empty)"),
    Option("http.max_connections", 0, p_int(0), "--http-max-connections", live=True,
           help="connections the front may hold (its share of server.max_connections, which handoffs keep "
                "the rest of); more are answered 503 at once; 0: a quarter of server.max_connections"),
    Option("http.max_pending_per_address", 16, p_int(0), "--http-max-pending-per-address", live=True,
           help="connections one client address may hold that have not sent a whole request yet; more "
                "get 429 at once (trusted proxies are exempt); 0: no cap"),
    Option("http.api_keys_file", "", p_path_or_empty, "--api-keys", live=True,
           help="file of API keys, one per line (# comments); empty: no auth.  Re-read on SIGHUP"),
    Option("http.rate_limit", 100, p_int(0), "--rate-limit", live=True,
           help="stream requests per rate_window per API key (per client address without auth); 0: no limit"),
    Option("http.rate_window", 900.0, p_duration(), "--rate-window", live=True,
           help="the window of rate_limit (a token bucket: refills rate_limit per window)"),
    Option("http.max_streams_per_key", 10, p_int(0), "--max-streams-per-key", live=True,
           help="concurrent streams per API key (per client address without auth); 0: no cap"),
    Option("http.trusted_proxies", [], p_ips, "--trusted-proxies", live=True,
           help="proxies whose X-Forwarded-For names the client address (for limits and logs)"),
    Option("http.cors_origins", [], _parser("a list of origins (https://host[:port]) or *")(
           lambda v: [o.rstrip("/") for o in _str_list(v) if re.fullmatch(r"\*|https?://[^/\s]+/?", o) or _raise()]),
           "--cors-origins", live=True,
           help="web origins whose pages may call the front from the browser (CORS); * for any"),
    Option("http.request_timeout", 10.0, p_duration(), "--request-timeout", live=True,
           help="time for a client to send its whole request (or WebSocket request message); else 408"),
    Option("http.max_request_line", 8192, p_size, "--max-request-line", live=True,
           help="longest request line; longer gets 414"),
    Option("http.max_header_bytes", 16384, p_size, "--max-header-bytes", live=True,
           help="largest request header block; larger gets 431"),
    Option("http.max_headers", 64, p_int(1), "--max-headers", live=True,
           help="most request header lines; more gets 431"),
    Option("http.max_body_bytes", 128 * 1024, p_size, "--max-body-bytes", live=True,
           help="largest request body (413) and WebSocket message (close 1009)"),
    Option("http.demo_page", "", p_path_or_empty, "--demo-page", live=True,
           help="the page served at / (empty: demo.html next to streamd.py, inside streamd.pyz, or in "
                "{sys.prefix}/share/streamd); re-read on SIGHUP"),
    Option("metrics.listen_addr", "127.0.0.1:9090", p_addr, "--metrics-addr",
           help="HOST:PORT for /metrics and /healthz; empty disables"),
    Option("logging.level", "info", _parser("one of debug, info, warning (or warn), error")(
           lambda v: p_choice("debug", "info", "warning", "error")("warning" if str(v).lower() == "warn" else v)),
           "--log-level", live=True, help="debug, info, warning (or warn) or error"),
    Option("logging.format", "text", p_choice("text", "json"), "--log-format", live=True,
           help="text (logfmt) or json, one line per record"),
]
OPTION_BY_KEY = {o.key: o for o in OPTIONS}

# File descriptors kept back from max_connections: listener, selector, wakeup
# pair, logging, metrics, handoffs in flight, 503 answers while at capacity.
FD_RESERVE = 100


def parse_option(opt: Option, raw, source: str):
    """Parse one value; on failure raise ConfigError naming source, key and value."""
    try:
        return opt.parse(raw)
    except NestedValueError as e:
        raise ConfigError("%s: %s.%s: expected %s, got %s" % (source, opt.key, e.key, e.expect, _shown(e.value))) from None
    except (ValueError, TypeError, OverflowError):
        where = source if source.startswith("-") or source.isupper() else "%s: %s" % (source, opt.key)
        raise ConfigError("%s: expected %s, got %s" % (where, opt.parse.expect, _shown(raw))) from None


GO_FLAG_WARNINGS = []  # what go_flags() accepted but ignores, for load_config to pass on


def _ms(v):
    """A Go *_ms key: an integer of milliseconds, as our duration text."""
    if isinstance(v, bool) or not isinstance(v, int):
        return v  # (our parser names what is wrong)
    return "%dms" % v


def _go_http2(v):
    return ("true" if v else "false") if isinstance(v, bool) else v


# The Go reference daemon's config keys that streamd names otherwise, so that
# its config/example.yaml loads unchanged: Go key -> (streamd key, conversion).
GO_KEYS = {"server.max_stream_duration_ms": ("server.max_stream_duration", _ms),
           "backend.mock.message_delay_ms": ("backend.mock.message_delay", _ms),
           "metrics.enabled": ("metrics.enabled", None)}  # (false: no metrics listener; see load_config)
for _name in ("openai", "anthropic", "gemini", "langgraph"):
    GO_KEYS["backend.%s.http2_enabled" % _name] = ("backend.%s.http2" % _name, _go_http2)
# ... and the ones that tune Go's own runtime, or features streamd does otherwise:
# accepted, with one warning each.
GO_IGNORED = {"server.pprof_addr": "Go's profiler endpoint (for Python: py-spy)",
              "server.mem_limit": "a Go runtime setting (GOMEMLIMIT)",
              "server.gc_percent": "a Go runtime setting (GOGC)",
              "server.data_dir_max_age_ms": "streamd deletes each attachment once read",
              "backend.typing.use_api": "the typing backend types fortune's output",
              "backend.typing.default_model": "the typing backend types fortune's output"}


def _flatten(tree, path: str, prefix: str = "", warnings=None) -> dict:
    out = {}
    if not isinstance(tree, dict):
        raise ConfigError("%s: %s: expected a mapping, got %s" % (path, prefix or "top level", _shown(tree)))
    for k, v in tree.items():
        key = "%s.%s" % (prefix, k) if prefix else str(k)
        if key in OPTION_BY_KEY:
            out[key] = v
        elif key in GO_KEYS:
            ours, convert = GO_KEYS[key]
            out[ours] = convert(v) if convert else v
        elif key in GO_IGNORED:
            if warnings is not None:
                warnings.append("%s: %s: ignored (%s)" % (path, key, GO_IGNORED[key]))
        elif isinstance(v, dict) and any(o.startswith(key + ".") for o in list(OPTION_BY_KEY) + list(GO_KEYS)):
            out.update(_flatten(v, path, key, warnings))
        else:
            raise ConfigError("%s: %s: unknown key" % (path, key if _LOGFMT_BARE.fullmatch(key) else _shown(key)))
    return out


def _shown(value) -> str:
    """A value in an error message: its repr, cut to one short line.  reprlib
    stops at a few items and levels: a YAML alias bomb (a 477-byte file that
    expands to billions of items) is not expanded to be shown."""
    import reprlib
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 3, 4, 4, 60, 60
    shown = r.repr(value)
    return shown if len(shown) <= 80 else shown[:60] + "...(%d characters)" % len(shown)


MAX_CONFIG_BYTES = 1 << 20


def read_config_file(path: str, warnings=None) -> dict:
    """Read a YAML file into {dotted key: raw value}.  PyYAML is imported here,
    only when a config file is used: streamd.py alone runs without it.  What
    is accepted but ignored (the Go daemon's runtime knobs) goes to `warnings`."""
    try:
        import yaml
    except ImportError:
        raise ConfigError("%s: reading a config file needs PyYAML (pip install PyYAML)" % path) from None
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError("%s: cannot read: %s" % (path, e.strerror)) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError("%s: larger than %d bytes; is it the right file?" % (path, MAX_CONFIG_BYTES))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError("%s: not UTF-8: byte 0x%02x at line %d (save the file as UTF-8)"
                          % (path, raw[e.start], line)) from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = " at line %d" % (mark.line + 1) if mark else ""
        problem = str(getattr(e, "problem", None) or e).replace("\n", " ")
        raise ConfigError("%s: invalid YAML%s: %s" % (path, at, problem)) from None
    except RecursionError:
        raise ConfigError("%s: invalid YAML: nested too deeply" % path) from None
    except (ValueError, TypeError, OverflowError) as e:
        # What PyYAML's constructors raise for absurd values (an integer of 5,000 digits).
        raise ConfigError("%s: invalid YAML: a value that cannot be converted (%s)"
                          % (path, str(e).split(";")[0][:80])) from None
    return _flatten(tree if tree is not None else {}, path, warnings=warnings)


# systemd credentials (LoadCredential=): streamd.service loads the directory
# /etc/streamd/keys as credentials named keys_<file>.  A backend's key is the
# credential keys_<backend> (or <backend>, loaded by name); a profile's, the one
# its api_key_credential names.  Root owns the files; only the service's user
# can read systemd's copies, and nothing else of the key reaches the config.
CREDENTIAL_PREFIX = "keys_"
MAX_CREDENTIAL = 64 * 1024


def credential(name: str, env) -> str | None:
    """The text of credential `name` (keys_<name>, else <name>) in
    $CREDENTIALS_DIRECTORY, stripped; None without one.  Errors never show
    the contents."""
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    for cred in (CREDENTIAL_PREFIX + name, name):
        try:
            with open(os.path.join(directory, cred), "rb") as f:
                data = f.read(MAX_CREDENTIAL + 1)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise ConfigError("credential %s: cannot be read: %s" % (cred, e.strerror)) from None
        try:
            text = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            text = None
        if len(data) > MAX_CREDENTIAL or not text or not text.isprintable():
            raise ConfigError("credential %s: expected one line of printable text (an API key) of at most "
                              "%d bytes" % (cred, MAX_CREDENTIAL))
        return text
    return None


def apply_credentials(cfg: dict, origin: dict, env) -> None:
    """Backend keys and profile keys from systemd credentials (see credential())."""
    for name in ("openai", "anthropic", "gemini", "langgraph"):
        key = "backend.%s.api_key" % name
        text = credential(name, env)
        if text is not None:
            cfg[key], origin[key] = text, "credential " + name
        profs = cfg.get("backend.%s.profiles" % name) or {}
        if any("api_key_credential" in p for p in profs.values()):
            cfg["backend.%s.profiles" % name] = profs = {n: dict(p) for n, p in profs.items()}
            for pname, prof in profs.items():
                cred = prof.pop("api_key_credential", None)
                if cred is None:
                    continue
                text = credential(cred, env)
                if text is None:
                    raise ConfigError("backend.%s.profiles.%s.api_key_credential: no credential %r (nor %r) in "
                                      "$CREDENTIALS_DIRECTORY (%s)" % (name, pname, CREDENTIAL_PREFIX + cred, cred,
                                                                       env.get("CREDENTIALS_DIRECTORY") or "not set"))
                prof["api_key"] = text


def load_config(flags: dict | None = None, env=None, path: str | None = None) -> dict:
    """Build the config dict {dotted key: value}:
    defaults < file < systemd credentials < env < flags."""
    cfg = {o.key: o.default for o in OPTIONS}
    origin = {}  # key -> where its value came from, for errors that involve two keys
    warnings = list(GO_FLAG_WARNINGS)  # logged once logging is set up (see main)

    def where(key):
        src = origin.get(key)
        return "%s: %s" % (src, key) if src and not (src.startswith("-") or src.isupper()) else \
            "%s (%s)" % (key, src) if src else key

    if path:
        metrics_enabled = True
        for key, raw in read_config_file(path, warnings).items():
            if key == "metrics.enabled":  # the Go daemon's: false means no metrics listener at all
                metrics_enabled = parse_option(Option(key, True, p_bool), raw, path)
                continue
            cfg[key], origin[key] = parse_option(OPTION_BY_KEY[key], raw, path), path
        if not metrics_enabled:
            cfg["metrics.listen_addr"], origin["metrics.listen_addr"] = "", path
    env = os.environ if env is None else env
    apply_credentials(cfg, origin, env)
    for o in OPTIONS:
        if o.env and env.get(o.env):  # (set and not empty, as the Go daemon reads them too)
            raw = o.env_parse(env[o.env]) if o.env_parse else env[o.env]
            cfg[o.key], origin[o.key] = parse_option(o, raw, o.env), o.env
    for key, raw in (flags or {}).items():
        o = OPTION_BY_KEY[key]
        cfg[key], origin[key] = parse_option(o, raw, o.flag), o.flag
    if cfg["server.write_high_water"] > cfg["server.write_buffer_limit"]:
        raise ConfigError("%s (%d) must not exceed %s (%d)" % (
            where("server.write_high_water"), cfg["server.write_high_water"],
            where("server.write_buffer_limit"), cfg["server.write_buffer_limit"]))
    for key in ("backend.provider", "backend.enabled"):
        for name in cfg[key] if key == "backend.enabled" else [cfg[key]]:
            if name not in BACKENDS:
                raise ConfigError("%s: unknown backend %r (known: %s)"
                                  % (where(key), name[:40], ", ".join(sorted(BACKENDS))))
    cfg["config_path"] = path
    cfg["config_warnings"] = warnings
    return cfg


# ---- Logging ----
#
# stderr, one line per record: logfmt (`ts=… level=info msg="stream done" conn=17 …`)
# or JSON.  Call sites pass fields as keywords to log(); prompts, message contents
# and API keys are never among them.

logger = logging.getLogger("streamd")
LOG_CONTEXT = {}  # fields on every line, e.g. {"worker": 2} in a pre-forked worker
# A value is written bare only if it is printable ASCII without space, quote,
# "=" or backslash; anything else is quoted.  (fullmatch everywhere: "$" would
# also match before a trailing newline.)
_LOGFMT_BARE = re.compile(r"[!#-<>-\[\]-~]+")
# Characters json.dumps leaves raw that a terminal or a log viewer would act on
# (DEL, C1 controls, bidi overrides, line separators) or that cannot be UTF-8
# (lone surrogates): written as \uXXXX.  (json.dumps escapes U+0000-U+001F.)
_LOG_UNSAFE = re.compile("[\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]")
MAX_LOG_VALUE = 256  # characters of one field value; a client's 100 KB request_id is cut


def _escape_unsafe(text: str) -> str:
    return _LOG_UNSAFE.sub(lambda m: "\\u%04x" % ord(m.group()), text)


def _cap(s: str) -> str:
    return s if len(s) <= MAX_LOG_VALUE else "%s...[%d more]" % (s[:MAX_LOG_VALUE], len(s) - MAX_LOG_VALUE)


def _logfmt_value(v, cap: bool = True) -> str:
    if type(v) is int:
        return str(v)  # the common case: no quoting needed
    s = v if isinstance(v, str) else repr(v) if isinstance(v, float) else str(v)
    if cap:
        s = _cap(s)
    if s and _LOGFMT_BARE.fullmatch(s):
        return s
    return _escape_unsafe(json.dumps(s, ensure_ascii=False))


_ts_cache = [None, ""]


def _timestamp(created: float) -> str:
    """RFC 3339 UTC with milliseconds; the seconds part is formatted once per second."""
    sec = int(created)
    if _ts_cache[0] != sec:
        _ts_cache[0], _ts_cache[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return "%s.%03dZ" % (_ts_cache[1], (created - sec) * 1000)


class LogfmtFormatter(logging.Formatter):
    def format(self, record):
        ts = _timestamp(record.created)
        parts = ["ts=" + ts, "level=" + record.levelname.lower(), "msg=" + _logfmt_value(record.getMessage())]
        for k, v in itertools.chain(LOG_CONTEXT.items(), getattr(record, "fields", {}).items()):
            parts.append("%s=%s" % (k, _logfmt_value(v)))
        if record.exc_info:
            parts.append("exc=" + _logfmt_value(self.formatException(record.exc_info), cap=False))
        return " ".join(parts)


class JSONFormatter(logging.Formatter):
    def format(self, record):
        ts = _timestamp(record.created)
        obj = {"ts": ts, "level": record.levelname.lower(), "msg": record.getMessage()}
        obj.update(LOG_CONTEXT)
        for k, v in getattr(record, "fields", {}).items():
            obj[k] = _cap(v) if isinstance(v, str) else v
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return _escape_unsafe(json.dumps(obj, ensure_ascii=False, default=str))


# syslog priorities: under systemd, a line that starts "<3>" is an error in the
# journal (journalctl -p err), instead of every line at the unit's default.
_PRIORITY = {logging.DEBUG: "<7>", logging.INFO: "<6>", logging.WARNING: "<4>", logging.ERROR: "<3>",
             logging.CRITICAL: "<2>"}


class JournalPrefix(logging.Formatter):
    """Puts the record's syslog priority before the line another formatter made."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def format(self, record):
        return _PRIORITY.get(record.levelno, "<6>") + self.inner.format(record)


def stderr_is_the_journal(stream) -> bool:
    """systemd sets JOURNAL_STREAM=<device>:<inode> of the journal's socket;
    our stderr is that socket when both match (not when stderr was redirected)."""
    try:
        dev, ino = os.environ["JOURNAL_STREAM"].split(":")
        st = os.fstat(stream.fileno())
        return st.st_dev == int(dev) and st.st_ino == int(ino)
    except (KeyError, ValueError, OSError, AttributeError):
        return False


def setup_logging(level: str, fmt: str, stream=None) -> None:
    # We print none of these, so do not look them up for every record.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    formatter = JSONFormatter() if fmt == "json" else LogfmtFormatter()
    handler.setFormatter(JournalPrefix(formatter) if stderr_is_the_journal(stream) else formatter)
    logger.handlers[:] = [handler]
    logger.setLevel(getattr(logging, level.upper()))
    logger.propagate = False


def log(level: int, msg: str, exc_info=None, **fields) -> None:
    if logger.isEnabledFor(level):
        # makeRecord directly: Logger.log would walk the stack to find the
        # caller's file and line, which we never print (and which costs more
        # than formatting the whole line).
        if exc_info is True:
            exc_info = sys.exc_info()
        logger.handle(logger.makeRecord("streamd", level, "", 0, msg, (), exc_info, extra={"fields": fields}))


# ---- Wire protocol ----
#
# Everything here is pure: bytes in, values or bytes out, no sockets or clocks
# (h11's rule).  Tests feed these functions bytes directly.

# The handoff message carries at most this many fds before the kernel truncates
# the control data (MSG_CTRUNC).  Apache sends exactly one; making room for more
# lets us see and close extras instead of failing the whole handoff.
MAX_FDS = 16
_FD_SIZE = array.array("i").itemsize


def fds_from_ancillary(ancdata) -> list:
    """The fds in a recvmsg() control list (every SCM_RIGHTS cmsg, in order)."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % _FD_SIZE])
    return list(fds)


class Request:
    """The handoff data (README "Handoff data"), validated.  Unknown keys are ignored."""

    __slots__ = ("prompt", "messages", "system", "model", "max_tokens", "temperature", "top_p",
                 "user_id", "request_id", "backend", "test_pattern", "response_headers",
                 "dropped_headers", "include_usage", "include_reasoning", "thread_id", "assistant_id",
                 "langgraph_input", "stream_mode", "tools", "tool_choice", "profile",
                 "attachments", "attachment_types", "image_paths", "images", "files")

    def __init__(self):
        self.prompt = self.messages = self.system = self.model = self.max_tokens = None
        self.temperature = self.top_p = self.user_id = self.request_id = self.backend = None
        self.test_pattern = self.thread_id = self.assistant_id = self.profile = None
        self.langgraph_input = self.stream_mode = self.tools = self.tool_choice = None
        self.attachments = self.attachment_types = self.image_paths = None
        self.images = ()   # [(mime, base64)] given inline (the Go daemon's "images")
        self.files = None  # the attachments, read: {ref: (mime, bytes or text)} (see Attachments)
        self.response_headers = self.dropped_headers = ()
        self.include_usage = self.include_reasoning = False

    def conversation(self) -> list:
        """The conversation as [Message]: `messages` if given, else `prompt` as
        one user message; the attachments and images (once read) are parts of
        the last user message."""
        if self.messages:
            out = [Message.from_object(m) for m in self.messages]
        else:
            out = [Message("user", [("text", self.prompt or "")])]
        if self.files or self.images:
            for m in reversed(out):
                if m.role == "user":
                    m.parts = place_attachments(m.text(), self.files or {}, self.images)
                    break
        return out

    def heavy(self) -> bool:
        """Carries attachments or images: its upstream body may be megabytes
        (encoded on a helper thread, not on the loop)."""
        return bool(self.files or self.images)

    def last_user_text(self) -> str:
        for m in reversed(self.conversation()):
            if m.role == "user":
                return m.text()
        return ""


class Message:
    """One message, in the neutral form every backend translates from:
    role ("system", "user", "assistant", "tool" or another the client named),
    parts [("text", str) | ("image", mime, base64) | ("document", mime, base64, name)],
    tool_calls [(id, name, arguments JSON text, extra_content)] (assistant),
    tool_call_id (tool).  extra_content is what a provider needs back with
    the call, as streamd's tool_call event gave it to the client: Gemini's
    {"google": {"thought_signature"}}, Anthropic's {"anthropic":
    {"thinking_blocks"}} (the turn's signed thinking)."""

    __slots__ = ("role", "parts", "tool_calls", "tool_call_id")

    def __init__(self, role, parts, tool_calls=(), tool_call_id=None):
        self.role, self.parts, self.tool_calls, self.tool_call_id = role, parts, tool_calls, tool_call_id

    @classmethod
    def from_object(cls, m: dict):
        content = m.get("content")
        if content is None:
            parts = []
        elif isinstance(content, str):
            parts = [("text", content)]
        else:
            parts = [("text", p["text"]) for p in content]
        calls = [(c["id"], c["function"]["name"], c["function"].get("arguments") or "{}", c.get("extra_content") or {})
                 for c in m.get("tool_calls") or ()]
        return cls(m["role"], parts, calls, m.get("tool_call_id"))

    def text(self) -> str:
        return "".join(p[1] for p in self.parts if p[0] == "text")


    def only_text(self) -> bool:
        return all(p[0] == "text" for p in self.parts)


_SURROGATE = re.compile("[\ud800-\udfff]")

# Limits on what a client's JSON may be (handoff data, a POST body, a
# WebSocket message, ?messages=, a tool call's arguments).  Python's json
# recurses until RecursionError on "[[[[…", and int() of a 5,000-digit number
# raises (and is slow): both are refused before they can cost anything.
MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 40
MAX_MESSAGES = 1000     # entries in `messages`
MAX_NAME_LENGTH = 1024  # model, backend, request_id, thread_id, ...: they go into URLs, headers, logs


def _type_name(v) -> str:
    if isinstance(v, str) and _SURROGATE.search(v):
        return "a string with a lone surrogate escape"
    if isinstance(v, str) and len(v) > MAX_NAME_LENGTH:
        return "a string of %d characters" % len(v)
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "integer", float: "number"}.get(type(v), type(v).__name__)


def _check_str(v):
    return isinstance(v, str)


def _check_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _check_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_name(v):
    """A string that goes into a URL, a header or a log line: it must be
    encodable, so no lone surrogate (JSON allows "\\ud800"; UTF-8 does not),
    and of a sane length."""
    return isinstance(v, str) and len(v) <= MAX_NAME_LENGTH and not _SURROGATE.search(v)


_NAME = "a string of at most %d characters" % MAX_NAME_LENGTH


_FIELD_CHECKS = {
    # name: (check, what the client should have sent)
    "prompt": (_check_str, "a string"),
    "system": (_check_str, "a string"),
    "model": (_check_name, _NAME),
    "request_id": (_check_name, _NAME),
    "backend": (_check_name, _NAME),
    "test_pattern": (lambda v: _check_name(v) and not _CONTROL.search(v),
                     _NAME + " without control characters (it becomes an upstream header)"),
    "thread_id": (_check_name, _NAME),
    "assistant_id": (_check_name, _NAME),
    "max_tokens": (lambda v: _check_int(v) and v >= 1, "an integer >= 1"),
    "temperature": (_check_number, "a number"),
    "top_p": (_check_number, "a number"),
    "user_id": (lambda v: _check_int(v) or isinstance(v, str), "an integer or a string"),
    "include_usage": (lambda v: isinstance(v, bool), "true or false"),
    "include_reasoning": (lambda v: isinstance(v, bool), "true or false"),
    "profile": (_check_name, _NAME),
    "langgraph_input": (lambda v: isinstance(v, dict), "an object"),
    "stream_mode": (lambda v: isinstance(v, str) or (isinstance(v, list) and v and all(
        isinstance(s, str) for s in v)), "a string or a list of strings"),
}

# RFC 9110 token characters, for response header names.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # used with fullmatch, never with "$"
# Controls other than HTAB may not appear in a header value (no CR/LF: no injection).
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Headers a handoff may not set: ours, framing ones, and hop-by-hop ones.
BLOCKED_HEADERS = frozenset((
    "content-type", "cache-control", "connection", "x-accel-buffering", "content-length",
    "transfer-encoding", "content-encoding", "keep-alive", "upgrade", "te", "trailer"))


def validate_headers(obj) -> tuple:
    """Split `response_headers` into ([(name, value)] kept, [name] dropped)."""
    kept, dropped = [], []
    for name, value in obj.items():
        lname = name.lower()
        if (not isinstance(value, str) or not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value)
                or lname in BLOCKED_HEADERS
                or lname.startswith("proxy-")):
            dropped.append(name)
        else:
            kept.append((name, value))
    return kept, dropped


def _bad(field: str, expected: str, value) -> ProtocolError:
    # Name the field and the type received, never the value: it may be a prompt.
    return ProtocolError(400, "%s: expected %s, got %s" % (field, expected, _type_name(value)))


def _parse_messages(value) -> list:
    """OpenAI's chat shape: {role, content} where content is a string, a list
    of text parts, or (an assistant calling tools) null; an assistant's
    tool_calls [{id, type: function, function: {name, arguments}}]; a tool
    result {role: tool, tool_call_id, content}."""
    if not isinstance(value, list):
        raise _bad("messages", "a list of {role, content} objects", value)
    if len(value) > MAX_MESSAGES:
        raise ProtocolError(400, "messages: %d entries, more than the limit of %d" % (len(value), MAX_MESSAGES))
    for i, m in enumerate(value):
        where = "messages[%d]" % i
        if not isinstance(m, dict):
            raise _bad(where, "an object with role and content", m)
        role = m.get("role")
        if not isinstance(role, str) or not role or not _check_name(role):
            raise _bad(where + ".role", "a non-empty string", role)
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and isinstance(part.get("text"), str)
                        and part.get("type", "text") == "text"):
                    raise _bad("%s.content[%d]" % (where, j), 'a text part {"type":"text","text":...}', part)
        elif not isinstance(content, str) and not (content is None and m.get("tool_calls")):
            raise _bad(where + ".content", "a string or a list of text parts", content)
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise ProtocolError(400, "%s.tool_calls: only an assistant message calls tools" % where)
            _parse_tool_calls(calls, where + ".tool_calls")
        if role == "tool" and not _check_name(m.get("tool_call_id")):
            raise _bad(where + ".tool_call_id", "the id of the tool call this answers (" + _NAME + ")",
                       m.get("tool_call_id"))
    return value


MAX_TOOLS = 128  # tools offered, and tool calls in one message
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # (what OpenAI, Anthropic and Gemini all accept)


def _parse_tool_calls(calls, where: str) -> None:
    if not isinstance(calls, list) or len(calls) > MAX_TOOLS:
        raise _bad(where, "a list of at most %d tool calls" % MAX_TOOLS, calls)
    for j, c in enumerate(calls):
        at = "%s[%d]" % (where, j)
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict):
            raise _bad(at, '{"id": ..., "type": "function", "function": {"name": ..., "arguments": ...}}', c)
        if not _check_name(c.get("id")):
            raise _bad(at + ".id", _NAME, c.get("id"))
        if not (isinstance(fn.get("name"), str) and _TOOL_NAME.fullmatch(fn["name"])):
            raise _bad(at + ".function.name", "a tool name (letters, digits, _ and -; 1 to 64)", fn.get("name"))
        if not isinstance(fn.get("arguments", ""), str):
            raise _bad(at + ".function.arguments", "the arguments as a JSON text (a string)", fn.get("arguments"))
        if not isinstance(c.get("extra_content", {}), dict):
            raise _bad(at + ".extra_content", "an object, as streamd's tool_call event gave it", c["extra_content"])


def _parse_tools(value) -> list:
    """OpenAI's function tools: [{"type": "function", "function": {name,
    description, parameters}}], kept in that shape."""
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise _bad("tools", "a list of at most %d function tools" % MAX_TOOLS, value)
    for i, t in enumerate(value):
        where = "tools[%d]" % i
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or t.get("type", "function") != "function":
            raise _bad(where, '{"type": "function", "function": {"name": ..., "parameters": {...}}}', t)
        if not (isinstance(fn.get("name"), str) and _TOOL_NAME.fullmatch(fn["name"])):
            raise _bad(where + ".function.name", "a tool name (letters, digits, _ and -; 1 to 64)", fn.get("name"))
        if not isinstance(fn.get("description", ""), str):
            raise _bad(where + ".function.description", "a string", fn.get("description"))
        if not isinstance(fn.get("parameters", {}), dict):
            raise _bad(where + ".function.parameters", "a JSON Schema object", fn.get("parameters"))
    return value


def _parse_tool_choice(value, tools):
    """"auto", "none", "required", or {"type": "function", "function": {"name"}}
    naming one of the tools."""
    if value in ("auto", "none", "required"):
        return value
    fn = value.get("function") if isinstance(value, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise _bad("tool_choice", '"auto", "none", "required" or {"type": "function", "function": {"name": ...}}',
                   value)
    if fn["name"] not in {t["function"]["name"] for t in tools or ()}:
        raise ProtocolError(400, "tool_choice: %r is not one of the tools" % fn["name"][:128])
    return value


def _parse_attachments(obj: dict, req) -> None:
    """The Go daemon's fields, so that PHP written for it works unchanged:
    attachments {ref: file name in data_dir}, attachment_types {ref: MIME},
    images [{base64, mime_type}], and its older image_paths, image_path,
    image_base64, image_mime_type.  Files are read later (Attachments)."""
    for field in ("attachments", "attachment_types"):
        v = obj.get(field)
        if v is None:
            continue
        if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
            raise _bad(field, "an object of strings {ref: %s}" % ("file name" if field == "attachments" else "MIME type"), v)
        if len(v) > MAX_ATTACHMENTS:
            raise ProtocolError(400, "%s: more than %d entries" % (field, MAX_ATTACHMENTS))
        for ref, x in v.items():
            if not _REF.fullmatch(ref):
                raise ProtocolError(400, "%s: ref %r is not a name (letters, digits, _.-)" % (field, ref[:64]))
            if not _check_path(x):
                raise ProtocolError(400, "%s: %s: expected %s" % (field, ref, _PATH))
        setattr(req, field, v)
    paths = obj.get("image_paths") or ([obj["image_path"]] if isinstance(obj.get("image_path"), str) else [])
    if not (isinstance(paths, list) and len(paths) <= MAX_ATTACHMENTS and all(isinstance(p, str) for p in paths)):
        raise _bad("image_paths", "a list of at most %d file paths in data_dir" % MAX_ATTACHMENTS, paths)
    if not all(_check_path(p) for p in paths):
        raise ProtocolError(400, "image_paths: expected %s" % _PATH)
    req.image_paths = paths or None
    images = obj.get("images")
    if isinstance(obj.get("image_base64"), str):
        images = list(images or []) + [{"base64": obj["image_base64"], "mime_type": obj.get("image_mime_type")}]
    if images is not None:
        if not isinstance(images, list) or len(images) > MAX_ATTACHMENTS:
            raise _bad("images", "a list of at most %d {base64, mime_type} objects" % MAX_ATTACHMENTS, images)
        out = []
        for i, im in enumerate(images):
            b64 = im.get("base64") if isinstance(im, dict) else None
            mime = (im.get("mime_type") if isinstance(im, dict) else None) or "image/jpeg"
            if not isinstance(b64, str) or not isinstance(mime, str) or not _BASE64.fullmatch(b64):
                raise _bad("images[%d]" % i, "{base64: <base64 text>, mime_type: image/...}", im)
            if mime not in IMAGE_TYPES.values():
                raise ProtocolError(400, "images[%d]: unsupported image type %r" % (i, mime[:64]))
            out.append((mime, b64))
        req.images = out


MAX_ATTACHMENTS = 32
_PATH = "a file path of at most 4096 characters, without NUL or a lone surrogate"


def _check_path(v) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 4096 and "\0" not in v and not _SURROGATE.search(v)
_REF = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


class ClientJSONError(ValueError):
    """JSON we refuse although Python would parse it: NaN, Infinity, a number
    too large for a float (1e400), an integer longer than MAX_INT_DIGITS, or
    nesting deeper than MAX_JSON_DEPTH."""


def _not_json(name):
    raise ClientJSONError("%s is not a JSON number" % name)


def _finite(text):
    v = float(text)
    if v != v or v in (float("inf"), float("-inf")):
        raise ClientJSONError("%s is out of range" % text[:20])
    return v


def _bounded_int(text):
    if len(text) > MAX_INT_DIGITS:
        raise ClientJSONError("an integer of %d digits is too long" % len(text))
    return int(text)


def json_depth_over(obj, limit: int = MAX_JSON_DEPTH) -> bool:
    """Do the arrays and objects of a parsed value nest deeper than `limit`?
    A walk with a stack (no recursion), so its cost is the number of values."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        if depth > limit:
            return True
        stack.extend((v, depth + 1) for v in value if isinstance(v, (dict, list)))
    return False


def loads_client_json(data):
    """json.loads for what clients send: RFC 8259 only, so no NaN or Infinity,
    and no number that becomes one (1e400); nothing non-finite can reach an
    upstream request body.  Nesting and integer length are bounded (above).
    Raises ValueError."""
    if isinstance(data, (bytes, bytearray)):
        # UTF-8 only: json.loads(bytes) would also take UTF-16 and UTF-32
        # (by their BOM) and UTF-8-encoded surrogates.
        data = data.decode("utf-8")
    try:
        obj = json.loads(data, parse_constant=_not_json, parse_float=_finite, parse_int=_bounded_int)
    except RecursionError:  # (the C decoder gives up cleanly, at Python's recursion limit)
        obj = None
        deep = True
    else:  # (more brackets than the limit at all is rare: only then walk the value)
        deep = data.count("[") + data.count("{") > MAX_JSON_DEPTH and json_depth_over(obj)
    if deep:
        raise ClientJSONError("nested deeper than %d levels (the limit)" % MAX_JSON_DEPTH)
    return obj


def parse_handoff(data: bytes) -> Request:
    """Parse the X-Handoff-Data bytes; raise ProtocolError(400) naming the field.

    Empty data, the one-byte NUL placeholder Apache sends when PHP set no header,
    and whitespace all mean "serve with defaults"."""
    req = Request()
    data = data.strip(b"\x00 \t\r\n")
    if not data:
        return req
    try:
        obj = loads_client_json(data)
    except (ValueError, RecursionError) as e:
        # ValueError includes invalid UTF-8; the position is safe to show, the text is not.
        if isinstance(e, UnicodeDecodeError):
            raise ProtocolError(400, "handoff data is not valid UTF-8 (at byte %d)" % e.start) from None
        if isinstance(e, json.JSONDecodeError):
            where = " at character %d" % e.pos
        elif isinstance(e, ClientJSONError):
            where = ": " + str(e)  # the number or the limit, never the text around it
        else:
            where = ""
        raise ProtocolError(400, "handoff data is not valid JSON%s" % where) from None
    if not isinstance(obj, dict):
        raise ProtocolError(400, "handoff data: expected a JSON object, got %s" % _type_name(obj))
    return request_from_object(obj)


# Every key of the handoff data (and, below, of its messages, tool calls and
# images), for matching keys as the Go daemon does: Go's encoding/json takes a
# key that differs only in case ("Prompt", "USER_ID"), the last one winning.
HANDOFF_KEYS = frozenset(("prompt", "messages", "system", "model", "max_tokens", "temperature", "top_p", "user_id",
                          "request_id", "backend", "test_pattern", "response_headers", "include_usage",
                          "include_reasoning", "thread_id", "assistant_id", "langgraph_input", "stream_mode",
                          "tools", "tool_choice", "profile", "lg", "langgraph_url", "langgraph_api_key",
                          "attachments", "attachment_types", "images", "image_paths", "image_path", "image_base64",
                          "image_mime_type", "timestamp"))
MESSAGE_KEYS = frozenset(("role", "content", "tool_calls", "tool_call_id", "name"))
PART_KEYS = frozenset(("type", "text", "id", "function", "extra_content", "arguments", "base64", "mime_type",
                       "parameters", "description"))
_FOLDED = {k.casefold(): k for k in HANDOFF_KEYS | MESSAGE_KEYS | PART_KEYS}


def fold_keys(obj: dict, known) -> dict:
    """`obj` with each key that matches a known one only when case is ignored
    renamed to it.  The common case, every key exact, costs one set check."""
    if all(k in known for k in obj):
        return obj
    out = {}
    for k, v in obj.items():
        name = k if k in known else _FOLDED.get(k.casefold(), k) if isinstance(k, str) else k
        out.pop(name, None)  # (the last one wins, as in Go)
        out[name] = v
    return out


def _fold_list(items, known):
    return [fold_keys(x, known) if isinstance(x, dict) else x for x in items] if isinstance(items, list) else items


def request_from_object(obj: dict) -> Request:
    """Validate the fields of a handoff-data object (also a direct request's body)."""
    obj = fold_keys(obj, HANDOFF_KEYS)
    for field, known in (("messages", MESSAGE_KEYS), ("images", PART_KEYS), ("tools", PART_KEYS)):
        if isinstance(obj.get(field), list):
            obj[field] = _fold_list(obj[field], known)
    if isinstance(obj.get("messages"), list):
        for m in obj["messages"]:
            if isinstance(m, dict):
                for field in ("content", "tool_calls"):
                    if isinstance(m.get(field), list):
                        m[field] = _fold_list(m[field], PART_KEYS)
                for c in m.get("tool_calls") or () if isinstance(m.get("tool_calls"), list) else ():
                    if isinstance(c, dict) and isinstance(c.get("function"), dict):
                        c["function"] = fold_keys(c["function"], PART_KEYS)
    req = Request()
    for name, value in obj.items():  # only the keys present: usually two or three
        rule = _FIELD_CHECKS.get(name)
        if rule is not None and value is not None:
            if not rule[0](value):
                raise _bad(name, rule[1], value)
            setattr(req, name, value)
    if obj.get("messages") is not None:
        req.messages = _parse_messages(obj["messages"]) or None
    if obj.get("tools") is not None:
        req.tools = _parse_tools(obj["tools"]) or None
    if obj.get("tool_choice") is not None:
        req.tool_choice = _parse_tool_choice(obj["tool_choice"], req.tools)
    for field in ("langgraph_url", "langgraph_api_key"):
        if obj.get(field):
            raise ProtocolError(400, "%s: per-request upstream URLs and keys are not accepted; "
                                "name a configured profile instead" % field)
    lg = obj.get("lg")
    if lg is not None:  # the Go daemon's "profile|url|key"; only the profile is taken
        parts = lg.split("|") if isinstance(lg, str) else None
        if parts is None or any(parts[1:]):
            raise ProtocolError(400, "lg: only a profile name is accepted (\"profile||\"), "
                                "not per-request URLs or keys")
        if parts[0] and req.profile is None:
            req.profile = parts[0]
    _parse_attachments(obj, req)
    headers = obj.get("response_headers")
    if headers is not None:
        if not isinstance(headers, dict):
            raise _bad("response_headers", "an object of strings", headers)
        req.response_headers, req.dropped_headers = validate_headers(headers)
    if isinstance(req.stream_mode, str):
        req.stream_mode = [req.stream_mode]
    return req


REASONS = {101: "Switching Protocols", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
           413: "Content Too Large", 414: "URI Too Long", 426: "Upgrade Required", 429: "Too Many Requests",
           431: "Request Header Fields Too Large", 500: "Internal Server Error", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported"}
ERROR_KINDS = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 408: "request_timeout", 411: "length_required",
               413: "request_too_large", 414: "uri_too_long", 426: "upgrade_required", 429: "rate_limited",
               431: "headers_too_large", 500: "internal_error", 502: "upstream_error", 503: "unavailable",
               504: "upstream_timeout", 505: "http_version_not_supported"}

HEAD_200 = (b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\n"
            b"Connection: close\r\n"
            b"X-Accel-Buffering: no\r\n")


def response_head(extra_headers=()) -> bytes:
    """The 200 head of an event stream, with any validated extra headers."""
    if not extra_headers:
        return HEAD_200 + b"\r\n"
    extra = "".join("%s: %s\r\n" % (n, v) for n, v in extra_headers).encode("utf-8", "replace")
    return HEAD_200 + extra + b"\r\n"


def _dumps(obj) -> bytes:
    # Compact, UTF-8 (not \u-escaped).  A lone surrogate cannot be UTF-8: replace it.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")


def http_response(status: int, content_type: str, body: bytes, headers=()) -> bytes:
    """A complete response with a body, closing the connection."""
    extra = "".join("%s: %s\r\n" % h for h in headers)
    return ("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n"
            % (status, REASONS.get(status, "Error"), content_type, len(body), extra)).encode("latin-1") + body


def error_response(status: int, message: str, kind: str | None = None,
                   retry_after: int | None = None, headers=(), fmt: str = "streamd") -> bytes:
    """A complete JSON error response, sent when no stream has started.
    fmt "go": {"error": "<message>"}, the shape the Go daemon's clients read."""
    if fmt == "go":
        body = _dumps({"error": message})
    else:
        body = _dumps({"error": {"type": kind or ERROR_KINDS.get(status, "error"), "message": message}})
    if retry_after is not None:
        headers = (("Retry-After", retry_after),) + tuple(headers)
    return http_response(status, "application/json", body, headers)


def sse_event(obj) -> bytes:
    """`data: <json>` plus the blank line that ends an SSE event."""
    return b"data: " + _dumps(obj) + b"\n\n"


def sse_error(kind: str, message: str, fmt: str = "streamd") -> bytes:
    """The error event that ends a failed stream (fmt: see error_response)."""
    return sse_event({"error": message} if fmt == "go" else {"error": {"type": kind, "message": message}})


SSE_DONE = b"data: [DONE]\n\n"
SSE_PING = b": ping\n\n"


# ---- Attachments ----
#
# The Go daemon's way, so that PHP written for it works unchanged: PHP writes
# files into server.data_dir and names them in the handoff (`attachments`:
# {ref: file name}); streamd reads each one, deletes it, and puts it where the
# prompt says `{ref}`: text files inline, images and PDFs as parts of the
# message.  Reading happens on a helper thread (the loop never touches the
# disk), and nothing outside data_dir is ever opened: each path component is
# opened relative to the one before with O_NOFOLLOW, so "..", absolute paths
# and symlinks cannot lead out.

TEXT_TYPES = {".txt": "text/plain", ".md": "text/markdown", ".csv": "text/csv", ".json": "application/json",
              ".xml": "application/xml", ".html": "text/html", ".yaml": "application/yaml",
              ".yml": "application/yaml", ".log": "text/plain"}
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".webp": "image/webp"}
DOCUMENT_TYPES = {".pdf": "application/pdf"}
_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_.-]{1,64})\}")


class AttachmentError(BackendError):
    """An attachment the handoff names cannot be used: 400, naming the ref."""

    def __init__(self, ref: str, why: str):
        super().__init__("attachment %r: %s" % (ref, why), status=400, kind="invalid_request", reason="bad_request")


def attachment_kind(mime: str) -> str:
    """"text", "image" or "document" for a MIME type, "" if unsupported."""
    mime = mime.split(";", 1)[0].strip().lower()
    if mime.startswith("text/") or mime in ("application/json", "application/xml", "application/yaml"):
        return "text"
    if mime in IMAGE_TYPES.values():
        return "image"
    return "document" if mime in DOCUMENT_TYPES.values() else ""


def read_attachments(req, cfg) -> dict:
    """Runs on a helper thread.  {ref: (kind, mime, text or base64, file name)}
    for req.attachments (and the legacy req.image_paths); AttachmentError
    (400) for a path outside data_dir, a missing or special file, an
    unsupported type, invalid UTF-8 text, or a size over the limits."""
    root = cfg["server.data_dir"]
    names = _named_files(req, root)
    try:
        return _read_all(names, req, cfg)
    except AttachmentError:
        discard_attachments(req, cfg)  # (the ones not read yet: nobody else will)
        raise


def _read_all(names: dict, req, cfg) -> dict:
    import base64
    root = cfg["server.data_dir"]
    types = req.attachment_types or {}
    total, out = 0, {}
    for ref, path in names.items():
        mime = types.get(ref) or _type_by_extension(path)
        if not mime:
            raise AttachmentError(ref, "unknown type (name it in attachment_types)")
        kind = attachment_kind(mime)
        if not kind:
            raise AttachmentError(ref, "unsupported type %r" % mime[:64])
        limit = cfg["server.max_text_attachment_bytes"] if kind == "text" else cfg["server.max_attachment_bytes"]
        data = _read_inside(root, path, ref, min(limit, cfg["server.max_attachments_bytes"] - total))
        total += len(data)
        if kind == "text":
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                raise AttachmentError(ref, "not valid UTF-8 text") from None
            out[ref] = (kind, mime, text, os.path.basename(path))
        else:
            out[ref] = (kind, mime, base64.b64encode(data).decode("ascii"), os.path.basename(path))
    return out


def _type_by_extension(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    return TEXT_TYPES.get(ext) or IMAGE_TYPES.get(ext) or DOCUMENT_TYPES.get(ext) or ""


def _walk_to(root: str, path: str, ref: str):
    """(fd of the directory that holds `path`'s file, the file's name): each
    component of data_dir/path opened relative to the one before with
    O_NOFOLLOW, none of them "..", "." or empty.  The caller closes the fd."""
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise AttachmentError(ref, "the path must be a file name inside data_dir (no '..', not absolute)")
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        d = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))  # (data_dir itself may be a link)
    except OSError as e:
        raise AttachmentError(ref, "data_dir cannot be opened: %s" % e.strerror) from None
    try:
        for part in parts[:-1]:
            try:
                nd = os.open(part, flags | os.O_DIRECTORY, dir_fd=d)
            except OSError as e:
                raise AttachmentError(ref, "a symlink or not a directory on the way" if e.errno in (
                    errno.ELOOP, errno.ENOTDIR) else "cannot open: %s" % e.strerror) from None
            os.close(d)
            d = nd
    except BaseException:
        os.close(d)
        raise
    return d, parts[-1]


def _read_inside(root: str, path: str, ref: str, limit: int) -> bytes:
    """Read data_dir/path (see _walk_to), a regular file with one link, then delete it."""
    d, name = _walk_to(root, path, ref)
    try:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), dir_fd=d)
        except OSError as e:
            raise AttachmentError(ref, "not found" if e.errno == errno.ENOENT else "a symlink"
                                  if e.errno == errno.ELOOP else "cannot open: %s" % e.strerror) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise AttachmentError(ref, "not a regular file")
            if st.st_nlink > 1:  # (a hard link could point at a file that lives elsewhere)
                raise AttachmentError(ref, "a file with more than one link")
            if st.st_size > limit:
                _unlink(name, d)
                raise AttachmentError(ref, "%d bytes, over the limit of %d" % (st.st_size, limit))
            chunks, n = [], 0
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                n += len(chunk)
                if n > limit:  # (it grew while we read)
                    _unlink(name, d)
                    raise AttachmentError(ref, "over the limit of %d bytes" % limit)
                chunks.append(chunk)
        finally:
            os.close(fd)
        _unlink(name, d)  # read: PHP's file is ours to remove
        return b"".join(chunks)
    finally:
        os.close(d)


def discard_attachments(req, cfg) -> None:
    """Delete what a handoff named and streamd will not read (it was refused,
    or another of its attachments was): best effort, inside data_dir only.
    Runs on a helper thread."""
    root = cfg["server.data_dir"]
    for ref, path in _named_files(req, root).items():
        try:
            d, name = _walk_to(root, path, ref)
        except AttachmentError:
            continue
        try:
            _unlink(name, d)
        finally:
            os.close(d)


def _named_files(req, root: str) -> dict:
    """{ref: path relative to data_dir} of the attachments and the legacy
    image_paths (the Go daemon took absolute paths there, inside data_dir;
    one outside stays absolute, and _walk_to refuses it)."""
    names = dict(req.attachments or {})
    for i, path in enumerate(req.image_paths or ()):
        if path.startswith(root.rstrip("/") + "/"):
            path = path[len(root.rstrip("/")) + 1:]
        names.setdefault("image_paths[%d]" % i, path)
    return names


def _unlink(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass  # best effort (read-only data_dir, or removed already)


def place_attachments(text: str, files: dict, images) -> list:
    """The parts of the last user message: `{ref}` in its text replaced by
    that attachment (text inline, images and documents as parts), at its
    first placeholder only (a later `{ref}` of the same one stays as it is: a
    prompt of 30,000 placeholders must not become 30,000 copies); a `{name}`
    that is no attachment stays literal text; attachments the text does not
    mention, then inline images, come before the text."""
    placed, parts = set(), []
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        ref = m.group(1)
        if ref not in files or ref in placed:
            continue
        parts.append(("text", text[pos:m.start()]))
        parts.append(_part(files[ref]))
        placed.add(ref)
        pos = m.end()
    parts.append(("text", text[pos:]))
    before = [_part(f) for ref, f in files.items() if ref not in placed]
    before += [("image", mime, b64) for mime, b64 in images]
    out, texts = [], []  # neighbouring text is joined (once: "".join, not + in a loop)
    for p in before + parts:
        if p[0] == "text":
            texts.append(p[1])
            continue
        if texts and "".join(texts):
            out.append(("text", "".join(texts)))
        texts = []
        out.append(p)
    if texts and "".join(texts):
        out.append(("text", "".join(texts)))
    return out or [("text", "")]


def _part(f):
    kind, mime, data, name = f
    if kind == "text":
        return ("text", data)
    return ("image", mime, data) if kind == "image" else ("document", mime, data, name)


def files_first(run, req, cfg):
    """A backend generator that first reads the attachments (on a helper
    thread), then runs `run`.  Every backend gets them this way, the mock
    too: the files are deleted whichever backend serves the request (and
    Daemon.release discards them for a request that never got this far)."""
    req.files = {}  # (claimed: from here the files are read or discarded by this)
    req.files = yield ("call", lambda: read_attachments(req, cfg), ATTACHMENT_READ_TIMEOUT,
                       None)
    return (yield from run(req, cfg))


ATTACHMENT_READ_TIMEOUT = 30.0


# ---- Direct HTTP front: the request parser and WebSocket framing ----
#
# Pure like the rest of the wire protocol: RequestParser is fed bytes as they
# arrive and answers "need more", a complete HTTPRequest, or raises HTTPError
# with the status to send.  WSParser does the same for WebSocket frames.  The
# loop side (HTTPFront, WSConnection) is further down, after the Connection.

class HTTPError(StreamdError):
    """A request we refuse: answered with `status` and closed."""

    def __init__(self, status: int, message: str, headers=()):
        super().__init__(message)
        self.status, self.headers = status, tuple(headers)


class HTTPRequest:
    __slots__ = ("method", "target", "path", "query", "version", "headers", "body")

    def __init__(self, method, target, path, query, version, headers, body=b""):
        self.method, self.target, self.path, self.query = method, target, path, query
        self.version, self.headers, self.body = version, headers, body

    def header(self, name: str, default: str | None = None):
        return self.headers.get(name, default)

    def header_tokens(self, name: str) -> list:
        """A comma-separated header as lower-case tokens (Connection, Upgrade)."""
        return [t.strip().lower() for t in self.headers.get(name, "").split(",") if t.strip()]


_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_ABSOLUTE_FORM = re.compile(r"https?://[^/?#]+", re.IGNORECASE)
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")  # "%" not followed by two hex digits


class RequestParser:
    """A strict HTTP/1.1 request parser (RFC 9112), one request per connection.

    feed(bytes) returns None until the request is complete, then the
    HTTPRequest; raises HTTPError on anything malformed or over a limit:
    400 syntax, 411 a body without Content-Length, 413 body too large,
    414 request line too long, 431 headers too large or too many, 505 not
    HTTP/1.x.  Lenient only where RFC 9112 says a server should be: a bare LF
    ends a line, and empty lines before the request line are skipped."""

    EMPTY_LINES = 8  # blank lines tolerated before the request line

    def __init__(self, max_line=8192, max_header_bytes=16384, max_headers=64, max_body=131072):
        self.max_line, self.max_header_bytes = max_line, max_header_bytes
        self.max_headers, self.max_body = max_headers, max_body
        self.buf = bytearray()
        self.received = 0       # bytes fed so far
        self.scan = 0           # where to look for the next LF in buf
        self.line = None        # (method, target, version) once the request line is in
        self.fields = []        # [(lower-case name, value)]
        self.head_bytes = 0     # bytes of header lines so far
        self.blank = 0
        self.length = None      # Content-Length, once the head is complete
        self.request = None     # the HTTPRequest, once the head is complete
        self.complete = False

    def feed(self, data: bytes):
        if self.complete:
            return self.request  # a second request (pipelining) is never read
        self.received += len(data)
        self.buf += data
        while self.length is None:
            nl = self.buf.find(b"\n", self.scan)
            if nl < 0:
                self.scan = len(self.buf)
                self.check_partial()
                return None
            line = bytes(self.buf[:nl])
            del self.buf[:nl + 1]
            self.scan = 0
            if line.endswith(b"\r"):
                line = line[:-1]
            self.check_length(len(line))  # before anything else: as check_partial would have
            if b"\r" in line:
                raise HTTPError(400, "bare CR in the request head")
            if self.line is None:
                self.request_line(line)
            elif line:
                self.field_line(line)
            else:
                self.end_of_head()
        if len(self.buf) < self.length:
            return None
        self.request.body = bytes(self.buf[:self.length])
        self.buf = bytearray()
        self.complete = True
        return self.request

    def check_partial(self):
        """No LF yet: is the line already longer than allowed?  (A CR at the
        end may be the first half of its CRLF: it does not count.)"""
        self.check_length(len(self.buf) - self.buf.endswith(b"\r"))

    def check_length(self, n: int):
        """A line of n bytes (without its line end): over a limit?  The same
        answer whether the line arrived whole or in pieces."""
        if self.line is None:
            if n > self.max_line:
                raise HTTPError(414, "request line longer than %d bytes" % self.max_line)
        elif self.head_bytes + n + 2 > self.max_header_bytes:
            raise HTTPError(431, "request headers larger than %d bytes" % self.max_header_bytes)

    def request_line(self, line: bytes):
        if not line:
            self.blank += 1
            if self.blank > self.EMPTY_LINES:
                raise HTTPError(400, "too many empty lines before the request line")
            return
        if len(line) > self.max_line:
            raise HTTPError(414, "request line longer than %d bytes" % self.max_line)
        m = _REQUEST_LINE.fullmatch(line)
        if m is None or m.group(3) != b"1":
            if re.fullmatch(rb"\S+ \S+ HTTP/(?!1\.)\d+(\.\d+)?", line):
                raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
            raise HTTPError(400, "malformed request line (expected: METHOD /path HTTP/1.1)")
        self.line = (m.group(1).decode("ascii"), m.group(2).decode("ascii"), (1, int(m.group(4))))

    def field_line(self, line: bytes):
        self.head_bytes += len(line) + 2
        if self.head_bytes > self.max_header_bytes:
            raise HTTPError(431, "request headers larger than %d bytes" % self.max_header_bytes)
        if len(self.fields) >= self.max_headers:
            raise HTTPError(431, "more than %d request headers" % self.max_headers)
        if line[:1] in (b" ", b"\t"):
            raise HTTPError(400, "obsolete line folding in the request headers")
        name, colon, value = line.partition(b":")
        if not colon or not _FIELD_NAME.fullmatch(name):
            raise HTTPError(400, "malformed header line (expected: Name: value)")
        value = value.strip(b" \t")
        if _FIELD_VALUE_BAD.search(value):
            raise HTTPError(400, "control character in header %s" % name.decode("ascii"))
        self.fields.append((name.decode("ascii").lower(), value.decode("latin-1")))

    def end_of_head(self):
        method, target, version = self.line
        headers = {}
        for name, value in self.fields:
            if name in headers:
                if name in ("host", "content-length"):
                    if name == "host" or headers[name] != value:
                        raise HTTPError(400, "conflicting %s headers" % name)
                    continue
                headers[name] += ", " + value
            else:
                headers[name] = value
        if version >= (1, 1) and "host" not in headers:
            raise HTTPError(400, "HTTP/1.1 request without a Host header")
        if "transfer-encoding" in headers:
            raise HTTPError(411, "Transfer-Encoding is not supported: send the body with Content-Length")
        length = 0
        if "content-length" in headers:
            values = {v.strip() for v in headers["content-length"].split(",")}
            value = values.pop()
            if values or not value or not all(c in "0123456789" for c in value):
                raise HTTPError(400, "invalid Content-Length")
            # Count the digits before int(): 5,000 of them make int() raise.
            digits = value.lstrip("0")
            if len(digits) > len(str(self.max_body)) or int(digits or "0") > self.max_body:
                raise HTTPError(413, "request body larger than %d bytes" % self.max_body)
            length = int(digits or "0")
        elif method in ("POST", "PUT", "PATCH"):
            raise HTTPError(411, "a %s needs a Content-Length header" % method)
        path, query = split_target(target)
        self.request = HTTPRequest(method, target, path, query, version, headers)
        self.length = length


def split_target(target: str):
    """The path and the decoded query of a request target (origin or absolute
    form); HTTPError(400) for what no client should send."""
    import urllib.parse
    m = _ABSOLUTE_FORM.match(target)
    if m:
        target = target[m.end():] or "/"
    if not target.startswith("/"):
        raise HTTPError(400, "request target must be a path")
    path, _, qs = target.partition("?")
    path = path.split("#", 1)[0]
    qs = qs.split("#", 1)[0]
    if _BAD_PERCENT.search(qs):
        raise HTTPError(400, "malformed query string (invalid percent-encoding)")
    try:
        query = dict(urllib.parse.parse_qsl(qs, keep_blank_values=True,
                                            errors="strict", max_num_fields=64))
    except (ValueError, UnicodeDecodeError):
        raise HTTPError(400, "malformed query string (invalid percent-encoding or over 64 fields)") from None
    return path, query


# RFC 6455.  Opcodes, and the close codes we send.
WS_CONT, WS_TEXT, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
WS_NORMAL, WS_PROTOCOL_ERROR, WS_UNSUPPORTED, WS_BAD_DATA, WS_POLICY, WS_TOO_BIG = 1000, 1002, 1003, 1007, 1008, 1009
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WSError(StreamdError):
    """The peer broke RFC 6455: close the connection with `code`."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def ws_accept_key(key: str) -> str:
    import base64
    import hashlib
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + WS_GUID).digest()).decode("ascii")


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final frame (a server never masks)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return head + payload


def ws_close_frame(code: int, reason: str = "") -> bytes:
    return ws_frame(WS_CLOSE, code.to_bytes(2, "big") + reason.encode("utf-8")[:123])


def ws_text(obj) -> bytes:
    return ws_frame(WS_TEXT, _dumps(obj))


class WSParser:
    """Client frames to messages: feed(bytes) -> [(opcode, payload)], with
    fragments joined and masks removed.  Raises WSError for what RFC 6455
    says must fail the connection, and for messages over max_message."""

    def __init__(self, max_message: int):
        self.max_message = max_message
        self.buf = bytearray()
        self.parts = None  # [opcode, bytearray] while a fragmented message is open
        self.closed = False  # a close frame arrived: nothing after it counts

    def feed(self, data: bytes) -> list:
        """The messages completed by `data`.  A WSError carries, as .messages,
        those completed before the fault in this same feed."""
        out = []
        try:
            self._feed(data, out)
        except WSError as e:
            e.messages = out
            raise
        return out

    def _feed(self, data: bytes, out: list) -> None:
        if self.closed:
            return
        self.buf += data
        while True:
            frame = self.next_frame()
            if frame is None:
                return
            fin, opcode, payload = frame
            if opcode >= WS_CLOSE:  # control frames: may come between fragments
                if opcode == WS_CLOSE:
                    self.check_close(payload)
                    self.closed = True
                    self.buf = bytearray()
                    out.append((opcode, payload))
                    return
                out.append((opcode, payload))
                continue
            if opcode == WS_CONT:
                if self.parts is None:
                    raise WSError(WS_PROTOCOL_ERROR, "continuation frame with no message open")
                self.parts[1] += payload
            else:
                if self.parts is not None:
                    raise WSError(WS_PROTOCOL_ERROR, "new message before the last one ended")
                self.parts = [opcode, bytearray(payload)]
            if len(self.parts[1]) > self.max_message:
                raise WSError(WS_TOO_BIG, "message larger than %d bytes" % self.max_message)
            if fin:
                opcode, body = self.parts[0], bytes(self.parts[1])
                self.parts = None
                if opcode == WS_TEXT:
                    try:
                        body.decode("utf-8")
                    except UnicodeDecodeError:
                        raise WSError(WS_BAD_DATA, "text message is not valid UTF-8") from None
                out.append((opcode, body))

    def next_frame(self):
        buf = self.buf
        if len(buf) < 2:
            return None
        b0, b1 = buf[0], buf[1]
        fin, opcode = b0 & 0x80, b0 & 0x0F
        if b0 & 0x70:
            raise WSError(WS_PROTOCOL_ERROR, "reserved bits set (no extension was negotiated)")
        if opcode not in (WS_CONT, WS_TEXT, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG):
            raise WSError(WS_PROTOCOL_ERROR, "unknown opcode %d" % opcode)
        if not b1 & 0x80:
            raise WSError(WS_PROTOCOL_ERROR, "client frame is not masked")
        n, at = b1 & 0x7F, 2
        if opcode >= WS_CLOSE and (n > 125 or not fin):
            raise WSError(WS_PROTOCOL_ERROR, "control frame fragmented or over 125 bytes")
        if n == 126:
            if len(buf) < 4:
                return None
            n, at = int.from_bytes(buf[2:4], "big"), 4
        elif n == 127:
            if len(buf) < 10:
                return None
            n, at = int.from_bytes(buf[2:10], "big"), 10
            if n >> 63:
                raise WSError(WS_PROTOCOL_ERROR, "frame length has the top bit set")
        if n > self.max_message:
            raise WSError(WS_TOO_BIG, "frame larger than %d bytes" % self.max_message)
        if len(buf) < at + 4 + n:
            return None
        mask = bytes(buf[at:at + 4])
        payload = bytes(buf[at + 4:at + 4 + n])
        del buf[:at + 4 + n]
        if n:
            # XOR with the 4-byte mask, as one big-integer operation (fast in CPython).
            key = (mask * (n // 4 + 1))[:n]
            payload = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
        return fin, opcode, payload

    @staticmethod
    def check_close(payload: bytes):
        if len(payload) == 1:
            raise WSError(WS_PROTOCOL_ERROR, "close frame with a 1-byte body")
        if len(payload) >= 2:
            code = int.from_bytes(payload[:2], "big")
            if code < 1000 or code in (1004, 1005, 1006, 1015) or 1016 <= code < 3000 or code >= 5000:
                raise WSError(WS_PROTOCOL_ERROR, "invalid close code %d" % code)
            try:
                payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                raise WSError(WS_BAD_DATA, "close reason is not valid UTF-8") from None


def sse_to_ws(data: bytes, pending: bytearray) -> bytes:
    """Translate SSE bytes (as the backends write them) into WebSocket frames:
    a content event becomes {"type":"chunk","content":…}, [DONE] becomes
    {"type":"done"}, an error event {"type":"error","error":…}, a ": ping"
    comment a ping frame.  `pending` keeps an event cut across two writes."""
    pending += data
    end = pending.rfind(b"\n\n")
    if end < 0:
        return b""
    events = bytes(pending[:end]).split(b"\n\n")
    del pending[:end + 2]
    out = []
    for ev in events:
        data_lines, name = [], None
        for line in ev.split(b"\n"):
            if line.startswith(b"data:"):
                data_lines.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line.startswith(b"event:"):
                name = line[6:].strip().decode("utf-8", "replace")
            elif line.startswith(b":"):
                out.append(ws_frame(WS_PING, b""))
        if not data_lines:
            continue
        text = b"\n".join(data_lines)
        if text == b"[DONE]":
            out.append(ws_text({"type": "done"}))
            continue
        try:
            obj = json.loads(text)
        except ValueError:
            obj = text.decode("utf-8", "replace")
        if isinstance(obj, dict) and "error" in obj:
            msg = {"type": "error", "error": obj["error"]}
        elif isinstance(obj, dict) and isinstance(obj.get("content"), str):
            msg = {"type": "chunk", "content": obj["content"]}
        elif isinstance(obj, dict) and isinstance(obj.get("char"), str):
            msg = {"type": "chunk", "content": obj["char"], "index": obj.get("index")}
        elif isinstance(obj, dict) and isinstance(obj.get("reasoning"), str):
            msg = {"type": "reasoning", "content": obj["reasoning"]}
        elif isinstance(obj, dict) and "tool_call" in obj:
            msg = {"type": "tool_call", "tool_call": obj["tool_call"]}
        elif isinstance(obj, dict) and "finish_reason" in obj:
            msg = dict(obj, type="usage" if "usage" in obj else "finish")
        else:
            msg = {"type": "event", "data": obj}
            if name:
                msg["event"] = name
        out.append(ws_text(msg))
    return b"".join(out)


# ---- Timers ----
#
# A heap of (deadline, seq, timer).  Cancelling only marks the timer; the entry
# is dropped when it reaches the top (lazy cancellation, as in asyncio and trio),
# and the heap is rebuilt when more than half of it is dead.  The clock is
# injectable, so tests move time forward instead of sleeping.
#
# One shortcut: timers set with call_later() for the same delay are due in the
# order they were set (the clock only moves forward), so each such "delay
# class" is a FIFO: append and popleft instead of heap pushes and pops.  With
# thousands of mock streams all sleeping message_delay, that is one queue.  Up
# to MAX_FIFOS classes; other delays use the heap.

class Timer:
    __slots__ = ("when", "fn", "arg", "cancelled", "fifo")

    def __init__(self, when, fn, arg, fifo):
        # fifo: the delay class this timer queues in, or None for the heap
        self.when, self.fn, self.arg, self.cancelled, self.fifo = when, fn, arg, False, fifo


_when = operator.attrgetter("when")


class Timers:
    MAX_FIFOS = 32

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._heap = []
        self._fifos = {}  # delay -> deque of Timers, deadlines in order
        self._fifo_dead = collections.Counter()  # cancelled timers still queued, per class
        self._seq = itertools.count()
        self._dead = 0
        self.max_lag = 0.0

    def __len__(self):
        return len(self._heap) - self._dead + sum(1 for q in self._fifos.values() for t in q if not t.cancelled)

    def call_at(self, when: float, fn, arg=None) -> Timer:
        t = Timer(when, fn, arg, None)
        heapq.heappush(self._heap, (when, next(self._seq), t))
        return t

    def call_later(self, delay: float, fn, arg=None, reuse: Timer | None = None) -> Timer:
        """`reuse`: a timer that has fired, to be armed again (saves an allocation
        on hot paths that re-arm the same timer over and over)."""
        q = self._fifos.get(delay)
        if q is None:
            if len(self._fifos) >= self.MAX_FIFOS:
                return self.call_at(self.clock() + delay, fn, arg)
            q = self._fifos[delay] = collections.deque()
        if reuse is not None and reuse.fifo is not None:
            t = reuse
            t.when, t.fn, t.arg, t.cancelled, t.fifo = self.clock() + delay, fn, arg, False, delay
        else:
            t = Timer(self.clock() + delay, fn, arg, delay)
        q.append(t)
        return t

    def cancel(self, t: Timer | None) -> None:
        if t is None or t.cancelled:
            return
        t.cancelled = True
        t.fn = t.arg = None  # a dead entry waits for its deadline: it must not hold a connection meanwhile
        # Dead entries wait for their deadline; rebuild when they are the
        # majority (a 300 s timer cancelled after 1 s would otherwise linger).
        if t.fifo is None:
            self._dead += 1
            if self._dead > 256 and self._dead * 2 > len(self._heap):
                self._heap = [e for e in self._heap if not e[2].cancelled]
                heapq.heapify(self._heap)
                self._dead = 0
        else:
            q = self._fifos.get(t.fifo)
            if q is None:
                return
            self._fifo_dead[t.fifo] += 1
            if self._fifo_dead[t.fifo] > 256 and self._fifo_dead[t.fifo] * 2 > len(q):
                self._fifos[t.fifo] = collections.deque(x for x in q if not x.cancelled)
                self._fifo_dead[t.fifo] = 0

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
            self._dead -= 1
        best = heap[0][0] if heap else None
        for delay, q in list(self._fifos.items()):
            while q and q[0].cancelled:
                q.popleft()
                self._fifo_dead[delay] -= 1
            if not q:
                del self._fifos[delay]  # an idle class frees its slot
                self._fifo_dead.pop(delay, None)
            elif best is None or q[0].when < best:
                best = q[0].when
        return best

    def run_due(self, now: float, slack: float = 0.0, on_error=None) -> None:
        """Call every timer due by `now` (+ `slack`), in deadline order.  Timers
        that callbacks set fire in a later pass, so zero delays cannot spin.
        A callback that raises is passed to on_error(timer, exception), and
        the others still run."""
        until = now + slack
        due = []
        heap = self._heap
        while heap and heap[0][0] <= until:
            t = heapq.heappop(heap)[2]
            if t.cancelled:
                self._dead -= 1
            else:
                due.append(t)
        sources = 1 if due else 0
        for delay, q in self._fifos.items():
            if q and q[0].when <= until:
                sources += 1
                popleft = q.popleft
                while q and q[0].when <= until:
                    t = popleft()
                    if t.cancelled:
                        self._fifo_dead[delay] -= 1
                    else:
                        due.append(t)
        if sources > 1:
            due.sort(key=_when)  # several sources: merge them into deadline order
        for t in due:
            if t.cancelled:  # cancelled by a callback earlier in this pass
                continue
            t.cancelled = True  # fired: a later cancel() is a no-op
            lag = now - t.when  # negative when fired early, within the slack
            if lag > self.max_lag:
                self.max_lag = lag
            try:
                t.fn(t.arg)
            except Exception as e:
                if on_error is None:
                    raise
                on_error(t, e)


# ---- Connection state machine ----
#
#   RECEIVING ──handoff──▶ STARTING ──head──▶ STREAMING ──end──▶ FLUSHING ──flushed──▶ DRAINING ──eof──▶ CLOSED
#       │                     │                                     ▲
#       └────error_response───┴─────────────────────────────────────┘
#   (any state) ──abort──▶ CLOSED
#
# RECEIVING: the Unix connection from Apache is open; waiting for its message.
# STARTING:  we hold the client socket and a backend; no response head sent yet,
#            so a failure can still be a real HTTP status.
# STREAMING: the 200 head went out; events flow; failures become error events.
# FLUSHING:  the last bytes are queued; waiting for the client to take them.
# DRAINING:  write side shut down (FIN sent); discarding input until the client
#            closes, so unread bytes do not turn our close into a reset.
# The direct HTTP front (--listen) adds two:
# REQUEST:   a client connected to us; reading its HTTP request (then STARTING,
#            or FLUSHING with a reply such as /healthz or an error status).
# AWAITING:  a WebSocket is open; waiting for the message that says what to
#            stream (then STARTING).  "close": the WebSocket client closed first.
# All changes go through Connection.transition().

class State(enum.Enum):
    RECEIVING = "receiving"
    REQUEST = "request"
    AWAITING = "awaiting"
    STARTING = "starting"
    STREAMING = "streaming"
    FLUSHING = "flushing"
    DRAINING = "draining"
    CLOSED = "closed"


TRANSITIONS = {
    (State.RECEIVING, "handoff"): State.STARTING,
    (State.RECEIVING, "error_response"): State.FLUSHING,
    (State.REQUEST, "request"): State.STARTING,
    (State.REQUEST, "error_response"): State.FLUSHING,
    (State.REQUEST, "reply"): State.FLUSHING,
    (State.REQUEST, "upgrade"): State.AWAITING,
    (State.AWAITING, "request"): State.STARTING,
    (State.AWAITING, "error_response"): State.FLUSHING,
    (State.AWAITING, "close"): State.FLUSHING,
    (State.STARTING, "close"): State.FLUSHING,
    (State.STREAMING, "close"): State.FLUSHING,
    (State.STARTING, "head"): State.STREAMING,
    (State.STARTING, "error_response"): State.FLUSHING,
    (State.STREAMING, "end"): State.FLUSHING,
    (State.FLUSHING, "flushed"): State.DRAINING,
    (State.DRAINING, "eof"): State.CLOSED,
}
for _s in State:
    if _s is not State.CLOSED:
        TRANSITIONS[(_s, "abort")] = State.CLOSED


class TransitionError(StreamdError):
    pass


LAG_PROBE_INTERVAL = 0.25
FULL_GC_INTERVAL = 300.0  # see Daemon.tend_gc
TIMER_SLACK = 0.001  # timers due this soon fire in the current pass
REPORT_INTERVAL = 1.0  # how often a worker sends its metrics to the parent
ACCEPT_BATCH = 64      # handoffs a worker accepts per wakeup (one process: until EAGAIN)
# How long a finished connection waits for the client's FIN before closing anyway.
LINGER = 2.0
_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
PARK = object()  # an operation handler's answer: "the backend waits; do not resume it now"


class Connection:
    """One handoff: the Unix connection from Apache, then the client's socket."""

    __slots__ = ("daemon", "id", "state", "sock", "mask", "out", "t_life", "t_write",
                 "t_backend", "t_heartbeat", "last_progress", "last_send", "accepted_at",
                 "started_at", "first_byte_at", "req", "backend_name", "gen", "parked",
                 "waiting", "status", "bytes", "chunks", "outcome", "has_client", "backend_error", "corked", "paced",
                 "paced_i", "paced_delay", "unix_buf",
                 "unix_fds", "front", "fd_limit")

    def __init__(self, daemon, unix_sock, cid):
        self.daemon = daemon
        self.id = cid
        self.state = State.RECEIVING
        self.sock = unix_sock
        self.mask = 0
        # Unsent bytes.  Empty: the shared b"" (most connections, most of the
        # time: one less object each); a bytearray only while bytes wait.
        self.out = b""
        self.t_life = self.t_write = self.t_backend = self.t_heartbeat = None
        self.accepted_at = daemon.clock()
        self.last_progress = self.last_send = self.accepted_at
        self.started_at = self.first_byte_at = None
        self.req = self.backend_name = self.gen = self.waiting = None
        self.parked = False
        self.corked = False  # True while its backend runs: writes are collected
        self.paced = None    # the events of a ("paced", events, delay) operation, and
        self.paced_i = 0     # the index of the next one to send, and
        self.paced_delay = 0.0  # the pause between them
        self.status = None
        self.bytes = self.chunks = 0
        self.outcome = None
        self.has_client = False  # True once a client socket was received
        self.backend_error = False  # the backend itself failed (not the client, not shutdown)
        self.unix_buf = None  # stream-mode handoffs arrive in pieces until EOF
        self.unix_fds = None
        self.front = None     # a FrontState for a direct HTTP client (--listen)
        self.fd_limit = False  # the fd table was full when its handoff arrived: answer 503

    def __repr__(self):
        return "<Connection %d %s>" % (self.id, self.state.name)

    def transition(self, event: str) -> None:
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise TransitionError("connection %d: can't handle event %r in state %s"
                                  % (self.id, event, self.state.name)) from None

    # -- interest in the selector: READ always, WRITE while bytes are queued --

    def update_interest(self) -> None:
        want = _READ | _WRITE if self.out else _READ
        if want != self.mask:
            self.daemon.selector.modify(self.sock, want, self.on_client_io)
            self.mask = want

    # -- writing: send at once; queue only what the kernel did not take --
    #
    # Two limits.  Above write_high_water queued bytes, the backend parks (it
    # and its upstream wait for the client); whatever drains the queue below
    # it again (a direct send, uncork, flush) unparks it: sent() is the one
    # place that decides.  The bytes of one backend step are taken as a unit
    # (one event may be bigger than either limit; the step then parks), so
    # write_buffer_limit caps what is queued on top of that: writes that keep
    # coming while the client does not read (heartbeats, WebSocket pongs).

    def write(self, data) -> None:
        if self.state is State.CLOSED:
            return
        if self.corked:
            # Inside a backend step: collect, and send once when the step ends.
            if not self.out:
                self.out = data  # often the only piece: no copy
            else:
                self.queue(data)
            return
        if self.out:
            self.queue(data)
            self.last_send = self.daemon.clock()
            limit = self.cfg_limit("server.write_buffer_limit")
            if len(self.out) > limit:
                self.drop("slow_client", "write buffer over %d bytes" % limit)
            return
        # Nothing queued: send at once, queue what the kernel did not take.
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self.client_gone(e)
            return
        self.bytes += n
        now = self.daemon.clock()
        self.last_send = now
        if n < len(data):
            self.last_progress = now  # the write timeout counts from here
            self.out = bytearray(memoryview(data)[n:])
            self.update_interest()
            self.arm_write_timer()

    def queue(self, data) -> None:
        """Append to what is queued (a bytearray from the second piece on)."""
        if type(self.out) is not bytearray:
            self.out = bytearray(self.out)
        self.out += data

    def cfg_limit(self, key):
        # The daemon's current config: limits and timeouts follow a SIGHUP at once.
        return self.daemon.cfg[key]

    def uncork(self) -> None:
        """End of a backend step: send what it wrote in one syscall (the head
        with the first event, the last event with [DONE]), queue the rest."""
        self.corked = False
        if self.state is State.CLOSED:
            return
        if self.out and not self.mask & _WRITE:  # (else: waiting for the socket already; flush() sends it)
            data, self.out = self.out, b""
            Connection.write(self, data)  # with nothing queued, write() sends (bytes as they are: not a subclass's)
        if self.parked or self.state is State.FLUSHING:
            self.sent()

    def flush(self) -> None:
        """The socket is writable: send what is queued."""
        try:
            n = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.client_gone(e)
            return
        if n:
            if n == len(self.out):
                self.out = b""
            else:
                if type(self.out) is not bytearray:
                    self.out = bytearray(self.out)
                del self.out[:n]
            self.bytes += n
            self.last_progress = self.daemon.clock()
        if not self.out:
            self.update_interest()
        self.sent()

    def sent(self) -> None:
        """The queue may have shrunk: finish a closing stream whose bytes are
        all out, and wake a parked backend once the queue is under the
        high-water mark, however it drained."""
        if self.corked or self.state is State.CLOSED:
            return
        if not self.out:
            if self.state is State.FLUSHING:
                self.shutdown_write()
                return
        if self.parked and len(self.out) <= self.cfg_limit("server.write_high_water"):
            self.daemon.unpark(self)

    def arm_write_timer(self) -> None:
        if self.t_write is None:
            self.t_write = self.daemon.timers.call_at(
                self.last_progress + self.cfg_limit("server.write_timeout"), Connection.check_write, self)

    def check_write(self) -> None:
        """Write-progress timeout: fires only if no byte moved for write_timeout."""
        self.t_write = None
        if not self.out or self.state is State.CLOSED:
            return
        timeout = self.cfg_limit("server.write_timeout")
        if self.last_progress + timeout <= self.daemon.clock():  # same sum as the timer (see heartbeat)
            self.drop("timeout", "client accepted no bytes for %gs" % timeout)
        else:
            self.arm_write_timer()

    def on_unix_readable(self, sock, mask) -> None:
        self.daemon.receive(self)

    def on_request_io(self, sock, mask) -> None:
        if self.state is State.REQUEST:
            self.daemon.front.readable(self)
        else:  # answered already (a refusal, a 408): from here bytes are only discarded
            self.on_client_io(sock, mask)

    def on_backend_io(self, sock, mask) -> None:
        self.daemon.backend_io_ready(self)

    # -- reading the client: the only thing we expect is EOF (the client left) --

    def on_client_io(self, sock, mask) -> None:
        if mask & _READ:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError as e:
                self.client_gone(e)
                return
            if data == b"":
                if self.state is State.DRAINING:
                    self.transition("eof")
                    self.daemon.release(self)
                else:
                    self.client_gone(None)
                return
            if data:
                self.received(data)
                if self.state is State.CLOSED:
                    return
        if mask & _WRITE and self.state is not State.CLOSED:
            self.flush()

    def received(self, data: bytes) -> None:
        """Bytes from the client.  Discarded (a pipelined request, a body Apache
        did not read): this connection only ever answers once.  A WebSocket
        reads frames here."""

    # -- the response: head, events, end --

    def send_head(self) -> None:
        self.transition("head")
        self.status = 200
        self.daemon.backend_answered(self)
        self.write(response_head(self.req.response_headers))
        self.last_send = self.daemon.clock()  # (a corked write counts as sent now)
        self.arm_heartbeat()

    def arm_heartbeat(self) -> None:
        interval = self.cfg_limit("server.heartbeat_interval")
        if interval and self.state is State.STREAMING:
            timers = self.daemon.timers
            remaining = self.last_send + interval - timers.clock()
            # Whole seconds (rounded up): a handful of delay classes shared by
            # every stream, instead of a heap entry each; a ping may come up to
            # a second after the interval, which is all a keepalive needs.
            delay = math.ceil(remaining) if remaining >= 1 else max(remaining, 0.0)
            self.t_heartbeat = timers.call_later(delay, Connection.heartbeat, self)

    def heartbeat(self) -> None:
        self.t_heartbeat = None
        if self.state is not State.STREAMING:
            return
        # Compare with the same sum the timer was armed with: `now - last >= interval`
        # can disagree with `last + interval <= now` by a rounding error, and then
        # the timer would be re-armed in the past forever.
        # (Bytes still queued: the client is not idle, it is slow; no ping.)
        if not self.out and self.last_send + self.cfg_limit("server.heartbeat_interval") <= self.daemon.clock():
            self.write(SSE_PING)
        self.arm_heartbeat()

    def respond_error(self, status: int, message: str, kind: str | None = None,
                      retry_after: int | None = None, outcome: str = "error", headers=()) -> None:
        """Answer with an HTTP error status (only before the head went out)."""
        self.daemon.stop_backend(self)
        self.transition("error_response")
        self.status = status
        self.outcome = self.outcome or outcome
        self.write(error_response(status, message, kind, retry_after, headers, self.cfg_limit("server.error_format")))
        self.after_last_write()

    def last_words(self, kind: str, message: str, status: int = 503):
        """What to send, unbuffered, when the connection must end at once (the
        daemon stops, or handling it raised): an error event if the stream
        started, an error status if not (None: nothing fits)."""
        if self.state is State.STREAMING:
            return sse_error(kind, message, self.cfg_limit("server.error_format"))
        if self.state in (State.STARTING, State.REQUEST) or (self.state is State.RECEIVING and self.has_client):
            return error_response(status, message, kind, retry_after=1 if status == 503 else None,
                                  fmt=self.cfg_limit("server.error_format"))
        return None

    def fail_internal(self) -> None:
        """Handling this connection raised (a bug): its state may be half
        changed, so do not go through the usual paths.  Send the client a
        500 or an error event if one fits, best effort, and close."""
        last = self.last_words("internal_error", "internal error", 500) if self.sock is not None else None
        if last:
            try:
                self.sock.send(bytes(self.out) + last if self.out else last)
            except OSError:
                pass
        self.outcome = "internal_error"
        self.corked = False
        if self.state is not State.CLOSED:
            self.transition("abort")
        self.daemon.release(self)

    def end_stream(self, final: bytes, outcome: str) -> None:
        """Queue the last event ([DONE] or an error event) and start closing."""
        self.daemon.stop_backend(self)
        self.outcome = self.outcome or outcome
        self.transition("end")
        if final:  # (not counted in chunks: those are the backend's events)
            self.write(final)
        self.after_last_write()

    def after_last_write(self) -> None:
        self.daemon.timers.cancel(self.t_heartbeat)
        self.t_heartbeat = None
        if self.state is State.FLUSHING and not self.out and not self.corked:
            self.shutdown_write()

    def shutdown_write(self) -> None:
        # shutdown(SHUT_WR) sends our FIN even if another process still holds a
        # copy of this socket (close() alone would not), then we read until the
        # client closes: closing with unread input makes Linux send a reset,
        # which can destroy the last bytes of the response in flight.
        self.transition("flushed")
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.transition("abort")
            self.daemon.release(self)
            return
        self.daemon.timers.cancel(self.t_life)
        self.t_life = self.daemon.timers.call_later(LINGER, Connection.linger_expired, self)

    def linger_expired(self) -> None:
        self.t_life = None
        if self.state is State.DRAINING:
            self.transition("eof")
            self.daemon.release(self)

    # -- ending early --

    def client_gone(self, exc) -> None:
        """EOF or a reset from the client: it left.  Cancel the backend at once."""
        if self.state in (State.STARTING, State.STREAMING):
            self.outcome = self.outcome or "client_disconnected"
        elif self.state is State.DRAINING:
            self.outcome = self.outcome or "done"
        else:
            self.outcome = self.outcome or "client_disconnected"
        self.transition("abort")
        self.daemon.release(self)

    def drop(self, reason: str, detail: str) -> None:
        """Close at once (slow client, write timeout): nothing more can be sent."""
        log(logging.WARNING, "dropping client", conn=self.id, reason=reason, detail=detail)
        self.outcome = reason
        self.transition("abort")
        self.daemon.release(self)


# ---- Backend operations ----
#
# A backend is a generator function `run(req, cfg)`.  It yields operations, small
# tuples the loop carries out, and is resumed with the result (or has an exception
# thrown in: TimeoutError when a wait times out).  Returning ends the stream
# cleanly: the loop sends the usage event (if asked for) and `data: [DONE]`.
# Raising ends it with an error.  When the client leaves, the loop calls
# gen.close(), so a backend releases what it holds in try/finally.
#
#   ("sleep", seconds)                  resume after a delay
#   ("event", dict | bytes)             send one SSE event (a dict is JSON-encoded;
#                                       bytes are a pre-rendered `data: …\n\n`)
#   ("raw", bytes)                      send bytes verbatim (already SSE-framed)
#   ("paced", [bytes, …], delay)        send these pre-rendered events one by one,
#                                       `delay` apart (the first after `delay`),
#                                       then resume: the loop does it without
#                                       resuming the generator for each event
#   ("head",)                           send the 200 head now (else: at the first event)
#   ("now",)                            resume with the loop's clock (tests fake it)
#   ("park", timeout|None, channel)     wait until something calls channel.wake(value,
#                                       exc), a method the loop installs: for streams
#                                       that share one upstream connection
#   ("loop",)                           resume with the Daemon, for an object shared
#                                       by many streams (a multiplexed HTTP/2
#                                       connection) that watches its own socket
#   ("count", "upstream_retries")       add one to that per-backend metric
#   ("readable", sock, timeout|None)    resume when sock is readable
#   ("writable", sock, timeout|None)    resume when sock is writable
#   ("call", fn, timeout|None, cleanup) run fn() on a helper thread (for what cannot
#                                       be non-blocking: DNS, connect, TLS setup) and
#                                       resume with its result or exception; if the
#                                       stream is gone by then, cleanup(result) runs
#
# A backend's return value may be {"finish_reason": …, "usage": {…}}, which
# becomes the usage event when the handoff asked for include_usage, and
# "send_done": False to end without the [DONE] marker, and "raw": True for a
# raw pass-through (no final event either: the upstream's bytes went out as
# they came).

STEP_BUDGET = 64  # operations one generator may run per pass before others get a turn


class Parked:
    """What a ("park", …) operation waits on; its wake() resumes the backend."""
    __slots__ = ("daemon", "conn")

    def __init__(self, daemon, conn):
        self.daemon, self.conn = daemon, conn

    def wake(self, value=None, exc=None) -> None:
        conn = self.conn
        if conn.waiting is self:  # still parked here (not closed, not timed out)
            conn.waiting = None
            self.daemon.timers.cancel(conn.t_backend)
            conn.t_backend = None
            self.daemon.runnable.append((conn, value, exc))


class HelperPool:
    """A few threads for work that cannot be done without blocking.

    The loop submits a job; a thread runs it and appends it to `done`, then
    writes one byte to a socketpair the loop watches.  Only the loop touches
    connections: threads see nothing but the job.  Threads start on first use
    (the mock never needs them, and a forked worker must start its own)."""

    class Job:
        __slots__ = ("conn", "fn", "cleanup", "result", "exc", "cancelled", "timer")

    def __init__(self, daemon, size):
        import queue
        import threading
        self.daemon = daemon
        self.size = size
        self.jobs = queue.SimpleQueue()
        self.done = collections.deque()   # deque.append/popleft are thread-safe
        self.threads = []
        self.idle = 0
        self._threading = threading
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        daemon.selector.register(self.wake_r, _READ, self.on_wake)

    def submit(self, conn, fn, cleanup):
        job = HelperPool.Job()
        job.conn, job.fn, job.cleanup = conn, fn, cleanup
        job.result = job.exc = job.timer = None
        job.cancelled = False
        # Another thread only when none is idle (the count is approximate; a
        # race costs at most one extra thread, still capped at `size`).
        if len(self.threads) < self.size and self.idle <= self.jobs.qsize():
            t = self._threading.Thread(target=self.work, name="streamd-helper", daemon=True)
            t.start()
            self.threads.append(t)
        self.jobs.put(job)
        return job

    def work(self):
        while True:
            self.idle += 1
            job = self.jobs.get()
            self.idle -= 1
            if job is None:
                return
            if not job.cancelled:
                try:
                    job.result = job.fn()
                except BaseException as e:  # handed to the backend, which decides
                    job.exc = e
            self.done.append(job)
            try:
                self.wake_w.send(b"x")
            except (BlockingIOError, OSError):
                pass  # the loop is already woken (buffer full) or shutting down

    def on_wake(self, sock, mask):
        try:
            sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            pass
        while self.done:
            job = self.done.popleft()
            try:
                self.daemon.call_finished(job)
            except Exception as e:
                self.daemon.contained(e, "helper", job.conn)

    def close(self):
        for _ in self.threads:
            self.jobs.put(None)
        self.daemon.selector.unregister(self.wake_r)
        self.wake_r.close()
        self.wake_w.close()


# ---- Circuit breaker ----
#
# One per backend.  CLOSED: streams go to the upstream.  After `failures`
# failures in a row within `window` seconds: OPEN, and handoffs for that
# backend get 503 + Retry-After at once, without touching the upstream.  After
# `cooldown`: HALF_OPEN, and one stream goes through as a probe; its success
# closes the circuit, its failure opens it again.  A success is an upstream
# that answered 2xx (our 200 head went out); a failure, an upstream that was
# refused, failed or timed out before that.  Pure: the caller passes the time.

class Breaker:
    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
    __slots__ = ("name", "state", "failures", "first_failure", "opened_at", "probe")

    def __init__(self, name: str):
        self.name, self.state = name, Breaker.CLOSED
        self.failures, self.first_failure, self.opened_at, self.probe = 0, 0.0, 0.0, None

    def allow(self, now: float, cfg: dict, conn=None) -> bool:
        if self.state is Breaker.OPEN:
            if now - self.opened_at < cfg["upstream.breaker_cooldown"]:
                return False
            self.change(Breaker.HALF_OPEN)
        if self.state is Breaker.HALF_OPEN:
            if self.probe is not None:
                return False  # one probe at a time
            self.probe = conn if conn is not None else True
        return True

    def retry_after(self, now: float, cfg: dict) -> int:
        return max(1, math.ceil(self.opened_at + cfg["upstream.breaker_cooldown"] - now))

    def success(self) -> None:
        self.failures, self.probe = 0, None
        if self.state is not Breaker.CLOSED:
            self.change(Breaker.CLOSED)

    def failure(self, now: float, cfg: dict) -> None:
        threshold = cfg["upstream.breaker_failures"]
        if not threshold:
            return  # disabled
        if self.state is Breaker.HALF_OPEN:
            self.probe, self.opened_at = None, now
            self.change(Breaker.OPEN)
            return
        if not self.failures or now - self.first_failure > cfg["upstream.breaker_window"]:
            self.failures, self.first_failure = 0, now
        self.failures += 1
        if self.state is Breaker.CLOSED and self.failures >= threshold:
            self.opened_at = now
            self.change(Breaker.OPEN)

    def abandon(self, conn) -> None:
        """The probe's client left before the upstream answered: let another probe go."""
        if self.probe is conn:
            self.probe = None

    def change(self, state: str) -> None:
        self.state = state
        level = logging.WARNING if state is Breaker.OPEN else logging.INFO
        log(level, "circuit " + state.replace("_", "-"), backend=self.name, failures=self.failures)


# ---- Metrics ----
#
# The loop keeps plain integers and bucket arrays (an increment, or a bisect
# per stream); prometheus_client only renders them when /metrics is scraped,
# through a collector that reads a snapshot.  So the hot path never takes a
# metrics lock, --benchmark skips only the histograms, and with --workers the
# parent sums the snapshots its workers send.  Names, labels and buckets match
# the Go daemon's, so its dashboards work unchanged.

def _buckets(start, n=15):
    return tuple(start * 2 ** k for k in range(n))


HANDOFF_BUCKETS = _buckets(0.0001)   # 0.1 ms .. 1.6 s
STREAM_BUCKETS = _buckets(0.01)      # 10 ms .. 164 s
TTFB_BUCKETS = _buckets(0.001)       # 1 ms .. 16 s
LAG_BUCKETS = HANDOFF_BUCKETS
STREAM_REASONS = ("client_disconnected", "timeout", "canceled", "network", "slow_client",
                  "upstream", "shutdown", "other")


class Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def dump(self):
        return [self.counts, self.sum]


class Stats:
    """Every number streamd reports: /metrics, /healthz, the SIGHUP log line,
    the --benchmark summary.  Only the loop thread touches it."""

    __slots__ = ("active_connections", "active_streams", "peak_streams", "started", "completed",
                 "failed", "bytes_sent", "chunks_sent", "handoffs", "handoff_errors", "rejected", "http_responses",
                 "stream_errors", "backend_requests", "backend_errors", "internal_errors", "tokens",
                 "tool_calls_dropped", "upstream_retries", "circuit_open", "handoff_duration", "stream_duration",
                 "backend_duration", "backend_ttfb", "loop_lag", "histograms")

    def __init__(self, histograms: bool = True):
        for name in ("active_connections", "active_streams", "peak_streams", "started", "completed",
                     "failed", "bytes_sent", "chunks_sent", "handoffs", "rejected"):
            setattr(self, name, 0)
        for name in ("handoff_errors", "stream_errors", "backend_requests", "backend_errors",
                     "upstream_retries", "http_responses", "internal_errors", "tokens", "tool_calls_dropped"):
            setattr(self, name, collections.Counter())
        self.circuit_open = {}
        self.histograms = histograms  # False under --benchmark: no metric observations
        self.handoff_duration = Histogram(HANDOFF_BUCKETS)
        self.stream_duration = Histogram(STREAM_BUCKETS)
        self.loop_lag = Histogram(LAG_BUCKETS)
        self.backend_duration = {}
        self.backend_ttfb = {}

    def observe_backend(self, table: dict, bounds, backend: str, value: float) -> None:
        h = table.get(backend)
        if h is None:
            h = table[backend] = Histogram(bounds)
        h.observe(value)

    def snapshot(self, live=()) -> dict:
        """A JSON-able copy; `live` connections add the bytes and events they
        have sent so far (counted into the totals only when they close)."""
        bytes_sent, chunks = self.bytes_sent, self.chunks_sent
        for conn in live:
            bytes_sent += conn.bytes
            chunks += conn.chunks
        return {
            "gauges": {"active_connections": self.active_connections, "active_streams": self.active_streams,
                       "peak_streams": self.peak_streams},
            # connections_total counts handoffs admitted under the limit
            "counters": {"connections": self.handoffs - self.rejected, "connections_rejected": self.rejected,
                         "handoffs": self.handoffs, "bytes_sent": bytes_sent, "chunks_sent": chunks,
                         "started": self.started, "completed": self.completed, "failed": self.failed},
            "labeled": {"handoff_errors": dict(self.handoff_errors), "stream_errors": dict(self.stream_errors),
                        "backend_requests": dict(self.backend_requests),
                        "backend_errors": dict(self.backend_errors),
                        "upstream_retries": dict(self.upstream_retries),
                        "http_responses": dict(self.http_responses),
                        "internal_errors": dict(self.internal_errors),
                        "tokens": dict(self.tokens),
                        "tool_calls_dropped": dict(self.tool_calls_dropped)},
            "circuit_open": dict(self.circuit_open),
            "histograms": {"handoff_duration": self.handoff_duration.dump(),
                           "stream_duration": self.stream_duration.dump(),
                           "loop_lag": self.loop_lag.dump()},
            "backend_histograms": {"backend_duration": {b: h.dump() for b, h in self.backend_duration.items()},
                                   "backend_ttfb": {b: h.dump() for b, h in self.backend_ttfb.items()}},
        }


def merge_snapshots(snaps) -> dict:
    """Add up snapshots (workers, plus those that exited).  Gauges add too;
    peak_streams is the largest."""
    out = Stats().snapshot()
    for snap in snaps:
        for section in ("gauges", "counters"):
            for k, v in snap[section].items():
                out[section][k] = max(out[section][k], v) if k == "peak_streams" else out[section][k] + v
        for name, table in snap["labeled"].items():
            dst = out["labeled"].setdefault(name, {})
            for k, v in table.items():
                dst[k] = dst.get(k, 0) + v
        for k, v in snap["circuit_open"].items():
            out["circuit_open"][k] = max(out["circuit_open"].get(k, 0), v)
        for name, (counts, total) in snap["histograms"].items():
            dc, _ = out["histograms"][name]
            out["histograms"][name] = [[a + b for a, b in zip(dc, counts)], out["histograms"][name][1] + total]
        for name, table in snap["backend_histograms"].items():
            dst = out["backend_histograms"][name]
            for b, (counts, total) in table.items():
                if b in dst:
                    dst[b] = [[x + y for x, y in zip(dst[b][0], counts)], dst[b][1] + total]
                else:
                    dst[b] = [list(counts), total]
    return out


_HELP = {
    "active_connections": "Client connections currently open",
    "connections": "Client connections handed off and admitted",
    "connections_rejected": "Handoffs answered 503 because max_connections was reached",
    "handoffs": "Handoff messages received with a usable client socket",
    "handoff_errors": "Handoffs that failed, by reason",
    "handoff_duration": "Time from accepting the Unix connection to having the client socket",
    "active_streams": "Streams in progress",
    "peak_streams": "Most streams in progress at once since start",
    "bytes_sent": "Bytes written to clients (headers and body)",
    "chunks_sent": "SSE events written to clients",
    "stream_errors": "Streams that ended without [DONE], by reason",
    "stream_duration": "Stream duration, every stream",
    "backend_requests": "Streams started, by backend",
    "backend_errors": "Streams whose backend failed, by backend",
    "backend_duration": "Backend stream duration, successful streams",
    "backend_ttfb": "Time from stream start to the first event, by backend",
    "loop_lag": "How late the event loop ran a due timer",
    "upstream_retries": "Upstream requests retried before the first byte, by backend",
    "circuit_open": "1 while the backend's circuit breaker is open",
    "http_responses": "Direct HTTP front (--listen): connections ended, by response status (101: WebSocket, 0: none)",
    "internal_errors": "Exceptions met while handling one connection (a bug; that connection was ended), by where",
    "tokens": "Tokens the upstreams reported using, by backend and kind (prompt, completion, reasoning, "
              "cache_read, cache_creation)",
    "tool_calls_dropped": "Tool calls not sent to the client because their arguments were not JSON "
                          "(a turn cut at max_tokens), by backend",
    "worker_open_fds": "File descriptors a worker process holds",
    "worker_resident_memory_bytes": "A worker process's resident memory",
    "worker_cpu_seconds": "CPU time a worker process has used",
}
# Every reason of daemon_handoff_errors_total, so the series exist (at 0) from the start.
HANDOFF_REASONS = ("timeout", "no_fd", "ctrunc", "bad_fd", "too_large", "bad_json", "network", "emfile")
TOKEN_KINDS = (("prompt_tokens", "prompt"), ("completion_tokens", "completion"), ("reasoning_tokens", "reasoning"),
               ("cache_read_input_tokens", "cache_read"), ("cache_creation_input_tokens", "cache_creation"))
_BUCKETS = {"handoff_duration": HANDOFF_BUCKETS, "stream_duration": STREAM_BUCKETS, "loop_lag": LAG_BUCKETS,
            "backend_duration": STREAM_BUCKETS, "backend_ttfb": TTFB_BUCKETS}
_LABEL = {"handoff_errors": "reason", "stream_errors": "reason", "backend_requests": "backend",
          "backend_errors": "backend", "upstream_retries": "backend", "http_responses": "code",
          "internal_errors": "where", "tool_calls_dropped": "backend"}  # (tokens has two labels, backend and kind: collected on its own)
# Every `where` of daemon_internal_errors_total, so the series exist (at 0) from the start.
INTERNAL_WHERE = ("accept", "handoff", "front", "websocket", "client", "backend", "upstream", "helper",
                  "timer", "metrics", "signal")


class SnapshotCollector:
    """A prometheus_client collector that renders a snapshot (see Stats)."""

    def __init__(self, source, backends=()):
        self.source = source
        self.backends = backends  # configured backends: their series exist from the start

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        snap = self.source()

        def hist(name, dump, labels=None, values=None):
            counts, total = dump
            cum, buckets = 0, []
            for bound, n in zip(_BUCKETS[name] + (float("inf"),), counts):
                cum += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cum))
            return buckets, total

        for name, v in snap["gauges"].items():
            yield GaugeMetricFamily("daemon_" + name, _HELP[name], value=v)
        for name in ("connections", "connections_rejected", "handoffs", "bytes_sent", "chunks_sent"):
            yield CounterMetricFamily("daemon_" + name, _HELP[name], value=snap["counters"][name])
        for name, label in _LABEL.items():
            fam = CounterMetricFamily("daemon_" + name, _HELP[name], labels=[label])
            table = dict(snap["labeled"].get(name, {}))
            if label == "backend":
                for b in self.backends:
                    table.setdefault(b, 0)
            elif name == "stream_errors":
                for r in STREAM_REASONS:
                    table.setdefault(r, 0)
            elif name == "internal_errors":
                for r in INTERNAL_WHERE:
                    table.setdefault(r, 0)
            elif name == "handoff_errors":
                for r in HANDOFF_REASONS:
                    table.setdefault(r, 0)
            for k in sorted(table):
                fam.add_metric([k], table[k])
            yield fam
        fam = CounterMetricFamily("daemon_tokens", _HELP["tokens"], labels=["backend", "kind"])
        tokens = dict(snap["labeled"].get("tokens", {}))
        for b in self.backends:
            for _, kind in TOKEN_KINDS[:2]:
                tokens.setdefault("%s/%s" % (b, kind), 0)
        for k in sorted(tokens):
            fam.add_metric(k.split("/", 1), tokens[k])
        yield fam
        build = GaugeMetricFamily("streamd_build_info", "streamd's version and Python's, as labels (always 1)",
                                  labels=["version", "python"])
        build.add_metric([__version__, "%d.%d.%d" % sys.version_info[:3]], 1)
        yield build
        workers = snap.get("workers") or {}
        for name, unit, metric in (("worker_open_fds", "", GaugeMetricFamily),
                                   ("worker_resident_memory_bytes", "", GaugeMetricFamily),
                                   ("worker_cpu_seconds", "", CounterMetricFamily)):
            if workers:
                fam = metric("daemon_" + name, _HELP[name], labels=["worker"])
                for w in sorted(workers, key=int):
                    fam.add_metric([w], workers[w][name])
                yield fam
        fam = GaugeMetricFamily("daemon_circuit_open", _HELP["circuit_open"], labels=["backend"])
        for b in sorted(set(self.backends) | set(snap["circuit_open"])):
            fam.add_metric([b], snap["circuit_open"].get(b, 0))
        yield fam
        for name, dump in snap["histograms"].items():
            buckets, total = hist(name, dump)
            yield HistogramMetricFamily("daemon_" + name + "_seconds", _HELP[name], buckets=buckets,
                                        sum_value=total)
        for name, table in snap["backend_histograms"].items():
            fam = HistogramMetricFamily("daemon_" + name + "_seconds", _HELP[name], labels=["backend"])
            for b in sorted(table):
                buckets, total = hist(name, table[b])
                fam.add_metric([b], buckets, total)
            yield fam


def metrics_registry(source, backends):
    """A registry with our collector plus the process/platform/gc collectors
    (the Go daemon exposes its runtime's equivalents).  None without
    prometheus_client: metrics are then off, with one warning."""
    try:
        from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
    except ImportError:
        log(logging.WARNING, "metrics disabled: prometheus_client is not installed (pip install prometheus-client)")
        return None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(source, backends))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class MetricsServer:
    """GET /metrics and /healthz, served from the event loop: non-blocking,
    a request-size cap and a deadline, one request per connection."""

    WHERE = "metrics"  # for daemon_internal_errors_total
    MAX_REQUEST = 8192
    TIMEOUT = 5.0

    def __init__(self, loop, addr: str, registry, health):
        host, _, port = addr.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, int(port)))
            self.sock.listen(64)
        except OSError as e:
            self.sock.close()
            raise ConfigError("metrics.listen_addr: cannot listen on %r: %s" % (addr, e.strerror)) from None
        self.sock.setblocking(False)
        self.loop, self.registry, self.health = loop, registry, health
        self.clients = {}  # sock -> [inbuf, outbuf, timer]
        loop.selector.register(self.sock, _READ, self.on_accept)
        self.addr = self.sock.getsockname()

    def on_accept(self, sock, mask):
        while True:
            try:
                c, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EMFILE and friends: the handoff listener pauses; this just waits
            c.setblocking(False)
            timer = self.loop.timers.call_later(self.TIMEOUT, self.expire, c)
            self.clients[c] = [b"", b"", timer]
            self.loop.selector.register(c, _READ, self.on_client)

    def expire(self, c):
        if c in self.clients:
            self.clients[c][2] = None
            self.drop(c)

    def drop(self, c):
        state = self.clients.pop(c)
        self.loop.timers.cancel(state[2])
        self.loop.selector.unregister(c)
        c.close()

    def on_client(self, c, mask):
        state = self.clients[c]
        if mask & _READ and not state[1]:
            try:
                data = c.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return self.drop(c)
            if not data:
                return self.drop(c)
            state[0] += data
            end = state[0].find(b"\r\n\r\n")
            if end < 0:
                if len(state[0]) > self.MAX_REQUEST:
                    state[1] = self.response(431, "text/plain", b"request header too large\n")
                else:
                    return
            else:
                state[1] = self.route(state[0][:end])
            self.loop.selector.modify(c, _WRITE, self.on_client)
        if mask & _WRITE or state[1]:
            try:
                n = c.send(state[1])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return self.drop(c)
            state[1] = state[1][n:]
            if not state[1]:
                self.drop(c)

    def route(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return self.response(400, "text/plain", b"bad request\n")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target not in (b"/metrics", b"/healthz"):
            return self.response(404, "text/plain", b"not found: try /metrics or /healthz\n")
        if method not in (b"GET", b"HEAD"):
            return self.response(405, "text/plain", b"method not allowed\n", (("Allow", "GET, HEAD"),))
        if target == b"/healthz":
            status, body = self.health()
            out = self.response(status, "application/json", _dumps(body))
        elif self.registry is None:
            out = self.response(503, "text/plain", b"metrics disabled: prometheus_client is not installed\n")
        else:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
            out = self.response(200, CONTENT_TYPE_LATEST, generate_latest(self.registry))
        if method == b"HEAD":
            out = out[:out.index(b"\r\n\r\n") + 4]
        return out

    @staticmethod
    def response(status, ctype, body, headers=()):
        return http_response(status, ctype, body, headers)

    def internal_error(self, c) -> None:
        """Serving this client raised: a 500, best effort, and close it."""
        if c in self.clients:
            try:
                c.send(self.response(500, "text/plain", b"internal error\n"))
            except OSError:
                pass
            self.drop(c)

    def close(self):
        for c in list(self.clients):
            self.drop(c)
        self.loop.selector.unregister(self.sock)
        self.sock.close()


# ---- Direct HTTP front (--listen) ----
#
# Apache's handoff stays the main path.  This lets clients (curl, a browser,
# another proxy) reach streamd directly: an HTTP/1.1 listener on the same loop.
# A connection starts in State.REQUEST: RequestParser takes its bytes until the
# request is whole (or a limit or request_timeout refuses it), HTTPFront.route
# checks auth and limits, and a stream request then runs exactly like a
# handoff (Daemon.admit), with the same response on the wire.  GET /v1/ws
# upgrades to a WebSocket: the Connection becomes a WSConnection, which turns
# the SSE the backends write into WebSocket frames.
#
# Auth (PHP's job on the handoff path) is API keys from a file, kept only as
# SHA-256 digests; limits are a token bucket and a concurrent-stream cap per
# key, or per client address when auth is off.  With --workers N each worker
# counts for itself: a client may get up to N times the limits.

class FrontState:
    """What a direct client's Connection carries besides the stream."""

    __slots__ = ("parser", "peer", "identity", "counted", "route", "ws", "pending", "close_sent",
                 "close_code", "cors", "unfinished")

    def __init__(self, parser, peer):
        self.parser, self.peer = parser, peer
        self.unfinished = None  # the address counted in HTTPFront.unfinished until the request is whole
        self.identity = None   # "key:<id>" or "addr:<ip>": whose limits this request counts against
        self.counted = False   # True while it holds one of its identity's concurrent streams
        self.route = ""
        self.ws = None         # WSParser once upgraded
        self.pending = None    # SSE bytes not yet translated (a WebSocket)
        self.close_sent = False
        self.close_code = WS_NORMAL
        self.cors = ()         # CORS headers for every answer to this request


def load_api_keys(path: str) -> dict:
    """{sha256 digest: short id} from a keys file; ConfigError if unreadable."""
    import hashlib
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError("http.api_keys_file: cannot read %s: %s" % (path, e.strerror)) from None
    keys = {}
    for line in lines:
        key = line.strip()
        if key and not key.startswith(b"#"):
            digest = hashlib.sha256(key).digest()
            keys[digest] = digest.hex()[:8]  # names the key in logs, never the key itself
    return keys


def shipped_file(name: str):
    """(where, bytes) of a file shipped with streamd (demo.html): next to
    streamd.py (a checkout, a copy, /opt/streamd), inside the bundle
    (streamd.pyz: read through its zip importer), or where pip installs the
    shared files ({sys.prefix}/share/streamd).  OSError if none has it."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    loader = globals().get("__loader__")
    for path in (here, os.path.join(sys.prefix, "share", "streamd", name)):
        try:
            with open(path, "rb") as f:
                return path, f.read()
        except NotADirectoryError:  # streamd.pyz/demo.html: a path inside the bundle
            if hasattr(loader, "get_data") and hasattr(loader, "prefix"):  # (a zipimporter)
                try:
                    return path, loader.get_data(loader.prefix + name)
                except OSError:
                    continue
        except FileNotFoundError:
            continue
    raise FileNotFoundError(errno.ENOENT, "not found next to streamd.py nor in %s"
                            % os.path.join(sys.prefix, "share", "streamd"), name)


class HTTPFront:
    STREAM_ROUTES = {"/v1/stream": ("GET", "POST"), "/v1/ws": ("GET",)}
    PAGE_ROUTES = {"/": ("GET", "HEAD"), "/healthz": ("GET", "HEAD"), "/v1/backends": ("GET", "HEAD")}
    SWEEP_INTERVAL = 60.0
    MAX_BUCKETS = 100_000  # bounds the buckets' memory under a flood of distinct clients

    def __init__(self, daemon):
        self.daemon = daemon
        self.listeners = []
        self.keys = None          # None: auth is off
        self.page = None          # the demo page's bytes, or None
        self.page_path = ""
        self.buckets = {}         # identity -> [tokens, when]
        self.active = collections.Counter()  # identity -> streams open
        self.t_sweep = None
        self.open = 0             # connections held (its own budget: http.max_connections)
        self.unfinished = collections.Counter()  # address -> connections without a whole request yet
        self.turned_away = 0      # refused at accept since the last log line about it
        self.turned_away_logged = -math.inf

    # -- setup --

    @staticmethod
    def bind(addrs) -> list:
        socks = []
        for addr in addrs:
            host, _, port = addr.rpartition(":")
            host = host.strip("[]")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, int(port)))
                s.listen(4096)
            except OSError as e:
                s.close()
                close_fds(x.detach() for x in socks)
                raise ConfigError("http.listen: cannot listen on %r: %s" % (addr, e.strerror or e)) from None
            s.setblocking(False)
            socks.append(s)
        return socks

    def configure(self, cfg: dict, reload: bool = False) -> None:
        """Read the API keys and the demo page (at start, and on SIGHUP: then
        a file that cannot be read keeps the previous contents)."""
        path = cfg["http.api_keys_file"]
        try:
            keys = load_api_keys(path) if path else None
        except ConfigError as e:
            if not reload:
                raise
            log(logging.ERROR, "reload: keeping the previous API keys", error=str(e))
        else:
            if keys is not None and not keys:
                log(logging.WARNING, "API keys file has no keys: every stream request gets 403", path=path)
            if reload or keys is not None:
                log(logging.INFO, "API keys loaded" if keys is not None else "API keys off", keys=len(keys or ()))
            self.keys = keys
        named = cfg["http.demo_page"]
        self.page_path = named or "demo.html"
        try:
            if named:
                with open(named, "rb") as f:
                    self.page = f.read()
            else:
                self.page_path, self.page = shipped_file("demo.html")
        except OSError as e:
            if named and not reload:
                raise ConfigError("http.demo_page: cannot read %s: %s" % (self.page_path, e.strerror)) from None
            if not reload:
                self.page = None  # (streamd.py copied alone: / is a 404 that says why)
            log(logging.ERROR if named else logging.INFO,
                "reload: keeping the previous demo page" if self.page else "no demo page: / answers 404",
                path=self.page_path, error=e.strerror)

    def start(self, socks) -> None:
        self.listeners = socks
        for s in socks:
            self.daemon.selector.register(s, _READ, self.daemon.on_accept)
            log(logging.INFO, "listening", addr="%s:%d" % s.getsockname()[:2], auth=self.keys is not None)
        self.t_sweep = self.daemon.timers.call_later(self.SWEEP_INTERVAL, self.sweep_timer)

    def close(self) -> None:
        for s in self.listeners:
            if not self.daemon.accept_paused:
                self.daemon.selector.unregister(s)
            s.close()
        self.listeners = []
        self.daemon.timers.cancel(self.t_sweep)
        self.t_sweep = None

    # -- a connection: read the request --

    def capacity(self) -> int:
        cfg = self.daemon.cfg
        return cfg["http.max_connections"] or max(1, self.daemon.max_connections // 4)

    def accepted(self, conn: Connection, addr) -> None:
        d = self.daemon
        cfg = d.cfg
        sock = conn.sock
        peer = addr[0] if isinstance(addr, tuple) else ""
        # The front has a budget of its own, so that clients of the front,
        # however many connect and however slowly they send, cannot take
        # the handoffs' capacity; one address may not hold many connections
        # that have not sent a request yet (slowloris).  Over either, answer
        # at once and close: holding the connection any longer would hand
        # the flood what it wants.
        per_address = cfg["http.max_pending_per_address"]
        if not d.reserve.refill():
            self.turn_away(conn, 503, "out of file descriptors", "fd_limit")
            return
        if self.open >= self.capacity():
            self.turn_away(conn, 503, "the HTTP front is at capacity (%d connections)" % self.capacity(), "capacity")
            return
        if per_address and self.unfinished[peer] >= per_address and peer not in cfg["http.trusted_proxies"]:
            self.turn_away(conn, 429, "too many unfinished requests from this address (limit %d)" % per_address,
                           "per_address")
            return
        self.open += 1
        self.unfinished[peer] += 1
        conn.state = State.REQUEST
        conn.front = FrontState(RequestParser(cfg["http.max_request_line"], cfg["http.max_header_bytes"],
                                              cfg["http.max_headers"], cfg["http.max_body_bytes"]), peer)
        conn.front.unfinished = peer
        conn.has_client = True
        d.stats.active_connections += 1
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        d.selector.register(sock, _READ, conn.on_request_io)
        conn.mask = _READ
        conn.t_life = d.timers.call_later(cfg["http.request_timeout"], HTTPFront.request_timed_out, conn)
        # The request often arrived with the connection: read it now, and save
        # a trip through select() (as for handoffs).
        self.readable(conn)

    def turn_away(self, conn: Connection, status: int, message: str, reason: str) -> None:
        """Refuse a connection at accept: one write, best effort, and close."""
        try:
            conn.sock.send(error_response(status, message, retry_after=1, fmt=self.daemon.cfg["server.error_format"]))
        except OSError:
            pass
        d = self.daemon
        d.stats.http_responses[str(status)] += 1
        # A flood must not become a flood of log lines: one line per 10 s at most.
        self.turned_away += 1
        now = d.clock()
        if now - self.turned_away_logged >= 10.0:
            log(logging.WARNING, "front connections turned away", status=status, reason=reason,
                count=self.turned_away, open=self.open, max_connections=self.capacity())
            self.turned_away, self.turned_away_logged = 0, now
        conn.outcome = reason
        conn.transition("abort")
        d.release(conn)

    def request_complete(self, conn: Connection) -> None:
        """The request is whole: it no longer counts as unfinished."""
        peer = conn.front.unfinished
        if peer is not None:
            conn.front.unfinished = None
            n = self.unfinished[peer] - 1
            if n:
                self.unfinished[peer] = n
            else:
                del self.unfinished[peer]

    @staticmethod
    def request_timed_out(conn) -> None:
        conn.t_life = None
        front = conn.daemon.front
        if conn.state is State.REQUEST and not conn.front.parser.received:
            # Not a byte: a browser's speculative preconnect, a port scan.  Close
            # quietly, as nginx does; there is no request to answer.
            log(logging.DEBUG, "idle connection closed", conn=conn.id, peer=conn.front.peer)
            conn.outcome = "timeout"
            conn.transition("abort")
            conn.daemon.release(conn)
        elif conn.state is State.REQUEST:
            front.refuse(conn, 408, "request not received within %gs" % conn.daemon.cfg["http.request_timeout"],
                         "timeout")
        elif conn.state is State.AWAITING:
            front.refuse(conn, 408, "no request message within %gs" % conn.daemon.cfg["http.request_timeout"],
                         "timeout")

    def readable(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            conn.client_gone(e)
            return
        if not data:
            conn.client_gone(None)
            return
        try:
            req = conn.front.parser.feed(data)
        except HTTPError as e:
            self.refuse(conn, e.status, str(e), "bad_request", e.headers)
            return
        if req is None:
            head = conn.front.parser.request  # the head, while the body is still coming
            if head is not None and head.header("expect", "").lower() == "100-continue" and not conn.out:
                # curl sends this for bodies over 1 KiB and waits a second for it.
                head.headers["expect"] = ""
                conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        conn.front.parser = None  # (its buffers: not needed any more)
        self.request_complete(conn)
        self.daemon.timers.cancel(conn.t_life)
        conn.t_life = None
        # From here the socket is read only to notice the client leaving.
        self.daemon.selector.modify(conn.sock, _READ, conn.on_client_io)
        self.route(conn, req)

    def refuse(self, conn: Connection, status: int, message: str, reason: str, headers=(),
               retry_after: int | None = None) -> None:
        log(logging.INFO, "request refused", conn=conn.id, status=status, reason=reason,
            peer=conn.front.peer, error=message)
        conn.respond_error(status, message, retry_after=retry_after, outcome=reason,
                           headers=tuple(headers) + conn.front.cors)

    def reply(self, conn: Connection, status: int, ctype: str, body: bytes, head_only: bool, headers=()) -> None:
        conn.transition("reply")
        conn.status = status
        conn.outcome = "done"
        out = http_response(status, ctype, body, (("Cache-Control", "no-cache"),) + tuple(headers))
        conn.write(out[:len(out) - len(body)] if head_only else out)
        conn.after_last_write()

    # -- routing --

    def route(self, conn: Connection, req: HTTPRequest) -> None:
        d = self.daemon
        path = req.path
        conn.front.route = path[:100]
        methods = self.STREAM_ROUTES.get(path) or self.PAGE_ROUTES.get(path)
        cors = conn.front.cors = self.cors_headers(req)
        if req.method == "OPTIONS" and path in self.STREAM_ROUTES and d.cfg["http.cors_origins"]:
            self.preflight(conn, req, cors)
            return
        if methods is None:
            self.refuse(conn, 404, "no such path: %s (try /, /v1/stream, /v1/ws, /healthz)" % path[:100],
                        "not_found")
            return
        if req.method not in methods:
            self.refuse(conn, 405, "%s does not allow %s" % (path, req.method[:20]), "bad_method",
                        (("Allow", ", ".join(methods)),))
            return
        head_only = req.method == "HEAD"
        if path == "/":
            if self.page is None:
                self.refuse(conn, 404, "no demo page: %s is missing (set http.demo_page)" % self.page_path,
                            "not_found")
            else:
                self.reply(conn, 200, "text/html; charset=utf-8", self.page, head_only,
                           (("X-Content-Type-Options", "nosniff"),))
            return
        if path == "/healthz":
            status, body = d.health()
            self.reply(conn, status, "application/json", _dumps(body), head_only)
            return
        if path == "/v1/backends":
            self.reply(conn, 200, "application/json",
                       _dumps({"backends": d.allowed_backends(), "default": d.cfg["backend.provider"],
                               "auth": self.keys is not None}), head_only)
            return
        if not self.allow(conn, req):
            return
        try:
            stream_req = self.stream_request(req)
            if stream_req is not None:
                self.check_request(stream_req)
        except ProtocolError as e:
            self.refuse(conn, 400, str(e), "bad_request")
            return
        if stream_req is not None and cors:
            stream_req.response_headers = list(stream_req.response_headers) + list(cors)
        self.active[conn.front.identity] += 1
        conn.front.counted = True
        if path == "/v1/ws":
            if not self.upgrade(conn, req):
                return
            if stream_req is None:  # the request comes as the first message
                conn.t_life = d.timers.call_later(d.cfg["http.request_timeout"], HTTPFront.request_timed_out, conn)
                return
        d.admit(conn, stream_req, "request")

    def check_request(self, req: Request) -> None:
        """A handoff's checks, and one of the front's own: a client of the front
        may not name files in data_dir (they are PHP's, written for handoffs:
        another user's, maybe); inline images are fine."""
        self.daemon.check_backend(req)
        if req.attachments or req.image_paths:
            raise ProtocolError(400, "attachments: files in data_dir can only be named by a handoff from "
                                "Apache; send images inline (images: [{base64, mime_type}])")

    def stream_request(self, req: HTTPRequest):
        """The stream's Request, from a POST body (the handoff data's JSON) or
        the query string; None for a WebSocket that will send it as a message."""
        if req.method == "POST":
            return parse_handoff(req.body)
        q = req.query
        if req.path == "/v1/ws" and not ("prompt" in q or "messages" in q):
            return None
        obj = {}
        for name in ("prompt", "backend", "model", "system", "request_id", "test_pattern", "thread_id",
                     "assistant_id", "stream_mode", "profile"):
            if name in q:
                obj[name] = q[name]
        for name, conv in (("max_tokens", int), ("temperature", _finite), ("top_p", _finite)):
            if name in q:
                try:
                    obj[name] = conv(q[name])
                except ValueError:
                    raise ProtocolError(400, "%s: expected %s, got %r" % (
                        name, "an integer" if conv is int else "a number", q[name][:40])) from None
        for name in ("include_usage", "include_reasoning"):
            if name in q:
                obj[name] = q[name].lower() in ("1", "true", "yes")
        if "messages" in q:
            try:
                obj["messages"] = loads_client_json(q["messages"])
            except ValueError:
                raise ProtocolError(400, "messages: expected a JSON list in the query string") from None
        return request_from_object(obj)

    # -- CORS: pages from other origins (a dev server on another port) --

    def cors_headers(self, req: HTTPRequest) -> tuple:
        origin = req.header("origin")
        allowed = self.daemon.cfg["http.cors_origins"]
        if origin is None or not allowed:
            return ()
        if "*" in allowed:
            return (("Access-Control-Allow-Origin", "*"),)
        if origin.rstrip("/") in allowed:
            return (("Access-Control-Allow-Origin", origin), ("Vary", "Origin"))
        return ()

    def preflight(self, conn: Connection, req: HTTPRequest, cors: tuple) -> None:
        if not cors:
            self.refuse(conn, 403, "origin %r is not in http.cors_origins" % (req.header("origin") or "")[:100],
                        "forbidden")
            return
        conn.transition("reply")
        conn.status = 204
        conn.outcome = "done"
        conn.write(("HTTP/1.1 204 No Content\r\n%sAccess-Control-Allow-Methods: GET, POST\r\n"
                    "Access-Control-Allow-Headers: Authorization, Content-Type, X-API-Key\r\n"
                    "Access-Control-Max-Age: 600\r\nConnection: close\r\n\r\n"
                    % "".join("%s: %s\r\n" % h for h in cors)).encode("latin-1", "replace"))
        conn.after_last_write()

    # -- auth and limits --

    def client_address(self, conn: Connection, req: HTTPRequest) -> str:
        """The peer, or behind a trusted proxy the last address it appended
        to X-Forwarded-For that is not itself a trusted proxy."""
        trusted = self.daemon.cfg["http.trusted_proxies"]
        addr = conn.front.peer
        if addr in trusted and "x-forwarded-for" in req.headers:
            for hop in reversed(req.headers["x-forwarded-for"].split(",")):
                hop = hop.strip()
                if hop and hop not in trusted:
                    return hop[:64]
        return addr

    def allow(self, conn: Connection, req: HTTPRequest) -> bool:
        """Auth, then the rate limit, then the concurrent cap; refuse and
        return False if one says no."""
        import hashlib
        cfg = self.daemon.cfg
        addr = self.client_address(conn, req)
        conn.front.peer = addr
        identity = "addr:" + addr
        if self.keys is not None:
            key = req.header("x-api-key")
            auth = req.header("authorization", "")
            if key is None and auth[:7].lower() == "bearer ":
                key = auth[7:].strip()
            if key is None:
                key = req.query.get("api_key")  # EventSource and WebSocket cannot set headers
            if key is None:
                if self.limited(conn, identity, cfg):  # failed attempts spend the address's tokens
                    return False
                self.refuse(conn, 401, "an API key is required (X-API-Key or Authorization: Bearer)",
                            "unauthorized", (("WWW-Authenticate", 'Bearer realm="streamd"'),))
                return False
            # A dict lookup by digest: timing reveals nothing about the keys themselves.
            key_id = self.keys.get(hashlib.sha256(key.encode("latin-1", "replace")).digest())
            if key_id is None:
                if self.limited(conn, identity, cfg):
                    return False
                self.refuse(conn, 403, "the API key is not valid", "forbidden")
                return False
            identity = "key:" + key_id
        conn.front.identity = identity
        if self.limited(conn, identity, cfg):
            return False
        cap = cfg["http.max_streams_per_key"]
        if cap and self.active[identity] >= cap:
            self.refuse(conn, 429, "too many concurrent streams for this %s (limit %d)"
                        % ("API key" if self.keys is not None else "client address", cap),
                        "rate_limited", retry_after=1)
            return False
        return True

    def limited(self, conn: Connection, identity: str, cfg: dict) -> bool:
        """Take a token from identity's bucket; if there is none, refuse 429."""
        rate = cfg["http.rate_limit"]
        if not rate:
            return False
        window = cfg["http.rate_window"]
        now = self.daemon.clock()
        b = self.buckets.get(identity)
        tokens = rate if b is None else min(rate, b[0] + (now - b[1]) * rate / window)
        if tokens >= 1:
            self.buckets[identity] = [tokens - 1, now]
            if len(self.buckets) > self.MAX_BUCKETS:
                self.sweep()
                if len(self.buckets) > self.MAX_BUCKETS // 2:
                    # Still full (a flood of distinct clients): forget the least
                    # recently seen half.  They start again with full buckets.
                    by_age = sorted(self.buckets, key=lambda k: self.buckets[k][1])
                    for identity in by_age[:len(by_age) - self.MAX_BUCKETS // 2]:
                        del self.buckets[identity]
            return False
        retry = max(1, math.ceil((1 - tokens) * window / rate))
        self.refuse(conn, 429, "rate limit: %d requests per %gs" % (rate, window), "rate_limited",
                    retry_after=retry)
        return True

    def sweep_timer(self, _=None) -> None:
        self.sweep()
        self.t_sweep = self.daemon.timers.call_later(self.SWEEP_INTERVAL, self.sweep_timer)

    def sweep(self) -> None:
        """Forget buckets that have refilled: a new one starts full anyway."""
        cfg = self.daemon.cfg
        rate, window = cfg["http.rate_limit"], cfg["http.rate_window"]
        now = self.daemon.clock()
        for identity, (tokens, when) in list(self.buckets.items()):
            if not rate or tokens + (now - when) * rate / window >= rate:
                del self.buckets[identity]

    def release(self, conn: Connection) -> None:
        front = conn.front
        self.open -= 1
        self.request_complete(conn)
        if front.counted:
            front.counted = False
            n = self.active[front.identity] - 1
            if n:
                self.active[front.identity] = n
            else:
                del self.active[front.identity]

    # -- WebSocket (RFC 6455) --

    def upgrade(self, conn: Connection, req: HTTPRequest) -> bool:
        import base64
        import binascii
        if "websocket" not in req.header_tokens("upgrade") or "upgrade" not in req.header_tokens("connection"):
            self.refuse(conn, 426, "/v1/ws is a WebSocket endpoint (for SSE use /v1/stream)", "bad_request",
                        (("Upgrade", "websocket"), ("Connection", "Upgrade")))
            return False
        if req.header("sec-websocket-version") != "13":
            self.refuse(conn, 426, "unsupported WebSocket version (this server speaks 13)", "bad_request",
                        (("Sec-WebSocket-Version", "13"),))
            return False
        key = req.header("sec-websocket-key", "")
        try:
            ok = len(base64.b64decode(key, validate=True)) == 16
        except (binascii.Error, ValueError):
            ok = False
        if not ok:
            self.refuse(conn, 400, "Sec-WebSocket-Key must be 16 bytes in base64", "bad_request")
            return False
        conn.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   b"Sec-WebSocket-Accept: " + ws_accept_key(key).encode("ascii") + b"\r\n\r\n")
        if conn.state is State.CLOSED:
            return False
        conn.transition("upgrade")
        # Same slots, other methods: from here the connection speaks frames.
        conn.__class__ = WSConnection
        conn.front.ws = WSParser(self.daemon.cfg["http.max_body_bytes"])
        conn.front.pending = bytearray()
        return True

    def ws_request(self, conn: Connection, payload: bytes) -> None:
        """The first text message of a WebSocket: the stream request, as JSON."""
        d = self.daemon
        d.timers.cancel(conn.t_life)
        conn.t_life = None
        try:
            req = parse_handoff(payload)
            self.check_request(req)
        except ProtocolError as e:
            self.refuse(conn, 400, str(e), "bad_request")
            return
        d.admit(conn, req, "request")


class WSConnection(Connection):
    """A direct client after a WebSocket upgrade.  The backends still write
    SSE; write() turns it into frames (sse_to_ws).  Client frames are read
    and answered: ping -> pong, close -> close, the first text message is
    the request."""

    __slots__ = ()

    def write(self, data) -> None:
        frames = sse_to_ws(data, self.front.pending)
        if frames:
            Connection.write(self, frames)

    def send_frame(self, frame: bytes) -> None:
        Connection.write(self, frame)

    def send_head(self) -> None:
        self.transition("head")
        self.status = 101
        self.daemon.backend_answered(self)
        self.last_send = self.daemon.clock()
        self.arm_heartbeat()

    def respond_error(self, status, message, kind=None, retry_after=None, outcome="error", headers=()):
        # The 101 went out already: the error is a message, then a close.
        self.daemon.stop_backend(self)
        self.transition("error_response" if self.state is not State.STREAMING else "end")
        self.status = status
        self.outcome = self.outcome or outcome
        err = {"type": kind or ERROR_KINDS.get(status, "error"), "message": message, "status": status}
        if retry_after is not None:
            err["retry_after"] = retry_after
        self.send_frame(ws_text({"type": "error", "error": err}))
        self.front.close_code = 1013 if status == 503 else WS_POLICY if status < 500 else 1011
        self.after_last_write()

    def end_stream(self, final: bytes, outcome: str) -> None:
        self.front.close_code = WS_NORMAL if outcome == "done" else 1001 if outcome == "shutdown" else 1011
        Connection.end_stream(self, final, outcome)

    def after_last_write(self) -> None:
        if not self.front.close_sent:
            self.front.close_sent = True
            self.send_frame(ws_close_frame(self.front.close_code))
        Connection.after_last_write(self)

    def last_words(self, kind, message, status=503):
        if self.front.close_sent:
            return None
        return (ws_text({"type": "error", "error": {"type": kind, "message": message}})
                + ws_close_frame(1011 if status == 500 else 1001))

    def received(self, data: bytes) -> None:
        # (The fault is kept as (code, text), never as the exception: in a
        # local it would form a cycle with its own traceback, holding this
        # connection until the collector runs; see Daemon.tend_gc.)
        try:
            messages, fault = self.front.ws.feed(data), None
        except WSError as e:
            messages, fault = e.messages, (e.code, str(e))
        for opcode, payload in messages:  # (those before a fault count: it came after them)
            self.message(opcode, payload)
            if self.state is State.CLOSED:
                return
        if fault is not None:
            self.fail(*fault)

    def message(self, opcode: int, payload: bytes) -> None:
        if opcode == WS_PING:
            if not self.front.close_sent:
                self.send_frame(ws_frame(WS_PONG, payload))
        elif opcode == WS_CLOSE:
            if self.front.close_sent:
                return  # the answer to ours: the client closes the TCP connection next (or LINGER does)
            # The client closed first: stop the stream, answer with its code.
            self.front.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else WS_NORMAL
            self.outcome = self.outcome or "client_disconnected"
            self.end_with("close")
        elif opcode == WS_TEXT:
            if self.state is State.AWAITING:
                self.daemon.front.ws_request(self, payload)
            # Later messages are ignored: one stream per WebSocket.
        elif opcode == WS_BINARY:
            self.fail(WS_UNSUPPORTED, "binary messages are not accepted")

    def fail(self, code: int, reason: str) -> None:
        """The client broke the protocol: close with `code`."""
        log(logging.INFO, "websocket closed", conn=self.id, code=code, reason=reason, peer=self.front.peer)
        if self.front.close_sent:
            self.transition("abort")
            self.daemon.release(self)
            return
        self.outcome = self.outcome or "bad_request"
        self.front.close_code = code
        self.end_with("close")

    def end_with(self, event: str) -> None:
        self.daemon.stop_backend(self)
        if self.state in (State.AWAITING, State.STARTING, State.STREAMING):
            self.transition(event)
            self.after_last_write()
        else:  # FLUSHING or DRAINING after an HTTP-level answer: just go
            self.transition("abort")
            self.daemon.release(self)


# ---- Event loop ----
#
# LoopBase holds what every loop has (selector, timers, signals).  Daemon is the
# loop of streams: the listener, every Connection, the backend operations, the
# drain.  Supervisor (Workers, below) is the parent of --workers N.

class LoopBase:
    """What every streamd loop has: a selector, timers, and signals that only
    wake the loop (set_wakeup_fd on a socketpair); the loop then calls
    handle_<name>.  Daemon (the streams) and Supervisor (--workers) build on it."""

    SIGNALS = {signal.SIGTERM: "term", signal.SIGINT: "term", signal.SIGHUP: "hup", signal.SIGUSR1: "usr1"}

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.selector = selectors.DefaultSelector()
        self.timers = Timers(clock)
        self.stopping = False
        self.exit_status = 0
        self.wakeup_r = self.wakeup_w = None

    def run(self) -> int:
        while not self.stopping:
            self.run_once()
        self.close()
        return self.exit_status

    def dispatch(self, timeout) -> None:
        """select(), then call each ready socket's handler (key.data), guarded.
        A handler may unregister a socket whose event is later in this same
        batch (a client's EOF cancels its upstream): such stale events are skipped."""
        registered = self.selector.get_map()
        for key, mask in self.selector.select(timeout):
            if registered.get(key.fd) is key:
                try:
                    key.data(key.fileobj, mask)
                except Exception as e:
                    self.contain(e, key.data, key.fileobj)

    # -- containment: a bug met while handling one connection ends that one --
    #
    # One process holds every stream, so an exception that left the loop would
    # end tens of thousands of them, and under Restart=on-failure the same
    # request could do it again after every restart.  So every handler the
    # loop calls (socket events, timers, backend steps) runs under a guard:
    # an exception ends the connection it was handling (a 500 before the
    # head, an error event after it), logs one "internal error" line with the
    # traceback, and counts daemon_internal_errors_total{where}.  Objects that
    # are not connections (an HTTP/2 connection, a metrics client) clean up
    # with their internal_error(fileobj).  Only a failure of the loop's own
    # machinery (select(), the timer heap) leaves run_once, and stops the daemon.

    def contain(self, exc: Exception, handler, fileobj) -> None:
        """An I/O handler raised: find what it was handling, and end that."""
        owner = getattr(handler, "__self__", None)
        name = getattr(handler, "__name__", "")
        where = getattr(owner, "WHERE", None) or {"on_accept": "accept", "on_signal": "signal"}.get(name, name)
        self.contained(exc, where, None, owner, fileobj)

    def timer_failed(self, timer, exc: Exception) -> None:
        arg = timer.arg
        conn = arg if isinstance(arg, Connection) else getattr(arg, "conn", None)
        owner = getattr(timer.fn, "__self__", None)
        self.contained(exc, "timer", conn if isinstance(conn, Connection) else None,
                       None if owner is self else owner)

    def contained(self, exc: Exception, where: str, conn=None, owner=None, fileobj=None) -> None:
        self.count_internal(where)
        log(logging.ERROR, "internal error", where=where, conn=conn.id if conn is not None else "",
            exc_info=(type(exc), exc, exc.__traceback__))
        try:
            if conn is not None:
                conn.fail_internal()
            elif owner is not None and hasattr(owner, "internal_error"):
                owner.internal_error(fileobj)
        except Exception:
            log(logging.ERROR, "internal error while cleaning up", where=where, exc_info=True)
            if conn is not None:
                self.force_close(conn)

    def count_internal(self, where: str) -> None:
        raise NotImplementedError

    def force_close(self, conn) -> None:
        raise NotImplementedError

    def install_signals(self) -> None:
        self.wakeup_r, self.wakeup_w = socket.socketpair()
        self.wakeup_r.setblocking(False)
        self.wakeup_w.setblocking(False)
        signal.set_wakeup_fd(self.wakeup_w.fileno(), warn_on_full_buffer=False)
        for sig in self.SIGNALS:
            signal.signal(sig, _ignore_signal)
        self.selector.register(self.wakeup_r, _READ, self.on_signal)

    def on_signal(self, sock, mask) -> None:
        try:
            data = sock.recv(512)
        except (BlockingIOError, InterruptedError):
            return
        for signum in data:
            name = self.SIGNALS.get(signum)
            if name:
                getattr(self, "handle_" + name)()

    def start_watchdog(self) -> None:
        """With systemd's WatchdogSec: WATCHDOG=1 every half interval, from the
        loop itself, so a stuck loop stops the pings and systemd restarts us."""
        interval = watchdog_interval()
        if interval:
            def pet(_=None):
                sd_notify("WATCHDOG=1")
                self.timers.call_later(interval, pet)
            pet()

    def close_signals(self) -> None:
        if self.wakeup_r is not None:
            signal.set_wakeup_fd(-1)
            self.selector.unregister(self.wakeup_r)
            self.wakeup_r.close()
            self.wakeup_w.close()
            self.wakeup_r = self.wakeup_w = None


class Daemon(LoopBase):
    """The event loop, the listener, and every connection."""

    def __init__(self, cfg: dict, clock=time.monotonic):
        super().__init__(clock)
        self.cfg = cfg
        self.runnable = collections.deque()  # (conn, value, exception) to resume
        self.conns = set()                    # every open Connection
        self.ids = itertools.count(1)
        self.stats = Stats(histograms=not cfg["server.benchmark"])
        self.metrics = None  # MetricsServer, when metrics.listen_addr is set
        self.listener = None
        self.listener_owned = None  # (path, inode) when we created the socket file
        self.accept_paused = False
        self.pauses, self.pause_logged = 0, -math.inf  # (for pause_accepting's log line)
        self.draining = False
        self.t_drain = None
        self.report_sock = None  # in a worker: where its metrics snapshots go
        self.gc_frozen_at = self.gc_full_at = clock()
        # Alone, accept until EAGAIN.  As one of several workers woken for the
        # same socket, take a few per wakeup so that a burst is shared out.
        self.accept_batch = -1
        self.max_connections = cfg["server.max_connections"]
        self.fd_limit = None
        self.backends = {}  # name -> loaded backend module
        self.flags, self.env = {}, {}  # what SIGHUP re-applies on top of the file
        self.ops = {
            "sleep": self._op_sleep, "event": self._op_event, "raw": self._op_raw,
            "head": self._op_head, "readable": self._op_readable, "writable": self._op_writable,
            "call": self._op_call, "paced": self._op_paced, "now": self._op_now, "count": self._op_count,
            "park": self._op_park, "loop": self._op_loop,
        }
        self.helpers = None  # HelperPool, made on the first "call"
        self.breakers = {}   # backend name -> Breaker
        self.front = None    # HTTPFront, with --listen
        self.reserve = FdReserve()

    # -- the loop --

    def run_once(self, max_wait: float | None = None) -> None:
        # 1. How long may select() sleep?
        if self.runnable:
            timeout = 0.0
        else:
            deadline = self.timers.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            if max_wait is not None and (timeout is None or timeout > max_wait):
                timeout = max_wait
        # 2. Wait for I/O.  3. Dispatch it: key.data is the handler (LoopBase.dispatch).
        self.dispatch(timeout)
        # 4. Fire due timers, and those due within TIMER_SLACK: with thousands
        #    of streams on the same cadence, one pass then serves many of them
        #    instead of one select() each (Linux and Go timers do the same).
        self.timers.run_due(self.clock(), TIMER_SLACK, self.timer_failed)
        # 5. Step the backends that can run.  Only those queued before this pass:
        #    a generator that re-queues itself waits for the next pass.
        for _ in range(len(self.runnable)):
            conn, value, exc = self.runnable.popleft()
            if conn.gen is not None:
                self.step(conn, value, exc)
        if self.draining and not self.conns:
            self.stopping = True

    # -- containment (see LoopBase.contain): what is special about connections --

    HANDLER_WHERE = {"on_unix_readable": "handoff", "on_request_io": "front", "on_client_io": "client",
                     "on_backend_io": "backend"}

    def contain(self, exc: Exception, handler, fileobj) -> None:
        owner = getattr(handler, "__self__", None)
        if not isinstance(owner, Connection):
            super().contain(exc, handler, fileobj)
            return
        where = self.HANDLER_WHERE.get(getattr(handler, "__name__", ""), "client")
        if where == "client" and owner.front is not None:
            where = "websocket" if owner.front.ws is not None else "front"
        self.contained(exc, where, owner)

    def count_internal(self, where: str) -> None:
        self.stats.internal_errors[where] += 1

    def force_close(self, conn: Connection) -> None:
        """The clean-up of a failed connection raised too: close what it holds by hand."""
        self.conns.discard(conn)
        for t in (conn.t_life, conn.t_write, conn.t_heartbeat, conn.t_backend):
            self.timers.cancel(t)
        close_fds(conn.unix_fds or ())
        for sock in (conn.sock, conn.waiting if isinstance(conn.waiting, socket.socket) else None):
            if sock is None:
                continue
            try:
                self.selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            try:
                sock.close()
            except OSError:
                pass

    # -- the listener --

    def open_listener(self, inherited=None) -> None:
        """Bind the Unix socket (or use one from systemd or the parent)."""
        if inherited is None:
            self.listener, self.listener_owned = bind_listener(self.cfg)
        else:
            self.listener = inherited
        self.listener.setblocking(False)
        self.selector.register(self.listener, _READ, self.on_accept)

    def open_front(self, inherited=None) -> None:
        """The direct HTTP front, when http.listen names addresses."""
        if not self.cfg["http.listen"]:
            return
        self.front = HTTPFront(self)
        self.front.configure(self.cfg)
        self.front.start(HTTPFront.bind(self.cfg["http.listen"]) if inherited is None else inherited)

    def listeners(self) -> list:
        socks = [] if self.listener is None else [self.listener]
        return socks + self.front.listeners if self.front is not None else socks

    def close_listener(self) -> None:
        if self.front is not None:
            self.front.close()
        if self.listener is None:
            return
        if not self.accept_paused:
            self.selector.unregister(self.listener)
        self.listener.close()
        self.listener = None
        unlink_owned(self.listener_owned)
        self.listener_owned = None

    def on_accept(self, listener, mask) -> None:
        """Accept until EAGAIN (the handoff socket, or a --listen one).  On
        EMFILE/ENFILE stop accepting for a moment: the pending connection stays
        in the backlog and would wake us again at once, so retrying immediately
        would spin the loop at 100% CPU."""
        budget = self.accept_batch
        spared = False  # a spare was just closed to make room for this accept
        while budget and listener.fileno() >= 0:  # (a handler may close it: a drain)
            budget -= 1
            if not spared and not self.reserve.refill() and not self.reserve.spares:
                # Not one spare fd: a handoff taken in now could lose its client's
                # socket at recvmsg.  Leave them in the backlog a moment.
                self.pause_accepting(OSError(errno.EMFILE, "no spare file descriptor"))
                return
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # At the fd limit: take one in with a spare slot, to answer it 503,
                # only while both spares are there (the second is for its client's
                # fd: without it that socket would be lost, see FdReserve); else
                # wait, the handoffs stay in the backlog.
                if not spared and e.errno in (errno.EMFILE, errno.ENFILE) \
                        and len(self.reserve.spares) == FdReserve.SPARES and self.reserve.release():
                    spared = True
                    continue
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.pause_accepting(e)
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            spared = False
            sock.setblocking(False)
            conn = Connection(self, sock, next(self.ids))
            self.conns.add(conn)
            try:
                if listener is self.listener:
                    self.accept_handoff(conn)
                else:
                    self.front.accepted(conn, addr)
            except Exception as e:
                self.contained(e, "handoff" if listener is self.listener else "front", conn)

    def accept_handoff(self, conn: Connection) -> None:
        # Apache sends its message right after connecting: try to read it now
        # and save a trip through select() for every handoff.
        self.receive(conn)
        if conn.state is State.RECEIVING:
            self.selector.register(conn.sock, _READ, conn.on_unix_readable)
            conn.mask = _READ
            conn.t_life = self.timers.call_later(self.cfg["server.handoff_timeout"],
                                                 Daemon.handoff_timeout, conn)

    def pause_accepting(self, exc: OSError) -> None:
        # (At a sustained limit this comes every 100 ms: one line per 10 s.)
        self.pauses += 1
        now = self.clock()
        if now - self.pause_logged >= 10.0:
            log(logging.WARNING, "accept paused: out of file descriptors", error=exc.strerror,
                connections=len(self.conns), pauses=self.pauses)
            self.pauses, self.pause_logged = 0, now
        self.stats.handoff_errors["emfile"] += 1
        for s in self.listeners():
            self.selector.unregister(s)
        self.accept_paused = True
        self.timers.call_later(0.1, self.resume_accepting)

    def probe_lag(self, due=None) -> None:
        """A timer that re-arms itself: how late it fires is the loop's lag,
        measured even when no stream has a timer (daemon_loop_lag_seconds).
        It also keeps the garbage collector from stalling the loop: see below."""
        now = self.clock()
        if due is not None and self.stats.histograms:
            self.stats.loop_lag.observe(max(0.0, now - due))
        self.tend_gc(now)
        self.timers.call_at(now + LAG_PROBE_INTERVAL, self.probe_lag, now + LAG_PROBE_INTERVAL)

    def tend_gc(self, now: float) -> None:
        # CPython's full collections walk every tracked object: with 19,000
        # live streams, tens of milliseconds with the loop stopped.  Streams
        # are freed by reference counting, not by the collector, so once a
        # second we move what survived into the permanent generation
        # (gc.freeze), and collections only look at young objects.  In case
        # something long-lived ever forms a reference cycle, every
        # FULL_GC_INTERVAL we unfreeze and collect everything once.
        if now - self.gc_full_at >= FULL_GC_INTERVAL:
            gc.unfreeze()
            gc.collect()
            self.gc_full_at = now
        if now - self.gc_frozen_at >= 1.0:
            gc.freeze()
            self.gc_frozen_at = now

    def snapshot(self) -> dict:
        return self.stats.snapshot(self.conns)

    def on_parent_gone(self, sock, mask) -> None:
        try:
            if sock.recv(1):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.selector.unregister(sock)
        log(logging.WARNING, "supervisor exited; draining")
        if not self.draining:
            self.handle_term()

    def report(self, _=None) -> None:
        """In a worker: send our numbers to the parent, which serves /metrics
        (with this process's own fds, memory and CPU: the parent's process_*
        metrics describe only the parent)."""
        snap = self.snapshot()
        snap["process"] = process_figures()
        try:
            self.report_sock.send(json.dumps(snap).encode())
        except OSError:
            pass  # the parent is gone or busy; the next report will do
        if not self.stopping and _ is not None:
            self.timers.call_later(REPORT_INTERVAL, self.report, True)

    def health(self):
        s = self.stats
        status = "draining" if self.draining else "ok"
        return (503 if self.draining else 200,
                {"status": status, "active_streams": s.active_streams, "active_connections": s.active_connections})

    def start_metrics(self) -> None:
        addr = self.cfg["metrics.listen_addr"]
        if not addr:
            return
        registry = metrics_registry(self.snapshot, self.allowed_backends())
        self.metrics = MetricsServer(self, addr, registry, self.health)
        log(logging.INFO, "metrics", addr="%s:%d" % self.metrics.addr[:2], enabled=registry is not None)

    def resume_accepting(self, _=None) -> None:
        self.reserve.refill()
        if self.accept_paused:
            self.accept_paused = False
            for s in self.listeners():
                self.selector.register(s, _READ, self.on_accept)

    # -- receiving a handoff: one message, data and the client's fd (README "Handoff data") --

    @staticmethod
    def handoff_timeout(conn) -> None:
        conn.t_life = None
        if conn.state is not State.RECEIVING:
            return
        d = conn.daemon
        if conn.unix_fds:
            # --socket-type stream, and the sender sent its fd but never closed:
            # we hold the client, so answer it.  What arrived is all there is.
            log(logging.WARNING, "handoff sender did not close; using the data that arrived", conn=conn.id,
                bytes=len(conn.unix_buf))
            data, fds = bytes(conn.unix_buf), conn.unix_fds
            conn.unix_buf = conn.unix_fds = None
            d.got_message(conn, data, fds, 0)
            return
        d.handoff_failed(conn, "timeout", "no handoff message within %gs" % d.cfg["server.handoff_timeout"])

    def receive(self, conn: Connection) -> None:
        """Read the handoff message: data plus SCM_RIGHTS fds."""
        maxbytes = self.cfg["server.max_handoff_bytes"]
        stream_mode = self.cfg["server.socket_type"] == "stream"
        if stream_mode and conn.unix_buf is None:
            conn.unix_buf, conn.unix_fds = bytearray(), []
        # A seqpacket message bigger than the buffer arrives cut, with MSG_TRUNC;
        # a stream has no such flag, so read one byte more than allowed to notice.
        size = maxbytes + 1 - len(conn.unix_buf) if stream_mode else maxbytes
        # MSG_CMSG_CLOEXEC: received fds must not leak into child processes.
        # A spare slot for the client's fd first, so that it is never lost
        # to a full fd table (see FdReserve).
        self.reserve.release()
        try:
            data, anc, flags, _ = conn.sock.recvmsg(size, socket.CMSG_SPACE(MAX_FDS * _FD_SIZE),
                                                    getattr(socket, "MSG_CMSG_CLOEXEC", 0))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.handoff_failed(conn, "network", "recvmsg failed: %s" % e.strerror)
            return
        finally:
            conn.fd_limit = not self.reserve.refill()
        fds = fds_from_ancillary(anc)
        if stream_mode:
            # A stream socket has no message boundary: the message is everything
            # until Apache closes its end.  fds arrive with the first bytes.
            conn.unix_fds += fds
            conn.unix_buf += data
            if data and len(conn.unix_buf) <= maxbytes and not flags & socket.MSG_CTRUNC:
                return  # wait for more, or for EOF
            if len(conn.unix_buf) > maxbytes:
                flags |= socket.MSG_TRUNC
            data, fds = bytes(conn.unix_buf[:maxbytes]), conn.unix_fds
            conn.unix_buf = conn.unix_fds = None
        self.got_message(conn, data, fds, flags)

    def got_message(self, conn: Connection, data: bytes, fds: list, flags: int) -> None:
        # The Unix connection has done its job: close it now rather than hold an
        # fd for the whole stream.  Apache never reads a reply.
        self.timers.cancel(conn.t_life)
        conn.t_life = None
        if conn.mask:
            self.selector.unregister(conn.sock)
            conn.mask = 0
        conn.sock.close()
        conn.sock = None
        # From here every fd in `fds` is ours to close exactly once.
        if flags & socket.MSG_CTRUNC:
            close_fds(fds)
            if len(fds) < MAX_FDS:
                # Room was made for MAX_FDS: fewer means the kernel could not
                # install them, because the fd table is full.
                self.handoff_failed(conn, "emfile", "the client's socket was lost: out of file descriptors "
                                    "(fd limit %s)" % (self.fd_limit or "?"))
            else:
                self.handoff_failed(conn, "ctrunc", "control data truncated (more than %d fds)" % MAX_FDS)
            return
        if not fds:
            self.handoff_failed(conn, "no_fd", "handoff message carried no file descriptor"
                                if data else "connection closed without a handoff message")
            return
        if len(fds) > 1:
            log(logging.WARNING, "handoff carried extra fds; keeping the first", conn=conn.id, fds=len(fds))
            close_fds(fds[1:])
        client = adopt_client_socket(fds[0])
        if client is None:
            self.handoff_failed(conn, "bad_fd", "received fd is not a connected stream socket")
            return
        conn.sock = client
        conn.has_client = True
        if self.stats.histograms:
            self.stats.handoff_duration.observe(self.clock() - conn.accepted_at)
        self.stats.handoffs += 1
        self.stats.active_connections += 1
        self.selector.register(client, _READ, conn.on_client_io)
        conn.mask = _READ
        if flags & socket.MSG_TRUNC:
            self.stats.handoff_errors["too_large"] += 1
            log(logging.INFO, "handoff rejected", conn=conn.id, reason="too_large")
            conn.respond_error(413, "handoff data is larger than %d bytes" % self.cfg["server.max_handoff_bytes"],
                               outcome="too_large")
            return
        req = None
        try:
            req = parse_handoff(data)
            self.check_backend(req)
        except ProtocolError as e:
            if req is not None:
                conn.req = req  # (refused: release() discards the files it named)
            self.stats.handoff_errors[e.reason] += 1
            log(logging.INFO, "handoff rejected", conn=conn.id, reason=e.reason, error=str(e))
            conn.respond_error(e.status, str(e), outcome=e.reason)
            return
        self.admit(conn, req, "handoff")

    def admit(self, conn: Connection, req: Request, event: str) -> None:
        """A valid request (handoff or direct): stream it, unless shutting down
        or at capacity."""
        conn.req = req
        if req.dropped_headers:
            log(logging.DEBUG, "dropped response headers", conn=conn.id, names=",".join(req.dropped_headers))
        if self.draining:
            conn.respond_error(503, "server is shutting down", retry_after=1, outcome="shutdown")
        elif self.stats.active_connections > self.max_connections or conn.fd_limit:
            self.stats.rejected += 1
            log(logging.WARNING, "at capacity", conn=conn.id, max_connections=self.max_connections,
                fd_limit=self.fd_limit or "", reason="fd_limit" if conn.fd_limit else "max_connections")
            conn.respond_error(503, "server at capacity (%s)" % (
                "out of file descriptors" if conn.fd_limit else "%d connections" % self.max_connections),
                retry_after=1, outcome="rejected")
        else:
            conn.transition(event)
            self.start_stream(conn)

    def handoff_failed(self, conn: Connection, reason: str, detail: str) -> None:
        """A handoff with no usable client socket: nothing to answer, count and log."""
        self.stats.handoff_errors[reason] += 1
        log(logging.WARNING, "handoff failed", conn=conn.id, reason=reason, detail=detail)
        conn.outcome = reason
        conn.transition("abort")
        self.release(conn)

    def check_backend(self, req: Request) -> None:
        if req.backend is not None and req.backend not in self.allowed_backends():
            raise ProtocolError(400, "backend: %r is not configured here (configured: %s)"
                                % (req.backend, ", ".join(self.allowed_backends())))
        if req.profile is not None:
            name = req.backend or self.cfg["backend.provider"]
            profiles = self.cfg.get("backend.%s.profiles" % name) or {}
            if req.profile not in profiles:
                raise ProtocolError(400, "profile: %r is not a profile of backend %s (profiles: %s)"
                                    % (req.profile[:64], name, ", ".join(sorted(profiles)) or "none"))

    def allowed_backends(self) -> list:
        return [self.cfg["backend.provider"]] + [b for b in self.cfg["backend.enabled"]
                                                  if b != self.cfg["backend.provider"]]

    # -- streams --

    def breaker(self, name: str) -> Breaker:
        br = self.breakers.get(name)
        if br is None:
            br = self.breakers[name] = Breaker(name)
        return br

    @staticmethod
    def circuit(conn: Connection) -> str:
        """Whose circuit breaker a stream counts for: its backend, or the
        backend's profile (one failing upstream must not shut out the others)."""
        profile = conn.req.profile if conn.req is not None else None
        return "%s/%s" % (conn.backend_name, profile) if profile else conn.backend_name

    def start_stream(self, conn: Connection) -> None:
        conn.backend_name = conn.req.backend or self.cfg["backend.provider"]
        circuit = self.circuit(conn)
        br = self.breaker(circuit)
        now = self.clock()
        if not br.allow(now, self.cfg, conn):
            self.stats.circuit_open[circuit] = 1
            conn.respond_error(503, "backend %r is failing; not trying it for now (circuit open)"
                               % circuit, "circuit_open", br.retry_after(now, self.cfg),
                               outcome="circuit_open")
            return
        self.stats.circuit_open[circuit] = 0 if br.state is Breaker.CLOSED else 1
        conn.started_at = now
        self.stats.started += 1
        self.stats.backend_requests[conn.backend_name] += 1
        self.stats.active_streams += 1
        if self.stats.active_streams > self.stats.peak_streams:
            self.stats.peak_streams = self.stats.active_streams
        limit = self.cfg["server.max_stream_duration"]
        if limit:
            conn.t_life = self.timers.call_later(limit, Daemon.stream_expired, conn)
        try:
            run = self.backend(conn.backend_name).run
            req = conn.req
            conn.gen = files_first(run, req, self.cfg) if req.attachments or req.image_paths else run(req, self.cfg)
        except Exception as e:
            self.backend_failed(conn, e)
            return
        self.step(conn, None, None)

    @staticmethod
    def stream_expired(conn) -> None:
        conn.t_life = None
        if conn.state in (State.STARTING, State.STREAMING):
            conn.daemon.backend_failed(conn, BackendError(
                "stream exceeded max_stream_duration (%gs)" % conn.daemon.cfg["server.max_stream_duration"],
                status=504, kind="timeout", reason="timeout"))

    def step(self, conn: Connection, value, exc) -> None:
        """Run a backend until it waits.  Its writes are corked meanwhile and
        sent in one syscall at the end (uncork)."""
        gen = conn.gen
        ops = self.ops
        conn.corked = True
        try:
            for _ in range(STEP_BUDGET):
                try:
                    op = gen.throw(exc) if exc is not None else gen.send(value)
                except StopIteration as stop:
                    self.backend_finished(conn, stop.value)
                    break
                except Exception as e:
                    self.backend_failed(conn, e)
                    break
                exc = None
                try:
                    handler = ops[op[0]]
                except (KeyError, TypeError, IndexError):
                    self.backend_failed(conn, BackendError("backend yielded an unknown operation %r" % (op,),
                                                           status=500, kind="internal_error", reason="other"))
                    break
                value = handler(conn, op)
                if value is PARK:
                    break
            else:
                self.runnable.append((conn, value, None))
            conn.uncork()
        except Exception as e:  # an operation's handler raised: contained (see Daemon.contain)
            self.contained(e, "backend", conn)

    def _op_sleep(self, conn, op):
        conn.t_backend = self.timers.call_later(op[1], self.resume, conn)
        return PARK

    def _op_head(self, conn, op):
        if conn.state is State.STARTING:
            conn.send_head()
        return None

    def _op_event(self, conn, op):
        payload = op[1]
        return self.emit(conn, payload if isinstance(payload, bytes) else sse_event(payload), 1)

    def _op_raw(self, conn, op):
        return self.emit(conn, op[1], op[1].count(b"\n\n"))

    def emit(self, conn: Connection, data: bytes, events: int):
        if conn.state is State.STARTING:
            conn.send_head()
        if conn.first_byte_at is None:
            conn.first_byte_at = self.clock()
            if self.stats.histograms:
                self.stats.observe_backend(self.stats.backend_ttfb, TTFB_BUCKETS, conn.backend_name,
                                           conn.first_byte_at - conn.started_at)
        conn.chunks += events
        conn.write(data)
        if conn.state is not State.STREAMING:
            return PARK  # the write failed and the connection is gone
        if len(conn.out) > self.cfg["server.write_high_water"]:
            # Back-pressure: the backend (and so its upstream socket) waits until
            # the client has taken the queued bytes.
            conn.parked = True
            return PARK
        return None

    def unpark(self, conn: Connection) -> None:
        conn.parked = False
        if conn.gen is None:
            return
        if conn.paced is not None:  # in a paced run: carry on with the next event
            conn.t_backend = self.timers.call_later(conn.paced_delay, self.paced_tick, conn)
        else:
            self.runnable.append((conn, None, None))

    def _op_now(self, conn, op):
        return self.clock()

    def _op_loop(self, conn, op):
        return self

    def _op_park(self, conn, op):
        _, timeout, channel = op
        parked = Parked(self, conn)
        channel.wake = parked.wake
        conn.waiting = parked
        if timeout is not None:
            conn.t_backend = self.timers.call_later(timeout, self.park_timed_out, conn)
        return PARK

    def park_timed_out(self, conn) -> None:
        conn.t_backend = None
        if isinstance(conn.waiting, Parked):
            conn.waiting = None
            self.runnable.append((conn, None, TimeoutError("upstream did not answer in time")))

    def _op_count(self, conn, op):
        getattr(self.stats, op[1])[conn.backend_name] += 1
        return None

    def _op_paced(self, conn, op):
        _, events, delay = op
        if not events:
            return None
        conn.paced, conn.paced_i, conn.paced_delay = events, 0, delay
        conn.t_backend = self.timers.call_later(delay, self.paced_tick, conn)
        return PARK

    def paced_tick(self, conn) -> None:
        """One event of a ("paced", events, delay) run: a timer and a send,
        with no trip through the backend's generator (this is the hot path)."""
        fired, conn.t_backend = conn.t_backend, None
        if conn.gen is None:
            return
        events, i = conn.paced, conn.paced_i
        if conn.state is State.STARTING:
            conn.send_head()
        conn.chunks += 1
        conn.write(events[i])
        if conn.state is not State.STREAMING:
            return  # the client is gone (write failed)
        i += 1
        if i == len(events):
            conn.paced = None
            self.runnable.append((conn, None, None))
        else:
            conn.paced_i = i
            if conn.out and len(conn.out) > self.cfg["server.write_high_water"]:
                conn.parked = True  # unpark() carries on
            else:
                conn.t_backend = self.timers.call_later(conn.paced_delay, self.paced_tick, conn, fired)

    def _op_readable(self, conn, op):
        return self.wait_io(conn, op, _READ)

    def _op_writable(self, conn, op):
        return self.wait_io(conn, op, _WRITE)

    def wait_io(self, conn: Connection, op, events: int):
        sock = op[1]
        timeout = op[2] if len(op) > 2 else None
        self.selector.register(sock, events, conn.on_backend_io)
        conn.waiting = sock
        if timeout is not None:
            conn.t_backend = self.timers.call_later(timeout, self.wait_timed_out, conn)
        return PARK

    def backend_io_ready(self, conn: Connection) -> None:
        # (Registered only while the backend waits on it: run_once drops stale events.)
        # Unregister at once: the backend may close or replace the socket before
        # it waits again, and a stale registration would block its fd number.
        self.selector.unregister(conn.waiting)
        conn.waiting = None
        self.timers.cancel(conn.t_backend)
        conn.t_backend = None
        self.runnable.append((conn, None, None))

    def wait_timed_out(self, conn) -> None:
        conn.t_backend = None
        sock = conn.waiting
        if sock is not None:
            self.selector.unregister(sock)
            conn.waiting = None
            self.runnable.append((conn, None, TimeoutError("upstream did not answer in time")))

    def _op_call(self, conn, op):
        _, fn, timeout, cleanup = op
        if self.helpers is None:
            self.helpers = HelperPool(self, self.cfg["upstream.threads"])
        job = self.helpers.submit(conn, fn, cleanup)
        conn.waiting = job
        if timeout is not None:
            job.timer = conn.t_backend = self.timers.call_later(timeout, self.call_timed_out, job)
        return PARK

    def call_soon_on_helper(self, fn) -> None:
        """Run fn on a helper thread, for no connection (nothing waits for it)."""
        if self.helpers is None:
            self.helpers = HelperPool(self, self.cfg["upstream.threads"])
        self.helpers.submit(None, fn, None)

    def call_finished(self, job) -> None:
        conn = job.conn
        if conn is None:
            return
        if job.cancelled:
            # The stream ended (or timed out) while the thread worked: release
            # whatever the job produced, e.g. a freshly connected socket.
            if job.exc is None and job.cleanup is not None and job.result is not None:
                job.cleanup(job.result)
            return
        conn.waiting = None
        self.timers.cancel(job.timer)
        conn.t_backend = None
        self.runnable.append((conn, job.result, job.exc))

    def call_timed_out(self, job) -> None:
        job.cancelled = True
        conn = job.conn
        conn.t_backend = None
        conn.waiting = None
        self.runnable.append((conn, None, TimeoutError("timed out")))

    def resume(self, conn) -> None:
        conn.t_backend = None
        self.runnable.append((conn, None, None))

    def stop_backend(self, conn: Connection) -> None:
        """Cancel whatever the backend waits for and close the generator, so its
        try/finally blocks release their sockets now."""
        self.timers.cancel(conn.t_backend)
        conn.t_backend = None
        if isinstance(conn.waiting, HelperPool.Job):
            conn.waiting.cancelled = True  # its result is cleaned up when it arrives
            conn.waiting = None
        elif isinstance(conn.waiting, Parked):
            conn.waiting = None
        elif conn.waiting is not None:
            # Unregister before the generator closes the socket in its finally.
            self.selector.unregister(conn.waiting)
            conn.waiting = None
        conn.paced = None
        gen, conn.gen = conn.gen, None
        if gen is not None:
            try:
                gen.close()
            except Exception:
                log(logging.ERROR, "backend raised while closing", conn=conn.id,
                    backend=conn.backend_name, exc_info=True)

    def backend_finished(self, conn: Connection, result) -> None:
        conn.gen = None
        if conn.state is State.STARTING:
            conn.send_head()
        result = result if isinstance(result, dict) else {}
        req = conn.req
        if result.get("empty"):
            log(logging.WARNING, "stream ended with neither text nor tool calls", conn=conn.id,
                backend=conn.backend_name, finish_reason=result.get("stop_reason") or result.get("finish_reason"))
        dropped = result.get("dropped_tool_calls")
        if dropped:
            self.stats.tool_calls_dropped[conn.backend_name] += dropped
            log(logging.WARNING, "tool calls not sent: their arguments were not JSON", conn=conn.id,
                backend=conn.backend_name, count=dropped, finish_reason=result.get("finish_reason"))
        # The final event: asked for with include_usage, and always when the
        # turn sent tool calls (the client must run them and hand off again,
        # or learn that the turn was cut: finish_reason length).
        usage = result.get("usage")
        if isinstance(usage, dict):
            tokens = self.stats.tokens
            for field, kind in TOKEN_KINDS:
                n = usage.get(field)
                if type(n) is int and n > 0:
                    tokens["%s/%s" % (conn.backend_name, kind)] += n
        finish = result.get("finish_reason") or "stop"
        if not result.get("raw") and (req.include_usage or finish == "tool_calls" or result.get("tool_calls")):
            final = {"finish_reason": finish}
            if result.get("stop_reason"):
                final["stop_reason"] = result["stop_reason"]
            if req.include_usage and result.get("usage"):
                final["usage"] = result["usage"]
            conn.chunks += 1
            conn.write(sse_event(final))
        if conn.state is State.STREAMING:
            if result.get("send_done", True):
                conn.end_stream(SSE_DONE, "done")
            else:
                conn.end_stream(b"", "done")

    def backend_answered(self, conn: Connection) -> None:
        """The upstream answered 2xx (the head goes out): good news for its breaker."""
        circuit = self.circuit(conn)
        br = self.breakers.get(circuit)
        if br is not None and (br.state is not Breaker.CLOSED or br.failures):
            br.success()
            self.stats.circuit_open[circuit] = 0

    def backend_failed(self, conn: Connection, exc: BaseException) -> None:
        """A backend's stream failed: a status before the head, an error event after."""
        conn.gen = None
        # (A 4xx of ours, a bad attachment say, is the request's fault, not the backend's.)
        conn.backend_error = not (isinstance(exc, BackendError) and exc.status < 500)
        if conn.state is State.STARTING and (isinstance(exc, (TimeoutError, OSError)) or (
                isinstance(exc, BackendError) and exc.status in (502, 503, 504))):
            circuit = self.circuit(conn)
            br = self.breaker(circuit)
            br.failure(self.clock(), self.cfg)
            self.stats.circuit_open[circuit] = 0 if br.state is Breaker.CLOSED else 1
        if isinstance(exc, BackendError):
            status, kind, reason, message, retry = exc.status, exc.kind, exc.reason, exc.public(), exc.retry_after
            log(logging.WARNING, "stream failed", conn=conn.id, backend=conn.backend_name,
                reason=reason, **exc.log_fields())
            if exc.detail:
                # Debug only: upstreams quote the request (prompts) in their errors.
                log(logging.DEBUG, "upstream error text", conn=conn.id, text=exc.detail)
        elif isinstance(exc, TimeoutError):
            status, kind, reason, message, retry = 504, "timeout", "timeout", str(exc) or "timed out", None
            log(logging.WARNING, "stream failed", conn=conn.id, backend=conn.backend_name,
                reason=reason, error=message)
        elif isinstance(exc, OSError):
            status, kind, reason, message, retry = 502, "upstream_error", "network", \
                "upstream connection failed: %s" % (exc.strerror or exc), None
            log(logging.WARNING, "stream failed", conn=conn.id, backend=conn.backend_name,
                reason=reason, error=message)
        else:  # a bug in the backend: contained like any other (see Daemon.contain)
            status, kind, reason, message, retry = 500, "internal_error", "other", "internal error", None
            self.stats.internal_errors["backend"] += 1
            log(logging.ERROR, "internal error", where="backend", conn=conn.id, backend=conn.backend_name,
                exc_info=(type(exc), exc, exc.__traceback__))
        if conn.state is State.STARTING:
            conn.respond_error(status, message, kind, retry, outcome=reason)
        elif conn.state is State.STREAMING:
            conn.end_stream(sse_error(kind, message, self.cfg["server.error_format"]), reason)

    def fail_stream(self, conn: Connection, kind: str, message: str, reason: str) -> None:
        """End a live stream from outside (shutdown): error event or error status."""
        if conn.state is State.STARTING:
            conn.respond_error(503, message, kind, retry_after=1, outcome=reason)
        elif conn.state is State.STREAMING:
            conn.end_stream(sse_error(kind, message, self.cfg["server.error_format"]), reason)

    def backend(self, name: str):
        mod = self.backends.get(name)
        if mod is None:
            mod = self.backends[name] = load_backend(name)
        return mod

    # -- the end of a connection --

    def release(self, conn: Connection) -> None:
        """Free everything a CLOSED connection holds; write its access log line.
        Once: a connection released already (then a bug raised) is not counted twice."""
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        self.stop_backend(conn)
        if conn.backend_name is not None:
            # A half-open circuit's probe that ended neither as a success nor
            # as a failure (the client left, a 400, a bug) lets another probe go;
            # for any other connection this does nothing.
            br = self.breakers.get(self.circuit(conn))
            if br is not None:
                br.abandon(conn)
        for t in (conn.t_life, conn.t_write, conn.t_heartbeat):
            self.timers.cancel(t)
        conn.t_life = conn.t_write = conn.t_heartbeat = None
        if conn.sock is not None:
            if conn.mask:
                self.selector.unregister(conn.sock)
                conn.mask = 0
            conn.sock.close()
            conn.sock = None
        if conn.unix_fds:
            close_fds(conn.unix_fds)
            conn.unix_fds = None
        req = conn.req
        if req is not None and (req.attachments or req.image_paths) and req.files is None:
            # Refused (capacity, draining, circuit, a 400) or gone before its
            # backend started: its files would stay in data_dir for good.
            self.call_soon_on_helper(lambda: discard_attachments(req, self.cfg))
        if not conn.has_client:
            return
        stats = self.stats
        if conn.front is not None:
            self.front.release(conn)
            stats.http_responses[str(conn.status or 0)] += 1
        stats.active_connections -= 1
        stats.bytes_sent += conn.bytes
        stats.chunks_sent += conn.chunks
        now = self.clock()
        if conn.started_at is not None:
            stats.active_streams -= 1
            duration = now - conn.started_at
            if conn.outcome == "done":
                stats.completed += 1
                if stats.histograms:
                    stats.observe_backend(stats.backend_duration, STREAM_BUCKETS, conn.backend_name, duration)
            else:
                stats.failed += 1
                stats.stream_errors[conn.outcome if conn.outcome in STREAM_REASONS else "other"] += 1
            if conn.backend_error:
                stats.backend_errors[conn.backend_name] += 1
            if stats.histograms:
                stats.stream_duration.observe(duration)
        req = conn.req
        direct = {} if conn.front is None else {"peer": conn.front.peer, "path": conn.front.route,
                                                 "client": conn.front.identity or ""}
        log(logging.INFO, "stream done" if conn.front is None or conn.started_at is not None else "request done",
            conn=conn.id, request_id=req.request_id if req and req.request_id else "",
            backend=conn.backend_name or "", status=conn.status or 0, bytes=conn.bytes,
            chunks=conn.chunks,
            ttfb_ms=round((conn.first_byte_at - conn.started_at) * 1000, 2) if conn.first_byte_at else "",
            duration_ms=round((now - conn.accepted_at) * 1000, 2), outcome=conn.outcome or "unknown", **direct)

    # -- signals (the handlers only wake the loop: see LoopBase) --

    def handle_term(self) -> None:
        """First SIGTERM/SIGINT: drain.  Second: stop now."""
        if self.draining:
            log(logging.WARNING, "second signal: stopping now", streams=self.stats.active_streams)
            self.end_all_streams()
            self.stopping = True
            return
        self.draining = True
        self.close_listener()
        sd_notify("STOPPING=1")
        timeout = self.cfg["server.shutdown_timeout"]
        log(logging.INFO, "draining", streams=self.stats.active_streams, timeout_s=timeout)
        self.t_drain = self.timers.call_later(timeout, self.drain_expired)

    def drain_expired(self, _=None) -> None:
        log(logging.INFO, "drain timeout: ending live streams", streams=self.stats.active_streams)
        for conn in list(self.conns):
            self.fail_stream(conn, "shutdown", "server is shutting down", "shutdown")
        # Give the final events a moment to reach the clients, then stop regardless.
        self.t_drain = self.timers.call_later(min(LINGER, self.cfg["server.write_timeout"]), self.stop_now)

    def stop_now(self, _=None) -> None:
        self.end_all_streams()
        self.stopping = True

    def end_all_streams(self) -> None:
        """Best effort, without waiting: one last error event, then close."""
        for conn in list(self.conns):
            last = conn.last_words("shutdown", "server is shutting down")
            if last and not conn.out:
                try:
                    conn.sock.send(last)
                except OSError:
                    pass
            if conn.state is not State.CLOSED:
                conn.outcome = conn.outcome or "shutdown"
                conn.transition("abort")
                self.release(conn)

    def handle_usr1(self) -> None:
        """SIGUSR1: one log line with what the daemon holds now (for an operator
        at 3 a.m.: journalctl -u streamd | grep state)."""
        states = collections.Counter(c.state.name.lower() for c in self.conns)
        backends = collections.Counter(c.backend_name for c in self.conns if c.started_at is not None and c.gen)
        http = sys.modules.get("backends._http")
        lag = self.stats.loop_lag.counts
        fields = {"connections": len(self.conns), "states": _counts(states), "streams": _counts(backends),
                  "max_loop_lag_ms": round(self.timers.max_lag * 1000, 2),
                  "loop_lag_over_10ms": sum(lag[bisect.bisect_left(LAG_BUCKETS, 0.01):]),
                  "timers": len(self.timers), "fds": process_figures()["worker_open_fds"],
                  "helper_threads": len(self.helpers.threads) if self.helpers else 0,
                  "upstream_pools": http.pool_summary() if http else ""}
        if self.front is not None:
            fields.update(front_connections=self.front.open, front_unfinished=sum(self.front.unfinished.values()))
        log(logging.INFO, "state", **fields)

    def handle_hup(self) -> None:
        """SIGHUP: reload the config file; apply what can change on a live daemon."""
        path = self.cfg.get("config_path")
        log(logging.INFO, "SIGHUP", connections=len(self.conns), streams=self.stats.active_streams,
            config=path or "")
        if not path:
            log(logging.WARNING, "reload: no --config file to reload")
            return
        try:
            new = load_config(self.flags, self.env, path)
        except ConfigError as e:
            log(logging.ERROR, "reload failed; keeping the current config", error=str(e))
            return
        self.apply_config(new)

    def apply_config(self, new: dict) -> None:
        changed, ignored = [], []
        for o in OPTIONS:
            if new[o.key] != self.cfg[o.key]:
                (changed if o.live else ignored).append(o.key)
        for key in ignored:
            new[key] = self.cfg[key]
        if ignored:
            log(logging.WARNING, "reload: these keys need a restart; kept as they were", keys=",".join(ignored))
        self.cfg = new
        self.max_connections = cap_connections(new["server.max_connections"], self.fd_limit)
        setup_logging(new["logging.level"], new["logging.format"])
        if self.front is not None:
            self.front.configure(new, reload=True)
        log(logging.INFO, "config reloaded", changed=",".join(changed) or "nothing")

    def close(self) -> None:
        self.close_listener()
        for conn in list(self.conns):
            if conn.state is not State.CLOSED:
                conn.outcome = conn.outcome or "shutdown"
                conn.transition("abort")
                self.release(conn)
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        for mod in self.backends.values():
            if hasattr(mod, "close"):
                mod.close()  # e.g. pooled upstream connections
        if self.helpers is not None:
            self.helpers.close()
            self.helpers = None
        if self.report_sock is not None:
            self.report()  # the final numbers, so the parent's totals are complete
            try:
                self.selector.unregister(self.report_sock)
            except KeyError:
                pass  # already gone (on_parent_gone)
            self.report_sock.close()
            self.report_sock = None
        self.close_signals()
        self.selector.close()
        self.reserve.close()


def bind_listener(cfg: dict):
    """The handoff socket: systemd's (LISTEN_FDS) or a new one at socket_path.
    Returns (socket, (path, inode) if we created the file else None)."""
    sock_type = socket.SOCK_SEQPACKET if cfg["server.socket_type"] == "seqpacket" else socket.SOCK_STREAM
    inherited = systemd_listen_fds()
    if inherited:
        sock = socket.socket(fileno=inherited[0])
        if sock.family != socket.AF_UNIX or sock.type != sock_type:
            raise ConfigError("LISTEN_FDS: inherited socket is not an AF_UNIX %s socket" % cfg["server.socket_type"])
        log(logging.INFO, "using socket from systemd", fd=sock.fileno())
        return sock, None
    path = cfg["server.socket_path"]
    remove_stale_socket(path, sock_type)
    sock = socket.socket(socket.AF_UNIX, sock_type)
    try:
        # bind() creates the file with the umask; restrict it before anyone can connect.
        old = os.umask(0o777 & ~cfg["server.socket_mode"])
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, cfg["server.socket_mode"])
        # A big backlog: Apache does not retry EAGAIN on a full queue, so a
        # short one turns a burst of handoffs into failed requests.
        sock.listen(4096)
    except OSError as e:
        sock.close()
        raise ConfigError("server.socket_path: cannot listen on %r: %s" % (path, e.strerror)) from None
    group = cfg["server.socket_group"]
    if group:
        # Until this chown only our own group (and we) could connect: nothing to guard.
        try:
            os.chown(path, -1, group_id(group))
        except OSError as e:
            sock.close()
            os.unlink(path)
            raise ConfigError("server.socket_group: cannot give %r to group %r: %s" % (path, group, e.strerror)) from None
    log(logging.DEBUG, "listening", socket=path, type=cfg["server.socket_type"], mode="%04o" % cfg["server.socket_mode"],
        group=group)
    return sock, (path, os.stat(path).st_ino)


def unlink_owned(owned) -> None:
    """Remove the socket file we created, only if it is still ours (a
    successor may have replaced it)."""
    if owned:
        path, ino = owned
        try:
            if os.stat(path).st_ino == ino:
                os.unlink(path)
        except OSError:
            pass


# ---- Workers (pre-fork) ----
#
# With --workers N the parent binds the socket (or takes systemd's), forks N
# workers that each run the same single-threaded loop on it, and stays behind
# as a supervisor: it restarts a worker that dies (with backoff), forwards
# SIGTERM (drain) and SIGHUP (reload), and serves /metrics and /healthz with
# the sum of what workers report every second.  This is how one host uses all
# its cores, and goes past the per-process fd limit.  The parent runs no
# streams and no threads, so forking it is safe.

class Worker:
    __slots__ = ("index", "pid", "report", "started", "failures", "snapshot", "t_restart")

    def __init__(self, index):
        self.index, self.pid, self.report, self.started = index, None, None, 0.0
        self.failures, self.snapshot, self.t_restart = 0, None, None


class Supervisor(LoopBase):
    SIGNALS = {**LoopBase.SIGNALS, signal.SIGCHLD: "chld"}
    STABLE = 10.0        # a worker that lived this long restarts at once; its failures reset
    MAX_BACKOFF = 30.0

    def __init__(self, cfg: dict, flags: dict, env: dict):
        super().__init__()
        self.cfg, self.flags, self.env = cfg, flags, env
        self.workers = [Worker(i) for i in range(cfg["server.workers"])]
        self.retired = Stats().snapshot()  # counters of workers that exited
        self.peak = 0
        self.listener = self.owned = None
        self.http_listeners = []  # --listen sockets, shared by the workers like the Unix one
        self.metrics = None
        self.draining = False
        self.t_kill = None
        self.internal_errors = collections.Counter()  # the parent's own (its metrics clients)

    def start(self) -> None:
        self.listener, self.owned = bind_listener(self.cfg)
        if self.cfg["http.listen"]:
            HTTPFront(self).configure(self.cfg)  # unreadable files stop the start here, not in N workers
            self.http_listeners = HTTPFront.bind(self.cfg["http.listen"])
        addr = self.cfg["metrics.listen_addr"]
        if addr:
            backends = [self.cfg["backend.provider"]] + list(self.cfg["backend.enabled"])
            self.metrics = MetricsServer(self, addr, metrics_registry(self.snapshot, backends), self.health)
            log(logging.INFO, "metrics", addr="%s:%d" % self.metrics.addr[:2], workers=len(self.workers))
        self.install_signals()
        for w in self.workers:
            self.spawn(w)

    def spawn(self, w: Worker) -> None:
        w.t_restart = None
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Block our signals across fork(): a SIGHUP or SIGTERM that reaches the
        # new worker before it has installed its handlers stays pending, and is
        # handled once it has, instead of killing it (the default action).
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(self.SIGNALS))
        pid = os.fork()
        if pid == 0:  # the worker
            parent_end.close()
            os._exit(self.worker_main(w, child_end, old_mask))
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        child_end.close()
        parent_end.setblocking(False)
        w.pid, w.report, w.started, w.snapshot = pid, parent_end, self.clock(), None
        self.selector.register(parent_end, _READ, self.on_report)
        log(logging.INFO, "worker started", worker=w.index, pid=pid)

    def worker_main(self, w: Worker, report_sock, old_mask) -> int:
        """In the child: drop the parent's loop (without touching its epoll
        registrations, which the parent still uses) and run a Daemon."""
        status = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in self.SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            for other in self.workers:
                if other.report is not None:
                    other.report.close()
            if self.metrics is not None:
                self.metrics.sock.close()
            self.wakeup_r.close()
            self.wakeup_w.close()
            os.close(self.selector.fileno())
            LOG_CONTEXT["worker"] = w.index
            daemon = Daemon(self.cfg)
            daemon.flags, daemon.env = self.flags, self.env
            daemon.fd_limit = raise_fd_limit()
            daemon.max_connections = cap_connections(self.cfg["server.max_connections"], daemon.fd_limit)
            daemon.open_listener(self.listener)
            daemon.open_front(self.http_listeners)
            daemon.accept_batch = ACCEPT_BATCH
            daemon.report_sock = report_sock
            # EOF on this socket means the parent is gone (even SIGKILLed):
            # drain and exit rather than live on as an orphan.
            daemon.selector.register(report_sock, _READ, daemon.on_parent_gone)
            daemon.install_signals()
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # pending signals arrive now
            daemon.probe_lag()
            daemon.report(True)
            log(logging.INFO, "worker ready", pid=os.getpid(), max_connections=daemon.max_connections)
            status = daemon.run()
        except BaseException:
            log(logging.CRITICAL, "worker crashed: this is a bug in streamd", worker=w.index, exc_info=True)
        finally:
            logging.shutdown()
        return status

    def run_once(self, max_wait=None) -> None:
        deadline = self.timers.next_deadline()
        timeout = None if deadline is None else max(0.0, deadline - self.clock())
        self.dispatch(timeout)
        self.timers.run_due(self.clock(), 0.0, self.timer_failed)

    def count_internal(self, where: str) -> None:
        self.internal_errors[where] += 1

    def on_report(self, sock, mask) -> None:
        w = next((w for w in self.workers if w.report is sock), None)
        while True:
            try:
                data = sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # the worker is exiting; SIGCHLD does the rest
                self.selector.unregister(sock)
                return
            if w is not None:
                w.snapshot = json.loads(data)

    def snapshot(self) -> dict:
        snaps = [self.retired] + [w.snapshot for w in self.workers if w.snapshot]
        merged = merge_snapshots(snaps)
        merged["workers"] = {str(w.index): w.snapshot["process"] for w in self.workers
                             if w.snapshot and "process" in w.snapshot}
        for where, n in self.internal_errors.items():
            table = merged["labeled"]["internal_errors"]
            table[where] = table.get(where, 0) + n
        self.peak = max(self.peak, merged["gauges"]["active_streams"], merged["gauges"]["peak_streams"])
        merged["gauges"]["peak_streams"] = self.peak
        return merged

    def health(self):
        g = self.snapshot()["gauges"]
        alive = sum(1 for w in self.workers if w.pid)
        ok = alive and not self.draining
        return (200 if ok else 503, {"status": "ok" if ok else ("draining" if self.draining else "down"),
                                     "active_streams": g["active_streams"],
                                     "active_connections": g["active_connections"], "workers": alive})

    def handle_chld(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            w = next((w for w in self.workers if w.pid == pid), None)
            if w is not None:
                self.reaped(w, status)
        if self.draining and not any(w.pid for w in self.workers):
            self.stopping = True

    def reaped(self, w: Worker, status: int) -> None:
        code = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status
        if w.snapshot:
            snap = w.snapshot
            snap["gauges"] = {k: 0 for k in snap["gauges"]}  # a dead worker has nothing in flight
            self.retired = merge_snapshots([self.retired, snap])
        if w.report is not None:
            try:
                self.selector.unregister(w.report)
            except KeyError:
                pass
            w.report.close()
        lived = self.clock() - w.started
        w.pid = w.report = w.snapshot = None
        if self.draining:
            log(logging.INFO, "worker exited", worker=w.index, status=code)
            return
        w.failures = 0 if lived >= self.STABLE else w.failures + 1
        delay = 0.0 if not w.failures else min(self.MAX_BACKOFF, 0.5 * 2 ** (w.failures - 1))
        log(logging.WARNING, "worker died; restarting", worker=w.index, status=code,
            lived_s=round(lived, 1), restart_in_s=delay)
        w.t_restart = self.timers.call_later(delay, self.spawn, w)

    def handle_term(self) -> None:
        if self.draining:
            log(logging.WARNING, "second signal: stopping workers now")
            self.signal_workers(signal.SIGTERM)  # a worker's second signal stops it at once
            return
        self.draining = True
        for w in self.workers:
            self.timers.cancel(w.t_restart)
        # Stop taking handoffs: close and remove the socket; workers drain.
        self.listener.close()
        unlink_owned(self.owned)
        self.owned = None
        for s in self.http_listeners:
            s.close()
        sd_notify("STOPPING=1")
        log(logging.INFO, "draining workers", workers=sum(1 for w in self.workers if w.pid))
        self.signal_workers(signal.SIGTERM)
        # Workers end on their own within shutdown_timeout (+ a moment to flush).
        self.t_kill = self.timers.call_later(self.cfg["server.shutdown_timeout"] + 10, self.kill_workers)
        if not any(w.pid for w in self.workers):
            self.stopping = True

    def kill_workers(self, _=None) -> None:
        log(logging.ERROR, "workers did not stop in time; killing them")
        self.signal_workers(signal.SIGKILL)

    def handle_hup(self) -> None:
        path = self.cfg.get("config_path")
        if path:
            try:
                new = load_config(self.flags, self.env, path)
            except ConfigError as e:
                log(logging.ERROR, "reload failed; keeping the current config", error=str(e))
                return
            setup_logging(new["logging.level"], new["logging.format"])
        log(logging.INFO, "SIGHUP: reloading workers", workers=sum(1 for w in self.workers if w.pid))
        self.signal_workers(signal.SIGHUP)

    def handle_usr1(self) -> None:
        log(logging.INFO, "state", workers=",".join("%d:%s" % (w.index, w.pid or "down") for w in self.workers),
            draining=self.draining)
        self.signal_workers(signal.SIGUSR1)  # each worker logs its own

    def signal_workers(self, sig) -> None:
        for w in self.workers:
            if w.pid:
                try:
                    os.kill(w.pid, sig)
                except ProcessLookupError:
                    pass

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self.listener.close()
        unlink_owned(self.owned)
        for s in self.http_listeners:
            s.close()
        self.close_signals()
        self.selector.close()


class FdReserve:
    """A few spare fds (copies of /dev/null), kept so that the daemon at its
    fd limit can still take in a handoff and answer it 503, instead of
    losing the client's socket: with the table full, the kernel cannot
    install the received fd and drops it (recvmsg reports MSG_CTRUNC).

    release() frees a slot just before an operation that needs one (accept,
    recvmsg); refill() takes the slots back, and False means the table is
    full: the daemon is at its fd limit, whatever max_connections says."""

    SPARES = 2  # one for the Unix connection, one for the client's socket

    def __init__(self):
        self.base = os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.spares = []
        self.refill()

    def release(self) -> bool:
        if not self.spares:
            return False
        os.close(self.spares.pop())
        return True

    def refill(self) -> bool:
        while len(self.spares) < self.SPARES:
            try:
                self.spares.append(os.dup(self.base))  # (dup: cheaper than open; non-inheritable)
            except OSError:
                return False
        return True

    def close(self) -> None:
        close_fds(self.spares + [self.base])
        self.spares = []


def _counts(counter) -> str:
    return ",".join("%s:%d" % kv for kv in sorted(counter.items())) or "none"


def process_figures() -> dict:
    """This process's open fds, resident memory and CPU seconds (Linux /proc)."""
    try:
        fds = len(os.listdir("/proc/self/fd"))
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        fds = rss = 0
    t = os.times()
    return {"worker_open_fds": fds, "worker_resident_memory_bytes": rss, "worker_cpu_seconds": t.user + t.system}


def close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def adopt_client_socket(fd: int):
    """Wrap a received fd as a non-blocking socket, or close it and return None
    if it is not a connected stream socket (handoff error bad_fd)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)  # not a socket at all: socket() did not take ownership
        return None
    try:
        # A stream socket, and a connected one: not a listening socket, not
        # one that never connected (getpeername: ENOTCONN).
        ok = (sock.type == socket.SOCK_STREAM and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
              and sock.getpeername() is not None)
    except OSError:
        ok = False
    if not ok:
        sock.close()
        return None
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # Best effort: the test harness and load generators hand over AF_UNIX pairs.
        for level, opt, value in ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
                                  (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                                  (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), 15),
                                  (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), 15)):
            if opt is not None:
                try:
                    sock.setsockopt(level, opt, value)
                except OSError:
                    pass
    return sock


def remove_stale_socket(path: str, sock_type: int) -> None:
    """Refuse a non-socket or a live daemon's socket; unlink a stale one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError("server.socket_path: %r exists and is not a socket; refusing to replace it" % path)
    probe = socket.socket(socket.AF_UNIX, sock_type)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: a leftover from a crash
        log(logging.INFO, "removed stale socket", socket=path)
        return
    except FileNotFoundError:
        return
    except OSError as e:
        raise ConfigError("server.socket_path: %r: cannot probe existing socket: %s" % (path, e.strerror)) from None
    finally:
        probe.close()
    raise ConfigError("server.socket_path: %r: another daemon is listening there" % path)


def cap_connections(wanted: int, fd_limit: int | None) -> int:
    if fd_limit is None or wanted <= fd_limit - FD_RESERVE:
        return wanted
    return max(1, fd_limit - FD_RESERVE)


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the limit in force."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def _ignore_signal(signum, frame):
    # The real work happens in the loop: set_wakeup_fd has already written the
    # signal number to the wakeup socket, which wakes select().
    pass


# ---- Mock backend & registry ----
#
# The mock is the tutorial backend: every backend has this shape, a module (or
# namespace) with NAME and a generator function run(req, cfg).  It lives in this
# file so that streamd.py copied alone still runs it; every other backend is a
# module in backends/, imported the first time it is used.

MOCK_EVENTS = 18
_MOCK_LINES = [
    "This stream comes from streamd's mock backend.",
    "Apache handed this connection over and went back to work.",
    "One thread and one selectors loop serve every stream.",
    "Each backend is a generator the loop resumes.",
    "The mock yields a sleep between events.",
    "Writes go out at once; only the rest is queued.",
    "A slow client pauses its backend at the high-water mark.",
    "A client that leaves cancels its backend at once.",
    "Timers live in one heap with lazy cancellation.",
    "SIGTERM drains: live streams get time to finish.",
] + ["This is message %d of %d." % (i, MOCK_EVENTS) for i in range(13, MOCK_EVENTS + 1)]
# Pre-rendered once: the fixed events are the same bytes for every stream.
_MOCK_FIXED = [sse_event({"content": line}) for line in _MOCK_LINES]
_MOCK_WORDS = sum(len(line.split()) for line in _MOCK_LINES) + 7  # + "Hello from streamd! Prompt:" and "User ID: N"


def cut_text(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class MockBackend:
    """18 content events, the first at once, then one every message_delay."""

    NAME = "mock"

    @staticmethod
    def run(req: Request, cfg: dict):
        delay = cfg["backend.mock.message_delay"]
        prompt = req.last_user_text()
        user = req.user_id if req.user_id is not None else "unknown"
        echoed = cut_text(prompt, 50)
        yield ("event", {"content": "Hello from streamd! Prompt: " + echoed})
        yield ("sleep", delay)
        yield ("event", {"content": "User ID: %s" % user})
        # The other 16 lines are the same for every stream, rendered once.  This
        # one operation does what this loop would, but the loop sends them
        # without resuming this generator for each (it is the hot path):
        #     for event in _MOCK_FIXED:
        #         yield ("sleep", delay)
        #         yield ("event", event)
        yield ("paced", _MOCK_FIXED, delay)
        prompt_tokens = len(prompt.split())
        words = _MOCK_WORDS + len(echoed.split())  # a stand-in for a tokenizer: the words sent
        return {"finish_reason": "stop", "usage": {"prompt_tokens": prompt_tokens,
                "completion_tokens": words, "total_tokens": prompt_tokens + words}}


# name -> the built-in backend, or the module path of one in backends/
BACKENDS = {
    "mock": MockBackend,
    "typing": "backends.typing",
    "openai": "backends.openai",
    "anthropic": "backends.anthropic",
    "gemini": "backends.gemini",
    "langgraph": "backends.langgraph",
}


# The Debian 12 package of each importable name a backend may need.
DEBIAN_PACKAGES = {"urllib3": "python3-urllib3", "yaml": "python3-yaml", "prometheus_client": "python3-prometheus-client",
                   "h2": "python3-h2"}
PYPI_NAMES = {"yaml": "PyYAML", "prometheus_client": "prometheus-client"}


def load_backend(name: str):
    """The backend's module (imported on first use), after checking that the
    packages it names in REQUIRES are installed: a missing one stops the start
    naming it, rather than failing every request later.  They are imported
    here, at start: an import on first use would stall the loop (and every
    stream on it) for the tens of milliseconds urllib3 takes to load."""
    entry = BACKENDS[name]
    if not isinstance(entry, str):
        return entry
    try:
        mod = importlib.import_module(entry)
    except ImportError as e:
        raise ConfigError("backend %r cannot be loaded: %s (is the backends/ directory next to streamd.py?)"
                          % (name, e)) from None
    for package in getattr(mod, "REQUIRES", ()):
        try:
            importlib.import_module(package)
        except ImportError:
            raise ConfigError("backend %r needs the %s package: pip install %s (or apt install %s)"
                              % (name, package, PYPI_NAMES.get(package, package),
                                 DEBIAN_PACKAGES.get(package, "python3-" + package))) from None
    return mod


# ---- Signals & systemd ----

def sd_notify(state: str) -> bool:
    """Tell systemd about our state (READY=1, STOPPING=1, WATCHDOG=1).  A no-op
    without NOTIFY_SOCKET, i.e. when not started by systemd with Type=notify."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), addr)
        return True
    except OSError:
        return False


def systemd_listen_fds() -> list:
    """fds passed by systemd socket activation (LISTEN_FDS, starting at fd 3)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        n = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # not for our children
    return list(range(3, 3 + n))


def watchdog_interval() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None


# ---- Client: send, demo ----
#
# `streamd.py send` does what Apache does: make a socket for the "client", pass
# one end to the daemon with SCM_RIGHTS (plus the JSON), keep the other end and
# read the response from it.

def send_handoff(path: str, data: bytes, fd: int, socket_type: str = "seqpacket", timeout: float = 5.0) -> None:
    """Hand `fd` to the daemon at `path` with `data`, exactly as mod_socket_handoff does."""
    kind = socket.SOCK_SEQPACKET if socket_type == "seqpacket" else socket.SOCK_STREAM
    with socket.socket(socket.AF_UNIX, kind) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendmsg([data or b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


class StreamReader:
    """Incremental parser of the daemon's response (client side): status, then events."""

    def __init__(self):
        self.buf = b""
        self.status = None
        self.headers = None
        self.events = []
        self.body = b""  # for error responses

    def feed(self, data: bytes) -> list:
        """Return the SSE events completed by `data` (as decoded data strings)."""
        self.buf += data
        out = []
        if self.status is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return out
            lines = self.buf[:end].decode("latin-1").split("\r\n")
            m = re.fullmatch(r"HTTP/1\.[01] ([0-9]{3})(?: .*)?", lines[0])
            if m is None:
                raise ValueError("not an HTTP response: %r" % lines[0][:40])
            self.status = int(m.group(1))
            self.headers = dict(line.partition(": ")[::2] for line in lines[1:])
            self.buf = self.buf[end + 4:]
        if self.status != 200:
            self.body += self.buf
            self.buf = b""
            return out
        while True:
            end = self.buf.find(b"\n\n")
            if end < 0:
                return out
            block, self.buf = self.buf[:end].decode("utf-8", "replace"), self.buf[end + 2:]
            out.append(block)
            self.events.append(block)


def cmd_send(argv) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="streamd.py send", description=(
        "Hand a socket to a running streamd exactly as Apache does, and print the response."))
    p.add_argument("prompt", nargs="?", help="the prompt (sets 'prompt' in the handoff data)")
    p.add_argument("--socket", default=OPTION_BY_KEY["server.socket_path"].default, help="daemon socket")
    p.add_argument("--socket-type", default="seqpacket", choices=("seqpacket", "stream"))
    p.add_argument("--data", default="", help="handoff data (JSON) to send as-is, PROMPT merged in")
    p.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    p.add_argument("--retries", type=int, default=0, metavar="N",
                   help="retry up to N times before the first byte of a stream: when the daemon cannot be "
                        "reached (restarting) or answers 503 (at capacity, draining), waiting with "
                        "exponential backoff and full jitter, or the 503's Retry-After (default: 0)")
    p.add_argument("--retry-base", type=float, default=0.2, metavar="S",
                   help="the first retry waits up to S seconds, doubling each time up to 5 s (default: 0.2)")
    a = p.parse_args(argv)
    data = a.data.encode()
    if a.prompt is not None:
        try:
            obj = json.loads(a.data) if a.data.strip() else {}
        except ValueError as e:
            p.error("--data: not valid JSON: %s" % e)
        if not isinstance(obj, dict):
            p.error("--data: expected a JSON object to merge PROMPT into")
        obj["prompt"] = a.prompt
        data = json.dumps(obj).encode()
    return Sender(a, data).run()


class Sender:
    """`streamd.py send`: hand off, print the response; retry what may succeed
    a moment later, but only before the first byte of a stream."""

    def __init__(self, args, data: bytes):
        self.a, self.data = args, data
        self.t0 = time.monotonic()
        self.retries = 0
        self.status = 1  # the exit status

    def run(self) -> int:
        for attempt in range(self.a.retries + 1):
            wait = self.attempt(final=attempt == self.a.retries)
            if wait is None:
                break
            wait = wait or random_backoff(self.a.retry_base, attempt)
            print("streamd send: retrying in %.2fs (%d of %d)" % (wait, attempt + 1, self.a.retries), file=sys.stderr)
            time.sleep(wait)
            self.retries += 1
        return self.status

    def attempt(self, final: bool):
        """One handoff and its response.  None when that is the result; else
        the wait before the next try (0: backoff), for a daemon that could not
        be reached (restarting) or answered 503 (at capacity, draining)."""
        a = self.a
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            send_handoff(a.socket, self.data, theirs.fileno(), a.socket_type)
        except OSError as e:
            mine.close()
            print("streamd send: cannot hand off to %s: %s" % (a.socket, e.strerror or e), file=sys.stderr)
            self.status = 3
            return None if final else 0
        finally:
            theirs.close()
        reader = StreamReader()
        ttfb = None
        mine.settimeout(a.timeout)
        out = sys.stdout
        total = 0
        try:
            while True:
                chunk = mine.recv(65536)
                if not chunk:
                    break
                if ttfb is None:
                    ttfb = time.monotonic() - self.t0
                total += len(chunk)
                had_head = reader.status is not None
                try:
                    events = reader.feed(chunk)
                except ValueError as e:
                    print("streamd send: %s" % e, file=sys.stderr)
                    self.status = 1
                    return None
                if reader.status == 503 and not final:
                    continue  # (read it whole: its Retry-After says how long to wait)
                if not a.quiet:
                    if not had_head and reader.status is not None:
                        out.write("HTTP %d\n" % reader.status)
                    for ev in events:
                        out.write(ev + "\n")
                    out.flush()
        except socket.timeout:
            print("streamd send: no data for %gs" % a.timeout, file=sys.stderr)
        finally:
            mine.close()
        if reader.status == 503 and not final:
            try:
                return min(5.0, float((reader.headers or {}).get("Retry-After", 0)))
            except ValueError:
                return 0
        elapsed = time.monotonic() - self.t0
        if reader.status not in (None, 200) and not a.quiet:
            out.write(reader.body.decode("utf-8", "replace") + "\n")
        done = bool(reader.events) and reader.events[-1] == "data: [DONE]"
        print("status=%s events=%d bytes=%d ttfb_ms=%s total_ms=%.1f retries=%d outcome=%s" % (
            reader.status, len(reader.events), total, "%.1f" % (ttfb * 1000) if ttfb is not None else "-",
            elapsed * 1000, self.retries, "done" if done else "incomplete"), file=sys.stderr)
        self.status = 0 if done else 1
        return None


def random_backoff(base: float, attempt: int, cap: float = 5.0) -> float:
    """Full jitter: a random wait up to base * 2**attempt (at most cap), so
    that many clients retrying at once spread out."""
    import random
    return random.uniform(0, min(cap, base * 2 ** attempt))


def cmd_demo(argv) -> int:
    """Start a daemon on a temporary socket, stream one request, stop it."""
    import subprocess
    import tempfile
    if "-h" in argv or "--help" in argv:
        print("usage: streamd.py demo [OPTIONS]\n\nStart a streamd daemon on a temporary socket, hand it one "
              "connection as Apache would, print the stream, stop the daemon.\nOPTIONS are the daemon's own "
              "(see streamd.py --help), e.g. --message-delay 10ms or --backend typing.")
        return 0
    with tempfile.TemporaryDirectory(prefix="streamd-demo-") as tmp:
        path = os.path.join(tmp, "streamd.sock")
        # Wait for READY=1 on our own notify socket, the way systemd does.
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(os.path.join(tmp, "notify"))
        notify.settimeout(10)
        env = dict(os.environ, NOTIFY_SOCKET=os.path.join(tmp, "notify"))
        daemon = subprocess.Popen(self_command() + ["serve", "--socket", path,
                                   "--metrics-addr", "", "--message-delay", "80ms"] + argv, env=env)
        try:
            try:
                while notify.recv(256) != b"READY=1":
                    pass
            except socket.timeout:
                print("demo: the daemon did not become ready", file=sys.stderr)
                return 1
            print("--- streamd is up on %s; handing it one connection as Apache would ---" % path,
                  file=sys.stderr)
            status = cmd_send(["--socket", path, "--data", '{"user_id": 42, "include_usage": true}',
                               "Explain what streamd does, in eighteen short messages"])
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
            notify.close()
        return status


# ---- main ----

def self_command() -> list:
    """The command that runs this streamd again: this file, or the bundle it
    was loaded from (streamd.pyz), with the same Python and its -S."""
    me = os.path.abspath(__file__)
    if not os.path.isfile(me) and os.path.isfile(os.path.dirname(me)):
        me = os.path.dirname(me)  # .../streamd.pyz/streamd.py: run the bundle
    return [sys.executable] + (["-S"] if sys.flags.no_site else []) + [me]


def cmd_check(argv) -> int:
    """Load the config as the daemon would (file, credentials, environment,
    flags), import every configured backend and its packages, find the demo
    page; print what was found; 0 if the daemon would start, else 2."""
    if "-h" in argv or "--help" in argv:
        print("usage: streamd.py check [--config FILE] [OPTIONS]\n\nCheck what the daemon would start with, "
              "without starting it: the config (file, systemd credentials, environment, OPTIONS), the configured "
              "backends and the packages they need, the demo page.  Exit 0 if it would start, 2 if not (the "
              "reason on stderr).  Run it as the service's user to check it can read the files.")
        return 0
    args = vars(build_arg_parser().parse_args(go_flags(argv)))
    path = args.pop("config", None)
    try:
        cfg = load_config(args, dict(os.environ), path)
        names = [cfg["backend.provider"]] + [n for n in cfg["backend.enabled"] if n != cfg["backend.provider"]]
        for name in names:
            load_backend(name)
    except ConfigError as e:
        print("streamd: %s" % e, file=sys.stderr)
        return 2
    for warning in cfg["config_warnings"]:
        print("streamd: warning: config: %s" % warning, file=sys.stderr)
    try:
        page = shipped_file("demo.html")[0] if not cfg["http.demo_page"] else cfg["http.demo_page"]
    except OSError:
        page = "none (/ answers 404)"
    keys = [n for n in names if cfg.get("backend.%s.api_key" % n)]
    creds = "" if os.environ.get("CREDENTIALS_DIRECTORY") else \
        " (keys in systemd credentials are seen only inside the service)"
    print("streamd %s: config OK: %s; backends %s (with an API key: %s%s); socket %s; metrics %s; front %s; "
          "demo page %s" % (__version__, path or "no config file", ", ".join(names), ", ".join(keys) or "none",
                            creds, cfg["server.socket_path"], cfg["metrics.listen_addr"] or "off",
                            ", ".join(cfg["http.listen"]) or "off", page))
    return 0


# What `bundle --with-deps` puts in streamd.pyz: each distribution and the
# packages it installs (pure Python all; PyYAML's C speedups are left out, its
# pure-Python loader is used).  h2 and its two are optional: taken if installed.
BUNDLE_DEPS = (("PyYAML", ("yaml",)), ("prometheus-client", ("prometheus_client",)), ("urllib3", ("urllib3",)))
BUNDLE_OPTIONAL = (("h2", ("h2",)), ("hpack", ("hpack",)), ("hyperframe", ("hyperframe",)))
BUNDLE_FILES = ("demo.html", "LICENSE", "config.example.yaml", "streamd.service", "streamd.socket")
_PIN = re.compile(r'^(?:#[^=]*?)?\b([A-Za-z0-9_.-]+)==([\w.]+)\s*(?:;\s*python_version\s*(>=|<=|<|>|==)\s*"([\d.]+)")?')


def requirement_pins(path: str) -> dict:
    """{distribution: version} pinned in a requirements file for this Python
    (its python_version markers evaluated), commented optional pins too."""
    pins = {}
    ops = {">=": operator.ge, "<=": operator.le, "<": operator.lt, ">": operator.gt, "==": operator.eq}
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = _PIN.match(line.strip())
            if not m:
                continue
            name, version, op, wanted = m.groups()
            if op and not ops[op](sys.version_info[:2], tuple(int(x) for x in wanted.split("."))):
                continue
            pins[name.lower()] = version
    return pins


def bundle_dependency(dist: str, packages, pins: dict):
    """({archive name: bytes}, version) of an installed distribution: its packages
    .py files and its licence text(s), after checking its version is the pin."""
    import importlib.metadata as md
    version = md.version(dist)
    pinned = pins.get(dist.lower())
    if pinned and version != pinned:
        raise ConfigError("bundle: %s %s is installed, requirements.txt pins %s (pip install -r requirements.txt)"
                          % (dist, version, pinned))
    out = {}
    for pkg in packages:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError("bundle: %s: package %s not found" % (dist, pkg))
        root = list(spec.submodule_search_locations)[0]
        for top, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in files:
                if name.endswith(".py") or name == "py.typed":
                    full = os.path.join(top, name)
                    with open(full, "rb") as f:
                        out[pkg + "/" + os.path.relpath(full, root).replace(os.sep, "/")] = f.read()
    licences = [f for f in (md.distribution(dist).files or ())
                if re.search(r"LICEN[CS]E|COPYING|NOTICE", f.name, re.I) and ".dist-info" in str(f)]
    for f in licences:
        out["licenses/%s-%s/%s" % (dist, version, f.name)] = f.locate().read_bytes()
    if not licences:
        raise ConfigError("bundle: %s %s: no licence file in its installed metadata (install it with pip)"
                          % (dist, version))
    return out, version


def cmd_bundle(argv) -> int:
    """Build streamd.pyz: one file that runs as `python3 streamd.pyz ...`."""
    import argparse
    import zipfile
    p = argparse.ArgumentParser(prog="streamd.py bundle", description=(
        "Build one file that carries streamd.py, every backend, the front and demo.html (Python's zipapp): "
        "run it as `python3 streamd.pyz [serve|send|demo|check] ...`. The same sources give the same bytes."))
    p.add_argument("-o", "--output", default="streamd.pyz", help="the file to write (default: streamd.pyz)")
    p.add_argument("--with-deps", action="store_true", help=(
        "also carry the pinned runtime packages (PyYAML, prometheus-client, urllib3; h2 if installed), "
        "from this Python's installed copies, with their licence texts: then it needs nothing but Python "
        "(the Python version line those packages support: urllib3 2.7 needs 3.10)"))
    args = p.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    files = {}
    try:
        if not os.path.isdir(os.path.join(here, "backends")):
            raise ConfigError("bundle: run it from a checkout or an installed copy (streamd.py with backends/ "
                              "next to it), not from %s" % here)
        with open(os.path.abspath(__file__), "rb") as f:
            files["streamd.py"] = f.read()
        for name in sorted(os.listdir(os.path.join(here, "backends"))):
            if name.endswith(".py"):
                with open(os.path.join(here, "backends", name), "rb") as f:
                    files["backends/" + name] = f.read()
        for name in BUNDLE_FILES:
            try:
                files[name] = shipped_file(name)[1]
            except OSError:
                if name in ("demo.html", "LICENSE"):
                    raise ConfigError("bundle: %s not found next to streamd.py" % name) from None
        files["__main__.py"] = (b"# streamd, bundled: python3 streamd.pyz [serve|send|demo|check] [OPTIONS]\n"
                                b"import sys\n\nimport streamd\n\nsys.exit(streamd.main())\n")
        manifest = ["streamd %s" % __version__]
        if args.with_deps:
            req = os.path.join(here, "requirements.txt")
            pins = requirement_pins(req) if os.path.exists(req) else {}
            for dist, packages in BUNDLE_DEPS + BUNDLE_OPTIONAL:
                if (dist, packages) in BUNDLE_OPTIONAL and importlib.util.find_spec(packages[0]) is None:
                    continue
                if importlib.util.find_spec(packages[0]) is None:
                    raise ConfigError("bundle --with-deps: %s is not installed (pip install -r requirements.txt)"
                                      % dist)
                got, version = bundle_dependency(dist, packages, pins)
                files.update(got)
                manifest.append("%s %s" % (dist, version))
        files["BUNDLE.txt"] = ("\n".join(manifest) + "\n").encode()
    except ConfigError as e:
        print("streamd: %s" % e, file=sys.stderr)
        return 2
    tmp = args.output + ".tmp"
    with open(tmp, "wb") as f:
        f.write(b"#!/usr/bin/env python3\n")
        with zipfile.ZipFile(f, "w") as z:
            for name in sorted(files):
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # reproducible: no mtimes
                info.create_system, info.external_attr = 3, 0o100644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                z.writestr(info, files[name], compresslevel=9)
    os.chmod(tmp, 0o755)
    os.replace(tmp, args.output)
    print("streamd: wrote %s (%d files, %d bytes: %s)" % (args.output, len(files), os.path.getsize(args.output),
                                                          ", ".join(manifest)), file=sys.stderr)
    return 0


def build_arg_parser():
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            # One line naming the problem, exit status 2.
            self.exit(2, "streamd: %s\n" % message)

    p = Parser(prog="streamd.py", description=(
        "Stream Server-Sent Events to clients handed off by Apache mod_socket_handoff.\n"
        "Commands: serve (default) runs the daemon; 'send [PROMPT]' hands one connection to a\n"
        "running daemon and prints the stream; 'demo' starts a daemon and streams one request;\n"
        "'check' loads the config and backends without starting; 'bundle' builds streamd.pyz.\n"
        "Each has its own --help."),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML config file (needs PyYAML)")
    p.add_argument("--version", action="version", version="streamd " + __version__)
    for o in OPTIONS:
        if o.flag is None:
            continue  # (config file only: a mapping)
        env = "; env %s" % o.env if o.env else ""
        text = "%s (config: %s%s; default: %s)" % (o.help, o.key, env, shown_default(o))
        if o.parse is p_bool:  # --benchmark, or --openai-stream-usage false
            p.add_argument(o.flag, dest=o.key, nargs="?", const="true", metavar="true|false",
                           default=argparse.SUPPRESS, help=text)
        elif o.parse is p_addrs:  # repeatable: --listen A --listen B
            p.add_argument(o.flag, dest=o.key, metavar="HOST:PORT", action="append",
                           default=argparse.SUPPRESS, help=text)
        else:
            p.add_argument(o.flag, dest=o.key, metavar=o.flag.strip("-").split("-")[-1].upper(),
                           default=argparse.SUPPRESS, help=text.replace("%", "%%"))
    return p


def shown_default(o: Option) -> str:
    """An option's default as one writes it: 50ms, 64KiB, 0660, "" ..."""
    v = o.default
    if isinstance(v, bool):
        return "true" if v else "false"
    if o.parse is p_size:
        return "%dMiB" % (v >> 20) if v % (1 << 20) == 0 else "%dKiB" % (v >> 10) if v % 1024 == 0 else str(v)
    if o.parse is p_mode:
        return "%04o" % v
    if isinstance(v, float):
        return "%gms" % (v * 1000) if v < 1 else "%gs" % v
    if isinstance(v, list):
        return ",".join(v) or "none"
    return '""' if v == "" else str(v)


def supervise(cfg: dict, flags: dict, env: dict) -> int:
    for name in [cfg["backend.provider"]] + cfg["backend.enabled"]:
        try:
            load_backend(name)  # a missing module is a start error, not N crashing workers
        except ConfigError as e:
            print("streamd: %s" % e, file=sys.stderr)
            return 2
    sup = Supervisor(cfg, flags, env)
    try:
        sup.start()
    except ConfigError as e:
        print("streamd: %s" % e, file=sys.stderr)
        return 2
    sup.start_watchdog()
    sd_notify("READY=1")
    log(logging.INFO, "ready", version=__version__, workers=len(sup.workers), backend=cfg["backend.provider"],
        pid=os.getpid())
    status = sup.run()
    log(logging.INFO, "stopped", workers=len(sup.workers))
    return status


# The Go daemon's flags: one dash (-backend mock) as well as two, -flag=value,
# and these that streamd spells otherwise or does not need.
GO_FLAGS = {"--max-stream-duration-ms": lambda v: ["--max-stream-duration", "%sms" % v],
            "--http2-enabled": lambda v: ["--openai-http2", "false" if v.lower() in ("false", "0") else "true"],
            "--memlimit": None, "--gc-percent": None, "--pprof-addr": None}
GO_BOOL_FLAGS = ("--http2-enabled", "--benchmark", "--insecure-ssl")


def go_flags(argv: list) -> list:
    """argv with the Go daemon's flags made ours (GO_FLAGS); what is accepted
    but ignored goes to GO_FLAG_WARNINGS."""
    GO_FLAG_WARNINGS.clear()
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if re.fullmatch(r"-[a-z][a-z0-9-]+(=.*)?", arg):
            arg = "-" + arg  # -backend -> --backend (Go's flag package takes both)
        name, eq, value = arg.partition("=")
        if name in GO_BOOL_FLAGS and name not in GO_FLAGS:
            if eq and value.lower() in ("false", "0"):
                continue  # -benchmark=false: the default
            arg = name
        if name in GO_FLAGS:
            if not eq and name not in GO_BOOL_FLAGS:
                if i >= len(argv):
                    out.append(arg)  # (argparse says what is missing)
                    continue
                value = argv[i]
                i += 1
            elif not eq:
                value = "true"
            convert = GO_FLAGS[name]
            if convert is None:
                GO_FLAG_WARNINGS.append("%s: ignored (a Go runtime setting)" % name.lstrip("-"))
            else:
                out += convert(value)
            continue
        out.append(arg)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "send":
        return cmd_send(argv[1:])
    if argv and argv[0] == "demo":
        return cmd_demo(argv[1:])
    if argv and argv[0] == "check":
        return cmd_check(argv[1:])
    if argv and argv[0] == "bundle":
        return cmd_bundle(argv[1:])
    if argv and argv[0] == "serve":
        argv = argv[1:]
    args = vars(build_arg_parser().parse_args(go_flags(argv)))
    path = args.pop("config", None)
    env = dict(os.environ)
    try:
        cfg = load_config(args, env, path)
    except ConfigError as e:
        print("streamd: %s" % e, file=sys.stderr)
        return 2
    setup_logging(cfg["logging.level"], cfg["logging.format"])
    for warning in cfg["config_warnings"]:
        log(logging.WARNING, "config: " + warning)
    if cfg["server.workers"] > 1:
        return supervise(cfg, args, env)
    if "true" in [cfg["upstream.http2"]] + [cfg.get("backend.%s.http2" % n) for n in [cfg["backend.provider"]]
                                                + cfg["backend.enabled"]]:
        try:
            import h2  # noqa: F401
        except ImportError:
            print("streamd: upstream.http2: true needs the h2 package (pip install h2)", file=sys.stderr)
            return 2
    daemon = Daemon(cfg)
    daemon.flags, daemon.env = args, env
    try:
        daemon.backend(cfg["backend.provider"])
        for name in cfg["backend.enabled"]:
            daemon.backend(name)
        daemon.open_listener()
        daemon.open_front()
        daemon.start_metrics()
    except ConfigError as e:
        daemon.close_listener()
        print("streamd: %s" % e, file=sys.stderr)
        return 2
    daemon.fd_limit = raise_fd_limit()
    daemon.max_connections = cap_connections(cfg["server.max_connections"], daemon.fd_limit)
    if daemon.max_connections < cfg["server.max_connections"]:
        # Expected with the default on most hosts; a warning only if it was asked for.
        explicit = "server.max_connections" in args or (path and "server.max_connections" in read_config_file(path))
        log(logging.WARNING if explicit else logging.INFO, "max_connections capped to the fd limit",
            wanted=cfg["server.max_connections"], max_connections=daemon.max_connections,
            fd_limit=daemon.fd_limit)
    daemon.install_signals()
    daemon.probe_lag()
    daemon.start_watchdog()
    sd_notify("READY=1")
    log(logging.INFO, "ready", version=__version__, backend=cfg["backend.provider"],
        max_connections=daemon.max_connections, pid=os.getpid())
    try:
        status = daemon.run()
    except BaseException as e:
        # The loop's own machinery failed (see Daemon.contain): nothing can be
        # trusted any more.  Say so loudly, tell systemd, and remove the
        # socket file so that Apache answers 503 at once instead of queueing.
        sd_notify("STOPPING=1")
        log(logging.CRITICAL, "event loop crashed: this is a bug in streamd", error=type(e).__name__,
            exc_info=True)
        try:
            daemon.close_listener()
        except Exception:
            unlink_owned(daemon.listener_owned)
        return 70  # EX_SOFTWARE
    if cfg["server.benchmark"]:
        s = daemon.stats
        print("\n=== Benchmark Summary ===\nPeak concurrent streams: %d\nTotal started: %d\n"
              "Total completed: %d\nTotal failed: %d\nTotal bytes sent: %d\n========================="
              % (s.peak_streams, s.started, s.completed, s.failed, s.bytes_sent), flush=True)
    log(logging.INFO, "stopped", completed=daemon.stats.completed, failed=daemon.stats.failed,
        peak_streams=daemon.stats.peak_streams, max_loop_lag_ms=round(daemon.timers.max_lag * 1000, 2))
    return status


if __name__ == "__main__":
    # Backends do `import streamd`; make that this running module, not a second copy.
    sys.modules.setdefault("streamd", sys.modules[__name__])
    sys.exit(main())
