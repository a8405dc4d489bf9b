"""A TCP proxy on 127.0.0.1 that cuts its link on cue: the network fault of a test, with real sockets."""

from __future__ import annotations

import socket
import struct
import threading


class FaultProxy:
    """Forwards 127.0.0.1:`port` to `target`. `fault(after_bytes, down_s)`: once `after_bytes` more bytes have gone
    back to clients, every open connection is reset (RST) and new ones are reset on accept for `down_s` seconds
    (None: until `restore()`), as an endpoint that goes away mid-response and comes back."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.conns: set[socket.socket] = set()
        self.down = False
        self.budget: int | None = None  # bytes still to forward to clients before the fault
        self.down_s: float | None = None
        self.faults = self.refused = 0
        self.closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fault(self, after_bytes: int, down_s: float | None) -> None:
        with self.lock:
            self.budget, self.down_s = after_bytes, down_s

    def restore(self) -> None:
        with self.lock:
            self.down = False

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        self._reset_all()

    # -- internals ------------------------------------------------------------------------------------------------
    @staticmethod
    def _reset(sock: socket.socket) -> None:
        try:  # linger 0: close sends RST, as a dropped connection does; shutdown first wakes a thread in recv()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def _reset_all(self) -> None:
        with self.lock:
            conns, self.conns = self.conns, set()
        for c in conns:
            self._reset(c)

    def _go_down(self) -> None:
        with self.lock:
            self.down, self.budget = True, None
            self.faults += 1
            down_s = self.down_s
        self._reset_all()
        if down_s is not None:
            threading.Timer(down_s, self.restore).start()

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down:
                self.refused += 1
                self._reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                self._reset(client)
                continue
            with self.lock:
                self.conns |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_client: bool) -> None:
        try:
            while True:
                data = src.recv(16384)
                if not data:
                    break
                if to_client:
                    with self.lock:
                        budget = self.budget
                        if budget is not None:
                            self.budget = budget - len(data)
                    if budget is not None and budget <= len(data):
                        dst.sendall(data[:max(0, budget)])
                        self._go_down()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with self.lock:
                    self.conns.discard(s)
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
