"""The accept/done cycle through the kernel simulator: one DONE per request, whatever happens.

These use small in-test plugins (registered exactly like third-party ones) so the
dispatcher's guarantees are checked independently of any TLS library; the interop
matrix with real TLS peers lives in test_interop.py.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import socket
import threading
import time
from typing import Callable

import pytest

from hsd.config import Config
from hsd.dispatcher import Dispatcher, Outcome
from hsd.errors import PeerRejected
from hsd.hookspecs import BackendInfo, Mode, hookimpl
from hsd.plugins import PluginHost
from hsd.session import Session
from hsd_kit.simulator import Simulator


class ScriptedBackend:
    """A backend whose behaviour each test chooses: return a session, raise, or hang."""

    def __init__(self, behaviour: str = "ok", name: str = "scripted") -> None:
        self.behaviour = behaviour
        self.name = name
        self.release = threading.Event()
        self.calls = 0

    @hookimpl
    def hsd_backend_info(self) -> BackendInfo:
        return BackendInfo(self.name, "1.0", frozenset({Mode("client", "unauth"), Mode("server", "x509")}))

    @hookimpl
    def hsd_handshake(self, ctx):
        self.calls += 1
        if self.behaviour == "raise":
            raise RuntimeError("plugin bug")
        if self.behaviour == "reject":
            raise PeerRejected("scripted rejection")
        if self.behaviour == "hang":
            self.release.wait(30)
            return None
        if self.behaviour == "none":
            return None
        return Session(cipher="TLS_AES_128_GCM_SHA256", tx_secret=bytearray(32), rx_secret=bytearray(b"\1" * 32),
                       group="x25519")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname())
        server, _ = srv.accept()
    return client, server


@pytest.fixture
def sim():
    with Simulator() as simulator:
        yield simulator


def run_dispatcher(sim: Simulator, backend: ScriptedBackend, config: Config | None = None, **kw):
    config = config or Config(backend=backend.name, handshake_timeout_ms=2000)
    host = PluginHost(config)
    assert host.add(backend.name, backend) is not None
    outcomes: list[Outcome] = []
    channel = sim.channel()
    dispatcher = Dispatcher(channel, host, config, on_outcome=outcomes.append, **kw)
    stop = threading.Event()
    ready = threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stop, ready.set), daemon=True)
    thread.start()
    assert ready.wait(5)

    def finish() -> None:
        stop.set()
        thread.join(15)
        assert not thread.is_alive()
        channel.close()

    return dispatcher, outcomes, finish


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_success_installs_ktls_and_sends_one_done(sim):
    backend = ScriptedBackend("ok")
    dispatcher, outcomes, finish = run_dispatcher(sim, backend)
    mine, peer = tcp_pair()
    try:
        req = sim.client_hello_anon(mine, peername="localhost", timeout_ms=5000)
        status, peerid = req.wait(10)
        assert status == 0 and peerid == 0
        assert req.done_calls == 1
        assert req.ktls_tx is not None and req.ktls_rx is not None
        assert req.ktls_tx.spec.name == "AES_GCM_128" and req.ktls_tx.rec_seq == 0
    finally:
        finish()
        mine.close(); peer.close()
    assert [o.status for o in outcomes] == [0]
    assert outcomes[0].cipher == "TLS_AES_128_GCM_SHA256"


@pytest.mark.parametrize("behaviour,status", [
    ("raise", errno.EIO), ("reject", errno.EACCES), ("none", errno.EOPNOTSUPP),
])
def test_plugin_failures_map_to_status(sim, behaviour, status):
    backend = ScriptedBackend(behaviour)
    _, outcomes, finish = run_dispatcher(sim, backend)
    mine, peer = tcp_pair()
    try:
        req = sim.client_hello_anon(mine, peername="localhost", timeout_ms=5000)
        assert req.wait(10)[0] == status
        assert req.done_calls == 1
        assert req.ktls_tx is None
    finally:
        finish()
        mine.close(); peer.close()
    assert len(outcomes) == 1 and outcomes[0].status == status


def test_unsupported_mode_gets_eopnotsupp(sim):
    backend = ScriptedBackend("ok")
    _, _, finish = run_dispatcher(sim, backend)
    mine, peer = tcp_pair()
    try:
        req = sim.client_hello_x509(mine, peername="localhost", timeout_ms=5000)  # not served
        assert req.wait(10)[0] == errno.EOPNOTSUPP
        assert req.done_calls == 1
    finally:
        finish()
        mine.close(); peer.close()


def test_hanging_plugin_is_answered_by_the_watchdog_and_others_proceed(sim):
    hanging = ScriptedBackend("hang")
    config = Config(backend="scripted", handshake_timeout_ms=300)
    _, outcomes, finish = run_dispatcher(sim, hanging, config)
    pairs = [tcp_pair() for _ in range(3)]
    try:
        reqs = [sim.client_hello_anon(a, peername="localhost", timeout_ms=300) for a, _ in pairs]
        for req in reqs:
            status, _ = req.wait(10)
            assert status == errno.ETIMEDOUT
    finally:
        hanging.release.set()
        finish()
        for a, b in pairs:
            a.close(); b.close()
    assert all(r.done_calls == 1 for r in reqs)  # the late plugin return sent no second DONE
    assert len(outcomes) == 3


def test_many_concurrent_requests_each_get_exactly_one_done(sim):
    backend = ScriptedBackend("ok")
    before = open_fds()
    _, outcomes, finish = run_dispatcher(sim, backend, max_inflight=4)
    pairs = [tcp_pair() for _ in range(20)]
    try:
        reqs = []
        for a, _ in pairs:
            while True:
                try:
                    reqs.append(sim.client_hello_anon(a, peername="localhost", timeout_ms=5000))
                    break
                except OSError as exc:  # EAGAIN: the kernel's pending cap; consumers retry
                    assert exc.errno == errno.EAGAIN
                    time.sleep(0.01)
        assert [r.wait(10)[0] for r in reqs] == [0] * 20
        assert all(r.done_calls == 1 for r in reqs)
    finally:
        finish()
        for a, b in pairs:
            a.close(); b.close()
    assert len(outcomes) == 20
    assert open_fds() <= before + 2  # the simulator's own sockets at most; no leaked request fds


def test_requests_queued_before_start_are_drained(sim):
    backend = ScriptedBackend("ok")
    # someone must listen for the submit to be accepted: an idle channel stands in for a daemon
    # that died after joining; its READYs are lost with it.
    idle = sim.channel()
    pairs = [tcp_pair() for _ in range(3)]
    reqs = [sim.client_hello_anon(a, peername="localhost", timeout_ms=5000) for a, _ in pairs]
    idle.close()
    _, _, finish = run_dispatcher(sim, backend)
    try:
        assert [r.wait(10)[0] for r in reqs] == [0, 0, 0]
    finally:
        finish()
        for a, b in pairs:
            a.close(); b.close()


def test_malformed_accept_reply_still_gets_a_done(sim):
    backend = ScriptedBackend("ok")
    # append an attribute with a wrong size for a known type (MESSAGE_TYPE as 2 bytes)
    from hsd import protocol as p

    def corrupt(data: bytes) -> bytes:
        extra = p.attr(p.AcceptAttr.TIMEOUT, b"\x01\x02")
        body = data + extra
        return len(body).to_bytes(4, "little") + body[4:]

    sim.mangle_next_accept(corrupt)
    _, outcomes, finish = run_dispatcher(sim, backend)
    mine, peer = tcp_pair()
    try:
        req = sim.client_hello_anon(mine, peername="localhost", timeout_ms=5000)
        assert req.wait(10)[0] == errno.EIO
        assert req.done_calls == 1
        # the daemon keeps serving
        mine2, peer2 = tcp_pair()
        req2 = sim.client_hello_anon(mine2, peername="localhost", timeout_ms=5000)
        assert req2.wait(10)[0] == 0
        mine2.close(); peer2.close()
    finally:
        finish()
        mine.close(); peer.close()


# ---------------------------------------------------------------- fd numbers are reused at once


class CloseHookDispatcher(Dispatcher):
    """The real dispatcher, plus a hook run right after a request's fd is closed by its worker:
    the instant at which the next ACCEPT can be handed the same fd number."""

    after_close: Callable[[int], None] = staticmethod(lambda fd: None)

    def _close_socket(self, sock, sockfd: int) -> None:
        super()._close_socket(sock, sockfd)
        self.after_close(sockfd)


class GatedAcceptChannel:
    """The simulator's channel, but once `armed`, ACCEPT waits for `gate`: the test picks its moment.

    With `reuse_fd` set, the handed-over socket is moved onto that number, as the kernel does when
    it is the lowest free one.  "Lowest free" alone is not enough for a test: any other thread of
    the process (the simulator's included) may hold that number for a moment.  F_DUPFD gives the
    lowest free number >= N atomically, so it is N exactly once N is free, and nothing is clobbered."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.ktls = inner.ktls
        self.armed = threading.Event()
        self.gate = threading.Event()
        self.reuse_fd: int | None = None

    def wait_ready(self, timeout):
        return self.inner.wait_ready(timeout)

    def accept(self):
        if self.armed.is_set():
            assert self.gate.wait(10), "the gate was never opened"
        req = self.inner.accept()
        if req is not None and self.armed.is_set() and not self.gate.is_set():
            # the dispatcher was already in an ACCEPT (draining) when the test armed the gate: hold the
            # request here instead, and move it onto the reused number below, as if it came now
            assert self.gate.wait(10), "the gate was never opened"
        if req is not None and self.reuse_fd is not None and req.sockfd != self.reuse_fd:
            req = dataclasses.replace(req, sockfd=self._move(req.sockfd, self.reuse_fd))
        return req

    @staticmethod
    def _move(fd: int, target: int) -> int:
        deadline = time.monotonic() + 5
        while True:
            moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, target)
            if moved == target or time.monotonic() > deadline:
                os.close(fd)
                return moved
            os.close(moved)
            time.sleep(0.001)

    def done(self, done):
        return self.inner.done(done)

    def close(self) -> None:
        self.inner.close()


class FdRecordingBackend:
    """first.test: waits until told, then succeeds.  second.test: says it runs, then hangs until released."""

    name = "fdrec"

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.first_running = threading.Event()
        self.first_may_return = threading.Event()
        self.second_running = threading.Event()
        self.release = threading.Event()

    @hookimpl
    def hsd_backend_info(self) -> BackendInfo:
        return BackendInfo(self.name, "1.0", frozenset({Mode("client", "unauth")}))

    @hookimpl
    def hsd_handshake(self, ctx):
        self.fds[ctx.peername] = ctx.sock.fileno()
        if ctx.peername == "first.test":
            self.first_running.set()
            assert self.first_may_return.wait(10)
            return Session(cipher="TLS_AES_128_GCM_SHA256", tx_secret=bytearray(32), rx_secret=bytearray(32))
        self.second_running.set()
        self.release.wait(30)
        return None


def test_a_request_reusing_a_just_closed_fd_keeps_its_own_watchdog_entry(sim):
    """Request 1's worker closes fd N; ACCEPT hands request 2 that same N before request 1's clean-up
    has finished.  Request 2's plugin hangs: the watchdog must still answer it (ETIMEDOUT, one DONE),
    and the in-flight count must still hold it.  (Keyed by fd, request 1's clean-up deleted request
    2's entry: no DONE until the plugin returned, and max_inflight undercounted.)"""
    backend = FdRecordingBackend()
    config = Config(backend=backend.name, handshake_timeout_ms=2000)
    host = PluginHost(config)
    assert host.add(backend.name, backend) is not None
    sim_channel = sim.channel()
    channel = GatedAcceptChannel(sim_channel)
    first_outcome = threading.Event()
    outcomes: list[Outcome] = []

    def record(outcome: Outcome) -> None:
        outcomes.append(outcome)
        first_outcome.set()

    dispatcher = CloseHookDispatcher(channel, host, config, max_inflight=4, on_outcome=record)

    def after_close(fd: int) -> None:
        if fd != backend.fds.get("first.test") or channel.gate.is_set():
            return
        channel.reuse_fd = fd  # N is free again: the next ACCEPT is handed N
        channel.gate.set()  # and it runs now
        assert backend.second_running.wait(10)  # request 2 is registered and in its plugin

    dispatcher.after_close = after_close
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stop, ready.set), daemon=True)
    thread.start()
    assert ready.wait(5)
    (one, one_peer), (two, two_peer) = tcp_pair(), tcp_pair()
    try:
        first = sim.client_hello_anon(one, peername="first.test", timeout_ms=5000)
        assert backend.first_running.wait(10)
        channel.armed.set()  # every ACCEPT from now on waits for request 1's close
        second = sim.client_hello_anon(two, peername="second.test", timeout_ms=300)
        backend.first_may_return.set()
        assert first.wait(10)[0] == 0
        assert first_outcome.wait(10)  # request 1's clean-up is over
        assert backend.fds["second.test"] == backend.fds["first.test"]  # the interleaving did happen
        assert dispatcher.inflight() == 1  # request 2 still counts against max_inflight
        assert second.wait(10)[0] == errno.ETIMEDOUT  # the watchdog answered for the hung plugin
    finally:
        backend.first_may_return.set()
        channel.gate.set()
        backend.release.set()
        stop.set()
        thread.join(15)
        channel.close()
        for sock in (one, one_peer, two, two_peer):
            sock.close()
    assert not thread.is_alive()
    assert (first.done_calls, second.done_calls) == (1, 1)
    assert dispatcher.inflight() == 0 and dispatcher.stats["watchdog"] == 1
