"""Control channel between a decode receiver and a prefill sender: framed JSON over TCP, never pickle.

A frame is ``b"KVT1"``, a big-endian uint32 header length, that many bytes of UTF-8 JSON (an object),
then ``header["nbytes"]`` raw bytes when the header has that key (payload, e.g. packed KV blocks).
Requests carry ``"op"``; replies carry ``"ok": true`` or ``"ok": false`` with an error ``code`` and
``message`` (mapped back to the kv_transfer exception of that code on the client side).
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from kv_transfer.errors import KVProtocolError, KVTransferError, error_from_code

MAGIC = b"KVT1"
_PREFIX = struct.Struct("!4sI")
MAX_HEADER_BYTES = 1 << 20

Header = dict[str, Any]
# A handler gets the request header and the connection; it returns the reply header or writes the
# reply itself (streaming payloads) and returns None.
Handler = Callable[[Header, socket.socket], Header | None]


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fills view from the socket or raises ConnectionError on a short read."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(f"peer closed the connection after {got} of {len(view)} bytes")
        got += n


def send_header(sock: socket.socket, header: Header) -> None:
    body = json.dumps(header, separators=(",", ":")).encode()
    sock.sendall(_PREFIX.pack(MAGIC, len(body)) + body)


def recv_header(sock: socket.socket) -> Header:
    prefix = bytearray(_PREFIX.size)
    recv_exact(sock, memoryview(prefix))
    magic, length = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise KVProtocolError(f"bad control frame magic {bytes(magic)!r}")
    if length > MAX_HEADER_BYTES:
        raise KVProtocolError(f"control header of {length} bytes exceeds {MAX_HEADER_BYTES}")
    body = bytearray(length)
    recv_exact(sock, memoryview(body))
    try:
        header = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KVProtocolError(f"control header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise KVProtocolError("control header must be a JSON object")
    return header


def error_header(exc: KVTransferError) -> Header:
    return {"ok": False, "code": exc.code, "message": str(exc)}


def raise_if_error(reply: Header) -> Header:
    if reply.get("ok") is True:
        return reply
    code, message = reply.get("code"), reply.get("message")
    if not isinstance(code, str) or not isinstance(message, str):
        raise KVProtocolError(f"malformed control reply {reply!r}")
    raise error_from_code(code, message)


class ControlServer:
    """Threaded control server: one thread per connection, requests handled in order per connection."""

    def __init__(self, host: str, port: int, handlers: dict[str, Handler], io_timeout_s: float) -> None:
        self._handlers = handlers
        self._io_timeout = io_timeout_s
        self._listener = socket.create_server((host, port), backlog=128)
        self.host, self.port = self._listener.getsockname()[:2]
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept_loop, name="kv-control-accept", daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._conns)
            threads = list(self._threads)
        # shutdown() wakes the accept() and recv() calls blocked in the server threads.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(timeout=5)
        for t in threads:
            t.join(timeout=5)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(None)
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                t = threading.Thread(target=self._serve, args=(conn,), name="kv-control-conn", daemon=True)
                self._conns.add(conn)
                self._threads.add(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                try:
                    request = recv_header(conn)
                except (ConnectionError, OSError, KVProtocolError):
                    return  # peer gone or speaking something else: drop the connection
                # A request in progress must not hang forever on a dead peer.
                conn.settimeout(self._io_timeout)
                op = request.get("op")
                handler = self._handlers.get(op) if isinstance(op, str) else None
                try:
                    if handler is None:
                        raise KVProtocolError(f"unknown control op {op!r}")
                    reply = handler(request, conn)
                except KVTransferError as exc:
                    reply = error_header(exc)
                except (ConnectionError, OSError):
                    return
                except Exception as exc:  # a bug or a backend failure: report it, keep serving
                    reply = error_header(KVTransferError(f"{op} failed on the prefill side: {exc!r}"))
                if reply is not None:
                    send_header(conn, reply)
                conn.settimeout(None)
        except OSError:
            return
        finally:
            conn.close()
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())


class ControlClient:
    """Connections to prefill control servers, kept open and reused (one in use per request)."""

    def __init__(self, io_timeout_s: float) -> None:
        self._timeout = io_timeout_s
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, int], list[socket.socket]] = {}

    def connect(self, host: str, port: int) -> socket.socket:
        with self._lock:
            idle = self._idle.get((host, port))
            if idle:
                return idle.pop()
        sock = socket.create_connection((host, port), timeout=self._timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def release(self, host: str, port: int, sock: socket.socket) -> None:
        """Returns a connection after a complete exchange (a broken one must be closed instead)."""
        with self._lock:
            self._idle.setdefault((host, port), []).append(sock)

    def request(self, host: str, port: int, header: Header) -> Header:
        """One request/reply exchange without payload; raises the peer's error as its exception."""
        sock = self.connect(host, port)
        try:
            send_header(sock, header)
            reply = recv_header(sock)
        except BaseException:
            sock.close()
            raise
        self.release(host, port, sock)
        return raise_if_error(reply)

    def close(self) -> None:
        with self._lock:
            socks = [s for lst in self._idle.values() for s in lst]
            self._idle.clear()
        for s in socks:
            s.close()
