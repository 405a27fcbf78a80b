"""Local sockets on Linux's abstract Unix namespace: listening for peers of this user only, and
connecting. The token channel (orchestrator/inbox.py, common/channel.py) and the request channels
(common/door.py, orchestrator/doors.py) use them. Abstract names leave nothing on the file system,
and SO_PEERCRED tells who connected."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def connect(name: str) -> socket.socket:
    """A connection to the listener on the abstract name `name`; OSError when there is none."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect("\0" + name)
    except OSError:
        sock.close()
        raise
    return sock


class LocalListener:
    """Accepts connections on the abstract name `name` on a thread of its own and hands each one
    from a process of this user to `serve`, on a new thread; others are closed. The constructor
    raises OSError when the name is taken."""

    def __init__(self, name: str, serve: Callable[[socket.socket], None], what: str) -> None:
        self.name = name
        self._serve = serve
        self._what = what
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind("\0" + name)
        except OSError:
            self._sock.close()
            raise
        self._sock.listen(64)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, name=f"{what}-accept", daemon=True).start()

    def close(self) -> None:
        """Stops accepting and closes every connection accepted."""
        with self._lock:  # a connection accepted from now on is closed by _accept
            self._closed = True
            conns = list(self._conns)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept(); only then is the name free
        self._sock.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)  # wakes its reader, which closes it

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", creds)
            if uid != os.getuid():
                log.warning("%s: refused a peer of uid %d", self._what, uid)
                conn.close()
                continue
            with self._lock:
                closed = self._closed
                if not closed:
                    self._conns.add(conn)
            if closed:  # close() ran while this connection was being accepted
                conn.close()
                return
            threading.Thread(target=self._run, args=(conn,), name=f"{self._what}-read", daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self._serve(conn)
        finally:
            conn.close()
            with self._lock:
                self._conns.discard(conn)
