"""Upstream resilience: retries before the first byte (on the daemon's fake
clock), and the per-backend circuit breaker."""
import json
import logging
import socket

import pytest

from conftest import client
from upstream import WORDS
from test_backends import contents, upstream  # noqa: F401  (upstream is a fixture)
import streamd


def openai(up, **extra):
    cfg = {"backend__provider": "openai", "backend__openai__api_base": up.base + "/v1",
           "upstream__retry_base": 0.5, "upstream__retry_cap": 8.0}
    cfg.update(extra)
    return cfg


def requests_for(up, pattern):
    return [r for r in up.requests if r.headers.get("x-test-pattern") == pattern]


def test_retry_after_503_then_success(daemon, upstream):
    up = upstream()
    ip = daemon(**openai(up))
    c = client(ip.path, {"test_pattern": "fail:1:503"})
    ip.pump(lambda: len(up.requests) == 1)
    ip.pump(c.done, advance=0.05)  # the backoff is at most retry_base (0.5 s) of fake time
    assert contents(c) == ("".join(WORDS), True, None)
    assert len(up.requests) == 2 and ip.d.stats.upstream_retries["openai"] == 1


@pytest.mark.parametrize("code", [400, 401, 403, 404])
def test_no_retry_on_client_errors(daemon, upstream, code):
    up = upstream()
    ip = daemon(**openai(up))
    c = client(ip.path, {"test_pattern": "fail:1:%d" % code})
    ip.pump(c.done, advance=0.5)
    assert c.parsed().status == 502 and len(up.requests) == 1
    assert not ip.d.stats.upstream_retries


def test_gives_up_after_max_retries(daemon, upstream):
    up = upstream()
    ip = daemon(**openai(up, upstream__max_retries=2))
    c = client(ip.path, {"test_pattern": "fail:9:500"})
    ip.pump(c.done, advance=0.1)
    assert c.parsed().status == 502 and len(up.requests) == 3
    assert ip.d.stats.upstream_retries["openai"] == 2


def test_backoff_grows_with_full_jitter(daemon, upstream):
    """Attempt n waits uniform(0, min(cap, base * 2^(n-1))): all retries of a
    6-retry run fit in 0.5+1+2+4+8+8 s of fake time and never before 0."""
    up = upstream()
    ip = daemon(**openai(up, upstream__max_retries=6, upstream__retry_budget=100.0))
    c = client(ip.path, {"test_pattern": "fail:9:502"})
    ip.pump(lambda: len(up.requests) == 1)
    start = ip.clock.now
    ip.pump(c.done, advance=0.01, timeout=30)
    assert len(up.requests) == 7 and ip.clock.now - start <= 0.5 + 1 + 2 + 4 + 8 + 8 + 1.0  # + pass granularity


def test_retry_after_is_honoured(daemon, upstream):
    up = upstream()
    ip = daemon(**openai(up))
    c = client(ip.path, {"test_pattern": "fail:1:429:7"})
    # wait until the daemon has read the 429 and started its wait (it counts the retry first)
    ip.pump(lambda: ip.d.stats.upstream_retries["openai"] == 1)
    ip.clock.advance(6.9)
    ip.run_for(20)
    assert len(up.requests) == 1, "retried before the upstream's Retry-After"
    ip.clock.advance(0.2)
    ip.pump(c.done)
    assert contents(c)[1] and len(up.requests) == 2


def test_retry_budget_answers_with_the_upstream_hint(daemon, upstream):
    up = upstream()
    ip = daemon(**openai(up, upstream__retry_budget=5.0))
    c = client(ip.path, {"test_pattern": "fail:1:503:60"})
    ip.pump(c.done)
    r = c.parsed()
    assert r.status == 503 and r.headers["Retry-After"] == "60" and len(up.requests) == 1


def test_x_should_retry(daemon, upstream):
    up = upstream()
    ip = daemon(**openai(up))
    c = client(ip.path, {"test_pattern": "fail:1:503::false"})
    ip.pump(c.done, advance=0.1)
    assert c.parsed().status == 503 and len(up.requests) == 1
    c = client(ip.path, {"test_pattern": "fail:1:400::true"})
    ip.pump(c.done, advance=0.1)
    assert contents(c)[1] and len(requests_for(up, "fail:1:400::true")) == 2


def test_connect_failure_is_retried(daemon):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    ip = daemon(backend__provider="openai", backend__openai__api_base="http://127.0.0.1:%d/v1" % port,
                upstream__max_retries=2)
    c = client(ip.path, b"\0")
    ip.pump(c.done, advance=0.1)
    assert c.parsed().status == 502 and ip.d.stats.upstream_retries["openai"] == 2


def test_never_retried_after_the_first_byte(daemon, upstream):
    up = upstream()
    ip = daemon(**openai(up))
    c = client(ip.path, {"test_pattern": "abort:3"})
    ip.pump(c.done, advance=0.1)
    text, done, error = contents(c)
    assert not done and error and len(up.requests) == 1


# ---- circuit breaker ----

CFG = {"upstream.breaker_failures": 3, "upstream.breaker_window": 30.0, "upstream.breaker_cooldown": 10.0}


def test_breaker_transitions():
    b = streamd.Breaker("x")
    assert b.allow(0, CFG)
    b.failure(1, CFG)
    b.failure(2, CFG)
    assert b.state == "closed" and b.allow(2, CFG)
    b.failure(3, CFG)
    assert b.state == "open" and not b.allow(5, CFG) and b.retry_after(5, CFG) == 8
    assert b.allow(13, CFG) and b.state == "half_open"   # cool-down over: one probe
    assert not b.allow(13.5, CFG)                         # only one
    b.failure(14, CFG)
    assert b.state == "open" and not b.allow(20, CFG)     # the probe failed: open again
    assert b.allow(24, CFG)
    b.success()
    assert b.state == "closed" and b.allow(25, CFG) and b.allow(25, CFG)


def test_breaker_counts_failures_in_a_row_within_the_window():
    b = streamd.Breaker("x")
    b.failure(0, CFG)
    b.failure(1, CFG)
    b.success()                      # a success resets the run
    b.failure(2, CFG)
    b.failure(3, CFG)
    assert b.state == "closed"
    b.failure(40, CFG)               # outside the 30 s window of the first: starts over
    assert b.state == "closed" and b.failures == 1


def test_breaker_disabled_with_zero():
    b = streamd.Breaker("x")
    for t in range(10):
        b.failure(t, dict(CFG, **{"upstream.breaker_failures": 0}))
    assert b.state == "closed"


def test_probe_that_leaves_frees_the_slot():
    b = streamd.Breaker("x")
    for t in range(3):
        b.failure(t, CFG)
    probe = object()
    assert b.allow(20, CFG, probe) and not b.allow(20, CFG)
    b.abandon(probe)
    assert b.allow(20, CFG)


def test_open_circuit_answers_503_without_touching_the_upstream(daemon, upstream, caplog):
    caplog.set_level(logging.INFO, logger="streamd")
    up = upstream()
    ip = daemon(**openai(up, upstream__max_retries=0, upstream__breaker_failures=3,
                         upstream__breaker_cooldown=10.0))
    for _ in range(3):
        c = client(ip.path, {"test_pattern": "status:500"})
        ip.pump(c.done)
        assert c.parsed().status == 502
    assert ip.d.snapshot()["circuit_open"] == {"openai": 1}
    c = client(ip.path, {"test_pattern": "status:500"})
    ip.pump(c.done)
    r = c.parsed()
    assert r.status == 503 and r.headers["Retry-After"] == "10"
    assert json.loads(r.body)["error"]["type"] == "circuit_open"
    assert len(up.requests) == 3, "an open circuit must not reach the upstream"
    # after the cool-down one probe goes through; it succeeds and closes the circuit
    ip.clock.advance(10)
    probe = client(ip.path, {})
    ip.pump(probe.done)
    assert contents(probe)[1] and len(up.requests) == 4
    assert ip.d.snapshot()["circuit_open"] == {"openai": 0}
    c = client(ip.path, {})
    ip.pump(c.done)
    assert contents(c)[1]
    messages = [r.getMessage() for r in caplog.records]
    assert "circuit open" in messages and "circuit half-open" in messages and "circuit closed" in messages


def test_failed_probe_opens_again(daemon, upstream):
    up = upstream()
    ip = daemon(**openai(up, upstream__max_retries=0, upstream__breaker_failures=2,
                         upstream__breaker_cooldown=5.0))
    for _ in range(2):
        c = client(ip.path, {"test_pattern": "status:503"})
        ip.pump(c.done)
    ip.clock.advance(5)
    c = client(ip.path, {"test_pattern": "status:503"})  # the probe fails
    ip.pump(c.done)
    assert c.parsed().status == 503 and len(up.requests) == 3
    c = client(ip.path, {})
    ip.pump(c.done)
    assert json.loads(c.parsed().body)["error"]["type"] == "circuit_open" and len(up.requests) == 3


def test_breaker_is_per_backend(daemon, upstream):
    up = upstream()
    ip = daemon(**openai(up, upstream__max_retries=0, upstream__breaker_failures=1,
                         backend__enabled=["mock"], backend__mock__message_delay=0.0))
    c = client(ip.path, {"test_pattern": "status:500"})
    ip.pump(c.done)
    c = client(ip.path, {"backend": "mock"})
    ip.pump(c.done)
    assert c.data.endswith(b"data: [DONE]\n\n")
