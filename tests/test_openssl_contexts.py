"""The OpenSSL backend's shared contexts: reused when identical, never a channel between handshakes.

Concurrent handshakes in threads share one cached SSL.Context against real
openssl s_client peers; each Session's keys must open its own peer's records
and no other peer's (the kit's record layer, keyed by the crypto_info hsd
would install).  The cache key must separate everything that shapes a context.
"""

from __future__ import annotations

import select
import socket
import threading
import time

import pluggy
import pytest

import hsd_openssl
from hsd.config import Config
from hsd.credentials import load_x509
from hsd.ktls import session_crypto_info
from hsd.session import Session
from hsd_kit import peers
from hsd_kit.handshakes import handshake_context, plugin_manager, run_handshake
from hsd_kit.harness import assert_records_roundtrip
from hsd_kit.pki import TestPki, x509_credentials
from hsd_kit.records import RecordError, RecordProtection, session_records
from hsd_openssl.contexts import ContextCache, context_key, contexts
from hsd_openssl.handshake import _server_context

CONCURRENT = 6

pytestmark = pytest.mark.skipif(not peers.tool_available("openssl"), reason="needs the openssl command-line tool")


@pytest.fixture(scope="module")
def plugins() -> pluggy.PluginManager:
    return plugin_manager(hsd_openssl)


def server_config(pki: TestPki) -> Config:
    config = Config()
    config.server.truststore = pki.ca
    config.server.certificate, config.server.private_key = pki.server.cert, pki.server.key
    return config


def read_raw_record(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """One whole TLS record off the wire, undecrypted."""
    deadline = time.monotonic() + timeout
    data = b""
    need = 5
    while len(data) < need:
        if not select.select([sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise TimeoutError("no record from the peer")
        chunk = sock.recv(need - len(data))
        if not chunk:
            raise EOFError("peer closed")
        data += chunk
        if len(data) == 5 and need == 5:
            need = 5 + int.from_bytes(data[3:5], "big")
    return data


def test_concurrent_handshakes_on_one_cached_context_keep_their_secrets_apart(plugins, hsd_pki, cleanup) -> None:
    config = server_config(hsd_pki)
    listener = peers.Listener()
    cleanup.append(listener)
    clients, socks = [], []
    for _ in range(CONCURRENT):
        client = peers.openssl_client(peers.PeerOptions(ca=hsd_pki.ca, cert=hsd_pki.client.cert,
                                                        key=hsd_pki.client.key), listener.port)
        cleanup.append(client)
        client.start()
        clients.append(client)
        sock = listener.accept()
        cleanup.append(sock)
        socks.append(sock)
    contexts.clear()
    warm = handshake_context(socks[0], "server", "x509", backend="openssl", config=config, peername=None)
    shared = contexts.obtain(context_key(warm, load_x509(config, warm.request)),
                             lambda: _server_context(load_x509(config, warm.request), False))
    hits_before = contexts.hits
    sessions: list[Session | BaseException | None] = [None] * CONCURRENT
    start = threading.Barrier(CONCURRENT)

    def serve(index: int) -> None:
        ctx = handshake_context(socks[index], "server", "x509", backend="openssl", config=config, peername=None)
        ctx.x509 = load_x509(config, ctx.request)
        start.wait()
        try:
            sessions[index] = run_handshake(plugins, ctx)
        except BaseException as exc:  # reported below, with its index
            sessions[index] = exc

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(CONCURRENT)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    failures = [(i, s) for i, s in enumerate(sessions) if not isinstance(s, Session)]
    assert not failures, failures
    assert len(contexts) == 1, "identical requests must share one context"
    assert contexts.hits - hits_before == CONCURRENT, "a concurrent identical request did not reuse the context"
    assert contexts.obtain(context_key(warm, load_x509(config, warm.request)), lambda: None) is shared
    done: list[Session] = [s for s in sessions if isinstance(s, Session)]
    assert len({bytes(s.rx_secret) for s in done}) == CONCURRENT, "two handshakes reported the same secret"

    checkers = [session_records(sock, session) for sock, session in zip(socks, done)]
    for checker, client in zip(checkers, clients):
        assert_records_roundtrip(checker, client, rounds=1)
    rx_infos = [session_crypto_info(session)[1] for session in done]
    for index, (sock, client, checker) in enumerate(zip(socks, clients, checkers)):
        client.send_line(f"only for handshake {index}")
        record = read_raw_record(sock)
        for other, info in enumerate(rx_infos):
            if other == index:
                continue
            foreign = RecordProtection(info)
            foreign.seq = checker.rx.seq
            with pytest.raises(RecordError):
                foreign.open(record)
        content_type, payload = checker.rx.open(record)
        assert f"only for handshake {index}".encode() in payload


def test_cache_key_separates_what_shapes_a_context(hsd_pki) -> None:
    config = server_config(hsd_pki)
    a, b = socket.socketpair()
    try:
        ctx = handshake_context(a, "server", "x509", backend="openssl", config=config, peername=None)
        creds = load_x509(config, ctx.request)
        same = load_x509(config, ctx.request)  # a fresh parse of the same files: the same context
        assert context_key(ctx, creds) == context_key(ctx, same)
        changes = {
            "other trust": dict(trust=[]),
            "require a client certificate": dict(require_peer_cert=True),
            "allowed SANs": dict(allowed_sans=["hsd://client"]),
            "no verification": dict(verify_peer=False),
            "a key that is not the certificate's": dict(key=x509_credentials(hsd_pki, hsd_pki.client).key),
            "other identity": dict(chain=x509_credentials(hsd_pki, hsd_pki.client).chain,
                                   key=x509_credentials(hsd_pki, hsd_pki.client).key),
        }
        for what, fields in changes.items():
            changed = load_x509(config, ctx.request)
            for name, value in fields.items():
                setattr(changed, name, value)
            assert context_key(ctx, changed) != context_key(ctx, creds), what
        keyring_ctx = handshake_context(a, "server", "x509", backend="openssl", config=config, peername=None,
                                        certificate=1234, privkey=1235)
        assert context_key(keyring_ctx, creds) is None, "keyring key material must not share a context"
    finally:
        a.close()
        b.close()


def test_the_cache_is_bounded_and_least_recently_used() -> None:
    cache = ContextCache(size=2)
    built: list[str] = []

    def build(name: str):
        def make():
            built.append(name)
            return object()
        return make

    first = cache.obtain("a", build("a"))
    cache.obtain("b", build("b"))
    assert cache.obtain("a", build("a")) is first  # a is now the most recent
    cache.obtain("c", build("c"))  # evicts b
    assert len(cache) == 2
    cache.obtain("b", build("b"))
    assert built == ["a", "b", "c", "b"]
    cache.obtain(None, build("x"))
    cache.obtain(None, build("x"))
    assert built[-2:] == ["x", "x"], "no key: built every time, never stored"
