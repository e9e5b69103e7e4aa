"""hsd in a box: the kernel simulator plus a real Dispatcher, for tests and for plugin authors.

`DaemonHarness` runs what the daemon runs - plugins discovered through the
``hsd.backends`` entry points (PluginHost.discover), a Dispatcher on a real
SimChannel in a thread - and hands the test the simulator's consumer API
(client_hello_*/server_hello_*), like NFS or NVMe would use the kernel.  An
installed third-party plugin is therefore found exactly as the daemon finds it.

`assert_ktls_roundtrip` then proves the keys a finished request installed:
application data both ways between the consumer's socket (through the
user-space record checker keyed by the request's crypto_info) and the real peer.
"""

from __future__ import annotations

import copy
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from hsd import keyring
from hsd.config import Config
from hsd.dispatcher import Dispatcher, Outcome, address_of
from hsd.plugins import PluginHost
from hsd.protocol import errno_name
from hsd.sim_channel import SimChannel
from hsd_kit.simulator import SimRequest, Simulator

from .peers import PeerError, PeerProcess
from .records import KtlsRecordChecker

DONE_GRACE = 10.0  # seconds past a request's own timeout a test waits for its DONE


class HarnessError(AssertionError):
    """The daemon under test did not do what the test expected (status, DONE count, data)."""


def _ends_of(sock: socket.socket) -> tuple[str, str]:
    """The same (local, peer) "host:port" pair the dispatcher logs for the agent's copy of this socket.

    Both ends together name one live connection; the peer alone does not (two
    clients of one listener share it, and a closed listener's port comes back)."""
    return address_of(sock.getsockname), address_of(sock.getpeername)


def ensure_process_keyring() -> None:
    """Create the process keyring before any dispatcher thread exists.

    Threads started before the process keyring exists do not share the one
    created later (it lives in each thread's credentials), so a request's
    keyring linked by the dispatcher thread would be invisible to the test
    thread's keys, and vice versa."""
    try:
        keyring.keyring_id(keyring.KEY_SPEC_PROCESS_KEYRING, create=True)
    except OSError:
        pass  # no keyrings here: PSK cases will say so


class DaemonHarness:
    """Simulator + Dispatcher with discovered plugins; a context manager.

    backend: the default backend (config.backend); per-mode choices go in
    config.backends like [hsd.backends] in hsd.conf.  extra_plugins: name ->
    plugin object registered as if it came from an entry point (for in-test
    plugins).  discover=False skips entry-point discovery (then extra_plugins
    is all there is).  sim: serve this running simulator instead of a new one
    (it is not stopped with the harness).  The one in-process daemon runner:
    `thread` runs Dispatcher.run until `stopping` is set; an exception it ends
    with is kept in `error`."""

    def __init__(self, backend: str | None = "openssl", config: Config | None = None, *,
                 extra_plugins: dict[str, Any] | None = None, discover: bool = True,
                 max_inflight: int | None = None, sim: Simulator | None = None) -> None:
        self.config = copy.deepcopy(config) if config is not None else Config()
        if backend:
            self.config.backend = backend
        self.discover = discover
        self.extra_plugins = dict(extra_plugins or {})
        self.max_inflight = max_inflight
        self.outcomes: list[Outcome] = []
        self._arrivals: list[Outcome] = []  # every outcome in arrival order (tests may clear self.outcomes)
        self._claimed: set[int] = set()  # indexes into _arrivals already handed to a finish()
        self._fences: dict[int, int] = {}  # id(request) -> len(_arrivals) when it was queued
        self._outcomes_changed = threading.Condition()
        self.sim: Simulator | None = sim
        self._own_sim = sim is None
        self.error: BaseException | None = None
        self.host: PluginHost | None = None
        self.channel: SimChannel | None = None
        self.dispatcher: Dispatcher | None = None
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "DaemonHarness":
        ensure_process_keyring()
        if self.sim is None:
            self.sim = Simulator().start()
        try:
            self.host = PluginHost.discover(self.config) if self.discover else PluginHost(self.config)
            for name, plugin in self.extra_plugins.items():
                self.host.add(name, plugin)
            self.channel = self.sim.channel()
            self.dispatcher = Dispatcher(self.channel, self.host, self.config, max_inflight=self.max_inflight,
                                         on_outcome=self._record)
            ready = threading.Event()
            self.thread = threading.Thread(target=self._run, args=(ready,), name="hsd-harness", daemon=True)
            self.thread.start()
            if not ready.wait(10):
                raise HarnessError("the dispatcher did not start")
        except BaseException:
            self.stop()
            raise
        return self

    def _run(self, ready: threading.Event) -> None:
        assert self.dispatcher is not None
        try:
            self.dispatcher.run(self.stopping, ready.set)
        except BaseException as exc:  # kept for the test to inspect
            self.error = exc

    def stop(self) -> None:
        """Stop accepting; in-flight handshakes finish first (each still gets its DONE)."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(30)
            if self.thread.is_alive():
                raise HarnessError("the dispatcher did not stop within 30 s")
            self.thread = None
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.sim is not None and self._own_sim:
            self.sim.stop()
            self.sim = None

    def __enter__(self) -> "DaemonHarness":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reconfigure(self, config: Config, backend: str | None = None) -> None:
        """New settings for the next requests (what SIGHUP does in the daemon)."""
        self.config = copy.deepcopy(config)
        if backend:
            self.config.backend = backend
        assert self.dispatcher is not None and self.host is not None
        self.dispatcher.config = self.config
        self.host.config = self.config

    # ------------------------------------------------------------ the consumer API (the "kernel")

    def _simulator(self) -> Simulator:
        if self.sim is None:
            raise HarnessError("the harness is not running (use it as a context manager)")
        return self.sim

    def _queued(self, submit: Callable[..., SimRequest], *args: Any, **kw: Any) -> SimRequest:
        """Queue a request, remembering which outcomes came before it (none of those can be its own)."""
        with self._outcomes_changed:
            fence = len(self._arrivals)
        request = submit(*args, **kw)
        self._fences[id(request)] = fence
        return request

    def client_hello_anon(self, sock: socket.socket, **kw: Any) -> SimRequest:
        return self._queued(self._simulator().client_hello_anon, sock, **kw)

    def client_hello_x509(self, sock: socket.socket, **kw: Any) -> SimRequest:
        return self._queued(self._simulator().client_hello_x509, sock, **kw)

    def client_hello_psk(self, sock: socket.socket, peerids: list[int] | tuple[int, ...], **kw: Any) -> SimRequest:
        return self._queued(self._simulator().client_hello_psk, sock, peerids, **kw)

    def server_hello_x509(self, sock: socket.socket, **kw: Any) -> SimRequest:
        return self._queued(self._simulator().server_hello_x509, sock, **kw)

    def server_hello_psk(self, sock: socket.socket, **kw: Any) -> SimRequest:
        return self._queued(self._simulator().server_hello_psk, sock, **kw)

    def cancel(self, sock: socket.socket) -> bool:
        return self._simulator().cancel(sock)

    # ------------------------------------------------------------ results

    def _record(self, outcome: Outcome) -> None:
        with self._outcomes_changed:
            self.outcomes.append(outcome)
            self._arrivals.append(outcome)
            self._outcomes_changed.notify_all()

    def finish(self, request: SimRequest, timeout: float | None = None) -> "Finished":
        """Wait for the request's DONE and the dispatcher's outcome line for it."""
        limit = timeout if timeout is not None else (request.timeout_ms or self.config.handshake_timeout_ms) / 1000
        local, peer = _ends_of(request.sock)
        fence = self._fences.pop(id(request), 0)
        try:
            status, peerid = request.wait(limit + DONE_GRACE)
        except TimeoutError:
            raise HarnessError(f"no DONE within {limit + DONE_GRACE:.0f} s") from None
        deadline = time.monotonic() + 5
        with self._outcomes_changed:
            while True:
                found = [i for i in range(fence, len(self._arrivals)) if i not in self._claimed
                         and self._arrivals[i].local == local and self._arrivals[i].peer == peer
                         and self._arrivals[i].status == status]
                if found:
                    self._claimed.add(found[0])
                    outcome = self._arrivals[found[0]]
                    break
                if not self._outcomes_changed.wait(max(0.0, deadline - time.monotonic())):
                    raise HarnessError(f"DONE arrived but the dispatcher reported no outcome for peer {peer}")
        return Finished(request, status, peerid, outcome)


@dataclass
class Finished:
    """One request after its DONE: what the consumer saw and what the daemon logged."""

    request: SimRequest
    status: int
    peerid: int
    outcome: Outcome

    @property
    def remote_auth(self) -> tuple[int, ...]:
        return self.request.remote_auth

    def describe(self) -> str:
        return f"status {self.status} ({errno_name(self.status) if self.status else 'ok'}): {self.outcome.line()}"

    def expect(self, status: int) -> "Finished":
        """Exactly one DONE, with this status; success also means kTLS keys were installed."""
        if self.request.done_calls != 1:
            raise HarnessError(f"{self.request.done_calls} DONE messages for one request")
        if self.status != status:
            raise HarnessError(f"expected status {status} ({errno_name(status) if status else 'ok'}), "
                               f"got {self.describe()}")
        if status == 0 and (self.request.ktls_tx is None or self.request.ktls_rx is None):
            raise HarnessError("DONE said success but no kTLS keys were installed")
        if status != 0 and self.remote_auth:
            raise HarnessError(f"a failed handshake reported remote-auth {self.remote_auth}")
        return self


def checker_for(request: SimRequest, timeout: float = 10.0) -> KtlsRecordChecker:
    """The consumer's side of the kTLS connection, keyed by what the request installed.

    It sends as the kernel would: records no larger than the TLS_TX_MAX_PAYLOAD_LEN
    the agent set, if it set one."""
    if request.ktls_tx is None or request.ktls_rx is None:
        raise HarnessError("this request installed no kTLS keys")
    request.sock.setblocking(False)
    limit = request.ktls_tx_max_payload
    return KtlsRecordChecker(request.sock, request.ktls_tx, request.ktls_rx, timeout=timeout,
                             **({"max_payload": limit} if limit is not None else {}))


@dataclass
class RoundTrip:
    """What one verified exchange proved."""

    records_sent: int
    records_received: int
    post_handshake_messages: list[int]  # skipped before the data (4 = NewSessionTicket)

    def summary(self) -> str:
        text = f"kTLS verified: {self.records_sent} records each way"
        if self.post_handshake_messages:
            text += f" (after {len(self.post_handshake_messages)} post-handshake messages)"
        return text


Exchange = Callable[[KtlsRecordChecker, bytes], bytes]


def assert_ktls_roundtrip(request: SimRequest, peer: PeerProcess | None, *, echo: bool = False,
                          rounds: int = 2, label: str = "hsd") -> RoundTrip:
    """Application data both ways under the request's kTLS keys, against the real peer (see below)."""
    return assert_records_roundtrip(checker_for(request), peer, echo=echo, rounds=rounds, label=label)


def assert_records_roundtrip(records: KtlsRecordChecker, peer: PeerProcess | None, *, echo: bool = False,
                             rounds: int = 2, label: str = "hsd") -> RoundTrip:
    """Application data both ways through this record checker, against the real peer.

    echo=True: the peer sends back what it received (gnutls-serv --echo), so
    each line proves both directions.  Otherwise the peer is a tool that prints
    what it gets and sends its stdin lines (openssl s_server/s_client,
    gnutls-cli).  Records the peer sent first (NewSessionTicket) are decrypted
    and skipped: the RX sequence number must already account for them."""
    for index in range(rounds):
        ours = f"{label}-to-peer-{index}-{time.monotonic_ns()}".encode()
        records.send(ours + b"\n")
        if echo:
            got = records.recv_until(b"\n")
            if not got.endswith(ours + b"\n"):
                raise HarnessError(f"the peer echoed {got!r}, not {ours!r}")
            continue
        if peer is None:
            raise HarnessError("a non-echoing exchange needs the peer process")
        try:
            peer.wait_for(ours.decode(), timeout=10)
        except PeerError as exc:
            raise HarnessError(f"the peer never decrypted our record: {exc}") from None
        theirs = f"peer-to-{label}-{index}".encode()
        peer.send_line(theirs)
        got = records.recv_until(b"\n")
        if theirs not in got:
            raise HarnessError(f"expected {theirs!r} from the peer, got {got!r}")
    return RoundTrip(rounds, rounds, list(records.handshake_messages))


def assert_ktls_pair(client: SimRequest, server: SimRequest, rounds: int = 2) -> RoundTrip:
    """Both ends of one connection are hsd: each end's kTLS keys must open the other's records."""
    return assert_records_pair(checker_for(client), checker_for(server), rounds)


def assert_records_pair(a: KtlsRecordChecker, b: KtlsRecordChecker, rounds: int = 2) -> RoundTrip:
    """Lines a -> b and b -> a: each checker's keys must open the other's records."""
    for index in range(rounds):
        for sender, receiver, what in ((a, b, b"client->server"), (b, a, b"server->client")):
            line = what + b" %d\n" % index
            sender.send(line)
            got = receiver.recv_until(b"\n")
            if got != line:
                raise HarnessError(f"sent {line!r}, the other end read {got!r}")
    return RoundTrip(rounds, rounds, list(a.handshake_messages) + list(b.handshake_messages))


__all__ = ["DaemonHarness", "Finished", "HarnessError", "RoundTrip", "assert_ktls_roundtrip", "assert_ktls_pair",
           "assert_records_pair", "assert_records_roundtrip", "checker_for"]
