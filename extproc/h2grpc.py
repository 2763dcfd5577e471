"""A small HTTP/2 gRPC server on asyncio, for the calls Envoy makes to us.

Why it exists: with ``grpc.aio`` about 70% of the ext_proc's CPU went to grpcio's own per-message
machinery (the poller thread waking the event loop, one ``sendmsg`` per response, completion
queues), about 300 µs per ext_proc message on a 2-core VM; see docs/performance.md. Envoy's
ext_proc client needs very little of gRPC: bidirectional streams of length-prefixed protobuf
messages on one HTTP/2 connection, without compression, and a status in the trailers. Done
directly on an ``asyncio.Protocol``, one message costs a frame parse, a protobuf decode and one
write.

What this module owns, and nothing more:

* the HTTP/2 connection (RFC 9113) as a server for gRPC clients: the preface and SETTINGS
  exchange, HPACK decoding of request headers (the ``hpack`` package keeps the dynamic table),
  CONTINUATION, PING, RST_STREAM, GOAWAY, and flow control both ways (large receive windows
  replenished as data is consumed; sends held back while the peer's window is closed);
* the gRPC framing on top: 5-byte message prefixes, response headers and status trailers,
  trailers-only answers (unknown method, a message too large), ``grpc-message`` percent-encoding.

What a call *means* is not here: :class:`GrpcServer` maps each ``:path`` to a factory that gets
the :class:`Call` (the send half) and returns a :class:`CallHandler` (the receive half). Response
headers carry no dynamic HPACK state: they are literals that are never indexed, so every header
block we send is independent of every other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import struct
import urllib.parse
from collections import deque
from collections.abc import Callable, Mapping
from typing import Protocol, cast

import hpack

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE = range(9)
CONTINUATION = 9
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# SETTINGS identifiers.
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5

# Error codes.
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
FLOW_CONTROL_ERROR = 0x3
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
COMPRESSION_ERROR = 0x9

# gRPC status codes we answer with.
OK = 0
NOT_FOUND = 5
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13

DEFAULT_WINDOW = 65_535
MAX_WINDOW = 2**31 - 1
STREAM_WINDOW = 16 * 1024 * 1024
"""Receive window we advertise per stream (replenished at half)."""
CONNECTION_WINDOW = 256 * 1024 * 1024
"""Receive window we open for the whole connection (replenished at half)."""
MAX_FRAME = 1024 * 1024
"""Largest frame we accept; Envoy then sends a buffered body in few frames."""
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024
_HEADER_CACHE_SIZE = 64

_FRAME_HEADER = struct.Struct(">BHBBI")
_MESSAGE_PREFIX = struct.Struct(">BI")
_WINDOW_UPDATE = struct.Struct(">I")
_SETTING = struct.Struct(">HI")
_GOAWAY = struct.Struct(">II")


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame."""
    size = len(payload)
    return _FRAME_HEADER.pack(size >> 16, size & 0xFFFF, kind, flags, stream_id) + payload


def _literal_block(headers: list[tuple[str, str]]) -> bytes:
    """An HPACK block of never-indexed literals (static-table names where they exist)."""
    encoder = hpack.Encoder()
    return encoder.encode([hpack.NeverIndexedHeaderTuple(k, v) for k, v in headers], huffman=False)


RESPONSE_HEADERS = _literal_block([(":status", "200"), ("content-type", "application/grpc")])
OK_TRAILERS = _literal_block([("grpc-status", "0")])


_GRPC_MESSAGE_SAFE = " !#$&'()*+,/:;=?@[]~"
"""Printable ASCII except ``%`` stays as is in ``grpc-message`` (the gRPC spec)."""


def status_block(code: int, message: str, *, headers_sent: bool) -> bytes:
    """Trailers for ``code`` (a trailers-only answer also carries the response headers)."""
    fields = [("grpc-status", str(code))]
    if message:
        text = urllib.parse.quote(message[:1024], safe=_GRPC_MESSAGE_SAFE)
        fields.append(("grpc-message", text))
    if not headers_sent:
        fields = [(":status", "200"), ("content-type", "application/grpc"), *fields]
    return _literal_block(fields)


class Call:
    """The send half of one gRPC call, handed to the handler factory."""

    __slots__ = (
        "_conn",
        "_stream",
        "metadata",
        "path",
    )

    def __init__(
        self, conn: _Connection, stream: _Stream, path: str, metadata: dict[str, str]
    ) -> None:
        """A call on ``stream`` of ``conn``."""
        self._conn = conn
        self._stream = stream
        self.path = path
        self.metadata = metadata
        """Request headers (gRPC metadata included), lower-case names; pseudo-headers too."""

    def send_message(self, data: bytes) -> None:
        """Send one gRPC message (its serialized protobuf)."""
        stream = self._stream
        if stream.local_closed:
            return
        self._conn.send_message(stream, data)

    def finish(self, code: int = OK, message: str = "") -> None:
        """End the call with a gRPC status (trailers); later sends are dropped."""
        stream = self._stream
        if stream.local_closed:
            return
        self._conn.finish(stream, code, message)


class CallHandler(Protocol):
    """The receive half of one call: what the server does with the client's messages."""

    def on_message(self, data: bytes) -> None:
        """One complete request message arrived."""

    def on_end(self) -> None:
        """The client half-closed: no more messages."""

    def on_cancel(self) -> None:
        """The call is gone (client reset, connection lost, server stopped)."""


CallFactory = Callable[[Call], CallHandler]


class _Stream:
    """Per-stream state: receive buffer, send window, pending output."""

    __slots__ = (
        "buffer",
        "call",
        "handler",
        "headers_sent",
        "id",
        "local_closed",
        "pending",
        "received",
        "remote_closed",
        "send_window",
        "trailer",
    )

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.send_window = send_window
        self.buffer = bytearray()
        self.received = 0
        """Bytes received since our last WINDOW_UPDATE for this stream."""
        self.handler: CallHandler | None = None
        self.call: Call | None = None
        self.headers_sent = False
        self.local_closed = False
        self.remote_closed = False
        self.pending: deque[memoryview] = deque()
        """Message bytes waiting for send window."""
        self.trailer: bytes | None = None
        """The trailers frame to send once ``pending`` is empty."""


class _ProtocolError(Exception):
    """A connection-level protocol error: answer GOAWAY with ``code`` and close."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class _Connection(asyncio.Protocol):
    """One client connection (Envoy keeps one per ext_proc cluster and worker)."""

    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.preface = False
        self.decoder = hpack.Decoder()
        self.header_cache: dict[bytes, dict[str, str]] = {}
        """Decoded header blocks that left the HPACK table unchanged (see ``_decode``)."""
        self.streams: dict[int, _Stream] = {}
        self.last_stream = 0
        self.send_window = DEFAULT_WINDOW
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = 16_384
        self.received = 0
        """Connection bytes received since our last connection WINDOW_UPDATE."""
        self.blocked: dict[int, _Stream] = {}
        """Streams with output waiting for the connection window, in arrival order."""
        self.continuation: tuple[int, int, bytearray] | None = None
        self.goaway = False
        self.out: list[bytes] | None = None
        """Frames collected while handling one read; written in one call at its end."""

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = writer = cast("asyncio.Transport", transport)  # uvloop's: no subclass
        self.server.connections.add(self)
        settings = b"".join(
            _SETTING.pack(key, value)
            for key, value in (
                (SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                (SETTINGS_MAX_FRAME_SIZE, MAX_FRAME),
            )
        )
        writer.write(
            frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, _WINDOW_UPDATE.pack(CONNECTION_WINDOW - DEFAULT_WINDOW))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        streams = list(self.streams.values())
        self.streams.clear()
        self.blocked.clear()
        for stream in streams:
            self._cancel(stream)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        self.out = []
        try:
            if not self.preface:
                if len(buffer) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buffer)):
                        raise _ProtocolError(PROTOCOL_ERROR, "not an HTTP/2 client")
                    return
                if buffer[: len(PREFACE)] != PREFACE:
                    raise _ProtocolError(PROTOCOL_ERROR, "not an HTTP/2 client")
                del buffer[: len(PREFACE)]
                self.preface = True
            position = 0
            available = len(buffer)
            unpack = _FRAME_HEADER.unpack_from
            while available - position >= 9:
                high, low, kind, flags, stream_id = unpack(buffer, position)
                size = (high << 16) | low
                if size > MAX_FRAME:
                    raise _ProtocolError(FRAME_SIZE_ERROR, f"frame of {size} bytes")
                end = position + 9 + size
                if end > available:
                    break
                payload = bytes(buffer[position + 9 : end])
                position = end
                self._frame(kind, flags, stream_id & 0x7FFFFFFF, payload)
                if self.transport is None:
                    return
            del buffer[:position]
        except _ProtocolError as error:
            self._abort(error.code, str(error))
        finally:
            self._flush()

    # --- output -----------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.out is not None:
            self.out.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def _flush(self) -> None:
        out, self.out = self.out, None
        if out and self.transport is not None:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])
        self._maybe_close()

    def _abort(self, code: int, reason: str) -> None:
        log.warning("closing a gRPC connection: %s", reason)
        self._write(frame(GOAWAY, 0, 0, _GOAWAY.pack(self.last_stream, code) + reason.encode()))
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def send_message(self, stream: _Stream, data: bytes) -> None:
        """Queue one length-prefixed message on ``stream``, within the flow-control windows."""
        message = _MESSAGE_PREFIX.pack(0, len(data)) + data
        size = len(message)
        head = b""
        if not stream.headers_sent:
            stream.headers_sent = True
            head = frame(HEADERS, END_HEADERS, stream.id, RESPONSE_HEADERS)
        if (
            not stream.pending
            and size <= self.send_window
            and size <= stream.send_window
            and size <= self.peer_max_frame
        ):
            # The common case: one DATA frame, written with the headers if they are due.
            self.send_window -= size
            stream.send_window -= size
            self._write(head + frame(DATA, 0, stream.id, message))
            return
        if head:
            self._write(head)
        stream.pending.append(memoryview(message))
        self._pump(stream)

    def finish(self, stream: _Stream, code: int, message: str) -> None:
        """Close our side of ``stream`` with a gRPC status, after any pending messages."""
        stream.local_closed = True
        if code == OK and stream.headers_sent:
            block = OK_TRAILERS
        else:
            block = status_block(code, message, headers_sent=stream.headers_sent)
            stream.headers_sent = True
        trailer = frame(HEADERS, END_HEADERS | END_STREAM, stream.id, block)
        if stream.pending:
            stream.trailer = trailer
            return
        self._end(stream, trailer)

    def _end(self, stream: _Stream, trailer: bytes) -> None:
        if not stream.remote_closed:
            # The client may still be sending: tell it we are done listening (gRPC does so too).
            trailer += frame(RST_STREAM, 0, stream.id, _WINDOW_UPDATE.pack(NO_ERROR))
        self._write(trailer)
        self.streams.pop(stream.id, None)
        self.blocked.pop(stream.id, None)
        if self.out is None:
            self._maybe_close()

    def _pump(self, stream: _Stream) -> None:
        """Send as much of ``stream``'s pending output as the windows allow."""
        pending = stream.pending
        while pending:
            chunk = pending[0]
            room = min(self.send_window, stream.send_window, self.peer_max_frame)
            if room <= 0:
                if self.send_window <= 0:
                    self.blocked[stream.id] = stream
                return
            piece = chunk[:room]
            self.send_window -= len(piece)
            stream.send_window -= len(piece)
            self._write(frame(DATA, 0, stream.id, bytes(piece)))
            if len(piece) == len(chunk):
                pending.popleft()
            else:
                pending[0] = chunk[len(piece) :]
        self.blocked.pop(stream.id, None)
        if stream.trailer is not None:
            trailer, stream.trailer = stream.trailer, None
            self._end(stream, trailer)

    # --- input ------------------------------------------------------------------------------

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continuation is not None and kind != CONTINUATION:
            raise _ProtocolError(PROTOCOL_ERROR, "expected CONTINUATION")
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            self._headers(flags, stream_id, payload)
        elif kind == CONTINUATION:
            self._continuation(flags, stream_id, payload)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == SETTINGS:
            self._settings(flags, payload)
        elif kind == PING:
            if not flags & ACK:
                self._write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                self.blocked.pop(stream_id, None)
                self._cancel(stream)
                self._maybe_close()
        elif kind == GOAWAY:
            self.goaway = True
            self._maybe_close()
        elif kind == PUSH_PROMISE:
            raise _ProtocolError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # PRIORITY and unknown frame types are ignored, as the RFC asks.

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise _ProtocolError(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)
        self.received += size
        if self.received >= CONNECTION_WINDOW // 2:
            self._write(frame(WINDOW_UPDATE, 0, 0, _WINDOW_UPDATE.pack(self.received)))
            self.received = 0
        if flags & PADDED:
            if not payload or payload[0] >= size:
                raise _ProtocolError(PROTOCOL_ERROR, "bad DATA padding")
            payload = payload[1 : size - payload[0]]
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            return  # a stream we already finished or reset: its data is simply dropped
        stream.received += size
        if stream.received >= STREAM_WINDOW // 2 and not flags & END_STREAM:
            self._write(frame(WINDOW_UPDATE, 0, stream_id, _WINDOW_UPDATE.pack(stream.received)))
            stream.received = 0
        ended = bool(flags & END_STREAM)
        if ended:
            stream.remote_closed = True
        messages = self._messages(stream, payload)
        handler = stream.handler
        if handler is not None:
            for message in messages:
                if stream.local_closed:
                    break
                handler.on_message(message)
            if ended and not stream.local_closed:
                handler.on_end()

    def _messages(self, stream: _Stream, payload: bytes) -> list[bytes]:
        buffer = stream.buffer
        if not buffer and len(payload) >= 5:
            flag, size = _MESSAGE_PREFIX.unpack_from(payload)
            if len(payload) == size + 5 and not flag:
                if size > self.server.max_message:
                    self._too_large(stream, size)
                    return []
                return [payload[5:]]  # the common case: exactly one whole message
        buffer += payload
        messages = []
        while len(buffer) >= 5:
            flag, size = _MESSAGE_PREFIX.unpack_from(buffer)
            if flag:
                stream.buffer = bytearray()
                self._fail(stream, UNIMPLEMENTED, "compressed messages are not supported")
                return []
            if size > self.server.max_message:
                stream.buffer = bytearray()
                self._too_large(stream, size)
                return []
            if len(buffer) < size + 5:
                break
            messages.append(bytes(buffer[5 : size + 5]))
            del buffer[: size + 5]
        return messages

    def _too_large(self, stream: _Stream, size: int) -> None:
        limit = self.server.max_message
        self._fail(stream, RESOURCE_EXHAUSTED, f"message of {size} bytes exceeds {limit}")

    def _fail(self, stream: _Stream, code: int, message: str) -> None:
        if stream.call is not None and not stream.local_closed:
            stream.call.finish(code, message)
        if stream.handler is not None:
            self._cancel(stream)

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise _ProtocolError(PROTOCOL_ERROR, "HEADERS on stream 0")
        start, end = 0, len(payload)
        if flags & PADDED:
            start = 1
            end -= payload[0]
        if flags & PRIORITY_FLAG:
            start += 5
        if start > end:
            raise _ProtocolError(PROTOCOL_ERROR, "bad HEADERS padding")
        block = bytearray(payload[start:end])
        if not flags & END_HEADERS:
            self.continuation = (stream_id, flags, block)
            return
        self._header_block(flags, stream_id, bytes(block))

    def _continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continuation is None or self.continuation[0] != stream_id:
            raise _ProtocolError(PROTOCOL_ERROR, "unexpected CONTINUATION")
        first_flags, block = self.continuation[1], self.continuation[2]
        block += payload
        if flags & END_HEADERS:
            self.continuation = None
            self._header_block(first_flags, stream_id, bytes(block))

    def _decode(self, block: bytes) -> dict[str, str]:
        """Decode a header block, reusing the result for a repeat that cannot change the table.

        Envoy opens every ext_proc stream with the same block (its ``:path`` is a Huffman-coded
        literal that is never indexed): once its other fields sit in the dynamic table, each new
        stream's block is byte for byte the last one and leaves the table as it was. Such a block
        means the same thing for as long as the table does not change, so its decoding is kept
        until a block that inserts an entry (or resizes the table) clears the cache. The returned
        mapping is shared: callers only read it.
        """
        cached = self.header_cache.get(block)
        if cached is not None:
            return cached
        table = self.decoder.header_table
        entries = table.dynamic_entries
        # Holding the newest entry keeps it alive, so a new entry can never reuse its identity.
        before = (len(entries), entries[0] if entries else None, table.maxsize)
        try:
            fields = self.decoder.decode(block)
        except hpack.HPACKError as error:
            raise _ProtocolError(COMPRESSION_ERROR, f"bad header block: {error}") from error
        metadata = {str(name): str(value) for name, value in fields}
        first = entries[0] if entries else None
        if before[0] == len(entries) and before[1] is first and before[2] == table.maxsize:
            if len(self.header_cache) >= _HEADER_CACHE_SIZE:
                self.header_cache.clear()
            self.header_cache[block] = metadata
        else:
            self.header_cache.clear()
        return metadata

    def _header_block(self, flags: int, stream_id: int, block: bytes) -> None:
        metadata = self._decode(block)
        ended = bool(flags & END_STREAM)
        stream = self.streams.get(stream_id)
        if stream is not None:
            # Trailers from the client: gRPC clients send none, but they end the stream.
            if ended and not stream.remote_closed:
                stream.remote_closed = True
                if stream.handler is not None and not stream.local_closed:
                    stream.handler.on_end()
            return
        if stream_id <= self.last_stream or not stream_id & 1:
            if stream_id > self.last_stream:
                raise _ProtocolError(PROTOCOL_ERROR, f"even stream id {stream_id}")
            return  # a stream we closed already: ignore its late headers
        self.last_stream = stream_id
        stream = _Stream(stream_id, self.peer_initial_window)
        stream.remote_closed = ended
        if self.goaway or self.server.closing:
            self._write(frame(RST_STREAM, 0, stream_id, _WINDOW_UPDATE.pack(REFUSED_STREAM)))
            return
        self.streams[stream_id] = stream
        path = metadata.get(":path", "")
        call = Call(self, stream, path, metadata)
        stream.call = call
        factory = self.server.methods.get(path)
        if factory is None:
            call.finish(UNIMPLEMENTED, f"unknown method {path}")
            return
        try:
            stream.handler = factory(call)
        except Exception:
            log.exception("gRPC call %s could not start", path)
            call.finish(INTERNAL, "internal error")
            return
        if ended and not stream.local_closed:
            stream.handler.on_end()

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ProtocolError(FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
        increment = _WINDOW_UPDATE.unpack(payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise _ProtocolError(FLOW_CONTROL_ERROR, "connection window overflow")
            for waiting in list(self.blocked.values()):
                self._pump(waiting)
                if self.send_window <= 0:
                    break
            return
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.send_window += increment
            if stream.pending:
                self._pump(stream)

    def _settings(self, flags: int, payload: bytes) -> None:
        if flags & ACK:
            return
        if len(payload) % 6:
            raise _ProtocolError(FRAME_SIZE_ERROR, "SETTINGS of the wrong size")
        for offset in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ProtocolError(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == SETTINGS_MAX_FRAME_SIZE:
                self.peer_max_frame = value
            elif key == SETTINGS_HEADER_TABLE_SIZE:
                pass  # we never index what we send, so the peer's decoder table size is moot
        self._write(frame(SETTINGS, ACK, 0))
        for stream in list(self.streams.values()):
            if stream.pending:
                self._pump(stream)

    # --- lifecycle --------------------------------------------------------------------------

    def _cancel(self, stream: _Stream) -> None:
        stream.local_closed = True
        stream.remote_closed = True
        stream.pending.clear()
        handler, stream.handler = stream.handler, None
        if handler is not None:
            try:
                handler.on_cancel()
            except Exception:
                log.exception("cancelling a gRPC call failed")

    def _maybe_close(self) -> None:
        if (self.goaway or self.server.closing) and not self.streams and self.transport:
            self.transport.close()

    def go_away(self) -> None:
        """Tell the client no new streams are taken; close once the open ones end."""
        self._write(frame(GOAWAY, 0, 0, _GOAWAY.pack(self.last_stream, NO_ERROR)))
        self._maybe_close()

    def close_now(self) -> None:
        """Cancel every call and close the connection."""
        if self.transport is not None:
            self.transport.close()


class GrpcServer:
    """Listens on TCP or a Unix socket and serves the registered gRPC methods."""

    def __init__(
        self, methods: Mapping[str, CallFactory], *, max_message: int = DEFAULT_MAX_MESSAGE
    ) -> None:
        """Serve ``methods`` (``/package.Service/Method`` → handler factory)."""
        self.methods = dict(methods)
        self.max_message = max_message
        self.connections: set[_Connection] = set()
        self.closing = False
        self._servers: list[asyncio.AbstractServer] = []

    async def start(self, address: str) -> int:
        """Listen on ``host:port``, ``unix:/path`` or ``/path``; return the TCP port (0: Unix)."""
        loop = asyncio.get_running_loop()
        path = address.removeprefix("unix:") if address.startswith(("unix:", "/")) else None
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.unlink(path)
            server = await loop.create_unix_server(lambda: _Connection(self), path)
            self._servers.append(server)
            return 0
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        server = await loop.create_server(lambda: _Connection(self), host, int(port))
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening, cancel every open call and close every connection."""
        self.closing = True
        for server in self._servers:
            server.close()
        for connection in list(self.connections):
            connection.go_away()
            connection.close_now()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
