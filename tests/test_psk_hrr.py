"""PSK identities across a HelloRetryRequest: DONE names the key the peer proved, or the handshake fails.

A hostile client built from tlslite-ng's parts (its TLSConnection client with
the ClientHello's pre_shared_key extension rewritten, binders recomputed with
HandshakeHelpers) forces a HelloRetryRequest by sending no key share, then sends
a second ClientHello whose identity list differs from the first: reordered,
shortened, extended, with an identity the server does not have.  It knows the
secret of one identity only; every other identity carries a binder made with a
random key, so it proves nothing.  hsd runs as the daemon runs it (simulator +
dispatcher, keys in a real kernel keyring) on both backends, and each case
asserts what the kernel's DONE says: success with exactly the serial of the key
the client proved (and application data under the installed kTLS keys), or
failure with no remote-auth.

The client role gets the same check the other way round: hsd offers several
keys, a tlslite server that knows one of them forces a HelloRetryRequest, and
DONE must carry the serial of the key that server selected.
"""

from __future__ import annotations

import secrets
import socket
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pytest
from tlslite import HandshakeSettings, TLSConnection
from tlslite.constants import TLS_1_3_HRR
from tlslite.extensions import PreSharedKeyExtension, PskIdentity
from tlslite.handshakehelpers import HandshakeHelpers
from tlslite.messages import ClientHello, ServerHello

from hsd.errors import PeerRejected
from hsd.psk import PskKey, PskSelection, selected_identity
from hsd_kit.soak import tcp_pair
from hsd_kit.harness import DaemonHarness, Finished, checker_for
from hsd_kit.keyrings import ThrowawayKeyring

BACKENDS = ["openssl", "tlslite"]
WAIT = 20.0
TIMEOUT_MS = 8000
IN_KEYRING = ("hrr-A", "hrr-B", "hrr-C")  # the server's keys; "hrr-U" is in no keyring
UNKNOWN = "hrr-U"


def binder_configs(identities: tuple[str, ...], known: dict[str, bytes]) -> list[tuple[bytearray, bytearray, str]]:
    """tlslite pskConfigs in this order: the real secret of a known identity, a random one for the rest."""
    return [(bytearray(name.encode()), bytearray(known.get(name) or secrets.token_bytes(32)), "sha256")
            for name in identities]


class TwoHelloClient(TLSConnection):
    """tlslite's TLS 1.3 client whose first and second ClientHello offer scripted PSK identity lists.

    The rewrite happens as the message is sent, after tlslite filled in the
    rest, so the transcript hash at that point is the one the binders cover."""

    def __init__(self, sock: socket.socket, hellos: tuple[tuple[str, ...], tuple[str, ...]],
                 known: dict[str, bytes]) -> None:
        super().__init__(sock)
        self.hellos = hellos
        self.known = known
        self.sent_hellos = 0
        self.hrr_received = 0

    def _sendMsg(self, msg, randomizeFirstBlock=True, update_hashes=True):
        if isinstance(msg, ClientHello):
            identities = self.hellos[min(self.sent_hellos, 1)]
            self.sent_hellos += 1
            ext = msg.extensions[-1]
            assert isinstance(ext, PreSharedKeyExtension)
            ext.identities = [PskIdentity().create(bytearray(name.encode()), 0) for name in identities]
            ext.binders = [bytearray(32) for _ in identities]
            HandshakeHelpers.update_binders(msg, self._handshake_hash, binder_configs(identities, self.known))
        yield from super()._sendMsg(msg, randomizeFirstBlock, update_hashes)

    def _getMsg(self, expectedType, secondaryType=None, constructorType=None):
        for result in super()._getMsg(expectedType, secondaryType, constructorType):
            if isinstance(result, ServerHello) and result.random == TLS_1_3_HRR:
                self.hrr_received += 1
            yield result


@dataclass(frozen=True)
class Case:
    name: str
    first: tuple[str, ...]  # identities of the ClientHello answered by the HelloRetryRequest
    second: tuple[str, ...]  # identities of the ClientHello after it
    knows: tuple[str, ...]  # identities whose real secret the client has (the others get random binders)
    proves: str | None  # the identity the server must select in the second hello: what DONE may name
    succeeds: frozenset[str]  # backends on which the handshake completes (then: with `proves`' serial)
    refused_before_retry: frozenset[str] = frozenset()  # backends that reject the first hello already
    proves_on: dict[str, str] = field(default_factory=dict)  # a backend that selects another proven key

    def proven(self, backend: str) -> str | None:
        return self.proves_on.get(backend, self.proves)


BOTH = frozenset(BACKENDS)
NONE: frozenset[str] = frozenset()
TLSLITE = frozenset({"tlslite"})
OPENSSL = frozenset({"openssl"})
# OpenSSL checks the binder of the first identity it has in EACH ClientHello, so a first hello
# whose leading known identity carries a random binder is refused before any retry; tlslite
# checks binders in the final ClientHello only, against the keys it was given for the first.
CASES = [
    Case("same-lists", ("hrr-B", "hrr-A"), ("hrr-B", "hrr-A"), ("hrr-B",), "hrr-B", BOTH),
    Case("reordered", ("hrr-A", "hrr-B"), ("hrr-B", "hrr-A"), ("hrr-B",), "hrr-B", TLSLITE, OPENSSL),
    Case("reordered-three", ("hrr-A", "hrr-C", "hrr-B"), ("hrr-B", "hrr-C", "hrr-A"), ("hrr-B",), "hrr-B",
         TLSLITE, OPENSSL),
    Case("reordered-unproven-first", ("hrr-B", "hrr-A"), ("hrr-A", "hrr-B"), ("hrr-B",), None, NONE),
    Case("reordered-after-unknown", ("hrr-B", "hrr-A"), (UNKNOWN, "hrr-B", "hrr-A"), ("hrr-B",), "hrr-B", BOTH),
    Case("shortened", ("hrr-A", "hrr-B"), ("hrr-B",), ("hrr-B",), "hrr-B", TLSLITE, OPENSSL),
    Case("unknown-then-proven", (UNKNOWN, "hrr-B"), ("hrr-B", UNKNOWN), ("hrr-B",), "hrr-B", BOTH),
    Case("unknown-moves-in-front", ("hrr-B", UNKNOWN), (UNKNOWN, "hrr-B"), ("hrr-B",), "hrr-B", BOTH),
    # a second hello naming a key the first did not: OpenSSL looks it up, tlslite was not given it
    Case("identity-new-in-second", ("hrr-B",), ("hrr-C",), ("hrr-B", "hrr-C"), "hrr-C", OPENSSL),
    Case("new-identity-in-front", ("hrr-B",), ("hrr-C", "hrr-B"), ("hrr-B", "hrr-C"), "hrr-C", BOTH,
         proves_on={"tlslite": "hrr-B"}),  # both binders are valid; tlslite has only B
    Case("new-unproven-in-front", ("hrr-B",), ("hrr-C", "hrr-B"), ("hrr-B",), "hrr-B", TLSLITE),
    Case("proven-only-in-first", ("hrr-B", "hrr-A"), ("hrr-A",), ("hrr-B",), None, NONE),
    Case("only-unknown-in-second", ("hrr-B",), (UNKNOWN,), ("hrr-B",), None, NONE),
]


@pytest.fixture(params=BACKENDS)
def daemon(request: pytest.FixtureRequest) -> Iterator[DaemonHarness]:
    """hsd with its installed plugins (as the daemon discovers them), this backend for every mode."""
    with DaemonHarness(backend=request.param) as harness:
        yield harness


@pytest.fixture(name="ring")
def _ring(hsd_keyring: ThrowawayKeyring) -> tuple[ThrowawayKeyring, dict[str, tuple[int, bytes]]]:
    """The server's keyring: identity -> (serial, secret) for A, B and C."""
    keys = {}
    for name in IN_KEYRING:
        secret = secrets.token_bytes(32)
        keys[name] = (hsd_keyring.add(name, secret), secret)
    return hsd_keyring, keys


def in_thread(conn: TLSConnection, handshake: Callable[[], None], result: dict) -> threading.Thread:
    """Run one peer's handshake on its own thread; result gets "conn" and then "ok" or "error"."""
    result["conn"] = conn

    def run() -> None:
        try:
            handshake()
            result["ok"] = True
        except Exception as exc:  # reported by the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def run_hostile_client(sock: socket.socket, case: Case, known: dict[str, bytes], result: dict) -> threading.Thread:
    settings = HandshakeSettings()
    settings.minVersion = settings.maxVersion = (3, 4)
    settings.keyShares = []  # no key share: the server must answer with a HelloRetryRequest
    settings.psk_modes = ["psk_dhe_ke"]
    order = case.first + tuple(name for name in case.second if name not in case.first)
    settings.pskConfigs = binder_configs(order, known)
    conn = TwoHelloClient(sock, (case.first, case.second), known)

    def handshake() -> None:
        conn.handshakeClientCert(settings=settings)
        conn.write(b"client finished\n")

    return in_thread(conn, handshake, result)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_server_reports_the_key_the_client_proved(daemon: DaemonHarness, ring, case: Case) -> None:
    keyring, keys = ring
    backend = daemon.config.backend
    known = {name: keys[name][1] for name in case.knows}
    mine, theirs = tcp_pair()
    result: dict = {}
    with mine, theirs:
        request = daemon.server_hello_psk(mine, keyring=keyring.serial, timeout_ms=TIMEOUT_MS)
        client = run_hostile_client(theirs, case, known, result)
        done: Finished = daemon.finish(request)
        if done.status:
            mine.shutdown(socket.SHUT_RDWR)  # a client still waiting for the server's flight gives up
        client.join(WAIT)
        conn = result["conn"]
        retried = backend not in case.refused_before_retry
        assert (conn.hrr_received, conn.sent_hellos) == ((1, 2) if retried else (0, 1)), done.describe()
        assert done.request.done_calls == 1
        if done.status == 0:
            # whatever the expectation: a completed handshake names the proven key, and only it
            proven = case.proven(backend)
            assert proven is not None, f"no valid binder in the final hello, yet: {done.describe()}"
            assert done.remote_auth == (keys[proven][0],), (
                f"DONE names {done.remote_auth}; the client proved {proven} = {keys[proven][0]} "
                f"(keyring: {({name: serial for name, (serial, _) in keys.items()})})")
            # and the kTLS keys installed are the ones the client derived from that key
            assert checker_for(request).recv_until(b"\n") == b"client finished\n"
        else:
            assert done.remote_auth == ()
        assert (done.status == 0) == (backend in case.succeeds), done.describe()
        print(f"{backend} {case.name}: {done.describe()}")


# --- client role: hsd offers several keys, the server knows one and forces a retry --------------------

class RetryingPskServer(TLSConnection):
    """tlslite's server that counts the HelloRetryRequests it sends."""

    hrr_sent = 0

    def _sendMsg(self, msg, randomizeFirstBlock=True, update_hashes=True):
        if isinstance(msg, ServerHello) and msg.random == TLS_1_3_HRR:
            self.hrr_sent += 1
        yield from super()._sendMsg(msg, randomizeFirstBlock, update_hashes)


def run_retrying_server(sock: socket.socket, identity: str, secret: bytes, result: dict) -> threading.Thread:
    settings = HandshakeSettings()
    settings.minVersion = settings.maxVersion = (3, 4)
    settings.eccCurves = ["secp384r1"]  # hsd sends x25519 and P-256 shares: a retry is needed
    settings.keyShares = ["secp384r1"]
    settings.psk_modes = ["psk_dhe_ke"]
    settings.ticket_count = 0
    settings.pskConfigs = [(bytearray(identity.encode()), bytearray(secret), "sha256")]
    conn = RetryingPskServer(sock)

    def handshake() -> None:
        conn.handshakeServer(settings=settings)
        conn.write(f"server used {identity}\n".encode())

    return in_thread(conn, handshake, result)


@pytest.mark.parametrize("server_knows", IN_KEYRING)
def test_client_reports_the_key_the_server_selected(daemon: DaemonHarness, ring, server_knows: str) -> None:
    keyring, keys = ring
    backend = daemon.config.backend
    offered = [keys[name][0] for name in IN_KEYRING]
    mine, theirs = tcp_pair()
    result: dict = {}
    with mine, theirs:
        server = run_retrying_server(theirs, server_knows, keys[server_knows][1], result)
        request = daemon.client_hello_psk(mine, offered, keyring=keyring.serial, timeout_ms=TIMEOUT_MS)
        done = daemon.finish(request)
        if done.status:
            mine.shutdown(socket.SHUT_RDWR)
        server.join(WAIT)
        assert result["conn"].hrr_sent == 1, result.get("error")
        assert done.request.done_calls == 1
        # the OpenSSL backend offers one external PSK per ClientHello: the first of ACCEPT's list
        should_succeed = backend == "tlslite" or server_knows == IN_KEYRING[0]
        if done.status == 0:
            assert done.remote_auth == (keys[server_knows][0],)
            assert checker_for(request).recv_until(b"\n") == f"server used {server_knows}\n".encode()
        else:
            assert done.remote_auth == ()
        assert (done.status == 0) == should_succeed, done.describe()


# --- the map itself: selected identity -> the key handed to the library ---------------------------

def _key(identity: bytes, serial: int) -> PskKey:
    return PskKey(identity=identity, secret=bytearray(secrets.token_bytes(32)), hash="sha256", serial=serial)


def test_selection_maps_only_identities_the_library_was_given() -> None:
    a, b = _key(b"A", 1), _key(b"B", 2)
    selection = PskSelection([a, b])
    assert selection.chosen(b"B") is b
    assert selection.chosen(bytearray(b"A"), a.secret) is a
    for identity in (None, b"C", b""):
        with pytest.raises(PeerRejected):
            selection.chosen(identity)


def test_selection_refuses_a_secret_that_is_not_the_selected_keys() -> None:
    """OpenSSL's session secret must be the selected identity's key, not another given key's."""
    a, b = _key(b"A", 1), _key(b"B", 2)
    selection = PskSelection([a, b])
    with pytest.raises(PeerRejected):
        selection.chosen(b"A", b.secret)


def test_selection_keeps_the_first_of_two_keys_under_one_identity() -> None:
    """A library finds PSKs by identity: a second key under the same one could be reported for the first's."""
    first, second = _key(b"A", 1), _key(b"A", 2)
    selection = PskSelection()
    assert selection.give(first) and not selection.give(second) and selection.give(first)
    assert selection.given == [first]
    assert selection.chosen(b"A", first.secret).serial == 1


def test_selected_identity_is_an_index_into_the_hello_it_answers() -> None:
    assert selected_identity((b"B", b"A"), 0) == b"B"
    assert selected_identity((b"B", b"A"), 2) is None
    assert selected_identity((b"B",), -1) is None
    assert selected_identity((b"B",), None) is None
