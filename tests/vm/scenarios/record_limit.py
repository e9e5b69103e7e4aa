"""Inside the guest: a GnuTLS peer's RFC 8449 record_size_limit caps the records the kernel sends.

For both roles: GnuTLS (gnutls-serv --echo / gnutls-cli) with `--recordsize 512`
announces a record_size_limit of 513 (TLS 1.3 counts the content type byte),
hsd_tlslite does the handshake and must report exactly that, hsd.ktls installs
the keys and TLS_TX_MAX_PAYLOAD_LEN, and one large write goes through kTLS.  A
relay between hsd and the peer parses every TLS record header hsd's side puts
on the wire: the protected records after the ClientHello/ServerHello must all
hold at most 513 bytes of TLSInnerPlaintext (record length minus the 16-byte
AEAD tag), the largest exactly 513 (the kernel filled them to the limit, so the
limit it applied is the peer's and no smaller one), and the peer must return or
print every byte (GnuTLS answers a larger record with record_overflow).

On a kernel without TLS_TX_MAX_PAYLOAD_LEN (Linux 6.12) hsd logs one warning
for the whole process and the kernel sends 16 KiB records: this script then
prints that line and what the peer did with a large write (`--expect absent`).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import hsd_tlslite
from hsd import ktls
from hsd.config import Config
from hsd.context import HandshakeContext
from hsd.credentials import load_x509
from hsd.protocol import AuthMode, HandshakeRequest, MessageType
from hsd.session import Session
from ktls_matrix import connect_with_retry, free_port  # the same guest's helpers, beside this file

PKI = Path("/tmp/pki")
RECORDSIZE = 512  # gnutls --recordsize: the plaintext the peer takes per record
ANNOUNCED = RECORDSIZE + 1  # what GnuTLS puts in record_size_limit under TLS 1.3
TAG = 16  # every kTLS TLS 1.3 suite's AEAD tag
PAYLOAD = 64 * 1024  # one write: at least 128 records at the limit
HANDSHAKE_SECONDS = 60.0  # emulated CPU, pure-Python handshake
APPLICATION_DATA = 23


class Relay:
    """TCP relay that notes (type, length) of every record one side sends."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.records: dict[str, list[tuple[int, int]]] = {"down": [], "up": []}  # down: client -> server
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            client, _ = self.listener.accept()
            server = socket.create_connection(("127.0.0.1", self.upstream), timeout=30)
            for s in (client, server):
                s.settimeout(None)
            pumps = [threading.Thread(target=self._pump, args=(client, server, "down"), daemon=True),
                     threading.Thread(target=self._pump, args=(server, client, "up"), daemon=True)]
            for pump in pumps:
                pump.start()
            for pump in pumps:
                pump.join()
        except OSError as exc:
            self.errors.append(f"relay: {exc}")

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        buf = bytearray()
        while True:
            try:
                chunk = src.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            buf += chunk
            while len(buf) >= 5:
                length = int.from_bytes(buf[3:5], "big")
                if len(buf) < 5 + length:
                    break
                self.records[direction].append((buf[0], length))
                del buf[: 5 + length]
            try:
                dst.sendall(chunk)
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()


def handshake(sock: socket.socket, role: str) -> Session:
    cfg = Config()
    cfg.client.truststore = cfg.server.truststore = str(PKI / "ca.pem")
    cfg.server.certificate = str(PKI / "server.pem")
    cfg.server.private_key = str(PKI / "server.key")
    request = HandshakeRequest(
        sockfd=sock.fileno(),
        message_type=MessageType.CLIENTHELLO if role == "client" else MessageType.SERVERHELLO,
        auth_mode=AuthMode.UNAUTH if role == "client" else AuthMode.X509,
        peername="localhost" if role == "client" else None)
    sock.setblocking(False)
    ctx = HandshakeContext(request=request, sock=sock, deadline=time.monotonic() + HANDSHAKE_SECONDS,
                           backend="tlslite", x509=load_x509(cfg, request))
    session = hsd_tlslite.hsd_handshake(ctx=ctx)
    if session is None:
        raise AssertionError(f"hsd_tlslite declined the {role} handshake")
    return session


def tx_max_payload(sock: socket.socket) -> str:
    try:
        value = sock.getsockopt(ktls.SOL_TLS, ktls.TLS_TX_MAX_PAYLOAD_LEN, 2)
    except OSError as exc:
        return f"absent ({errno.errorcode.get(exc.errno, exc.errno)})"
    return str(int.from_bytes(value[:2], sys.byteorder))


def read_exactly(fileobj, count: int, timeout: float) -> bytes:
    data = bytearray()
    deadline = time.monotonic() + timeout
    fd = fileobj.fileno()
    while len(data) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            break
        chunk = os.read(fd, count - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def send_through_ktls(sock: socket.socket, data: bytes) -> None:
    """One write on the kTLS socket: the kernel cuts it into records (the dry run replaces this)."""
    sock.setblocking(True)
    sock.settimeout(60)
    sock.sendall(data)


TLS_GET_RECORD_TYPE = 2  # SOL_TLS cmsg: a record that is not application data comes alone, typed


def recv_through_ktls(sock: socket.socket, count: int) -> bytes:
    """Application data from kTLS RX; other records (a NewSessionTicket) are skipped, not an EIO."""
    sock.settimeout(60)
    data = bytearray()
    while len(data) < count:
        chunk, ancillary, _, _ = sock.recvmsg(count - len(data), socket.CMSG_SPACE(1))
        record_type = next((c[2][0] for c in ancillary if c[0] == ktls.SOL_TLS and c[1] == TLS_GET_RECORD_TYPE),
                           APPLICATION_DATA)
        if record_type != APPLICATION_DATA:
            print(f"client: skipped a record of type {record_type} from the peer", flush=True)
            continue
        if not chunk:
            break
        data += chunk
    return bytes(data)


def run_role(role: str, expect: str) -> list[str]:
    """One role's case; returns what failed (empty: passed)."""
    failures: list[str] = []
    peer_port = free_port()
    listener = None
    if role == "client":  # hsd is the client: gnutls-serv echoes
        peer_cmd = ["gnutls-serv", "--port", str(peer_port), "--echo", "--noticket",  # no NewSessionTicket
                    "--recordsize", str(RECORDSIZE), "--x509certfile", str(PKI / "server.pem"),
                    "--x509keyfile", str(PKI / "server.key")]
        hsd_side = "down"
    else:  # hsd is the server: gnutls-cli prints what it receives
        listener = socket.create_server(("127.0.0.1", peer_port))
        hsd_side = "up"
    peer = None
    relay = None
    peer_log = open(f"/tmp/record-limit-{role}-peer.log", "w+b")  # a file: gnutls-serv logs every line it echoes
    try:
        if role == "client":
            peer = subprocess.Popen(peer_cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=peer_log)
            connect_with_retry(peer_port).close()  # gnutls-serv is listening (this probe is not relayed)
            relay = Relay(peer_port)
            sock = connect_with_retry(relay.port)
        else:
            relay = Relay(peer_port)
            peer_cmd = ["gnutls-cli", "--port", str(relay.port), "--recordsize", str(RECORDSIZE),
                        "--x509cafile", str(PKI / "ca.pem"), "--logfile", "/dev/null", "localhost"]
            peer = subprocess.Popen(peer_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=peer_log)
            listener.settimeout(30)
            sock, _ = listener.accept()
        with sock:
            started = time.monotonic()
            session = handshake(sock, role)
            took = time.monotonic() - started
            if session.peer_record_size_limit != ANNOUNCED:
                failures.append(f"backend reported record_size_limit {session.peer_record_size_limit}, "
                                f"GnuTLS announced {ANNOUNCED}")
            ktls.install_session(ktls.KernelKtls(), sock, session)
            session.wipe()
            option = tx_max_payload(sock)
            print(f"{role}: handshake {took * 1000:.0f} ms, peer's record_size_limit "
                  f"{session.peer_record_size_limit}, TLS_TX_MAX_PAYLOAD_LEN after install: {option}", flush=True)
            hexed = os.urandom(PAYLOAD // 2).hex()  # printable lines: gnutls-serv --echo answers line by line
            outbound = "".join(hexed[i : i + 255] + "\n" for i in range(0, len(hexed), 256)).encode()
            try:
                send_through_ktls(sock, outbound)
                if role == "client":
                    got = recv_through_ktls(sock, len(outbound))  # gnutls-serv --echo sends it back
                else:
                    got = read_exactly(peer.stdout, len(outbound), 60)
            except Exception as exc:  # without the option: the peer's record_overflow alert, then EOF
                if expect == "enforced":
                    raise
                print(f"{role}: the data exchange failed: {type(exc).__name__}: {exc}", flush=True)
                got = b""
            delivered = hashlib.sha256(got).digest() == hashlib.sha256(outbound).digest()
            print(f"{role}: {len(outbound)} bytes written, peer {'returned' if role == 'client' else 'printed'} "
                  f"{len(got)} ({'identical' if delivered else 'NOT identical'})", flush=True)
            time.sleep(1)  # the relay has parsed the last records
        protected = [length - TAG for ctype, length in relay.records[hsd_side] if ctype == APPLICATION_DATA]
        sizes = sorted(set(protected))
        print(f"{role}: hsd's side sent {len(protected)} protected records, TLSInnerPlaintext sizes "
              f"{sizes[:3]}..{sizes[-3:]}, largest {max(protected, default=0)}", flush=True)
        if expect == "enforced":
            if option != str(RECORDSIZE):
                failures.append(f"TLS_TX_MAX_PAYLOAD_LEN reads {option}, not {RECORDSIZE}")
            if not delivered:
                failures.append("the peer did not get every byte (record_overflow?)")
            over = [n for n in protected if n > ANNOUNCED]
            if over:
                failures.append(f"{len(over)} records above the limit on the wire (largest {max(over)})")
            if max(protected, default=0) != ANNOUNCED:
                failures.append(f"largest record {max(protected, default=0)}, not {ANNOUNCED}: "
                                "the kernel did not fill records to the peer's limit")
            if len(protected) < PAYLOAD // RECORDSIZE:
                failures.append(f"only {len(protected)} protected records for {PAYLOAD} bytes")
        else:  # absent: the kernel has no such option and sends full-size records
            if not option.startswith("absent"):
                failures.append(f"TLS_TX_MAX_PAYLOAD_LEN is {option} on a kernel expected to lack it")
            print(f"{role}: without the option the kernel's largest record held {max(protected, default=0)} "
                  f"bytes; the peer {'took' if delivered else 'refused'} it", flush=True)
    except Exception as exc:
        failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        if listener is not None:
            listener.close()
        if relay is not None:
            relay.close()
            failures.extend(relay.errors)
        if peer is not None:
            if peer.poll() is None:
                peer.kill()
            peer.wait(timeout=10)
            if failures:
                peer_log.seek(0)
                print(f"peer ({peer_cmd[0]}) stderr:\n{peer_log.read().decode(errors='replace')[-2000:]}", flush=True)
        peer_log.close()
    return failures


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--expect", choices=("enforced", "absent"), required=True)
    args = parser.parse_args(argv)
    warnings = Warnings()
    logging.getLogger("hsd").addHandler(warnings)
    failures = 0
    for role in ("client", "server"):
        for failure in run_role(role, args.expect):
            failures += 1
            print(f"FAIL: hsd-{role}: {failure}", flush=True)
        if not failures:
            print(f"ok: hsd-{role} (tlslite): record_size_limit {ANNOUNCED} "
                  f"{'enforced by the kernel' if args.expect == 'enforced' else 'reported; the kernel cannot'}",
                  flush=True)
    limit_lines = [line for line in warnings.lines if "TLS_TX_MAX_PAYLOAD_LEN" in line]
    for line in limit_lines:
        print(f"hsd warning: {line}", flush=True)
    wanted = 1 if args.expect == "absent" else 0
    if len(limit_lines) != wanted:
        failures += 1
        print(f"FAIL: {len(limit_lines)} TLS_TX_MAX_PAYLOAD_LEN warnings for two sessions, wanted {wanted}",
              flush=True)
    print(f"kernel {os.uname().release}: record-limit {'passed' if not failures else f'{failures} failures'}",
          flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
