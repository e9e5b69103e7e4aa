"""The accept/done cycle through the kernel simulator: one DONE per request, whatever happens.

These use small in-test plugins (registered exactly like third-party ones) so the
dispatcher's guarantees are checked independently of any TLS library; the interop
matrix with real TLS peers lives in test_interop.py.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time

import pytest

from hsd.config import Config
from hsd.dispatcher import Dispatcher, Outcome
from hsd.errors import PeerRejected
from hsd.hookspecs import BackendInfo, Mode, hookimpl
from hsd.plugins import PluginHost
from hsd.session import Session
from hsd.simulator import Simulator


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
        if ctx.backend != self.name:
            return None
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
