"""HTTP/2 to upstreams, multiplexed, with the optional `h2` package.

One H2Conn per upstream connection carries many streams.  It is shared, so no
single backend generator may own its socket: the loop watches the socket and
calls H2Conn.on_io, which feeds `h2` (a sans-I/O state machine: bytes in,
events out, data_to_send out) and wakes the streams that got something.  A
stream's generator waits with ("park", timeout, stream) and is resumed by
stream.notify().  H2Stream has _http.Stream's shape (send_request, read_head,
read_body, close), so the SSE parsing, timeouts, retries and errors are the
same as over HTTP/1.1.

Flow control is per stream: received DATA is acknowledged (WINDOW_UPDATE) only
when the backend takes it, so a slow client stalls its own stream and nothing
else.  A client that leaves resets only its stream (RST_STREAM CANCEL).  A
connection that hits the server's max_concurrent_streams, or gets GOAWAY, takes
no new streams; new ones go to another connection.
"""
from __future__ import annotations

import selectors
import ssl

from streamd import BackendError
from backends._http import KEEPALIVE_IDLE, Stream

WINDOW = 1 << 20  # flow-control window we grant the upstream, per stream and connection
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


def available() -> bool:
    try:
        import h2  # noqa: F401
    except ImportError:
        return False
    return True


def connect_tls(target, timeout: float):
    """Runs on a helper thread: connect and do the TLS handshake offering ALPN
    h2 and http/1.1 (urllib3 offers only http/1.1).  The socket's
    selected_alpn_protocol() says which one the upstream chose."""
    from urllib3.util.connection import create_connection
    sock = create_connection((target.host, target.port), timeout=timeout)
    try:
        tls = target.tls_context(("h2", "http/1.1")).wrap_socket(sock, server_hostname=target.host)
    except BaseException:
        sock.close()
        raise
    tls.setblocking(False)
    return tls


def connect_plain(target, timeout: float):
    """h2c with prior knowledge: plain TCP that starts with the HTTP/2 preface."""
    from urllib3.util.connection import create_connection
    sock = create_connection((target.host, target.port), timeout=timeout)
    sock.setblocking(False)
    return sock


def find(target):
    """A live connection to this upstream that can take one more stream."""
    for mux in getattr(target, "h2", ()):
        if mux.usable():
            return mux
    return None


class Waiter:
    """Something a backend can ("park", …) on until notify()."""
    __slots__ = ("wake",)

    def __init__(self):
        self.wake = None

    def notify(self) -> None:
        wake, self.wake = self.wake, None
        if wake is not None:
            wake()


def acquire(target, cfg, connect):
    """A connection with room for one more stream: (H2Conn, None), or
    (None, socket) when the upstream chose HTTP/1.1 in ALPN.

    Only one stream connects to an upstream at a time; the others that arrive
    meanwhile wait for it instead of each opening a connection.  A new
    connection counts only once the server's SETTINGS arrived, so its
    max_concurrent_streams is known before streams are put on it."""
    timeout = cfg["upstream.connect_timeout"] + 1
    while True:
        mux = find(target)
        if mux is not None:
            return mux, None
        if getattr(target, "h2_pending", None) is None:
            break
        w = Waiter()
        target.h2_pending.append(w)
        yield ("park", timeout, w)
    target.h2_pending = []
    try:
        sock = yield from connect()
        if target.scheme == "https" and sock.selected_alpn_protocol() != "h2":
            return None, sock
        loop = yield ("loop",)
        mux = H2Conn(loop, target, sock, cfg)
        while not mux.ready and mux.dead is None:
            w = Waiter()
            mux.ready_waiters.append(w)
            yield ("park", timeout, w)
        if mux.dead is not None:
            raise BackendError("upstream HTTP/2 connection failed: %s" % mux.dead, reason="network")
        return mux, None
    finally:
        waiters, target.h2_pending = target.h2_pending, None
        for w in waiters:
            w.notify()


def close_all(target) -> None:
    for mux in list(getattr(target, "h2", ())):
        mux.close()


class H2Conn:
    WHERE = "upstream"  # for daemon_internal_errors_total

    def __init__(self, loop, target, sock, cfg):
        import h2.config
        import h2.connection
        import h2.events
        import h2.exceptions
        import h2.settings
        self.ev, self.h2_errors = h2.events, h2.exceptions.ProtocolError
        self.loop, self.target, self.sock, self.cfg = loop, target, sock, cfg
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                                   h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 65536})
        self.conn.increment_flow_control_window(WINDOW)
        self.streams = {}   # stream id -> H2Stream
        self.out = b""      # bytes the socket did not take yet
        self.dead = None    # why no new stream may start here (GOAWAY, closed, failed)
        self.mask = _READ
        self.idle_timer = None
        self.ready = False        # the server's first SETTINGS arrived
        self.ready_waiters = []
        if not hasattr(target, "h2"):
            target.h2 = []
        target.h2.append(self)
        loop.selector.register(sock, _READ, self.on_io)
        self.flush()

    def usable(self) -> bool:
        return (self.ready and self.dead is None and self.sock is not None
                and len(self.streams) < self.conn.remote_settings.max_concurrent_streams)

    def open(self, stream) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.streams[sid] = stream
        if self.idle_timer is not None:
            self.loop.timers.cancel(self.idle_timer)
            self.idle_timer = None
        return sid

    def flush(self) -> None:
        """Send what h2 has queued; watch for writability while bytes wait."""
        if self.sock is None:
            return
        self.out += self.conn.data_to_send()
        if self.out:
            try:
                n = self.sock.send(self.out)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                n = 0
            except OSError as e:
                self.fail("upstream connection failed: %s" % (e.strerror or e))
                return
            self.out = self.out[n:]
        want = _READ | _WRITE if self.out else _READ
        if want != self.mask:
            self.loop.selector.modify(self.sock, want, self.on_io)
            self.mask = want

    def on_io(self, sock, mask) -> None:
        """The loop's callback: read everything available (TLS: until want-read),
        feed h2, hand each event to its stream, wake those streams."""
        if mask & _WRITE:
            self.flush()
        if not mask & _READ or self.sock is None:
            return
        chunks, eof = [], False
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    eof = True
                    break
                chunks.append(data)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except OSError:
            eof = True
        if chunks:
            try:
                events = self.conn.receive_data(b"".join(chunks))
            except self.h2_errors as e:
                self.fail("upstream broke HTTP/2: %s" % e)
                return
            woken = set()
            for e in events:
                self.dispatch(e, woken)
            for st in woken:
                st.notify()
            self.flush()
        if eof:
            self.fail("upstream closed the HTTP/2 connection")

    def dispatch(self, e, woken: set) -> None:
        ev = self.ev
        st = self.streams.get(getattr(e, "stream_id", None))
        if isinstance(e, ev.ResponseReceived) and st:
            st.headers_received(e.headers)
        elif isinstance(e, ev.DataReceived):
            if st:
                st.data.append(e.data)
                st.unacked += e.flow_controlled_length
            elif e.flow_controlled_length:  # a stream we already left: keep the connection window open
                self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        elif isinstance(e, ev.StreamEnded) and st:
            st.ended = True
        elif isinstance(e, ev.StreamReset) and st:
            st.failed = BackendError("upstream reset the HTTP/2 stream (error %s)" % e.error_code, reason="upstream")
        elif isinstance(e, ev.RemoteSettingsChanged):
            if not self.ready:
                self.ready = True
                waiters, self.ready_waiters = self.ready_waiters, []
                woken.update(waiters)
            return
        elif isinstance(e, ev.WindowUpdated):
            woken.update(self.streams.values() if not e.stream_id else [st] if st else [])
            return
        elif isinstance(e, ev.ConnectionTerminated):
            self.dead = "GOAWAY %s" % e.error_code
            for sid, other in self.streams.items():
                if e.last_stream_id is None or sid > e.last_stream_id:  # never processed: may be retried
                    other.failed = BackendError("upstream sent GOAWAY before this stream started",
                                                reason="upstream")
                    woken.add(other)
            return
        else:
            return
        woken.add(st)

    def release(self, stream) -> None:
        """A stream is done with this connection (complete, failed, or its client left)."""
        if self.streams.pop(stream.sid, None) is None:
            return
        if not stream.ended and self.sock is not None and self.dead is None:
            try:
                self.conn.reset_stream(stream.sid, error_code=8)  # CANCEL: only this stream
            except self.h2_errors:
                pass
            self.flush()
        if not self.streams:
            if self.dead is not None:
                self.close()
            elif self.idle_timer is None and self.sock is not None:
                self.idle_timer = self.loop.timers.call_later(KEEPALIVE_IDLE, self.idle_expired)

    def idle_expired(self, _=None) -> None:
        self.idle_timer = None
        if not self.streams:
            self.close()

    def internal_error(self, _sock=None) -> None:
        """Handling this connection raised (see streamd's Daemon.contain):
        its streams end with an error, the connection closes."""
        self.fail("internal error in the HTTP/2 connection")

    def fail(self, message: str) -> None:
        self.dead = message
        waiters, self.ready_waiters = self.ready_waiters, []
        for w in waiters:
            w.notify()
        for st in list(self.streams.values()):
            if not st.ended and st.failed is None:
                st.failed = BackendError(message, reason="upstream")
            st.notify()
        self.close()

    def close(self) -> None:
        if self.sock is None:
            return
        if self.idle_timer is not None:
            self.loop.timers.cancel(self.idle_timer)
            self.idle_timer = None
        try:
            self.conn.close_connection()
            self.sock.send(self.conn.data_to_send())
        except (OSError, ssl.SSLError, self.h2_errors):
            pass
        self.loop.selector.unregister(self.sock)
        self.sock.close()
        self.sock = None
        if self in getattr(self.target, "h2", ()):
            self.target.h2.remove(self)
        if self.dead is None:
            self.dead = "closed"


class H2Stream(Stream):
    """One request on a shared H2Conn, with _http.Stream's interface."""

    def __init__(self, mux: H2Conn, cfg: dict):
        super().__init__(mux.target, mux.sock, cfg, reused=False)
        self.mux = mux
        self.sid = None
        self.data = []        # DATA received, not yet taken
        self.unacked = 0      # its flow-controlled length, acknowledged when taken
        self.ended = False    # END_STREAM received
        self.failed = None    # a reset, GOAWAY or dead connection: raised after the data before it
        self.wake = None      # installed by the loop while parked
        self.keep_alive = False

    def notify(self) -> None:
        wake, self.wake = self.wake, None
        if wake is not None:
            wake()

    def wait(self, timeout: float):
        yield ("park", timeout, self)

    def headers_received(self, headers) -> None:
        hdrs = {}
        for k, v in headers:
            if k == ":status":
                if not (len(v) == 3 and v.isascii() and v.isdigit()):
                    self.failed = BackendError("upstream sent an invalid :status %r" % v[:20])
                    return
                self.status = int(v)
            else:
                hdrs[k] = hdrs[k] + ", " + v if k in hdrs else v
        self.headers = hdrs

    def send_request(self, method: str, path: str, headers: dict, body: bytes):
        from backends._http import check_headers
        check_headers(headers)
        mux, timeout = self.mux, self.cfg["upstream.header_timeout"]
        scheme = "https" if isinstance(mux.sock, ssl.SSLSocket) else "http"
        fields = [(":method", method), (":path", path), (":scheme", scheme),
                  (":authority", self.target.host_header), ("user-agent", "streamd")]
        if body is not None:
            fields += [("content-type", "application/json"), ("content-length", str(len(body)))]
        fields += [(k.lower(), v) for k, v in headers.items()]
        self.sid = mux.open(self)
        mux.conn.send_headers(self.sid, fields, end_stream=body is None)
        view = memoryview(body or b"")
        while view:
            if self.failed is not None:
                raise self.failed
            window = min(mux.conn.local_flow_control_window(self.sid), mux.conn.max_outbound_frame_size)
            if window <= 0:
                mux.flush()
                yield from self.wait(timeout)  # a WINDOW_UPDATE wakes us
                continue
            n = min(window, len(view))
            mux.conn.send_data(self.sid, view[:n].tobytes(), end_stream=n == len(view))
            view = view[n:]
        mux.flush()

    def read_head(self):
        timeout = self.cfg["upstream.header_timeout"]
        while self.status is None:
            if self.failed is not None:
                raise self.failed
            if self.ended:
                raise BackendError("upstream ended the HTTP/2 stream without a response")
            yield from self.wait(timeout)
        if self.headers.get("content-encoding", "identity").lower() != "identity":
            raise BackendError("upstream sent Content-Encoding %r; we asked for identity"
                               % self.headers["content-encoding"])

    def read_body(self, timeout: float):
        while True:
            if self.data:
                out = b"".join(self.data)
                self.data = []
                if self.unacked and self.mux.sock is not None:
                    # Taken: now the upstream may send this much more on this stream.
                    self.mux.conn.acknowledge_received_data(self.unacked, self.sid)
                    self.unacked = 0
                    self.mux.flush()
                return out
            if self.failed is not None:
                raise self.failed
            if self.ended:
                self.complete = True
                return None
            yield from self.wait(timeout)

    def close(self) -> None:
        if self.sock is None:
            return
        self.sock = None
        if self.sid is not None:
            self.mux.release(self)
