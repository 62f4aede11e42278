"""A real streamd process under a mixed hostile load, then its health.

For a fixed budget of wall time, 16 client threads run cases generated from
one seed (tests/hostile.py): malformed and valid handoffs over the SEQPACKET
socket (bad fds, too many fds, bad data of every class, clients that vanish),
hostile HTTP and WebSocket clients on the --listen port, hostile clients of
the metrics port, and openai streams proxied to a hostile upstream (bad
status lines, broken framing, giant or deeply nested SSE, slow or endless
answers; sometimes a valid stream).  Every case checks its own answer (a
status, a stream with [DONE], an error event, a close code, an fd closed, an
upstream request cancelled); after the budget:

  1. the daemon is still alive;
  2. a mock stream through a real handoff, a POST /v1/stream on the front and
     an openai stream all end with `data: [DONE]`;
  3. the daemon's fd count settles back to the baseline taken after warm-up;
  4. the log has no traceback outside a `msg="internal error"` line, no
     level=critical, no 'event loop crashed', no raw control bytes, nothing
     that is not a log record;
  5. handoff_errors{reason} counts at least the handoffs of each reason sent;
  and every case's own check passed.

The counts of inputs tried per class are printed and are in every assertion
message.

The daemon runs with the brief's flags (mock backend, 1 ms message delay,
openai -> the hostile upstream, no retries, 2 s idle/header timeouts, 1 s
handoff/request timeouts, debug logs) plus: --rate-limit 0
--max-streams-per-key 0 (every client is 127.0.0.1; the per-address limits
would turn most of the mix into 429s), --breaker-failures 0 (the breaker would
turn every openai request into a 503 after five hostile answers), and an
anthropic backend pointed at a listener whose accept queue is full
(--connect-timeout 2s), so that clients also leave while an upstream connect
is pending on a helper thread.  See hostile.DAEMON_FLAGS.

Modes:
  default        20 s of load (STREAMD_FUZZ_SECONDS overrides), at most 20000 cases: test_hostile_mix
  long           STREAMD_FUZZ_LONG=1 (300 s) or =N (N seconds): test_hostile_mix_long,
                 and the default test is skipped
Strict:          STREAMD_FUZZ_STRICT=1 also fails on contained exceptions (msg="internal error"
                 lines), which are otherwise only printed.
Replay:          STREAMD_FUZZ_SEED=<seed> reruns the same cases (the order in which
                 threads run them varies); one case: `python tests/hostile.py --seed S --case N`.
"""
import os
import random
import time

import pytest

import hostile as H


def _long_seconds():
    raw = os.environ.get("STREAMD_FUZZ_LONG", "").strip()
    if raw.lower() in ("", "0", "false", "no", "off"):
        return None
    try:
        value = float(raw)
    except ValueError:
        return 300.0
    return 300.0 if value == 1 else value  # "1": on, 300 s; any other number: that many seconds


LONG = _long_seconds()
DEFAULT_SECONDS = float(os.environ.get("STREAMD_FUZZ_SECONDS", "20"))
THREADS = int(os.environ.get("STREAMD_FUZZ_THREADS", "16"))
# STREAMD_FUZZ_STRICT=1: a contained exception (msg="internal error") fails too
STRICT = os.environ.get("STREAMD_FUZZ_STRICT", "") not in ("", "0")


def run_hostile(workdir, seconds, max_cases):
    seed = os.environ.get("STREAMD_FUZZ_SEED") or str(random.SystemRandom().randrange(1 << 32))
    print("\nhostile mix: seed=%s budget=%gs threads=%d (replay: STREAMD_FUZZ_SEED=%s)"
          % (seed, seconds, THREADS, seed))
    up = H.HostileUpstream(seed)
    hole = H.Blackhole()
    try:
        d = H.StreamdProcess(str(workdir), up.port, blackhole_port=hole.port)
    except BaseException:
        up.close()
        hole.close()
        raise
    try:
        problems, baseline = H.warm_up(d, up)
        assert not problems, "seed=%s: warm-up failed: %s\nlog:\n%s" % (seed, problems, d.logs()[-5000:])
        env = H.Env(d, up, seed)
        rss_before = d.rss_kb()
        start = time.monotonic()
        mix = H.Mix(env, seed, seconds, threads=THREADS, max_cases=max_cases).run()
        elapsed = time.monotonic() - start
        summary = H.report(env, mix, elapsed)
        print(summary)

        failures = []
        # Close every upstream connection first: pooled ones turn dead, and the
        # final openai stream discards them (leaving one, as the warm-up did).
        if not up.close_connections():
            failures.append("the hostile upstream's connections did not all close")
        # (1) alive
        if not d.alive():
            failures.append("the daemon died (exit status %s); cases in flight or just before:\n  %s"
                            % (d.proc.returncode, "\n  ".join(map(repr, mix.died_with or [])))[:6000])
        else:
            # (2) normal streams still work
            failures += ["after the mix: " + p for p in H.final_stream_checks(d, up)]
            # (3) fds back to the baseline
            fds = H.settle_fds(d, baseline, 10.0)
            if fds != baseline:
                failures.append("daemon fd count %d, baseline %d (after 10 s):\n  %s"
                                % (fds, baseline, "\n  ".join(d.fd_listing())))
            print("daemon: %d fds (baseline %d), RSS %d KiB -> %d KiB" % (fds, baseline, rss_before, d.rss_kb()))
            # (5) every handoff failure counted under its reason
            reasons = H.scrape_metrics(d)
            for reason, n in sorted(env.expected_reasons.items()):
                if reasons.get(reason, 0) < n:
                    failures.append("daemon_handoff_errors_total{reason=%r} is %d, but %d handoffs of that "
                                    "kind were sent" % (reason, reasons.get(reason, 0), n))
        # (4) the log
        findings = H.log_findings(d.log_bytes())
        failing = [f for f in findings if f[0] in H.FAILING_LOG_KINDS or (STRICT and f[0] == "internal_error")]
        if failing:
            failures.append("the daemon's log has %d bad lines (traceback outside 'internal error', critical, "
                            "raw stderr, control bytes):\n  %s"
                            % (len(failing), "\n  ".join(H.log_summary(failing))))
        contained = [f for f in findings if f not in failing]
        if contained:
            print("contained (allowed, but each is a bug to look at):\n  " + "\n  ".join(H.log_summary(contained)))
        # every case's own checks
        if env.violations:
            failures.append("%d case checks failed:\n  %s" % (len(env.violations),
                                                              "\n  ".join(H.group_violations(env.violations))))
        if env.notes:
            print("notes (not failures):\n  " + "\n  ".join(H.group_violations(env.notes)))
        if env.harness_errors or up.errors:
            failures.append("harness errors (bugs in tests/hostile.py):\n" + "\n".join(env.harness_errors + up.errors))
        counts = ", ".join("%s=%d" % kv for kv in sorted(env.counts.items()))
        if failures:
            pytest.fail("seed=%s; inputs tried: %s (%d in %.1fs)\n%s\n\n%s\nlog: %s" % (
                seed, counts, sum(env.counts.values()), elapsed, summary, "\n\n".join(failures), d.log_path),
                pytrace=False)
        print("inputs tried: %s" % counts)
        return env
    finally:
        d.stop()
        up.close()
        hole.close()


@pytest.mark.skipif(LONG is not None, reason="STREAMD_FUZZ_LONG is set: test_hostile_mix_long runs instead")
def test_hostile_mix(tmp_path):
    run_hostile(tmp_path, DEFAULT_SECONDS, max_cases=20000)


@pytest.mark.skipif(LONG is None, reason="long mode: set STREAMD_FUZZ_LONG=1 (300 s) or =SECONDS (or --fuzz-long)")
@pytest.mark.timeout((LONG or 0) + 240)
def test_hostile_mix_long(tmp_path):
    """LONG MODE: the same mix for STREAMD_FUZZ_LONG seconds (default 300)."""
    run_hostile(tmp_path, LONG, max_cases=10 ** 7)
