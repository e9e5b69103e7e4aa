"""Plugin API 2 as a plugin author meets it, and as a careless or hostile plugin would abuse it.

The host routes each request to the one backend chosen for its mode; the
core enforces the rules every backend obeys (peer name, own credentials,
which identity DONE reports) and refuses what a plugin gets wrong with a
message naming the plugin.  The plugins here are real plugins, registered
exactly as entry-point ones are, on the kernel simulator and the dispatcher.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import re
import socket
import typing
from pathlib import Path

import pytest

from hsd import context as context_mod
from hsd.config import Config
from hsd.context import Auth, HandshakeContext, Mode, Role, Settings
from hsd.hookspecs import API_VERSION, BackendInfo, hookimpl
from hsd.isolation import SECRET_FIELDS, _decode, _session_header, _encode, _result
from hsd.plugins import PluginHost
from hsd.protocol import AuthMode, MessageType
from hsd.psk import PskKey, PskOffer
from hsd.session import Session
from hsd_kit.harness import DaemonHarness

UNAUTH = frozenset({Mode("client", "unauth")})


def session(**fields: object) -> Session:
    base: dict[str, object] = dict(cipher="TLS_AES_128_GCM_SHA256", tx_secret=bytearray(32),
                                   rx_secret=bytearray(b"\1" * 32))
    base.update(fields)
    return Session(**base)  # type: ignore[arg-type]


class Greedy:
    """A backend that takes whatever it is given - no "is this mine?" filter, as API 2 allows."""

    def __init__(self, name: str, modes: frozenset[Mode] = UNAUTH, **returned: object) -> None:
        self.name, self.modes, self.returned = name, modes, returned
        self.seen: list[tuple[str, str]] = []

    @hookimpl
    def hsd_backend_info(self) -> BackendInfo:
        return BackendInfo(self.name, "1.0", self.modes)

    @hookimpl
    def hsd_handshake(self, ctx: HandshakeContext) -> Session:
        self.seen.append((ctx.backend, str(ctx.mode)))
        return session(**self.returned)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname())
        server, _ = srv.accept()
    return client, server


def one_request(harness: DaemonHarness, submit: str = "client_hello_anon", **kw: object):
    mine, theirs = tcp_pair()
    with mine, theirs:
        request = getattr(harness, submit)(mine, timeout_ms=5000, **kw)
        return harness.finish(request)


# ---------------------------------------------------------------- routing


def test_each_request_reaches_only_the_backend_chosen_for_its_mode() -> None:
    a, b = Greedy("a"), Greedy("b")
    config = Config(backend="a")
    config.backends["client.unauth"] = "b"
    with DaemonHarness(None, config, extra_plugins={"a": a, "b": b}, discover=False) as harness:
        for _ in range(3):
            one_request(harness, peername="localhost").expect(0)
    assert (a.seen, b.seen) == ([], [("b", "client/unauth")] * 3)


def test_a_mode_the_backend_does_not_claim_never_reaches_it() -> None:
    a = Greedy("a")  # claims client/unauth only
    with DaemonHarness("a", extra_plugins={"a": a}, discover=False) as harness:
        finished = one_request(harness, "client_hello_x509", peername="localhost")
    assert finished.status == errno.EOPNOTSUPP and "'a' does not serve client/x509" in finished.outcome.reason
    assert a.seen == []


class Delegating:
    """Serves client/unauth by handing the request to another backend (the documented way)."""

    def __init__(self, to: str) -> None:
        self.to = to

    @hookimpl
    def hsd_backend_info(self) -> BackendInfo:
        return BackendInfo("front", "1.0", UNAUTH)

    @hookimpl
    def hsd_handshake(self, ctx: HandshakeContext) -> Session:
        return ctx.delegate(self.to)


def test_a_backend_delegates_through_the_host_and_only_to_a_backend_that_serves_the_mode() -> None:
    behind = Greedy("behind")
    with DaemonHarness("front", extra_plugins={"front": Delegating("behind"), "behind": behind},
                       discover=False) as harness:
        one_request(harness, peername="localhost").expect(0)
    assert behind.seen == [("behind", "client/unauth")]  # it runs under its own name
    for target, reason in (("front", "delegated a request to itself"), ("nowhere", "'nowhere' is not installed")):
        with DaemonHarness("front", extra_plugins={"front": Delegating(target)}, discover=False) as harness:
            finished = one_request(harness, peername="localhost")
        assert finished.status == errno.EOPNOTSUPP and reason in finished.outcome.reason


# ---------------------------------------------------------------- the rules the core owns


def test_a_verifying_client_request_without_a_peer_name_is_refused_before_the_backend_runs() -> None:
    a = Greedy("a")
    with DaemonHarness("a", extra_plugins={"a": a}, discover=False) as harness:
        finished = one_request(harness, peername=None)
    assert finished.status == errno.EACCES and "without a peer name" in finished.outcome.reason
    assert a.seen == []


def test_a_server_request_without_our_certificate_never_reaches_the_backend() -> None:
    a = Greedy("a", frozenset({Mode("server", "x509")}))
    with DaemonHarness("a", extra_plugins={"a": a}, discover=False) as harness:
        finished = one_request(harness, "server_hello_x509")
    assert finished.status == errno.EIO and "no server certificate is configured" in finished.outcome.reason
    assert a.seen == []


def test_a_backend_cannot_choose_the_identity_done_reports() -> None:
    """remote_auth is the core's: a backend claiming serial 1234 (say, the key of another request) is EIO."""
    liar = Greedy("liar", remote_auth=(1234,))
    with DaemonHarness("liar", extra_plugins={"liar": liar}, discover=False) as harness:
        finished = one_request(harness, peername="localhost")
    assert finished.status == errno.EIO and finished.remote_auth == ()
    assert "backend 'liar' set remote_auth (1234,)" in finished.outcome.reason


def test_a_psk_session_reports_the_serial_of_the_offered_key_it_names_and_no_other() -> None:
    key = PskKey(identity=b"id-1", secret=bytearray(b"k" * 32), hash="sha256", serial=77)
    offer = PskOffer(keys=[key])
    assert offer.key_for(b"id-1") is key
    with pytest.raises(Exception, match="did not offer"):
        offer.key_for(b"id-2")
    found = PskKey(identity=b"srv", secret=bytearray(b"s" * 32), hash="sha256", serial=88)
    server = PskOffer(lookup=lambda identity: found if identity == b"srv" else None)
    assert server.lookup(b"nope") is None and server.lookup(b"srv") is found
    assert server.key_for(b"srv") is found and server.unknown() == [b"nope"]
    with pytest.raises(Exception, match="did not offer"):
        server.key_for(b"never-looked-up")  # a key the library was never given cannot be reported
    server.wipe()
    assert not any(found.secret)


# ---------------------------------------------------------------- what a plugin gives the core


class Info:
    def __init__(self, **fields: object) -> None:
        self.fields = fields

    @hookimpl
    def hsd_backend_info(self) -> BackendInfo:
        return BackendInfo(**{"name": "odd", "version": "1", "modes": UNAUTH, **self.fields})  # type: ignore[arg-type]


@pytest.mark.parametrize("fields,reason", [
    ({"api_version": 1}, "it targets plugin API 1, this hsd provides API 2 (API 2: hsd_handshake is called only"),
    ({"modes": frozenset({("client", "unauth")})}, "modes holds ('client', 'unauth'), a tuple, not a Mode"),
    ({"modes": frozenset()}, "modes is not a non-empty frozenset of Mode"),
    ({"modes": frozenset({Mode("server", "unauth")})}, "mode server/unauth is not one hsd serves"),
    ({"kind": "backnd"}, "kind 'backnd' is not one of backend, policy, observer"),
    ({"name": "two words"}, "name 'two words' is not a non-empty word"),
    ({"extra": {"n": 1}}, "extra is not a dict of str to str"),
])
def test_a_malformed_plugin_is_refused_at_load_naming_it(fields: dict, reason: str) -> None:
    host = PluginHost(Config())
    assert host.add("my-entry-point", Info(**fields)) is None
    (problem,) = host.problems
    assert problem.name == "my-entry-point" and reason in problem.reason, problem.reason
    assert "odd" not in host.infos


def test_an_api_1_plugin_is_reported_by_hsd_plugins_style_problems_and_never_called() -> None:
    class Old(Greedy):
        @hookimpl
        def hsd_backend_info(self) -> BackendInfo:
            return BackendInfo("old", "1.0", UNAUTH, api_version=1)

    old = Old("old")
    with DaemonHarness("old", extra_plugins={"old-entry": old}, discover=False) as harness:
        finished = one_request(harness, peername="localhost")
        assert [p.name for p in harness.host.problems] == ["old-entry"]
    assert finished.status == errno.EOPNOTSUPP and old.seen == []


# ---------------------------------------------------------------- the typed context and result


def test_the_context_holds_no_config_no_hook_and_no_optional_it_always_has() -> None:
    names = {f.name for f in dataclasses.fields(HandshakeContext)}
    assert {"config", "hook", "keyrings"}.isdisjoint(names)
    hints = typing.get_type_hints(HandshakeContext, vars(context_mod))
    assert all(typing.Any not in (hint, *typing.get_args(hint)) for hint in hints.values())
    for name in ("x509", "settings", "request", "sock", "deadline", "backend"):
        assert type(None) not in typing.get_args(hints[name]), name
    assert dataclasses.fields(Settings)  # what a plugin sees of the config, all of it typed


def test_modes_are_the_protocols_enums() -> None:
    assert Mode("client", "x509") == Mode(Role.CLIENT, Auth.X509) == Mode(Role.of(MessageType.CLIENTHELLO),
                                                                       Auth.of(AuthMode.X509))
    assert {role.wire for role in Role} == {MessageType.CLIENTHELLO, MessageType.SERVERHELLO}
    assert {auth.wire for auth in Auth} == {AuthMode.UNAUTH, AuthMode.X509, AuthMode.PSK}
    assert str(Mode("server", "psk")) == "server/psk" and Mode("server", "psk").key == "server.psk"
    with pytest.raises(ValueError):
        Mode("client", "x.509")


def test_every_session_field_crosses_the_isolation_pipe() -> None:
    """The frame is made from Session's own field list: a field added later crosses without an edit here."""
    original = session(tx_seq=3, rx_seq=4, group="x25519", peer_certificates=(b"\x30\x01", b"\x30\x02"),
                       psk_identity=b"NVMe0R01 h s", details={"k": "v"}, remote_auth=(9,))
    header = _session_header(original)
    assert set(header) - {"kind"} == {f.name for f in dataclasses.fields(Session)} - set(SECRET_FIELDS)
    frame = _encode(header, original.tx_secret, original.rx_secret)
    assert _decode(frame)[0] == header
    again = _result(frame, 0, False)
    for item in dataclasses.fields(Session):
        assert getattr(again, item.name) == getattr(original, item.name), item.name


def test_api_version_is_2() -> None:
    assert API_VERSION == 2


def test_a_plugin_exception_is_one_error_line_naming_the_plugin(caplog: pytest.LogCaptureFixture) -> None:
    class Buggy(Greedy):
        @hookimpl
        def hsd_handshake(self, ctx: HandshakeContext) -> Session:
            raise KeyError("oops")

    with caplog.at_level(logging.INFO, logger="hsd"), \
            DaemonHarness("buggy", extra_plugins={"buggy": Buggy("buggy")}, discover=False) as harness:
        finished = one_request(harness, peername="localhost")
    assert finished.status == errno.EIO
    assert "plugin 'buggy' raised KeyError('oops') in hsd_handshake" in finished.outcome.reason
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage().split(" (")[0] for r in errors] == ["plugin 'buggy' raised KeyError('oops') in hsd_handshake"]
    assert not any(r.exc_info for r in caplog.records if r.levelno > logging.DEBUG), "a traceback above debug level"


def test_eopnotsupp_is_called_eopnotsupp_in_the_outcome_line() -> None:
    a = Greedy("a")
    with DaemonHarness("a", extra_plugins={"a": a}, discover=False) as harness:
        finished = one_request(harness, "client_hello_x509", peername="localhost")
    line = finished.outcome.line()
    assert "status=95 (EOPNOTSUPP)" in line and "ENOTSUP)" not in line


def test_debug_logs_the_accept_the_choice_the_ktls_parameters_and_the_timings_never_a_key(
        hsd_pki, caplog: pytest.LogCaptureFixture) -> None:
    from hsd.ktls import session_crypto_info

    secret_tx, secret_rx = bytearray(range(1, 33)), bytearray(range(101, 133))
    expected = session(tx_secret=bytearray(secret_tx), rx_secret=bytearray(secret_rx))
    tx, rx = session_crypto_info(expected)
    forbidden = [bytes(b).hex() for b in (secret_tx, secret_rx, tx.key, rx.key, tx.iv, rx.iv)]
    tx.wipe(), rx.wipe()
    keyed = Greedy("keyed", tx_secret=secret_tx, rx_secret=secret_rx, tx_seq=2)
    config = Config()
    config.client.truststore = hsd_pki.ca
    with caplog.at_level(logging.DEBUG, logger="hsd"), \
            DaemonHarness("keyed", config, extra_plugins={"keyed": keyed}, discover=False) as harness:
        one_request(harness, peername="nfs.example", keyring=0).expect(0)
    lines = [record.getMessage() for record in caplog.records]
    text = "\n".join(lines)
    assert re.search(r"ACCEPT fd=\d+ message_type=CLIENTHELLO auth_mode=UNAUTH peername='nfs.example' "
                     r"timeout=5000ms peer_identities=\[\] certificate=0 privkey=0 keyring=0", text), text
    assert re.search(r"fd \d+: client/unauth -> backend keyed; certificate none \(0 in chain\), private key none, "
                     rf"trust 1 anchors from {re.escape(hsd_pki.ca)}, 0 CRLs, verify_peer=True", text), text
    assert re.search(r"kTLS installed on fd \d+: TX CryptoInfo\(AES_GCM_128, version=0x304, rec_seq=2\), "
                     r"RX CryptoInfo\(AES_GCM_128, version=0x304, rec_seq=0\)", text), text
    timing = next(line for line in lines if " timings: " in line)
    assert re.search(r"context [\d.]+ms handshake [\d.]+ms ktls [\d.]+ms identity [\d.]+ms done [\d.]+ms", timing)
    for secret in forbidden:  # neither the traffic secrets nor the derived kTLS keys and IVs, in hex
        assert secret not in text.replace(":", "").lower()


def test_the_operators_guide_shows_the_debug_lines_as_they_are_logged() -> None:
    """The guide's sample of a handshake at debug level: each line has the shape the dispatcher logs (above)."""
    guide = (Path(__file__).resolve().parents[1] / "docs" / "operators-guide.md").read_text(encoding="utf-8")
    sample = guide.split("or `--debug` adds, per request,", 1)[1].split("```", 2)[1].strip().splitlines()
    shapes = [r"ACCEPT fd=\d+ message_type=\w+ auth_mode=\w+ peername='[^']*' timeout=\d+ms peer_identities=\[.*\] "
              r"certificate=\d+ privkey=\d+ keyring=\d+$",
              r"fd \d+: (client|server)/(unauth|x509|psk) -> backend \w+; certificate .+, private key .+, trust ",
              r"kTLS installed on fd \d+: TX CryptoInfo\(\w+, version=0x304, rec_seq=\d+\), RX CryptoInfo\(",
              r"fd \d+ timings: context [\d.]+ms handshake [\d.]+ms ktls [\d.]+ms identity [\d.]+ms done [\d.]+ms; "
              r"remote-auth \d+"]
    assert len(sample) == len(shapes), sample
    for line, shape in zip(sample, shapes):
        assert re.match(shape, line), (shape, line)


def test_without_debug_a_handshake_logs_only_its_outcome_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="hsd"), \
            DaemonHarness("a", extra_plugins={"a": Greedy("a")}, discover=False) as harness:
        one_request(harness, peername="localhost").expect(0)
    handshake_lines = [r.getMessage() for r in caplog.records if r.name == "hsd" and "fd" in r.getMessage()]
    assert not any("ACCEPT" in line or "timings" in line for line in handshake_lines)


class Observer:
    def __init__(self, name: str, fail: bool) -> None:
        self.name, self.fail, self.seen = name, fail, []

    @hookimpl
    def hsd_backend_info(self) -> BackendInfo:
        return BackendInfo(self.name, "1.0", frozenset(), kind="observer")

    @hookimpl
    def hsd_handshake_done(self, ctx: HandshakeContext, status: int, session: Session | None) -> None:
        self.seen.append(status)
        if self.fail:
            raise ValueError("observer bug")


def test_an_observer_that_raises_is_named_and_the_other_observers_still_run(caplog) -> None:
    first, second = Observer("a-first", True), Observer("b-second", False)
    plugins = {"a": Greedy("a"), "b-second": second, "a-first": first}  # pluggy would call a-first first
    with caplog.at_level(logging.INFO, logger="hsd"), \
            DaemonHarness("a", extra_plugins=plugins, discover=False) as harness:
        one_request(harness, peername="localhost").expect(0)
    assert first.seen == [0] and second.seen == [0]
    assert any("plugin 'a-first' raised ValueError('observer bug') in hsd_handshake_done" in r.getMessage()
               for r in caplog.records if r.levelno == logging.ERROR)


@pytest.mark.parametrize("listed", ["entry-name", "info-name"])
def test_backend_selection_uses_backendinfo_name_and_disable_takes_either_name(listed: str) -> None:
    class Named(Greedy):
        @hookimpl
        def hsd_backend_info(self) -> BackendInfo:
            return BackendInfo("info-name", "1.0", UNAUTH)

    plugin = Named("info-name")
    with DaemonHarness("info-name", extra_plugins={"entry-name": plugin}, discover=False) as harness:
        one_request(harness, peername="localhost").expect(0)
    assert plugin.seen == [("info-name", "client/unauth")]
    host = PluginHost(Config(disable_plugins=[listed]))
    assert host.add("entry-name", Named("info-name")) is None and "info-name" not in host.infos
    host = PluginHost(Config(enable_plugins=[listed]))
    assert host.add("entry-name", Named("info-name")) is not None
