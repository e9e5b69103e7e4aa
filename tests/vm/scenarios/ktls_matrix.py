"""Inside the guest: an hsd backend handshakes, the real kernel carries the data.

For every kTLS TLS 1.3 suite and both roles: a TCP socket on loopback, the
handshake run by the backend's hsd_handshake hook (hsd_openssl or hsd_tlslite,
the first argument) against an independent peer
(openssl s_server / s_client), then hsd.ktls.install_session on the real
kernel and plain send()/recv() in both directions.  /proc/net/tls_stat must
count every installed socket.  Runs every case, exits non-zero if any failed.
The guest's s_client is trixie's OpenSSL 3.5, which (unlike the hosts' 3.0)
parses a CertificateRequest's compress_certificate extension: the tlslite
server cases are what caught tlslite's empty list there.
"""

from __future__ import annotations

import hashlib
import importlib
import errno
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from hsd import ktls
from hsd.config import Config
from hsd.context import HandshakeContext
from hsd.credentials import load_x509
from hsd.protocol import AuthMode, HandshakeRequest, MessageType
from hsd.session import Session

PKI = Path("/tmp/pki")
SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_AES_128_CCM_SHA256",
          "TLS_CHACHA20_POLY1305_SHA256")
PAYLOAD_BYTES = 256 * 1024  # many 16 KiB records each way
HANDSHAKE_SECONDS = 30.0  # generous: emulated CPU
MSG_TRACE = Path("/tmp/ktls-matrix-s_client.msg")  # s_client's protocol message trace


def tls_stat() -> dict[str, int]:
    stats = {}
    for line in Path("/proc/net/tls_stat").read_text().splitlines():
        name, value = line.split()
        stats[name] = int(value)
    return stats


def config() -> Config:
    cfg = Config()
    cfg.client.truststore = str(PKI / "ca.pem")
    cfg.server.truststore = str(PKI / "ca.pem")
    cfg.server.certificate = str(PKI / "server.pem")
    cfg.server.private_key = str(PKI / "server.key")
    return cfg


def handshake(sock: socket.socket, role: str, backend: str) -> Session:
    request = HandshakeRequest(
        sockfd=sock.fileno(),
        message_type=MessageType.CLIENTHELLO if role == "client" else MessageType.SERVERHELLO,
        auth_mode=AuthMode.UNAUTH if role == "client" else AuthMode.X509,
        peername="localhost" if role == "client" else None,
    )
    cfg = config()
    sock.setblocking(False)
    ctx = HandshakeContext(request=request, sock=sock, deadline=time.monotonic() + HANDSHAKE_SECONDS,
                           backend=backend, x509=load_x509(cfg, request))
    session = importlib.import_module(f"hsd_{backend}").hsd_handshake(ctx=ctx)
    if session is None:
        raise AssertionError(f"hsd_{backend} declined {role}")
    return session


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect_with_retry(port: int) -> socket.socket:
    deadline = time.monotonic() + 30
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def read_exactly_from(stream, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = stream.read1(count - len(data)) if hasattr(stream, "read1") else stream.read(count - len(data))
        if not chunk:
            raise AssertionError(f"peer's output ended after {len(data)} of {count} bytes")
        data += chunk
    return data


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise AssertionError(f"kTLS socket closed after {len(data)} of {count} bytes")
        data += chunk
    return bytes(data)


def exchange(sock: socket.socket, peer: subprocess.Popen) -> None:
    """hsd -> peer through kTLS TX, then peer -> hsd through kTLS RX; compare digests."""
    sock.setblocking(True)
    sock.settimeout(60)
    outbound = os.urandom(PAYLOAD_BYTES // 2).hex().encode()  # printable: the peer echoes it to stdout
    sock.sendall(outbound)
    got = read_exactly_from(peer.stdout, len(outbound))
    if hashlib.sha256(got).digest() != hashlib.sha256(outbound).digest():
        raise AssertionError("the peer decrypted something else than hsd's kTLS socket sent")
    inbound = os.urandom(PAYLOAD_BYTES // 2).hex().encode()
    peer.stdin.write(inbound)
    peer.stdin.flush()
    back = recv_exactly(sock, len(inbound))
    if hashlib.sha256(back).digest() != hashlib.sha256(inbound).digest():
        raise AssertionError("kTLS RX returned something else than the peer sent")


SOL_TLS = 282
TLS_TX_MAX_PAYLOAD_LEN = 5  # linux/tls.h since 6.x (on 7.2, not on 6.12): the largest plaintext per record
TLS_MAX_PAYLOAD_SIZE = 16384
tx_max_payload: list[str] = []  # what the first kTLS socket said, printed once by main()


def probe_tx_max_payload(sock: socket.socket) -> str:
    """The kernel's per-record plaintext limit on a kTLS socket, or why there is none.

    Why: hsd, like tlshd 1.4.0, sets TLS_TX_MAX_PAYLOAD_LEN from a negotiated record_size_limit
    (RFC 8449) below full size.  OpenSSL implements no such extension, so s_server and s_client
    never announce one, and the kernel's default, full-size records, must be what every hsd
    session has here where the option exists; where it does not (6.12) there is nothing to set.
    Smaller limits are the record-limit scenario's (GnuTLS peers)."""
    try:
        value = sock.getsockopt(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN, 2)
    except OSError as exc:
        return f"absent ({errno.errorcode.get(exc.errno, exc.errno)})"
    size = int.from_bytes(value[:2], sys.byteorder)
    if size != TLS_MAX_PAYLOAD_SIZE:
        raise AssertionError(f"TLS_TX_MAX_PAYLOAD_LEN is {size} on an hsd session, not {TLS_MAX_PAYLOAD_SIZE}")
    return str(size)


def run_case(suite: str, role: str, backend: str) -> None:
    port = free_port()
    ossl_suite = suite
    if role == "client":  # hsd is the client; s_server picks the suite
        cmd = ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_3", "-ciphersuites", ossl_suite,
               "-cert", str(PKI / "server.pem"), "-key", str(PKI / "server.key"), "-num_tickets", "0",
               "-naccept", "1", "-quiet"]
    else:  # hsd is the server; s_client offers only this suite
        cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-ciphersuites", ossl_suite,
               "-CAfile", str(PKI / "ca.pem"), "-servername", "localhost", "-verify_return_error", "-quiet",
               "-msg", "-msgfile", str(MSG_TRACE)]
    before = tls_stat()
    listener = None
    if role == "server":
        listener = socket.create_server(("127.0.0.1", port))
    peer = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if role == "client":
            sock = connect_with_retry(port)
        else:
            listener.settimeout(30)
            sock, _ = listener.accept()
        with sock:
            started = time.monotonic()
            session = handshake(sock, role, backend)
            took = time.monotonic() - started
            if ktls.ALIASES.get(session.cipher, session.cipher) != suite:
                raise AssertionError(f"negotiated {session.cipher}, wanted {suite}")
            ktls.install_session(ktls.KernelKtls(), sock, session)
            session.wipe()
            tx_max_payload.append(probe_tx_max_payload(sock))
            exchange(sock, peer)
        trace = ""
        if role == "server":  # s_client exits on the closed connection and flushes its trace
            peer.wait(timeout=30)
            trace = MSG_TRACE.read_text(errors="replace")
        if role == "server" and "Finished" not in trace:
            raise AssertionError("s_client's message trace is empty: the ticket check would prove nothing")
        if role == "server" and "NewSessionTicket" in trace:
            # kernel consumers take the socket right after Finished: the NVMe host fails on any
            # non-data record (ENOTCONN), so an agent's server must send no tickets at all
            raise AssertionError("hsd's server sent a NewSessionTicket to s_client")
        after = tls_stat()
        for counter in ("TlsTxSw", "TlsRxSw"):
            if after.get(counter, 0) <= before.get(counter, 0):
                raise AssertionError(f"/proc/net/tls_stat {counter} did not rise ({before.get(counter)} -> "
                                     f"{after.get(counter)})")
        if after.get("TlsDecryptError", 0) != before.get("TlsDecryptError", 0):
            raise AssertionError("the kernel counted a decrypt error")
        print(f"ok: {suite} hsd-{role} ({backend}): handshake {took * 1000:.0f} ms, {PAYLOAD_BYTES // 2} bytes each way "
              f"through kTLS, TlsTxSw {before.get('TlsTxSw')}->{after['TlsTxSw']}", flush=True)
    except BaseException:
        peer.kill()
        _, err = peer.communicate(timeout=5)
        print(f"peer ({' '.join(cmd[:2])}) stderr:\n{err.decode(errors='replace')}", flush=True)
        raise
    finally:
        if listener is not None:
            listener.close()
        if peer.poll() is None:
            peer.kill()
        peer.wait()


def main(argv: list[str]) -> int:
    backend = argv[1] if len(argv) > 1 else "openssl"
    failures = 0
    for suite in SUITES:
        for role in ("client", "server"):
            try:
                run_case(suite, role, backend)
            except Exception as exc:  # report every case, then fail
                failures += 1
                print(f"FAIL: {suite} hsd-{role} ({backend}): {type(exc).__name__}: {exc}", flush=True)
    print(f"kernel {os.uname().release}: TLS_TX_MAX_PAYLOAD_LEN on hsd's kTLS sockets: "
          f"{', '.join(sorted(set(tx_max_payload))) or 'no socket'}", flush=True)
    print(f"ktls-matrix ({backend}): {2 * len(SUITES) - failures}/{2 * len(SUITES)} cases passed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
