"""The local driver's Service for one node: a loopback TCP proxy, in a process of its own
(as kube-proxy is outside the applications: in the driver's process it would wait for the
interpreter lock of whatever runs there, and every request's latency with it).

    python -m controller.kube.local_proxy FD BACKEND_FILE

``FD`` is the listening socket, inherited from the driver (which bound it, so the port
answers from the moment the driver returns); ``BACKEND_FILE`` holds the port of the
version serving, read for each new connection (the driver replaces the file to move the
traffic; empty or absent: no version is Ready, and the connection is closed). A
connection stays with the process it reached until one side closes it, as kube-proxy's
DNAT does. Standard library only."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from pathlib import Path


def backend(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` to ``dst`` until ``src`` ends, then end ``dst``'s sending side."""
    with contextlib.suppress(OSError):
        while data := src.recv(256 * 1024):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def relay(client: socket.socket, backend_file: Path) -> None:
    port = backend(backend_file)
    try:
        if port is None:
            raise ConnectionRefusedError("no version is Ready on this node")
        upstream = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
    back.start()
    pump(client, upstream)
    back.join()
    upstream.close()
    client.close()


def main(argv: list[str]) -> None:
    fd, backend_file = int(argv[0]), Path(argv[1])
    listener = socket.socket(fileno=fd)
    while True:
        client, _ = listener.accept()
        threading.Thread(target=relay, args=(client, backend_file), daemon=True).start()


if __name__ == "__main__":
    main(sys.argv[1:])
