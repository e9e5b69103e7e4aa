"""The kernel simulator reproduces net/handshake: driven through SimChannel and through raw netlink bytes.

Consumer sockets are real TCP connections on loopback; the fds handed over are
checked to be those very sockets by sending data through them.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from hsd import keyring
from hsd import protocol as p
from hsd.channel import OVERRUN
from hsd.errors import KtlsError
from hsd.ktls import SOL_TLS, TCP_ULP, TLS_RX, TLS_TX, CryptoInfo, tls13_crypto_info
from hsd.sim_channel import SIMCALL_ADD_MEMBERSHIP, SIMCALL_ATTR_GROUP, SimChannel, simcall
from hsd_kit.simulator import Simulator

# ---------------------------------------------------------------- helpers


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(pending_max=4) as simulator:
        yield simulator


@pytest.fixture
def channel(sim: Simulator) -> Iterator[SimChannel]:
    ch = sim.channel()
    yield ch
    ch.close()


@pytest.fixture
def tcp_pair() -> Iterator:
    """Factory of connected loopback TCP pairs (consumer end, remote peer end), closed afterwards."""
    made: list[socket.socket] = []

    def make() -> tuple[socket.socket, socket.socket]:
        with socket.create_server(("127.0.0.1", 0)) as srv:
            consumer = socket.create_connection(srv.getsockname())
            remote, _ = srv.accept()
        made.extend((consumer, remote))
        return consumer, remote

    yield make
    for s in made:
        s.close()


class RawAgent:
    """A bare simulated netlink socket speaking bytes: what pyroute2 or tlshd would send."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(address)
        self.sock.settimeout(5)
        self.seq = 100
        reply = self.request(p.encode_getfamily(p.FAMILY_NAME, self.next_seq()))[0]
        [msg] = p.split_messages(reply)
        self.port = msg.pid
        self.family = p.decode_newfamily(msg)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def request(self, data: bytes, fd: int | None = None) -> tuple[bytes, list[int]]:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []
        self.sock.sendmsg([data], anc)
        return self.recv()

    def recv(self) -> tuple[bytes, list[int]]:
        data, ancdata, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(16))
        fds = array.array("i")
        for level, kind, blob in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(blob[: len(blob) - len(blob) % 4])
        return data, list(fds)

    def join(self) -> None:
        ack, _ = self.request(simcall(SIMCALL_ADD_MEMBERSHIP, self.next_seq(),
                                      p.attr_u32(SIMCALL_ATTR_GROUP, self.family.groups["tlshd"])))
        assert p.split_messages(ack)[0].error == 0

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(sim: Simulator) -> Iterator[RawAgent]:
    agent = RawAgent(sim.address)
    yield agent
    agent.close()


def nla(atype: int, payload: bytes) -> bytes:
    """Attribute encoder written independently of hsd.protocol, for byte-level expectations."""
    length = 4 + len(payload)
    return struct.pack("=HH", length, atype) + payload + b"\0" * (-length % 4)


def u32(value: int) -> bytes:
    return struct.pack("=I", value)


def error_of(reply: bytes) -> tuple[int, bytes]:
    """(positive errno, echoed bytes) of an NLMSG_ERROR reply."""
    length, mtype, _, _, _ = struct.unpack_from("=IHHII", reply)
    assert mtype == p.NLMSG_ERROR and length == len(reply)
    (err,) = struct.unpack_from("=i", reply, 16)
    return -err, reply[20:]


def done_events() -> tuple[list, threading.Event, callable]:
    calls: list = []
    fired = threading.Event()

    def cb(status: int, peerid: int) -> None:
        calls.append((status, peerid, threading.current_thread().name))
        fired.set()

    return calls, fired, cb


def accept_one(channel: SimChannel) -> p.HandshakeRequest:
    assert channel.wait_ready(5) != 0
    req = channel.accept()
    assert req is not None
    return req


def tls13_info(seq: int = 0) -> CryptoInfo:
    return tls13_crypto_info("TLS_AES_128_GCM_SHA256", bytes(range(32)), seq)


# ---------------------------------------------------------------- family and submit


def test_getfamily_resolves_family_and_groups_and_unknown_name_is_enoent(sim, raw):
    assert raw.family.name == "handshake" and raw.family.version == 1
    assert raw.family.id == sim.family.id and set(raw.family.groups) == {"none", "tlshd"}
    assert raw.port > 0
    query = p.encode_getfamily("nfsd-nonexistent", raw.next_seq())
    reply, _ = raw.request(query)
    err, echoed = error_of(reply)
    assert err == errno.ENOENT and echoed == query  # the whole request comes back


def test_submit_without_listener_is_esrch_and_calls_nothing(sim, raw, tcp_pair):
    consumer, _ = tcp_pair()
    calls, _, cb = done_events()
    with pytest.raises(OSError) as exc:  # raw agent resolved the family but joined no group
        sim.client_hello_anon(consumer, done=cb)
    assert exc.value.errno == errno.ESRCH
    assert sim.pending_count == 0 and calls == []
    raw.join()
    assert sim.client_hello_anon(consumer) is not None  # the failed submit left nothing behind


def test_ready_is_multicast_once_per_request_to_every_listener(sim, channel, raw, tcp_pair):
    raw.join()
    other = sim.channel()
    try:
        for _ in range(3):
            sim.client_hello_anon(tcp_pair()[0])
        for ch in (channel, other):
            got = 0
            while got < 3:
                n = ch.wait_ready(5)
                assert n > 0
                got += n
            assert got == 3 and ch.wait_ready(0.05) == 0
        for _ in range(3):
            data, fds = raw.recv()
            body = bytes([p.Cmd.READY, 1, 0, 0]) + nla(p.AcceptAttr.HANDLER_CLASS, u32(1))
            assert fds == [] and data == struct.pack("=IHHII", 16 + len(body), sim.family.id, 0, 0, 0) + body
        assert sim.stats.ready_sent == 3
    finally:
        other.close()


def test_accept_is_fifo_and_eagain_when_empty(sim, channel, tcp_pair):
    for name in ("first", "second", "third"):
        sim.client_hello_anon(tcp_pair()[0], peername=name)
    assert sim.pending_count == 3
    accepted = [channel.accept() for _ in range(3)]
    assert [hr.peername for hr in accepted] == ["first", "second", "third"]
    for hr in accepted:
        os.close(hr.sockfd)
    assert channel.accept() is None
    assert sim.pending_count == 0 and sim.stats.accept_eagain == 1


def test_pending_cap_gives_eagain_until_a_request_is_accepted(sim, channel, tcp_pair):
    for _ in range(4):
        sim.client_hello_anon(tcp_pair()[0])
    with pytest.raises(OSError) as exc:
        sim.client_hello_anon(tcp_pair()[0])
    assert exc.value.errno == errno.EAGAIN
    os.close(channel.accept().sockfd)
    sim.client_hello_anon(tcp_pair()[0])
    assert sim.pending_count == 4


def test_default_pending_cap_follows_the_kernel_formula():
    pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    expected = min(50, max(3, pages // (25 * page)))
    with Simulator() as sim:
        assert sim.pending_max == expected


def test_second_request_on_a_socket_is_ebusy_even_after_done(sim, channel, tcp_pair):
    consumer, _ = tcp_pair()
    req = sim.server_hello_x509(consumer)
    with pytest.raises(OSError) as exc:
        sim.client_hello_anon(consumer)
    assert exc.value.errno == errno.EBUSY
    hr = accept_one(channel)
    assert channel.done(p.Done(hr.sockfd, 0)) == 0
    assert req.wait(5) == (0, 0)
    with pytest.raises(OSError) as exc:
        sim.server_hello_x509(consumer)
    assert exc.value.errno == errno.EBUSY
    os.close(hr.sockfd)


def test_psk_client_needs_one_to_five_identities(sim, channel, tcp_pair):
    consumer, _ = tcp_pair()
    for ids in ([], [1, 2, 3, 4, 5, 6]):
        with pytest.raises(OSError) as exc:
            sim.client_hello_psk(consumer, ids)
        assert exc.value.errno == errno.EINVAL
    assert sim.pending_count == 0


# ---------------------------------------------------------------- ACCEPT reply, byte level


def accept_raw(raw: RawAgent, family_id: int) -> tuple[bytes, list[int], int]:
    seq = raw.next_seq()
    data, fds = raw.request(p.encode_accept(family_id, seq))
    return data, fds, seq


def expected_reply(family_id: int, seq: int, pid: int, attrs: bytes) -> bytes:
    body = bytes([p.Cmd.ACCEPT, 1, 0, 0]) + attrs
    return struct.pack("=IHHII", 16 + len(body), family_id, 0, seq, pid) + body


def test_accept_reply_psk_client_bytes_and_the_fd_is_the_consumer_socket(sim, channel, raw, tcp_pair):
    ring = keyring.add_key("keyring", f"hsd-sim-test-{os.getpid()}", b"", keyring.KEY_SPEC_PROCESS_KEYRING)
    consumer, remote = tcp_pair()
    ids = [0x11, 0x22, 0x33, 0x44, 0x55]
    sim.client_hello_psk(consumer, ids, peername="nvme.example", timeout_ms=10000, keyring=ring)
    data, fds, seq = accept_raw(raw, sim.family.id)
    assert len(fds) == 1
    attrs = (nla(1, struct.pack("=i", consumer.fileno())) + nla(3, u32(1)) + nla(8, b"nvme.example\0")
             + nla(4, u32(10000)) + nla(9, u32(ring)) + nla(5, u32(2)) + b"".join(nla(6, u32(i)) for i in ids))
    assert data == expected_reply(sim.family.id, seq, raw.port, attrs)
    handed = socket.socket(fileno=fds[0])
    try:
        assert os.fstat(handed.fileno()).st_ino == os.fstat(consumer.fileno()).st_ino
        handed.sendall(b"through the handed-over fd")
        remote.settimeout(5)
        assert remote.recv(100) == b"through the handed-over fd"
    finally:
        handed.close()


def test_accept_reply_x509_server_has_the_certificate_nest_last(sim, channel, raw, tcp_pair):
    consumer, _ = tcp_pair()
    sim.server_hello_x509(consumer, cert=0x101, privkey=0x202)
    data, fds, seq = accept_raw(raw, sim.family.id)
    os.close(fds[0])
    nest = nla(1, struct.pack("=i", 0x101)) + nla(2, struct.pack("=i", 0x202))
    attrs = (nla(1, struct.pack("=i", consumer.fileno())) + nla(3, u32(2)) + nla(5, u32(3))
             + nla(7 | 0x8000, nest))
    assert data == expected_reply(sim.family.id, seq, raw.port, attrs)


def test_accept_reply_without_optional_attrs_and_server_psk_sends_identity_zero(sim, channel, raw, tcp_pair):
    a, _ = tcp_pair()
    b, _ = tcp_pair()
    sim.client_hello_x509(a)  # no cert: no nest, no peername, no timeout, no keyring
    sim.server_hello_psk(b)
    data, fds, seq = accept_raw(raw, sim.family.id)
    os.close(fds[0])
    assert data == expected_reply(sim.family.id, seq, raw.port,
                                  nla(1, struct.pack("=i", a.fileno())) + nla(3, u32(1)) + nla(5, u32(3)))
    data, fds, seq = accept_raw(raw, sim.family.id)
    os.close(fds[0])
    assert data == expected_reply(sim.family.id, seq, raw.port,
                                  nla(1, struct.pack("=i", b.fileno())) + nla(3, u32(2)) + nla(5, u32(2))
                                  + nla(6, u32(0)))


def test_channel_accept_installs_the_fd_cloexec_and_reports_it(sim, channel, tcp_pair):
    consumer, remote = tcp_pair()
    sim.client_hello_anon(consumer, peername="server.example", timeout_ms=1234)
    hr = accept_one(channel)
    assert (hr.message_type, hr.auth_mode, hr.peername, hr.timeout_ms) == (
        p.MessageType.CLIENTHELLO, p.AuthMode.UNAUTH, "server.example", 1234)
    assert hr.sockfd != consumer.fileno()
    assert fcntl.fcntl(hr.sockfd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    os.write(hr.sockfd, b"ping")
    remote.settimeout(5)
    assert remote.recv(10) == b"ping"
    os.close(hr.sockfd)


def test_accept_with_a_keyring_links_it_and_a_bad_keyring_fails_the_request(sim, channel, tcp_pair):
    ring = keyring.add_key("keyring", f"hsd-sim-link-{os.getpid()}", b"", keyring.KEY_SPEC_USER_KEYRING)
    # like a consumer's keyring (e.g. .nvme): linkable by its owner, whether or not this test
    # process still possesses the user keyring (other tests may have changed the session keyring)
    try:
        keyring.set_perm(ring, 0x3F3F0000)
        good, _ = tcp_pair()
        sim.client_hello_psk(good, [1], keyring=ring)
        hr = accept_one(channel)
        assert hr.keyring == ring
        process = keyring.keyring_id(keyring.KEY_SPEC_PROCESS_KEYRING)
        assert keyring.search(process, "keyring", f"hsd-sim-link-{os.getpid()}") == ring
        os.close(hr.sockfd)
    finally:  # nothing of this test stays in the user keyring, also when it fails
        keyring.invalidate(ring)
    bad, _ = tcp_pair()
    req = sim.client_hello_psk(bad, [1], keyring=0x7FFFFFF0)  # no such key
    with pytest.raises(OSError) as exc:
        channel.accept()
    assert exc.value.errno == errno.ENOKEY
    assert req.wait(5) == (errno.EIO, 0)


# ---------------------------------------------------------------- malformed ACCEPT requests


@pytest.mark.parametrize("attrs, expected", [
    (nla(2, u32(1)) + nla(9, u32(5)), errno.EINVAL),        # attribute ACCEPT does not take
    (nla(2, u32(1)) + nla(30, u32(5)), errno.EINVAL),       # unknown attribute
    (nla(2, struct.pack("=H", 1)), errno.EINVAL),           # u32 of the wrong size
    (b"", errno.EINVAL),                                    # no handler class
    (nla(2, u32(3)), errno.EINVAL),                         # above HANDSHAKE_HANDLER_CLASS_MAX
    (nla(2, u32(0)), errno.EAGAIN),                         # class none: never has requests
])
def test_malformed_accept_is_rejected_with_the_request_echoed(sim, channel, raw, tcp_pair, attrs, expected):
    sim.client_hello_anon(tcp_pair()[0])
    body = bytes([p.Cmd.ACCEPT, 1, 0, 0]) + attrs
    request = struct.pack("=IHHII", 16 + len(body), sim.family.id, p.NLM_F_REQUEST, raw.next_seq(), 0) + body
    reply, fds = raw.request(request)
    assert fds == []
    assert error_of(reply) == (expected, request)
    assert sim.pending_count == 1  # nothing was dequeued


def test_unknown_command_and_unknown_family_are_refused(sim, raw):
    bogus_cmd = p.GenlMessage(sim.family.id, p.NLM_F_REQUEST, raw.next_seq(), 0, 9, 1).encode()
    assert error_of(raw.request(bogus_cmd)[0])[0] == errno.EOPNOTSUPP
    bogus_family = p.GenlMessage(sim.family.id + 1, p.NLM_F_REQUEST, raw.next_seq(), 0, 2, 1).encode()
    assert error_of(raw.request(bogus_family)[0]) == (errno.ENOENT, bogus_family)


# ---------------------------------------------------------------- DONE


def test_done_reaches_the_consumer_once_from_the_simulator_thread(sim, channel, tcp_pair):
    calls, fired, cb = done_events()
    consumer, _ = tcp_pair()
    req = sim.client_hello_x509(consumer, done=cb)
    hr = accept_one(channel)
    assert req.accepted
    assert channel.done(p.Done(hr.sockfd, 0, (0xAB,))) == 0
    assert fired.wait(5) and req.wait(5) == (0, 0xAB)
    assert channel.done(p.Done(hr.sockfd, errno.EACCES)) == 0  # duplicate: accepted and ignored
    assert calls == [(0, 0xAB, "hsd-simulator")]
    assert (req.status, req.done_calls, req.remote_auth) == (0, 2, (0xAB,))
    os.close(hr.sockfd)


def test_done_keeps_at_most_five_remote_auth_and_the_first_is_the_peerid(sim, channel, tcp_pair):
    consumer, _ = tcp_pair()
    req = sim.client_hello_x509(consumer)
    hr = accept_one(channel)
    assert channel.done(p.Done(hr.sockfd, 0, (11, 12, 13, 14, 15, 16, 17))) == 0
    assert req.wait(5) == (0, 11)
    assert req.remote_auth == (11, 12, 13, 14, 15)
    os.close(hr.sockfd)


def test_done_errors_ebadf_enotsock_ebusy(sim, channel, tcp_pair):
    consumer, _ = tcp_pair()
    req = sim.client_hello_anon(consumer)
    hr = accept_one(channel)
    r, w = os.pipe()
    closed_fd = os.dup(w)
    os.close(closed_fd)
    stranger, _ = tcp_pair()
    try:
        assert channel.done(p.Done(closed_fd, 0)) == errno.EBADF
        assert channel.done(p.Done(-1, 0)) == errno.EBADF
        assert channel.done(p.Done(r, 0)) == errno.ENOTSOCK
        assert channel.done(p.Done(stranger.fileno(), 0)) == errno.EBUSY
        assert req.status is None and req.done_calls == 0
        assert channel.done(p.Done(hr.sockfd, errno.ETIMEDOUT)) == 0
        assert req.wait(5) == (errno.ETIMEDOUT, 0)
    finally:
        os.close(r)
        os.close(w)
        os.close(hr.sockfd)


def test_done_without_status_completes_with_eio(sim, channel, tcp_pair):
    consumer, _ = tcp_pair()
    req = sim.server_hello_psk(consumer, peerid=5)
    hr = accept_one(channel)
    assert channel.done(p.Done(hr.sockfd, None)) == 0
    assert req.wait(5) == (errno.EIO, 0)
    os.close(hr.sockfd)


def test_done_with_an_unknown_attribute_is_einval_echoed(sim, channel, raw, tcp_pair):
    consumer, _ = tcp_pair()
    req = sim.client_hello_anon(consumer)
    _, fds, _ = accept_raw(raw, sim.family.id)
    body = bytes([p.Cmd.DONE, 1, 0, 0]) + nla(1, u32(0)) + nla(2, struct.pack("=i", fds[0])) + nla(4, u32(1))
    request = struct.pack("=IHHII", 16 + len(body), sim.family.id, p.NLM_F_REQUEST | p.NLM_F_ACK,
                          raw.next_seq(), 0) + body
    reply, _ = raw.request(request, fds[0])
    assert error_of(reply) == (errno.EINVAL, request)
    assert req.status is None
    os.close(fds[0])


# ---------------------------------------------------------------- cancel


def test_cancel_pending_removes_it_without_callback(sim, channel, tcp_pair):
    calls, _, cb = done_events()
    consumer, _ = tcp_pair()
    req = sim.client_hello_anon(consumer, done=cb)
    assert sim.cancel(consumer) is True
    assert sim.pending_count == 0
    assert channel.accept() is None
    assert sim.cancel(consumer) is False
    with pytest.raises(TimeoutError):
        req.wait(0.05)
    assert calls == [] and req.status is None


def test_cancel_accepted_makes_a_later_done_a_no_op(sim, channel, tcp_pair):
    calls, _, cb = done_events()
    consumer, _ = tcp_pair()
    req = sim.client_hello_anon(consumer, done=cb)
    hr = accept_one(channel)
    assert sim.cancel(consumer) is True
    assert channel.done(p.Done(hr.sockfd, 0, (9,))) == 0
    assert calls == [] and req.status is None and req.done_calls == 1
    assert sim.cancel(consumer) is False
    os.close(hr.sockfd)


def test_cancel_after_done_is_false(sim, channel, tcp_pair):
    consumer, _ = tcp_pair()
    req = sim.client_hello_anon(consumer)
    hr = accept_one(channel)
    channel.done(p.Done(hr.sockfd, 0))
    req.wait(5)
    assert sim.cancel(consumer) is False
    os.close(hr.sockfd)


# ---------------------------------------------------------------- kTLS setsockopt emulation


def test_ktls_install_records_both_directions_on_the_request(sim, channel, tcp_pair):
    consumer, _ = tcp_pair()
    req = sim.client_hello_anon(consumer)
    hr = accept_one(channel)
    handed = socket.socket(fileno=hr.sockfd)
    try:
        tx, rx = tls13_info(0), tls13_info(7)
        channel.ktls.install(handed, tx, rx)
        assert req.ktls_tx == tx and req.ktls_rx == rx
        with pytest.raises(KtlsError, match="TLS_TX.*busy"):  # keys are set once (no KeyUpdate here)
            channel.ktls.install(handed, tx, rx)
    finally:
        handed.close()


class FdOnly:
    """Anything with a fileno, like a pipe end, to hand where a socket is expected."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


def errno_of_setsockopt(channel: SimChannel, sock, level: int, opt: int, value: bytes) -> int:
    try:
        channel.ktls.setsockopt(sock, level, opt, value)
    except OSError as exc:
        return exc.errno
    return 0


def test_ktls_setsockopt_validation_like_the_kernel(sim, channel, tcp_pair):
    consumer, _ = tcp_pair()
    info = tls13_info()
    unconnected = socket.socket()
    unix_a, unix_b = socket.socketpair()
    r, w = os.pipe()
    try:
        assert errno_of_setsockopt(channel, unconnected, socket.IPPROTO_TCP, TCP_ULP, b"tls") == errno.ENOTCONN
        assert errno_of_setsockopt(channel, unix_a, socket.IPPROTO_TCP, TCP_ULP, b"tls") == errno.EOPNOTSUPP
        assert errno_of_setsockopt(channel, FdOnly(r), socket.IPPROTO_TCP, TCP_ULP, b"tls") == errno.ENOTSOCK
        assert errno_of_setsockopt(channel, consumer, SOL_TLS, TLS_TX, info.pack()) == errno.ENOPROTOOPT
        assert errno_of_setsockopt(channel, consumer, socket.IPPROTO_TCP, TCP_ULP, b"bogus") == errno.ENOENT
        assert errno_of_setsockopt(channel, consumer, socket.IPPROTO_TCP, TCP_ULP, b"tls") == 0
        assert errno_of_setsockopt(channel, consumer, socket.IPPROTO_TCP, TCP_ULP, b"tls") == errno.EEXIST
        assert errno_of_setsockopt(channel, consumer, SOL_TLS, TLS_TX, info.pack()[:-1]) == errno.EINVAL
        assert errno_of_setsockopt(channel, consumer, SOL_TLS, TLS_TX, b"\x04\x03\x63\x00" + bytes(36)) == errno.EINVAL
        assert errno_of_setsockopt(channel, consumer, SOL_TLS, TLS_TX, info.pack()) == 0
        assert errno_of_setsockopt(channel, consumer, SOL_TLS, TLS_TX, info.pack()) == errno.EBUSY
        chacha = tls13_crypto_info("TLS_CHACHA20_POLY1305_SHA256", bytes(32), 0)
        assert errno_of_setsockopt(channel, consumer, SOL_TLS, TLS_RX, chacha.pack()) == errno.EINVAL
        assert errno_of_setsockopt(channel, consumer, SOL_TLS, TLS_RX, info.pack()) == 0
    finally:
        os.close(r)
        os.close(w)
        unconnected.close()
        unix_a.close()
        unix_b.close()


def one_by_one(channel: SimChannel, sock, calls) -> tuple[int, int]:
    """What the separate syscalls give: how many succeed before the first failure, and its errno."""
    for index, (level, opt, value) in enumerate(calls):
        err = errno_of_setsockopt(channel, sock, level, opt, value)
        if err:
            return index, err
    return len(calls), 0


def test_batched_setsockopts_stop_at_the_first_failure_with_the_errno_the_separate_calls_give(sim, channel,
                                                                                              tcp_pair):
    info = tls13_info()
    chacha = tls13_crypto_info("TLS_CHACHA20_POLY1305_SHA256", bytes(32), 0)
    ulp = (socket.IPPROTO_TCP, TCP_ULP, b"tls")
    cases = {  # name: (calls made first, one by one; the batch)
        "all succeed": ([], [ulp, (SOL_TLS, TLS_TX, info.pack()), (SOL_TLS, TLS_RX, info.pack())]),
        "ULP already there": ([ulp], [ulp, (SOL_TLS, TLS_TX, info.pack())]),
        "TX before the ULP": ([], [(SOL_TLS, TLS_TX, info.pack()), ulp]),
        "RX cipher differs from TX": ([], [ulp, (SOL_TLS, TLS_TX, info.pack()), (SOL_TLS, TLS_RX, chacha.pack()),
                                           (SOL_TLS, TLS_RX, info.pack())]),
        "TX twice": ([], [ulp, (SOL_TLS, TLS_TX, info.pack()), (SOL_TLS, TLS_TX, info.pack())]),
        "short struct": ([], [ulp, (SOL_TLS, TLS_TX, info.pack()[:-1])]),
    }
    for name, (before, calls) in cases.items():
        batched, separate = tcp_pair()[0], tcp_pair()[0]
        for sock in (batched, separate):
            assert one_by_one(channel, sock, before)[1] == 0
        expected = one_by_one(channel, separate, calls)
        assert channel.setsockopts(batched.fileno(), calls) == expected, name
        # the state each left behind is the same: a further TX is refused (or not) alike
        again = [(SOL_TLS, TLS_TX, info.pack())]
        assert channel.setsockopts(batched.fileno(), again) == one_by_one(channel, separate, again), name
    unconnected = socket.socket()
    try:
        assert channel.setsockopts(unconnected.fileno(), [ulp]) == (0, errno.ENOTCONN)
    finally:
        unconnected.close()


def test_ktls_install_is_one_round_trip_and_fails_like_the_separate_calls(sim, channel, tcp_pair, monkeypatch):
    sent = []
    real = channel._req.transact
    monkeypatch.setattr(channel._req, "transact", lambda data, fd=None: sent.append(data) or real(data, fd))
    consumer = tcp_pair()[0]
    channel.ktls.install(consumer, tls13_info(), tls13_info())
    assert len(sent) == 1 and isinstance(sent[0], bytearray) and not any(sent[0])  # the keys' copy is zeroed
    with pytest.raises(KtlsError, match="kernel refused TLS_TX .*Device or resource busy"):  # EBUSY, as one by one
        channel.ktls.install(consumer, tls13_info(), tls13_info())
    assert len(sent) == 3  # EEXIST on the ULP is tolerated: TX and RX go again, TX fails
    fresh = tcp_pair()[0]
    assert one_by_one(channel, fresh, [(socket.IPPROTO_TCP, TCP_ULP, b"tls")]) == (1, 0)
    channel.ktls.install(fresh, tls13_info(), tls13_info())  # the ULP was attached already: still installs


def test_ktls_install_failure_is_a_ktls_error_with_the_reason(sim, channel):
    unconnected = socket.socket()
    try:
        with pytest.raises(KtlsError, match="tls ULP.*connected"):
            channel.ktls.install(unconnected, tls13_info(), tls13_info())
    finally:
        unconnected.close()


# ---------------------------------------------------------------- fault injection


def test_mangled_accept_reply_names_the_received_fd(sim, channel, tcp_pair):
    consumer, remote = tcp_pair()
    req = sim.client_hello_anon(consumer, peername="x")

    def drop_sockfd(data: bytes) -> bytes:
        msg = p.split_messages(data)[0]
        kept = b"".join(p.attr(t, v) for t, v in msg.attrs() if t != p.AcceptAttr.SOCKFD)
        return p.GenlMessage(msg.type, msg.flags, msg.seq, msg.pid, msg.cmd, msg.version, kept).encode()

    sim.mangle_next_accept(drop_sockfd)
    assert channel.wait_ready(5) == 1
    with pytest.raises(p.ProtocolError, match="sockfd") as exc:
        channel.accept()
    fd = exc.value.sockfd
    assert fd is not None and os.fstat(fd).st_ino == os.fstat(consumer.fileno()).st_ino
    assert channel.done(p.Done(fd, errno.EIO)) == 0
    assert req.wait(5) == (errno.EIO, 0)
    os.close(fd)


def test_mangle_adding_a_future_attribute_is_tolerated(sim, channel, tcp_pair):
    def add_future(data: bytes) -> bytes:
        body = data + p.attr(40, b"future")
        return struct.pack("=I", len(body)) + body[4:]

    sim.mangle_next_accept(add_future)
    sim.client_hello_anon(tcp_pair()[0])
    sim.client_hello_anon(tcp_pair()[0])
    first, second = channel.accept(), channel.accept()
    assert first.unknown_attrs == (40,)
    assert second.unknown_attrs == ()  # only the next reply was rewritten
    os.close(first.sockfd)
    os.close(second.sockfd)


def test_dropped_ready_is_reported_as_overrun_and_the_queue_drains(sim, channel, tcp_pair):
    sim.drop_ready(2)
    for _ in range(3):
        sim.client_hello_anon(tcp_pair()[0])
    seen = []
    while OVERRUN not in seen:
        n = channel.wait_ready(5)
        assert n != 0
        seen.append(n)
    drained = []
    while (hr := channel.accept()) is not None:
        drained.append(hr)
        os.close(hr.sockfd)
    assert len(drained) == 3
    assert sim.stats.ready_lost == 2


def test_ready_lost_to_a_full_buffer_is_reported_as_overrun():
    """An agent that does not read: READYs pile up until the socket buffer is full, then ENOBUFS."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    consumers: list[socket.socket] = []
    try:
        with Simulator(pending_max=2000) as sim:
            ch = sim.channel()
            try:
                while sim.stats.ready_lost == 0:
                    assert sim.stats.submitted < 2000, "the READY socket never filled up"
                    a, b = socket.socketpair()  # the kernel does not check the socket type at submit
                    consumers += [a, b]
                    sim.client_hello_anon(a)
                delivered = 0
                while (n := ch.wait_ready(5)) != OVERRUN:
                    assert n > 0
                    delivered += n
                assert delivered < sim.stats.submitted
            finally:
                ch.close()
    finally:
        for s in consumers:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_wait_ready_times_out_with_zero(channel):
    assert channel.wait_ready(0.05) == 0


def test_channel_sees_the_simulator_go_away(tcp_pair):
    sim = Simulator().start()
    ch = sim.channel()
    sim.stop()
    with pytest.raises(ConnectionError):
        ch.wait_ready(5)
    ch.close()
    assert not os.path.exists(sim.address)


# ---------------------------------------------------------------- hsd-sim CLI


def test_cli_serves_until_sigterm(tmp_path):
    path = str(tmp_path / "handshake.sock")
    proc = subprocess.Popen([sys.executable, "-m", "hsd_kit.simulator", "--socket", path, "--pending-max", "7"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert "listening" in first and "pending max 7" in first
        ch = SimChannel.connect(path)
        assert ch.accept() is None
        ch.close()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "joined tlshd" in out and "stopped" in out
    assert "Traceback" not in err
    assert not os.path.exists(path)


def test_cli_plays_the_consumer_and_exits_with_the_outcome(tmp_path):
    """--client-anon hands a real TCP connection to the agent (here: this test) and prints its DONE."""
    path = str(tmp_path / "handshake.sock")
    with socket.create_server(("127.0.0.1", 0)) as target:
        port = target.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "hsd_kit.simulator", "--socket", path, "--once",
                                 "--client-anon", f"127.0.0.1:{port}", "--peername", "server.example"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert "listening" in proc.stdout.readline()
            ch = SimChannel.connect(path)
            try:
                hr = accept_one(ch)
                assert hr.peername == "server.example" and hr.auth_mode == p.AuthMode.UNAUTH
                peer, _ = target.accept()
                os.write(hr.sockfd, b"hello")  # the CLI's connection really reached the target
                peer.settimeout(5)
                assert peer.recv(10) == b"hello"
                peer.close()
                assert ch.done(p.Done(hr.sockfd, 0, (42,))) == 0
                os.close(hr.sockfd)
                out, err = proc.communicate(timeout=15)
            finally:
                ch.close()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err
    assert "DONE status 0 (ok) peerid 42" in out
    assert "submit client/unauth" in out and "READY" in out and "ACCEPT port" in out


def test_cli_failure_is_one_clear_line(tmp_path):
    path = str(tmp_path / "missing-dir" / "handshake.sock")
    proc = subprocess.run([sys.executable, "-m", "hsd_kit.simulator", "--socket", path],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and path in lines[0]
