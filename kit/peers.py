"""Real, independent TLS peers for tests: OpenSSL and GnuTLS command-line tools on loopback.

hsd's handshakes are only worth something if another implementation agrees.
These wrappers start `openssl s_server/s_client` and `gnutls-serv/gnutls-cli`
as subprocesses (own process group, killed on teardown), wait until a server
really listens (from /proc/net/tcp, so no probe connection is wasted), and let
a test write lines to the peer's stdin and wait for what the peer printed.

Also here: scripted TCP peers for negative tests (silent, garbage, closes
mid-handshake), which are not TLS implementations at all.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

LOOPBACK = "127.0.0.1"

# IANA suite -> GnuTLS priority cipher keyword
GNUTLS_CIPHERS = {
    "TLS_AES_128_GCM_SHA256": "AES-128-GCM",
    "TLS_AES_256_GCM_SHA384": "AES-256-GCM",
    "TLS_CHACHA20_POLY1305_SHA256": "CHACHA20-POLY1305",
    "TLS_AES_128_CCM_SHA256": "AES-128-CCM",
}


class PeerError(Exception):
    """The peer process did not start, did not print what was expected, or died."""


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (bind to 0, read it, release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def is_listening(port: int) -> bool:
    """True when some socket listens on port (IPv4 or IPv6), read from /proc/net/tcp*."""
    wanted = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as handle:
                next(handle, None)
                for line in handle:
                    fields = line.split()
                    if len(fields) > 3 and fields[1].endswith(wanted) and fields[3] == "0A":
                        return True
        except OSError:
            continue
    return False


def tool_available(name: str) -> bool:
    return shutil.which(name) is not None


# The signature schemes a peer without ML-DSA offers (OpenSSL 3.0, GnuTLS 3.7): newer openssl and
# gnutls-cli (Debian's 3.5+/3.8.9+) offer ML-DSA too, so a test of the classic fallback says so.
CLASSIC_SIGALGS = ("ECDSA+SHA256:ECDSA+SHA384:ECDSA+SHA512:ed25519:ed448:"
                   "rsa_pss_rsae_sha256:rsa_pss_rsae_sha384:rsa_pss_rsae_sha512:"
                   "rsa_pss_pss_sha256:rsa_pss_pss_sha384:rsa_pss_pss_sha512")
GNUTLS_CLASSIC_SIGNATURES = (":-SIGN-ALL:+SIGN-ECDSA-SECP256R1-SHA256:+SIGN-ECDSA-SECP384R1-SHA384:"
                             "+SIGN-ECDSA-SECP521R1-SHA512:+SIGN-EDDSA-ED25519:+SIGN-RSA-PSS-RSAE-SHA256:"
                             "+SIGN-RSA-PSS-RSAE-SHA384:+SIGN-RSA-PSS-RSAE-SHA512")


def gnutls_priority(suites: list[str] | None, classic: bool = False) -> str:
    """TLS 1.3 only, optionally restricted to the given IANA suites (and to classic signatures)."""
    base = "NORMAL:-VERS-ALL:+VERS-TLS1.3" + (GNUTLS_CLASSIC_SIGNATURES if classic else "")
    if not suites:
        return base
    return base + ":-CIPHER-ALL:" + ":".join("+" + GNUTLS_CIPHERS[s] for s in suites)


class LoopbackPort:
    """Something listening on a loopback port, dialled the way the kernel's consumer would connect."""

    port: int

    @property
    def address(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    def connect(self, timeout: float = 5.0) -> socket.socket:
        """A connected, non-blocking TCP socket to this peer (what the kernel would hand over)."""
        sock = socket.create_connection(self.address, timeout=timeout)
        sock.setblocking(False)
        return sock


class PeerProcess:
    """A peer subprocess: stdin to write lines to, combined stdout/stderr collected in the background."""

    def __init__(self, argv: list[str], name: str) -> None:
        self.argv = argv
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self._output = bytearray()
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None

    def start(self) -> "PeerProcess":
        prefix = ["stdbuf", "-o0", "-e0"] if tool_available("stdbuf") else []
        self.proc = subprocess.Popen(prefix + self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._read_output, name=f"{self.name}-output", daemon=True)
        self._reader.start()
        return self

    def _read_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            with self._cond:
                if not chunk:
                    self._cond.notify_all()
                    return
                self._output += chunk
                self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return self._output.decode(errors="replace")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_line(self, line: str | bytes) -> None:
        """Write one line to the peer's stdin (the peer sends it over TLS)."""
        assert self.proc is not None and self.proc.stdin is not None
        data = line.encode() if isinstance(line, str) else line
        if not data.endswith(b"\n"):
            data += b"\n"
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise PeerError(f"{self.name} exited; output:\n{self.output}") from None

    def wait_for(self, pattern: str | bytes, timeout: float = 10.0) -> str:
        """Block until the output contains pattern (a regex); returns the output so far."""
        regex = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while not regex.search(self._output):
                remaining = deadline - time.monotonic()
                reader_done = self._reader is not None and not self._reader.is_alive()
                if remaining <= 0 or reader_done:
                    raise PeerError(f"{self.name}: {pattern!r} did not appear "
                                    f"({'exited' if reader_done else 'timed out'}); output:\n"
                                    f"{self._output.decode(errors='replace')}")
                self._cond.wait(min(remaining, 0.2))
            return self._output.decode(errors="replace")

    def wait_exit(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Terminate the whole process group; kill what does not go within 3 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(3)
        self._close(self.proc.stdin)
        if self._reader is not None:  # the group is gone: the reader ends at EOF with the last lines read
            self._reader.join(3)
        self._close(self.proc.stdout)

    @staticmethod
    def _close(stream: Any) -> None:
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass

    def __enter__(self) -> "PeerProcess":
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class PeerOptions:
    """What a peer presents and checks; paths are PEM files (see hsd_kit.pki)."""

    cert: str | None = None  # our certificate (chain) file
    key: str | None = None
    ca: str | None = None  # trust anchors for verifying the other side
    crl: str | None = None
    suites: list[str] | None = None  # IANA TLS 1.3 suites; None: the tool's default
    verify: bool = True  # client: verify the server (and its name)
    servername: str = "localhost"  # client: SNI and the name to verify
    request_client_cert: bool = False  # server: ask for a client certificate
    require_client_cert: bool = False  # server: insist on one
    classic_signatures: bool = False  # offer no ML-DSA signature scheme, as an older peer (CLASSIC_SIGALGS)
    extra: list[str] = field(default_factory=list)


class ServerPeer(LoopbackPort, PeerProcess):
    """A listening peer; start() returns once the port accepts connections."""

    def __init__(self, argv: list[str], name: str, port: int) -> None:
        super().__init__(argv, name)
        self.port = port

    def start(self, timeout: float = 10.0) -> "ServerPeer":
        super().start()
        deadline = time.monotonic() + timeout
        while not is_listening(self.port):
            if not self.running():
                self.stop()
                raise PeerError(f"{self.name} exited before listening; output:\n{self.output}")
            if time.monotonic() > deadline:
                self.stop()
                raise PeerError(f"{self.name} did not listen on {self.port} in time; output:\n{self.output}")
            time.sleep(0.02)
        return self


def _path_flags(opts: PeerOptions, cert: str, key: str, ca: str, crl: str) -> list[str]:
    """Each PEM file the options name, after the tool's flag for it."""
    argv: list[str] = []
    for flag, path in ((cert, opts.cert), (key, opts.key), (ca, opts.ca), (crl, opts.crl)):
        if path:
            argv += [flag, path]
    return argv


def _openssl_credentials(opts: PeerOptions) -> list[str]:
    """Certificate, key, trust anchors, CRL and suites: the same flags for s_server and s_client."""
    argv = _path_flags(opts, "-cert", "-key", "-CAfile", "-CRL")
    if opts.crl:
        argv += ["-crl_check"]
    if opts.suites:
        argv += ["-ciphersuites", ":".join(opts.suites)]
    if opts.classic_signatures:  # for our handshake signature, and (server) for a client certificate
        argv += ["-sigalgs", CLASSIC_SIGALGS, "-client_sigalgs", CLASSIC_SIGALGS]
    return argv


def _gnutls_credentials(opts: PeerOptions) -> list[str]:
    """Certificate, key, trust anchors and CRL: the same flags for gnutls-serv and gnutls-cli."""
    return _path_flags(opts, "--x509certfile", "--x509keyfile", "--x509cafile", "--x509crlfile")


def openssl_server(opts: PeerOptions, port: int | None = None) -> ServerPeer:
    """`openssl s_server`: prints what it receives, sends what is written to its stdin."""
    port = port or free_port()
    argv = ["openssl", "s_server", "-accept", f"{LOOPBACK}:{port}", "-tls1_3", "-naccept", "1",
            *_openssl_credentials(opts)]
    if opts.require_client_cert:
        argv += ["-Verify", "4", "-verify_return_error"]
    elif opts.request_client_cert:
        argv += ["-verify", "4", "-verify_return_error"]
    return ServerPeer(argv + opts.extra, "openssl s_server", port)


def gnutls_server(opts: PeerOptions, port: int | None = None) -> ServerPeer:
    """`gnutls-serv --echo`: echoes what it receives (proves both directions at once)."""
    port = port or free_port()
    argv = ["gnutls-serv", "--port", str(port), "--echo", "--priority",
            gnutls_priority(opts.suites, opts.classic_signatures),
            *_gnutls_credentials(opts)]
    if opts.require_client_cert:
        argv += ["--require-client-cert"]
    elif opts.request_client_cert:
        argv += ["--verify-client-cert"]
    return ServerPeer(argv + opts.extra, "gnutls-serv", port)


def openssl_client(opts: PeerOptions, port: int, host: str = LOOPBACK) -> PeerProcess:
    """`openssl s_client`: sends stdin lines, prints what it receives (-msg shows handshake messages)."""
    argv = ["openssl", "s_client", "-connect", f"{host}:{port}", "-tls1_3", "-ign_eof",
            "-servername", opts.servername, *_openssl_credentials(opts)]
    if opts.verify:
        argv += ["-verify_return_error", "-verify_hostname", opts.servername]
    return PeerProcess(argv + opts.extra, "openssl s_client")


def gnutls_client(opts: PeerOptions, port: int, host: str = LOOPBACK) -> PeerProcess:
    """`gnutls-cli`: sends stdin lines, prints what it receives."""
    argv = ["gnutls-cli", "--port", str(port), "--priority", gnutls_priority(opts.suites, opts.classic_signatures),
            "--sni-hostname", opts.servername, *_gnutls_credentials(opts)]
    if opts.verify:
        argv += ["--verify-hostname", opts.servername]
    else:
        argv += ["--insecure"]
    return PeerProcess(argv + opts.extra + [host], "gnutls-cli")


class Listener:
    """A loopback listening socket for tests where hsd is the server and a peer connects."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]

    def accept(self, timeout: float = 10.0) -> socket.socket:
        """The next connection, non-blocking (like the fd the kernel hands over)."""
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        conn.setblocking(False)
        return conn

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Listener":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- scripted (non-TLS) peers

Behaviour = Callable[[socket.socket], None]


class ScriptedPeer(LoopbackPort):
    """A TCP server on loopback that runs one behaviour per connection in a thread."""

    def __init__(self, behaviour: Behaviour, name: str) -> None:
        self.behaviour = behaviour
        self.name = name
        self.listener = Listener()
        self.port = self.listener.port
        self.connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def start(self) -> "ScriptedPeer":
        self._thread.start()
        return self

    def _serve(self) -> None:
        self.listener.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            conn.settimeout(5)
            self.connections.append(conn)
            try:
                self.behaviour(conn)
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(3)
        self.listener.close()
        for conn in self.connections:
            conn.close()

    def __enter__(self) -> "ScriptedPeer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _read_record(conn: socket.socket) -> bytes:
    header = conn.recv(5, socket.MSG_WAITALL)
    if len(header) < 5:
        return header
    return header + conn.recv(int.from_bytes(header[3:5], "big"), socket.MSG_WAITALL)


def silent_peer() -> ScriptedPeer:
    """Accepts and never answers (the connection stays open until stop())."""
    return ScriptedPeer(lambda conn: None, "silent-peer")


def garbage_peer(garbage: bytes = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n") -> ScriptedPeer:
    """Reads the ClientHello, answers with bytes that are not TLS."""

    def behaviour(conn: socket.socket) -> None:
        _read_record(conn)
        conn.sendall(garbage)

    return ScriptedPeer(behaviour, "garbage-peer")


def closing_peer(partial: bytes = b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76\x03\x03") -> ScriptedPeer:
    """Reads the ClientHello, sends the start of a ServerHello record, then closes (mid-handshake)."""

    def behaviour(conn: socket.socket) -> None:
        _read_record(conn)
        if partial:
            conn.sendall(partial)
        conn.shutdown(socket.SHUT_RDWR)
        conn.close()

    return ScriptedPeer(behaviour, "closing-peer")


# ---------------------------------------------------------------- PSK peers (secrets only in memory)


class MemoryFile:
    """A file that exists only in memory (memfd): PSKs handed to peer tools never touch the disk."""

    def __init__(self, content: bytes, name: str = "hsd-test") -> None:
        self.fd = os.memfd_create(name)
        os.write(self.fd, content)

    @property
    def path(self) -> str:
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _der(tag: int, content: bytes) -> bytes:
    """One DER TLV (definite length)."""
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = (n.bit_length() + 7) // 8
    return bytes([tag, 0x80 | size]) + n.to_bytes(size, "big") + content


def _der_int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def psk_session_pem(secret: bytes, hash_name: str) -> bytes:
    """An SSL_SESSION carrying the PSK, as openssl's -psk_session reads it (a SHA-384 PSK needs this).

    Encoded here (OpenSSL's SSL_SESSION ASN.1, ssl/ssl_asn1.c: version 1, TLS 1.3, the
    suite, no session id, the PSK as master key, time and timeout) rather than through
    i2d_SSL_SESSION, which cryptography's bindings dropped (43, Debian trixie's, has none)."""
    import base64

    cipher = b"\x13\x01" if hash_name == "sha256" else b"\x13\x02"
    der = _der(0x30, _der_int(1) + _der_int(0x0304) + _der(0x04, cipher) + _der(0x04, b"") + _der(0x04, secret)
               + _der(0xA1, _der_int(int(time.time()))) + _der(0xA2, _der_int(86400)))
    return (b"-----BEGIN SSL SESSION PARAMETERS-----\n" + base64.encodebytes(der)
            + b"-----END SSL SESSION PARAMETERS-----\n")


GNUTLS_13 = "NORMAL:-VERS-ALL:+VERS-TLS1.3"
GNUTLS_PSK_PRIORITY = {
    ("sha256", "psk_dhe_ke"): GNUTLS_13 + ":-CIPHER-ALL:+AES-128-GCM:+CHACHA20-POLY1305:-KX-ALL:+ECDHE-PSK",
    ("sha384", "psk_dhe_ke"): GNUTLS_13 + ":-CIPHER-ALL:+AES-256-GCM:-KX-ALL:+ECDHE-PSK",
    ("sha256", "psk_ke"): GNUTLS_13 + ":-CIPHER-ALL:+AES-128-GCM:-KX-ALL:+PSK",
    ("sha384", "psk_ke"): GNUTLS_13 + ":-CIPHER-ALL:+AES-256-GCM:-KX-ALL:+PSK",
}


@dataclass
class PskSecret:
    """One external PSK as a peer tool gets it; the memfd files it needs close with the peer."""

    identity: str
    secret: bytes
    hash: str = "sha256"
    mode: str = "psk_dhe_ke"

    def openssl_args(self, files: list[MemoryFile]) -> list[str]:
        """openssl's -psk builds a SHA-256 session; a SHA-384 PSK goes in through -psk_session."""
        if self.hash == "sha256":
            args = ["-psk", self.secret.hex(), "-psk_identity", self.identity]
        else:
            session = MemoryFile(psk_session_pem(self.secret, self.hash), "hsd-test-psk")
            files.append(session)
            args = ["-psk_session", session.path, "-psk_identity", self.identity]
        return args + (["-allow_no_dhe_kex"] if self.mode == "psk_ke" else [])


class _WithFiles:
    """Mixin: memfd files that live exactly as long as the peer process."""

    files: list[MemoryFile]

    def stop(self) -> None:  # type: ignore[override]
        super().stop()  # type: ignore[misc]
        for item in self.files:
            item.close()


class PskServerPeer(_WithFiles, ServerPeer):
    pass


class PskClientPeer(_WithFiles, PeerProcess):
    pass


def openssl_psk_server(psk: PskSecret, port: int | None = None, extra: tuple[str, ...] = ()) -> ServerPeer:
    """`openssl s_server -nocert` with one external PSK; prints what it receives (extra: e.g. -rev)."""
    port = port or free_port()
    files: list[MemoryFile] = []
    argv = ["openssl", "s_server", "-accept", f"{LOOPBACK}:{port}", "-tls1_3", "-naccept", "1", "-nocert",
            *psk.openssl_args(files), *extra]
    peer = PskServerPeer(argv, "openssl s_server (psk)", port)
    peer.files = files
    return peer


def gnutls_psk_server(psk: PskSecret, port: int | None = None) -> ServerPeer:
    """`gnutls-serv --echo` with a PSK password file in memory (gnutls splits it at the first ':')."""
    port = port or free_port()
    passwd = MemoryFile(f"{psk.identity}:{psk.secret.hex()}\n".encode(), "hsd-test-pskpasswd")
    argv = ["gnutls-serv", "--port", str(port), "--echo", "--pskpasswd", passwd.path,
            "--priority", GNUTLS_PSK_PRIORITY[psk.hash, psk.mode], "--disable-client-cert"]
    peer = PskServerPeer(argv, "gnutls-serv (psk)", port)
    peer.files = [passwd]
    return peer


def openssl_psk_client(psk: PskSecret, port: int, host: str = LOOPBACK, extra: tuple[str, ...] = ()) -> PeerProcess:
    files: list[MemoryFile] = []
    argv = ["openssl", "s_client", "-connect", f"{host}:{port}", "-tls1_3", "-ign_eof", *psk.openssl_args(files),
            *extra]
    peer = PskClientPeer(argv, "openssl s_client (psk)")
    peer.files = files
    return peer


def gnutls_psk_client(psk: PskSecret, port: int, host: str = LOOPBACK, extra: tuple[str, ...] = ()) -> PeerProcess:
    argv = ["gnutls-cli", "--port", str(port), "--pskusername", psk.identity, "--pskkey", psk.secret.hex(),
            "--priority", GNUTLS_PSK_PRIORITY[psk.hash, psk.mode], *extra, host]
    peer = PskClientPeer(argv, "gnutls-cli (psk)")
    peer.files = []
    return peer


def connect(port: int, host: str = LOOPBACK, timeout: float = 10.0) -> socket.socket:
    """A blocking TCP connection to a peer that may still be starting (retries refused connects)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((host, port), timeout=timeout)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
