"""A raw HTTP/2 client that sends exactly the frames a test tells it to.

h2's connection state machine refuses to break the protocol (a stream past the
peer's limit, a call that never ends); a test of how a server takes that needs
the frames themselves. So frames are built with h2's own layers, ``hyperframe``
(frames) and ``hpack`` (header compression), and written to a socket as they are.
What comes back is read frame by frame; the server's SETTINGS and PINGs are
acknowledged as any client would.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from tests._observe import WITHIN

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: HTTP/2 error codes (RFC 9113, section 7).
NO_ERROR, REFUSED_STREAM, ENHANCE_YOUR_CALM = 0x0, 0x7, 0xB


def grpc_message(payload: bytes) -> bytes:
    """``payload`` as one gRPC length-prefixed message (uncompressed)."""
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


@dataclass
class Stream:
    """What came back on one stream: headers blocks (decoded), data, its reset code."""

    headers: list[dict[str, str]] = field(default_factory=list)
    data: bytes = b""
    reset: int | None = None
    ended: bool = False

    @property
    def grpc_status(self) -> int | None:
        """The ``grpc-status`` the server sent (in trailers, or a trailers-only answer)."""
        for block in self.headers:
            if "grpc-status" in block:
                return int(block["grpc-status"])
        return None

    @property
    def grpc_message(self) -> str | None:
        for block in self.headers:
            if "grpc-message" in block:
                return block["grpc-message"]
        return None


class RawConnection:
    """One HTTP/2 connection over plain TCP (h2c with prior knowledge, as gRPC speaks it)."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=WITHIN)
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.buffer = b""
        self.streams: dict[int, Stream] = {}
        self.server_settings: dict[int, int] = {}
        self.goaway: GoAwayFrame | None = None
        self.closed = False
        self._pending: tuple[HeadersFrame, bytes] | None = None
        # Large windows: nothing the server sends waits on ours.
        settings = SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 1 << 24})
        window = WindowUpdateFrame(0, window_increment=1 << 30)
        self.sock.sendall(PREFACE + settings.serialize() + window.serialize())

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Sending

    def send(self, *frames: Frame) -> None:
        self.sock.sendall(b"".join(f.serialize() for f in frames))

    def headers(
        self,
        stream_id: int,
        path: str,
        *,
        content_type: str = "application/grpc",
        end_stream: bool = False,
        te: str | None = "trailers",
        extra: Sequence[tuple[str, str]] = (),
    ) -> HeadersFrame:
        """A request's HEADERS frame (not sent): a gRPC call of ``path``."""
        fields = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "localhost"),
            ("content-type", content_type),
            *([("te", te)] if te is not None else []),
            *extra,
        ]
        flags = ["END_HEADERS", *(["END_STREAM"] if end_stream else [])]
        return HeadersFrame(stream_id, self.encoder.encode(fields), flags=flags)

    @staticmethod
    def data(stream_id: int, payload: bytes, *, end_stream: bool = False) -> DataFrame:
        """A DATA frame (not sent)."""
        return DataFrame(stream_id, payload, flags=["END_STREAM"] if end_stream else [])

    # Receiving

    def _read(self, n: int, deadline: float) -> bytes | None:
        while len(self.buffer) < n:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            except OSError:  # reset by the server
                chunk = b""
            if not chunk:
                self.closed = True
                return None
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def read_frame(self, deadline: float) -> Frame | None:
        """The next frame, handled (streams updated, SETTINGS and PING acknowledged);
        None when the connection closed or nothing came before ``deadline``."""
        header = self._read(9, deadline)
        if header is None:
            return None
        frame, length = Frame.parse_frame_header(memoryview(header))
        body = self._read(length, deadline) if length else b""
        if body is None:
            return None
        frame.parse_body(memoryview(body))
        self._handle(frame)
        return frame

    def _handle(self, frame: Frame) -> None:
        if isinstance(frame, SettingsFrame):
            if "ACK" not in frame.flags:
                self.server_settings.update(frame.settings)
                self.send(SettingsFrame(0, flags=["ACK"]))
        elif isinstance(frame, PingFrame):
            if "ACK" not in frame.flags:
                self.send(PingFrame(0, opaque_data=frame.opaque_data, flags=["ACK"]))
        elif isinstance(frame, GoAwayFrame):
            self.goaway = frame
        elif isinstance(frame, HeadersFrame | ContinuationFrame):
            if isinstance(frame, HeadersFrame):
                self._pending = (frame, frame.data)
            elif self._pending is not None:
                self._pending = (self._pending[0], self._pending[1] + frame.data)
            if "END_HEADERS" in frame.flags and self._pending is not None:
                first, block = self._pending
                self._pending = None
                stream = self.streams.setdefault(first.stream_id, Stream())
                decoded = self.decoder.decode(block)
                stream.headers.append({str(k): str(v) for k, v in decoded})
                stream.ended |= "END_STREAM" in first.flags
        elif isinstance(frame, DataFrame):
            stream = self.streams.setdefault(frame.stream_id, Stream())
            stream.data += frame.data
            stream.ended |= "END_STREAM" in frame.flags
        elif isinstance(frame, RstStreamFrame):
            self.streams.setdefault(frame.stream_id, Stream()).reset = frame.error_code

    def until(self, condition: Callable[[], object], what: str, within: float = WITHIN) -> None:
        """Read frames until ``condition()`` holds; fail the test, naming ``what``, if the
        connection closes or ``within`` seconds pass first (a bound on a broken run only)."""
        deadline = time.monotonic() + within
        while not condition():
            assert not self.closed, f"the connection closed before: {what}"
            assert time.monotonic() < deadline, f"never happened: {what}"
            self.read_frame(deadline)

    def answered(self, stream_id: int, within: float = WITHIN) -> Stream:
        """Stream ``stream_id`` once it has a gRPC status or was reset."""
        self.until(
            lambda: (
                (s := self.streams.get(stream_id)) is not None
                and (s.grpc_status is not None or s.reset is not None)
            ),
            f"a status or a reset on stream {stream_id}",
            within,
        )
        return self.streams[stream_id]

    def settled(self) -> None:
        """Wait for the server's SETTINGS (acknowledged by then)."""
        self.until(lambda: self.server_settings, "the server's SETTINGS")

    def wait_closed(self, within: float = WITHIN) -> None:
        """Read until the server closes the connection."""
        deadline = time.monotonic() + within
        while not self.closed:
            assert time.monotonic() < deadline, "the server never closed the connection"
            self.read_frame(deadline)
