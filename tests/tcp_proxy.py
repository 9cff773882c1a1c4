"""A TCP proxy between an app and its database, to make "database unreachable".

The shared database servers are never stopped by a test. Instead
the app talks to the database through this proxy, and the test cuts it:

    with TcpProxy("127.0.0.1", 5432) as proxy:
        url = ...  # the database URL with host 127.0.0.1 and port proxy.port
        ...        # requests work
        proxy.cut()
        ...        # open connections are dead, new ones are refused

One thread multiplexes every connection with ``selectors``; commands reach it
through a socket pair, so only that thread ever touches the sockets.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from types import TracebackType

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``upstream``, until :meth:`cut`."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener: socket.socket | None = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._peers: dict[socket.socket, socket.socket] = {}
        self._cut = threading.Event()
        self.connections = 0
        self._thread = threading.Thread(target=self._loop, name="tcp-proxy", daemon=True)

    # --- control, from the test's thread -------------------------------------

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def cut(self) -> None:
        """Stop listening and kill every open connection; return once done."""
        self._wake_w.send(b"x")
        if not self._cut.wait(10):
            raise RuntimeError("the proxy did not cut its connections")

    def close(self) -> None:
        """Cut, stop the thread and release every socket."""
        if self._thread.is_alive():
            self._wake_w.send(b"q")
            self._thread.join(10)
        self._drop_all()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # --- the proxy thread ------------------------------------------------------

    def _loop(self) -> None:
        assert self._listener is not None
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        while True:
            for key, _ in self._selector.select():
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._wake_r:
                    command = sock.recv(1)
                    self._drop_all()
                    self._cut.set()
                    if command != b"x":
                        return
                elif sock is self._listener:
                    self._accept()
                elif sock in self._peers:
                    self._forward(sock)

    def _accept(self) -> None:
        assert self._listener is not None
        client, _ = self._listener.accept()
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        self.connections += 1
        self._peers[client] = upstream
        self._peers[upstream] = client
        self._selector.register(client, selectors.EVENT_READ)
        self._selector.register(upstream, selectors.EVENT_READ)

    def _forward(self, sock: socket.socket) -> None:
        peer = self._peers[sock]
        try:
            data = sock.recv(65536)
            if data:
                peer.sendall(data)
                return
        except OSError:
            pass
        self._close_pair(sock)

    def _close_pair(self, sock: socket.socket) -> None:
        peer = self._peers.pop(sock, None)
        for s in (sock, peer):
            if s is None:
                continue
            self._peers.pop(s, None)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(s)
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _drop_all(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
        for sock in list(self._peers):
            self._close_pair(sock)
