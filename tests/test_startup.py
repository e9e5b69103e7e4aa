"""Start-up: hsd joins the tlshd group before it loads anything heavy, and serves what queued meanwhile.

Structure, not time (the figures come from `hsd bench startup`): what is
imported when the group is joined, that a request submitted while hsd still
loads is served rather than refused, that READY=1 comes after the join, and
that the small netlink codec of the join agrees with hsd.protocol, the
simulator and pyroute2 - the last on the real kernel's own answers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hsd import protocol as p
from hsd import nlwire
from hsd import sim_channel as sim_mod
from hsd import startup
from hsd_kit.simulator import Simulator
from hsd_kit import peers
from hsd_kit.pki import TestPki

# imported before the join, none of these may be: TLS libraries, pyroute2, the plugin machinery, the dispatcher
HEAVY = ("OpenSSL", "tlslite", "cryptography", "pyroute2", "stevedore", "pluggy", "hsd.plugins", "hsd.dispatcher",
         "hsd.daemon", "hsd.config", "hsd.credentials", "hsd_kit.simulator", "hsd.ktls", "logging", "dataclasses",
         "hsd_openssl", "hsd_tlslite", "hsd_psk")

SPY = textwrap.dedent("""
    import json, sys
    from hsd import startup

    real = {method}

    def spy(*args, **kwargs):
        joined = real(*args, **kwargs)
        with open({out!r}, "w") as out:
            json.dump({{"joined": joined.joined, "modules": sorted(sys.modules)}}, out)
        raise SystemExit(0)

    startup.EarlyJoin.{name} = staticmethod(spy)
    from hsd.cli import main
    sys.exit(main({argv!r}))
""")


def argparse_imports() -> set[str]:
    """What parsing a command line imports in this Python, not hsd's choice: 3.14's argparse imports
    _colorize, and with it dataclasses."""
    code = "import argparse, sys; argparse.ArgumentParser().parse_args([]); print(' '.join(sys.modules))"
    return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              timeout=60).stdout.split())


def modules_at_join(method: str, argv: list[str], out: Path) -> dict:
    """Run the real command line in a fresh interpreter, stopping it right after the join."""
    name = method.rsplit(".", 1)[-1]
    code = SPY.format(method=f"startup.EarlyJoin.{name}", name=name, out=str(out), argv=argv)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


def test_serving_the_simulator_joins_before_any_tls_library_or_pyroute2_is_imported(tmp_path: Path) -> None:
    config = tmp_path / "hsd.conf"
    config.write_text("[hsd]\nbackend=openssl\n")
    with Simulator() as sim:
        found = modules_at_join("simulator_at", ["-c", str(config), "--simulator", sim.address], tmp_path / "m")
        assert sim.stats.submitted == 0
    assert found["joined"]
    loaded = [name for name in HEAVY if name in found["modules"] and name not in argparse_imports()]
    assert loaded == [], f"imported before the join: {loaded}"


# imported by the time hsd serves, none of these may be when no mode is routed to the tlslite backend
UNROUTED = ("tlslite", "hsd_tlslite.handshake", "hsd_tlslite.psk", "hsd_tlslite.accel", "hsd_tlslite.connection")

AT_READY = textwrap.dedent("""
    import json, sys
    from hsd import daemon

    def spy(state):
        if state == "READY=1":
            with open({out!r}, "w") as out:
                json.dump(sorted(sys.modules), out)
            raise SystemExit(0)

    daemon.notify_systemd = spy
    from hsd.cli import main
    sys.exit(main({argv!r}))
""")


def modules_at_ready(argv: list[str], out: Path) -> list[str]:
    """Run the real command line in a fresh interpreter, stopping it when it would send READY=1."""
    code = AT_READY.format(out=str(out), argv=argv)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


def test_an_unrouted_tlslite_backend_is_listed_but_its_library_is_not_imported_when_serving(
        tmp_path: Path, hsd_pki: TestPki) -> None:
    config = tmp_path / "hsd.conf"
    config.write_text(f"[authenticate.client]\nx509.truststore={hsd_pki.ca}\n[hsd]\nbackend=openssl\n")
    with Simulator() as sim:
        modules = modules_at_ready(["-c", str(config), "--simulator", sim.address], tmp_path / "m")
    assert "hsd_tlslite" in modules and "OpenSSL" in modules  # both plugins loaded: the check is not vacuous
    assert [name for name in UNROUTED if name in modules] == []
    plugins = subprocess.run([sys.executable, "-m", "hsd.cli", "plugins"], capture_output=True, text=True,
                             timeout=120)
    assert plugins.returncode == 0, plugins.stderr
    listed = [line for line in plugins.stdout.splitlines() if line.split()[:1] == ["tlslite"]]
    assert listed and "SKIPPED" not in listed[0] and "0.8" in listed[0], plugins.stdout


def _kernel_has_handshake_family() -> bool:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, startup.NETLINK_GENERIC) as sock:
        sock.bind((0, 0))
        try:
            startup.lookup_family(sock, startup.FAMILY_NAME)
        except FileNotFoundError:
            return False
    return True


def test_the_kernel_join_needs_no_pyroute2_whether_or_not_the_kernel_has_the_family(tmp_path: Path) -> None:
    """On this very kernel: joined (it has the family) or the one-line refusal (it has not), pyroute2 unloaded."""
    if not _kernel_has_handshake_family():
        result = subprocess.run(
            [sys.executable, "-c", "import sys\nfrom hsd import startup\ntry:\n startup.EarlyJoin.kernel()\n"
             "except startup.JoinError as exc:\n print(exc)\nprint('pyroute2' in sys.modules)"],
            capture_output=True, text=True, timeout=60)
        assert result.stdout.splitlines() == [startup.NO_FAMILY, "False"], result.stderr
        return
    found = modules_at_join("kernel", ["--backend", "openssl"], tmp_path / "m")
    assert found["joined"]
    assert [name for name in HEAVY if name in found["modules"] and name not in argparse_imports()] == []


def test_the_join_codec_reads_the_real_kernels_answer_as_pyroute2_does() -> None:
    """nlctrl exists on every kernel: same id and groups from hsd's small decoder and from pyroute2."""
    from pyroute2.netlink import genlmsg
    from pyroute2.netlink.generic import GenericNetlinkSocket

    class AnyMsg(genlmsg):
        nla_map = (("UNSPEC", "none"),)

    reference = GenericNetlinkSocket()
    try:
        reference.bind("nlctrl", AnyMsg)
        expected = (reference.prid, dict(reference.mcast_groups))
    finally:
        reference.close()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, startup.NETLINK_GENERIC) as sock:
        sock.bind((0, 0))
        family_id, _version, groups = startup.lookup_family(sock, "nlctrl")
        assert (family_id, groups) == expected
        with pytest.raises(FileNotFoundError):
            startup.lookup_family(sock, "nosuchfam")


def test_the_join_codec_agrees_with_hsd_protocol_and_the_simulator() -> None:
    """The join reads with hsd.nlwire, the codec hsd.protocol is built on: same request bytes, same family."""
    assert startup.getfamily_request is nlwire.getfamily_request
    assert startup.getfamily_request("handshake", 7) == p.encode_getfamily("handshake", 7)
    info = p.FamilyInfo(0x1234, p.FAMILY_NAME, 1, {"none": 3, "tlshd": 0x2A})
    message = p.encode_newfamily(info, 9)
    error, payload = startup.read_reply(message, 9)
    assert error == 0 and nlwire.parse_family(payload) == (0x1234, p.FAMILY_NAME, 1, {"none": 3, "tlshd": 0x2A})
    assert p.decode_newfamily(p.split_messages(message)[0]) == info
    assert startup.read_reply(message, 8) is None  # another request's answer
    assert startup.read_reply(p.encode_error(p.encode_getfamily("x", 5), 2), 5) == (2, b"")
    with pytest.raises(nlwire.ProtocolError):
        nlwire.parse_family(b"\xff\x00\x01\x00")  # an attribute longer than the message
    with pytest.raises(nlwire.ProtocolError):
        nlwire.parse_family(p.attr_u32(p.CTRL_ATTR_VERSION, 1))  # no family id
    with pytest.raises(nlwire.ProtocolError):
        startup.read_reply(message[:-1], 9)  # a datagram cut short
    assert p.ProtocolError is nlwire.ProtocolError  # one error type for both readers
    assert (startup.SIMCALL_TYPE, startup.SIMCALL_ADD_MEMBERSHIP, startup.SIMCALL_ATTR_GROUP) == \
        (sim_mod.SIMCALL_TYPE, sim_mod.SIMCALL_ADD_MEMBERSHIP, sim_mod.SIMCALL_ATTR_GROUP)
    assert (startup.FAMILY_NAME, startup.GROUP_NAME) == (p.FAMILY_NAME, p.MCGRP_TLSHD)


SLOW_PLUGIN = "import time\ntime.sleep({seconds})\n"  # a plugin whose import takes a while, like a TLS library


def slow_plugin_path(directory: Path, seconds: float) -> str:
    """A directory for PYTHONPATH holding a distribution whose hsd.backends plugin is slow to import."""
    (directory / "hsd_slowpoke.py").write_text(SLOW_PLUGIN.format(seconds=seconds))
    dist = directory / "hsd_slowpoke-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hsd-slowpoke\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[hsd.backends]\nslowpoke = hsd_slowpoke\n")
    return str(directory)


class LoadingDaemon:
    """hsd against the simulator with a plugin that takes `seconds` to load; returns once the group is joined."""

    def __init__(self, sim: Simulator, tmp_path: Path, truststore: str, seconds: float = 3.0) -> None:
        config = tmp_path / "hsd.conf"
        config.write_text(f"[authenticate.client]\nx509.truststore={truststore}\n[hsd]\nbackend=openssl\n")
        plugins = tmp_path / "plugins"
        plugins.mkdir()
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp_path / "notify"))
        self.log = tmp_path / "hsd.log"
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"),
               "PYTHONPATH": os.pathsep.join(filter(None, [slow_plugin_path(plugins, seconds),
                                                           os.environ.get("PYTHONPATH")]))}
        with open(self.log, "wb") as handle:
            self.proc = subprocess.Popen([sys.executable, "-m", "hsd.cli", "-c", str(config), "--simulator",
                                          sim.address, "-s"], stdin=subprocess.DEVNULL, stdout=handle,
                                         stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while sim.listeners() < 1:
            assert self.proc.poll() is None, self.text()
            assert time.monotonic() < deadline, f"hsd never joined:\n{self.text()}"
            time.sleep(0.005)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def not_ready_yet(self) -> bool:
        self.notify.setblocking(False)
        try:
            self.notify.recv(4096)
        except BlockingIOError:
            return True
        return False

    def ready(self, timeout: float = 30) -> bytes:
        self.notify.settimeout(timeout)
        return self.notify.recv(4096)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            self.notify.close()


def test_a_request_submitted_while_hsd_loads_waits_in_the_queue_and_is_served(tmp_path: Path, hsd_pki: TestPki):
    server = peers.openssl_server(peers.PeerOptions(cert=hsd_pki.server.cert, key=hsd_pki.server.key,
                                                    ca=hsd_pki.ca)).start()
    with Simulator() as sim:
        daemon = LoadingDaemon(sim, tmp_path, hsd_pki.ca)
        try:
            sock = server.connect()
            req = sim.client_hello_anon(sock, peername="localhost", timeout_ms=20000)  # not ESRCH: queued
            assert daemon.not_ready_yet(), "READY=1 before the slow plugin was even loaded"
            assert not req.accepted
            assert req.wait(30)[0] == 0, daemon.text()
            assert daemon.ready() == b"READY=1"
            sock.close()
        finally:
            server.stop()
            assert daemon.stop() == 0, daemon.text()
    assert "Traceback" not in daemon.text()


def test_stop_and_reload_signals_while_loading_are_acted_on_once_serving_not_fatal(tmp_path: Path,
                                                                                   hsd_pki: TestPki):
    with Simulator() as sim:
        daemon = LoadingDaemon(sim, tmp_path, hsd_pki.ca)
        try:
            daemon.proc.send_signal(signal.SIGHUP)  # the default action would end the process
            time.sleep(0.2)
            assert daemon.proc.poll() is None, daemon.text()
            assert daemon.not_ready_yet()
            daemon.proc.send_signal(signal.SIGTERM)  # queued: stops once serving has started
            assert daemon.proc.wait(30) == 0, daemon.text()
        finally:
            daemon.stop()
    text = daemon.text()
    assert "configuration reloaded" in text and "received SIGTERM" in text, text
    assert "Traceback" not in text
