"""A TCP proxy on 127.0.0.1 that counts the bytes crossing it: "bytes over the network",
measured outside the product; also the connections clients opened (how many, how many at
once) and the start of what each sent (to see the requests, e.g. a Range header)."""

from __future__ import annotations

import socket
import threading

SENT_KEPT = 64 << 10


class CountingProxy:
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.down = 0  # server -> client
        self.up = 0  # client -> server
        self.connections = 0  # accepted so far
        self.open = 0
        self.max_open = 0  # the most open at one time
        self.sent: list[bytearray] = []  # per connection: the first SENT_KEPT bytes it sent
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self.lock:
            self.down = self.up = 0

    def _accept(self) -> None:
        while self.running:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections += 1
                self.open += 1
                self.max_open = max(self.max_open, self.open)
                kept = bytearray()
                self.sent.append(kept)
            threading.Thread(target=self._pipe, args=(client, server, kept), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, None), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, kept: bytearray | None) -> None:
        """Copy one direction; ``kept`` (client -> server only) collects what was sent."""
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                with self.lock:
                    if kept is not None:
                        self.up += len(data)
                        kept += data[: max(0, SENT_KEPT - len(kept))]
                    else:
                        self.down += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            if kept is not None:
                with self.lock:
                    self.open -= 1
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.running = False
        self.listener.close()
