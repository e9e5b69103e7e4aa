"""The interop matrix as data: every case a backend must pass, and one function that runs a case.

A case is the whole path - simulated kernel request -> READY -> ACCEPT (the
socket over SCM_RIGHTS) -> dispatcher -> backend -> simulated kTLS -> DONE -
against a real, independent peer (openssl or gnutls tools), a scripted broken
peer, or hsd itself on the other end of the connection with another backend.
Success is proved with application data both ways under the installed keys;
failure must be exactly one DONE with the right status.

Plugin authors run the same list against their backend:
``cases_for("mybackend", modes)`` (or the pytest plugin's ``hsd_interop_matrix``).
"""

from __future__ import annotations

import errno
import secrets
import socket
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Iterable

from hsd import keyring
from hsd.config import Config
from hsd.hookspecs import Mode
from hsd.identity import SERVER_X509_SENTINEL
from hsd.protocol import errno_name

from . import peers
from .harness import DaemonHarness, Finished, HarnessError, RoundTrip, assert_ktls_pair, assert_ktls_roundtrip
from .keyrings import ThrowawayKeyring
from .pki import TestPki
from .records import NEW_SESSION_TICKET

SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
          "TLS_AES_128_CCM_SHA256")
TOOLS = ("openssl", "gnutls")
BUILTIN_BACKENDS = ("openssl", "tlslite")
# NVMe TLS PSK identities: "NVMe0R0<hash>" - 01 = SHA-256, 02 = SHA-384 (the PSK policy reads the hash from it)
PSK_IDENTITIES = {"sha256": "NVMe0R01 nqn.2024-01.org.example.host-matrix nqn.2014-08.org.nvmexpress.discovery",
                  "sha384": "NVMe0R02 nqn.2024-01.org.example.host-matrix nqn.2014-08.org.nvmexpress.discovery"}


@dataclass(frozen=True)
class Case:
    """One interop check.  `peer`: openssl | gnutls (real tools), closing | silent | garbage
    (scripted, not TLS), hsd (the other end is hsd too, on `other_backend`)."""

    name: str
    role: str  # hsd's role: client | server
    auth: str  # unauth | x509 | psk
    peer: str
    status: int = 0  # expected DONE status (0 = success, proved with data both ways)
    suite: str | None = None  # restrict the peer to this suite, and expect it
    client_cert: bool = False  # client x509: the peer server requires one; server: the peer client sends one
    peer_pair: str = ""  # PKI pair the peer presents (default: server / client)
    peername: str | None = "localhost"  # client role: the name hsd must verify
    remote_auth: str = ""  # what DONE reports on success: psk | sentinel | cert-keys | "" (nothing)
    psk_hash: str = "sha256"
    expect_tickets: bool = False  # the peer sends NewSessionTickets first: data after them must still open
    no_tickets_on_wire: bool = False  # hsd server: prove from the client's trace that no ticket was sent
    timeout_ms: int = 10000
    other_backend: str = ""  # peer == "hsd": the backend serving the other end

    @property
    def mode(self) -> Mode:
        return Mode(self.role, self.auth)

    def __str__(self) -> str:
        return self.name


def _cases() -> list[Case]:
    cases: list[Case] = []
    for tool in TOOLS:
        for suite in SUITES:
            short = suite.removeprefix("TLS_").lower().replace("_", "-")
            cases.append(Case(f"client-unauth-{tool}-{short}", "client", "unauth", tool, suite=suite,
                              remote_auth="cert-keys", expect_tickets=True))
            cases.append(Case(f"server-x509-{tool}-{short}", "server", "x509", tool, suite=suite))
        cases.append(Case(f"client-x509-{tool}", "client", "x509", tool, client_cert=True, remote_auth="cert-keys"))
        cases.append(Case(f"server-x509-client-cert-{tool}", "server", "x509", tool, client_cert=True,
                          remote_auth="sentinel"))
        cases.append(Case(f"client-psk-{tool}", "client", "psk", tool, remote_auth="psk"))
        cases.append(Case(f"server-psk-{tool}", "server", "psk", tool, remote_auth="psk"))
    cases += [
        Case("client-psk-openssl-sha384", "client", "psk", "openssl", psk_hash="sha384", remote_auth="psk"),
        Case("server-x509-no-tickets-on-wire", "server", "x509", "openssl", no_tickets_on_wire=True),
        Case("server-psk-no-tickets-on-wire", "server", "psk", "openssl", remote_auth="psk", no_tickets_on_wire=True),
        Case("fail-client-wrong-host-name", "client", "unauth", "openssl", status=errno.EACCES,
             peername="nfs.example.org"),
        Case("fail-client-untrusted-ca", "client", "unauth", "gnutls", status=errno.EACCES,
             peer_pair="untrusted_server"),
        Case("fail-client-expired-certificate", "client", "unauth", "openssl", status=errno.EACCES,
             peer_pair="expired_server"),
        Case("fail-client-no-peer-name", "client", "unauth", "openssl", status=errno.EACCES, peername=None),
        Case("fail-client-peer-closes-mid-handshake", "client", "unauth", "closing", status=errno.ETIMEDOUT),
        Case("fail-client-peer-never-answers", "client", "unauth", "silent", status=errno.ETIMEDOUT,
             timeout_ms=1000),
        Case("fail-client-garbage-server-hello", "client", "unauth", "garbage", status=errno.EACCES),
        Case("fail-server-untrusted-client-cert", "server", "x509", "openssl", status=errno.EACCES,
             client_cert=True, peer_pair="untrusted_server"),
    ]
    return cases


MATRIX: tuple[Case, ...] = tuple(_cases())


def cross_cases(backend: str, others: Iterable[str]) -> list[Case]:
    """hsd client on `backend` vs hsd server on each other backend, and the other way round."""
    out = []
    for other in others:
        if other == backend:
            continue
        for auth in ("unauth", "x509"):
            out.append(Case(f"cross-client-{auth}-vs-{other}-server", "client", auth, "hsd", other_backend=other,
                            client_cert=auth == "x509"))
        out.append(Case(f"cross-server-x509-vs-{other}-client", "server", "x509", "hsd", other_backend=other))
    return out


def cases_for(backend: str, modes: Iterable[Mode], *, cross_with: Iterable[str] = ("openssl",),
              suites: Iterable[str] | str | None = None) -> list[Case]:
    """The matrix restricted to the modes a backend serves (PSK modes need the psk policy plugin too).

    suites: the TLS 1.3 suites the backend can offer (a list or "A:B:C", as a
    plugin declares them in BackendInfo.extra["tls13_suites"]); None = all four."""
    served = {Mode(m.role, m.auth) for m in modes}
    allowed = set(suites.split(":") if isinstance(suites, str) else suites) if suites else set(SUITES)
    chosen = [case for case in MATRIX if case.mode in served and (case.suite is None or case.suite in allowed)]
    chosen += [case for case in cross_cases(backend, cross_with) if case.mode in served]
    return chosen


# ---------------------------------------------------------------- running one case


@dataclass
class CaseResult:
    case: Case
    backend: str
    finished: Finished
    roundtrip: RoundTrip | None

    def line(self) -> str:
        """One human line: what ran, how it went, what the data exchange proved."""
        out = self.finished.outcome
        status = f"status={self.finished.status} ({errno_name(self.finished.status) if self.finished.status else 'ok'})"
        if self.finished.status:
            status += f" as expected: {out.reason}"
        proof = self.roundtrip.summary() if self.roundtrip else "no kTLS keys installed"
        return (f"{self.case.role:6} {self.case.auth:6} peer={self.case.peer:7} backend={out.backend:10} "
                f"suite={out.cipher or '-'} group={out.group or '-'} {out.duration * 1000:.1f} ms "
                f"{status}; {proof}  [{self.case.name}]")


def case_config(case: Case, pki: TestPki, base: Config | None = None) -> Config:
    """The hsd.conf a case needs: our PKI as trust, our certificates, client-certificate policy."""
    config = replace(base) if base is not None else Config()
    config.client = replace(config.client, truststore=pki.ca)
    config.server = replace(config.server, truststore=pki.ca, certificate=pki.server.chain,
                            private_key=pki.server.key)
    if case.client_cert or case.peer == "hsd":
        config.client = replace(config.client, certificate=pki.client.chain, private_key=pki.client.key)
    config.require_client_certificate = case.role == "server" and case.client_cert and case.status == 0
    config.backends = dict(config.backends)
    return config


def _psk(case: Case) -> peers.PskSecret:
    return peers.PskSecret(PSK_IDENTITIES[case.psk_hash], secrets.token_bytes(48 if case.psk_hash == "sha384" else 32), case.psk_hash)


def _server_peer(case: Case, pki: TestPki, psk: peers.PskSecret | None) -> peers.ServerPeer | peers.ScriptedPeer:
    if case.peer == "closing":
        return peers.closing_peer()
    if case.peer == "silent":
        return peers.silent_peer()
    if case.peer == "garbage":
        return peers.garbage_peer()
    if psk is not None:
        return (peers.openssl_psk_server if case.peer == "openssl" else peers.gnutls_psk_server)(psk)
    pair = getattr(pki, case.peer_pair or "server")
    opts = peers.PeerOptions(cert=pair.chain, key=pair.key, ca=pki.ca, suites=[case.suite] if case.suite else None,
                             require_client_cert=case.client_cert)
    return (peers.openssl_server if case.peer == "openssl" else peers.gnutls_server)(opts)


def _client_peer(case: Case, pki: TestPki, port: int, psk: peers.PskSecret | None) -> peers.PeerProcess:
    if psk is not None:
        extra = ("-msg",) if case.no_tickets_on_wire else ()
        return (peers.openssl_psk_client if case.peer == "openssl" else peers.gnutls_psk_client)(psk, port, extra=extra)
    pair = getattr(pki, case.peer_pair or "client") if case.client_cert else None
    opts = peers.PeerOptions(cert=pair.chain if pair else None, key=pair.key if pair else None, ca=pki.ca,
                             suites=[case.suite] if case.suite else None,
                             extra=["-msg"] if case.no_tickets_on_wire else [])
    return (peers.openssl_client if case.peer == "openssl" else peers.gnutls_client)(opts, port)


def _drop_key(serial: int) -> None:
    """The consumer would drop the peer-certificate key; so does the test, where the kernel lets it."""
    try:
        keyring.invalidate(serial)
    except keyring.KeyringError:
        pass  # an asymmetric key in the user keyring may not be ours to invalidate: it expires with the keyring


def _check_remote_auth(case: Case, finished: Finished, psk_serial: int) -> None:
    got = finished.remote_auth
    if case.remote_auth == "psk":
        if got[:1] != (psk_serial,):
            raise HarnessError(f"DONE reported remote-auth {got}, not the PSK used ({psk_serial})")
    elif case.remote_auth == "sentinel":
        if got[:1] != (SERVER_X509_SENTINEL,):
            raise HarnessError(f"server x509 with a client certificate reported {got}, not 0xFFFFFFFF")
    elif case.remote_auth == "cert-keys":
        if not got or not all(got):
            raise HarnessError(f"client x509 reported remote-auth {got}, not peer-certificate key serials")
        if len(set(got)) != len(got):
            raise HarnessError(f"peer certificates share a key: {got}")
        for index, serial in enumerate(got):  # each certificate went into a key found by name
            description = keyring.describe_key(serial)[4]
            wanted = f"TLS x509 {case.peername}" + (f" #{index}" if index else "")
            if description != wanted:
                raise HarnessError(f"remote-auth key {serial} is described {description!r}, not {wanted!r}")
            _drop_key(serial)
    elif got:
        raise HarnessError(f"expected no remote-auth, DONE reported {got}")


def run_case(harness: DaemonHarness, case: Case, pki: TestPki, backend: str, *,
             base_config: Config | None = None) -> CaseResult:
    """Run one case on a running harness with `backend` serving hsd's end; raises HarnessError on a miss."""
    config = case_config(case, pki, base_config)
    if case.peer == "hsd":
        other = case.other_backend
        if case.role == "client":
            config.backends.update({f"client.{case.auth}": backend, "server.x509": other})
        else:
            config.backends.update({"server.x509": backend, "client.unauth": other, "client.x509": other})
    harness.reconfigure(config, backend)
    with ExitStack() as stack:
        if case.peer == "hsd":
            return _run_cross(harness, case, backend, stack)
        psk = _psk(case) if case.auth == "psk" else None
        ring = stack.enter_context(ThrowawayKeyring()) if psk is not None else None
        psk_serial = ring.add(psk.identity, psk.secret) if ring is not None and psk is not None else 0
        if case.role == "client":
            peer = _server_peer(case, pki, psk)
            stack.callback(peer.stop)
            peer.start()
            sock = peer.connect()
            stack.callback(sock.close)
            if case.auth == "psk":
                request = harness.client_hello_psk(sock, [psk_serial], keyring=ring.serial if ring else 0,
                                                   timeout_ms=case.timeout_ms)
            else:
                submit = harness.client_hello_x509 if case.auth == "x509" else harness.client_hello_anon
                request = submit(sock, peername=case.peername, timeout_ms=case.timeout_ms)
            process = peer if isinstance(peer, peers.PeerProcess) else None
        else:
            listener = stack.enter_context(peers.Listener())
            process = _client_peer(case, pki, listener.port, psk)
            stack.callback(process.stop)
            process.start()
            sock = listener.accept()
            stack.callback(sock.close)
            if case.auth == "psk":
                request = harness.server_hello_psk(sock, keyring=ring.serial if ring else 0, timeout_ms=case.timeout_ms)
            else:
                request = harness.server_hello_x509(sock, timeout_ms=case.timeout_ms)
        finished = harness.finish(request).expect(case.status)
        if case.status != 0:
            return CaseResult(case, backend, finished, None)
        if case.suite and finished.outcome.cipher != case.suite:
            raise HarnessError(f"negotiated {finished.outcome.cipher}, the peer only allowed {case.suite}")
        _check_remote_auth(case, finished, psk_serial)
        echo = case.role == "client" and case.peer == "gnutls"
        roundtrip = assert_ktls_roundtrip(request, process, echo=echo)
        if case.expect_tickets and NEW_SESSION_TICKET not in roundtrip.post_handshake_messages:
            raise HarnessError("the peer's NewSessionTickets were expected before the data")
        if roundtrip.post_handshake_messages and case.role == "server":
            raise HarnessError(f"the peer client sent post-handshake messages {roundtrip.post_handshake_messages}")
        if case.no_tickets_on_wire:
            assert process is not None
            trace = process.output
            if "<<< TLS 1.3, Handshake" not in trace:
                raise HarnessError("the client's -msg trace shows no handshake: nothing was proved")
            if "NewSessionTicket" in trace:
                raise HarnessError("hsd's server sent a NewSessionTicket (seen in the client's trace)")
        return CaseResult(case, backend, finished, roundtrip)


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with peers.Listener() as listener:
        client = socket.create_connection(listener.sock.getsockname())
        server = listener.accept()
    client.setblocking(False)
    return client, server


def _run_cross(harness: DaemonHarness, case: Case, backend: str, stack: ExitStack) -> CaseResult:
    """Two requests on the two ends of one TCP connection: hsd talks to hsd through the simulator."""
    client_sock, server_sock = _tcp_pair()
    stack.callback(client_sock.close)
    stack.callback(server_sock.close)
    server_req = harness.server_hello_x509(server_sock, timeout_ms=case.timeout_ms)
    if case.role == "client" and case.auth == "x509" or case.role == "server" and case.client_cert:
        client_req = harness.client_hello_x509(client_sock, peername="localhost", timeout_ms=case.timeout_ms)
    else:
        client_req = harness.client_hello_anon(client_sock, peername="localhost", timeout_ms=case.timeout_ms)
    client_done = harness.finish(client_req).expect(0)
    server_done = harness.finish(server_req).expect(0)
    if client_done.outcome.cipher != server_done.outcome.cipher:
        raise HarnessError(f"the two ends disagree on the suite: {client_done.outcome.cipher} vs "
                           f"{server_done.outcome.cipher}")
    ours, theirs = (client_done, server_done) if case.role == "client" else (server_done, client_done)
    if ours.outcome.backend != backend or theirs.outcome.backend != case.other_backend:
        raise HarnessError(f"backends were {ours.outcome.backend}/{theirs.outcome.backend}, "
                           f"wanted {backend}/{case.other_backend}")
    for serial in client_done.remote_auth:
        _drop_key(serial)
    roundtrip = assert_ktls_pair(client_req, server_req)
    return CaseResult(case, backend, ours, roundtrip)
