"""TCP listeners that take a connection and then never answer: a handshake towards them stays in flight.

Why: `systemctl stop hsd` must give every in-flight handshake its DONE, so the scenario needs
handshakes that are provably in flight when it stops hsd, from more than one consumer at once.
Two kinds of port:
  raw:PORT  silent from the start (NVMe/TCP starts TLS at once);
  rpc:PORT  answers the first RPC call with the RPC-with-TLS "STARTTLS" reply (RFC 9289), then
            goes silent: the NFS client's probe succeeds and it asks for a handshake.
Prints `CLIENTHELLO PORT PEER_ADDRESS` once a handshake record (0x16) arrived on a connection,
then holds the connection open, silent, until the peer closes it or the listener is killed.
    python3 silent_peer.py raw:4431 rpc:20049
"""

from __future__ import annotations

import selectors
import socket
import struct
import sys

AUTH_NONE, REPLY, MSG_ACCEPTED, SUCCESS = 0, 1, 0, 0


def starttls_reply(call: bytes) -> bytes:
    """The reply to an RPC call (record marking already stripped): accepted, AUTH_NONE verifier "STARTTLS"."""
    (xid,) = struct.unpack(">I", call[:4])
    body = struct.pack(">IIIII", xid, REPLY, MSG_ACCEPTED, AUTH_NONE, 8) + b"STARTTLS" + struct.pack(">I", SUCCESS)
    return struct.pack(">I", 0x80000000 | len(body)) + body


def main() -> int:
    sel = selectors.DefaultSelector()
    for spec in sys.argv[1:]:
        kind, _, port = spec.partition(":")
        listener = socket.create_server(("", int(port)))
        sel.register(listener, selectors.EVENT_READ, ("listen", kind, int(port)))
    print("LISTENING", *sys.argv[1:], flush=True)
    while True:
        for key, _ in sel.select():
            role, kind, port = key.data
            if role == "listen":
                conn, _ = key.fileobj.accept()
                sel.register(conn, selectors.EVENT_READ, ("rpc-probe" if kind == "rpc" else "conn", kind, port))
                continue
            conn = key.fileobj
            data = conn.recv(65536)
            if not data:
                sel.unregister(conn)
                conn.close()
                continue
            if role == "rpc-probe" and len(data) >= 8:
                conn.sendall(starttls_reply(data[4:]))
                sel.modify(conn, selectors.EVENT_READ, ("conn", kind, port))
            elif data[0] == 0x16:
                local = conn.getsockname()[0]
                print("CLIENTHELLO", port, f"{local}:{port}", len(data), flush=True)


if __name__ == "__main__":
    sys.exit(main())
