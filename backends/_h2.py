"""HTTP/2 for one upstream stream, with the `h2` package (optional).

The same shape as _http.Stream, whose SSE parsing and error handling it
inherits: send the request, read the head, read the body; only the framing
differs.  `h2` is a sans-I/O state machine (bytes in, events out; data_to_send
out), so the backend generator drives it with the loop's readable/writable
operations like any other socket.

This version opens one connection per stream: it speaks to upstreams that only
talk HTTP/2 (h2c prior knowledge, or ALPN h2), but does not multiplex many
streams over one connection yet.
"""
from __future__ import annotations

import ssl

from streamd import BackendError
from backends._http import Stream

WINDOW = 1 << 20  # flow-control window we grant the upstream, per stream and connection


def available() -> bool:
    try:
        import h2  # noqa: F401
    except ImportError:
        return False
    return True


def connect_tls(target, timeout: float):
    """Runs on a helper thread: connect and do the TLS handshake offering
    ALPN h2 and http/1.1 (urllib3 offers only http/1.1).  Returns the socket;
    its selected_alpn_protocol() says which one the upstream chose."""
    from urllib3.util.connection import create_connection
    sock = create_connection((target.host, target.port), timeout=timeout)
    ctx = ssl.create_default_context()
    if target.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    try:
        tls = ctx.wrap_socket(sock, server_hostname=target.host)
    except BaseException:
        sock.close()
        raise
    tls.setblocking(False)
    return tls


def connect_plain(target, timeout: float):
    """h2c with prior knowledge: a plain TCP connection that starts with the HTTP/2 preface."""
    from urllib3.util.connection import create_connection
    sock = create_connection((target.host, target.port), timeout=timeout)
    sock.setblocking(False)
    return sock


class H2Stream(Stream):
    def __init__(self, target, sock, cfg):
        super().__init__(target, sock, cfg, reused=False)
        import h2.config
        import h2.connection
        import h2.events
        import h2.exceptions
        import h2.settings
        self.ev = h2.events
        self.h2_errors = h2.exceptions.ProtocolError
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                                   h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 65536})
        self.conn.increment_flow_control_window(WINDOW)
        self.sid = None
        self.data = []          # DATA received, not yet handed out
        self.ended = False      # END_STREAM received
        self.failed = None      # a reset or GOAWAY: raised once the data before it is handed out
        self.keep_alive = False

    def flush(self, timeout: float):
        out = self.conn.data_to_send()
        if out:
            yield from self.send_all(out, timeout)

    def send_request(self, method: str, path: str, headers: dict, body: bytes):
        timeout = self.cfg["upstream.header_timeout"]
        scheme = "https" if isinstance(self.sock, ssl.SSLSocket) else "http"
        fields = [(":method", method), (":path", path), (":scheme", scheme), (":authority", self.target.host_header),
                  ("user-agent", "streamd")]
        if body is not None:
            fields += [("content-type", "application/json"), ("content-length", str(len(body)))]
        fields += [(k.lower(), v) for k, v in headers.items()]
        self.sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(self.sid, fields, end_stream=body is None)
        yield from self.flush(timeout)
        view = memoryview(body or b"")
        while view:
            window = self.conn.local_flow_control_window(self.sid)
            if window <= 0:
                yield from self.pump(timeout)  # wait for WINDOW_UPDATE
                continue
            n = min(window, self.conn.max_outbound_frame_size, len(view))
            self.conn.send_data(self.sid, view[:n].tobytes(), end_stream=n == len(view))
            view = view[n:]
            yield from self.flush(timeout)

    def pump(self, timeout: float):
        """Read once, feed h2, handle its events, send what it wants sent."""
        data = yield from self.recv_some(timeout)
        if not data:
            if not self.ended:
                raise BackendError("upstream closed the HTTP/2 connection mid-stream", reason="upstream")
            return
        try:
            events = self.conn.receive_data(data)
        except self.h2_errors as e:
            raise BackendError("upstream broke HTTP/2: %s" % e) from None
        ev = self.ev
        for e in events:
            if isinstance(e, ev.ResponseReceived) and e.stream_id == self.sid:
                hdrs = {}
                for k, v in e.headers:
                    k = k.decode() if isinstance(k, bytes) else k
                    v = v.decode() if isinstance(v, bytes) else v
                    if k == ":status":
                        self.status = int(v)
                    else:
                        hdrs[k] = hdrs[k] + ", " + v if k in hdrs else v
                self.headers = hdrs
            elif isinstance(e, ev.DataReceived) and e.stream_id == self.sid:
                self.data.append(e.data)
                # Grant the window back at once: back-pressure comes from not
                # reading the socket while the client is slow (TCP flow control).
                self.conn.acknowledge_received_data(e.flow_controlled_length, self.sid)
            elif isinstance(e, ev.StreamEnded) and e.stream_id == self.sid:
                self.ended = True
            elif isinstance(e, ev.StreamReset) and e.stream_id == self.sid:
                self.failed = BackendError("upstream reset the HTTP/2 stream (error %s)" % e.error_code,
                                           reason="upstream")
            elif isinstance(e, ev.ConnectionTerminated) and not self.ended:
                self.failed = BackendError("upstream ended the HTTP/2 connection (GOAWAY %s)" % e.error_code,
                                           reason="upstream")
        yield from self.flush(timeout)

    def read_head(self):
        timeout = self.cfg["upstream.header_timeout"]
        while self.status is None:
            if self.failed is not None:
                raise self.failed
            yield from self.pump(timeout)
            if self.ended and self.status is None:
                raise BackendError("upstream ended the HTTP/2 stream without a response")
        if self.headers.get("content-encoding", "identity").lower() != "identity":
            raise BackendError("upstream sent Content-Encoding %r; we asked for identity"
                               % self.headers["content-encoding"])

    def read_body(self, timeout: float):
        while True:
            if self.data:
                out = b"".join(self.data)
                self.data = []
                return out
            if self.failed is not None:
                raise self.failed
            if self.ended:
                self.complete = True
                return None
            yield from self.pump(timeout)

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        try:
            if not self.ended and self.sid is not None:
                self.conn.reset_stream(self.sid)  # tell the upstream we are gone
            self.conn.close_connection()
            sock.send(self.conn.data_to_send())
        except (OSError, ssl.SSLError, self.h2_errors):
            pass
        sock.close()
