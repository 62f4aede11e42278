"""typing: types a quotation character by character, like a person would.

The text comes from /usr/games/fortune (backend.typing.fortune_path), run as a
child process whose pipe the loop watches; if it is missing, slow or fails, a
built-in quote is used.  Events are {"char": c, "index": i}; the pause after
each character is longer after . ! ? and shorter after a space.
"""
import os
import random
import re
import subprocess

NAME = "typing"
FORTUNE_TIMEOUT = 0.5
QUOTES = [
    "Simple things should be simple, complex things should be possible. -- Alan Kay",
    "Make it work, make it right, make it fast. -- Kent Beck",
    "The best way to predict the future is to invent it. -- Alan Kay",
    "Premature optimization is the root of all evil. -- Donald Knuth",
]


def clean(text: str) -> str:
    """One line: no attribution block, whitespace collapsed."""
    text = re.split(r"\n\s*--", text, 1)[0]
    return " ".join(text.split())


def pause(ch: str, base: float, rnd) -> float:
    if ch in ".!?":
        factor = 6.0
    elif ch in ",;:":
        factor = 3.0
    elif ch == " ":
        factor = 0.5
    else:
        factor = 1.0
    return base * factor * rnd.uniform(0.6, 1.4)


_children = []  # killed children not yet reaped; checked on every run and at exit


def reap() -> None:
    _children[:] = [p for p in _children if p.poll() is None]


def close() -> None:
    for p in _children:
        p.kill()
        p.wait()
    _children.clear()


def wait_exit(proc, timeout: float):
    """Wait for the child to exit without blocking the loop: a pidfd becomes
    readable when the process ends (Linux 5.3+; elsewhere we just poll later)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        return
    try:
        yield ("readable", fd, timeout)
    except TimeoutError:
        pass
    finally:
        os.close(fd)


def read_fortune(path: str):
    """Run the program with its stdout on the loop; return its text or None."""
    try:
        proc = subprocess.Popen([path], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, close_fds=True)
    except OSError:
        return None
    out = b""
    try:
        os.set_blocking(proc.stdout.fileno(), False)
        while len(out) < 65536:
            try:
                yield ("readable", proc.stdout, FORTUNE_TIMEOUT)
            except TimeoutError:
                return None
            try:
                data = os.read(proc.stdout.fileno(), 65536)
            except BlockingIOError:
                continue
            if not data:
                break
            out += data
        yield from wait_exit(proc, FORTUNE_TIMEOUT)
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
            _children.append(proc)
    return out.decode("utf-8", "replace") if proc.returncode == 0 else None


def run(req, cfg):
    reap()
    text = yield from read_fortune(cfg["backend.typing.fortune_path"])
    text = clean(text or "") or random.choice(QUOTES)
    base = cfg["backend.typing.char_delay"]
    rnd = random.Random()
    yield ("head",)
    for i, ch in enumerate(text):
        yield ("event", {"char": ch, "index": i})
        if base:
            yield ("sleep", pause(ch, base, rnd))
    return {"finish_reason": "stop", "usage": {"prompt_tokens": len(req.last_user_text().split()),
                                               "completion_tokens": len(text.split()),
                                               "total_tokens": len(req.last_user_text().split()) + len(text.split())}}
