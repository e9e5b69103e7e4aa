"""Distribution readiness: the wheel, the systemd unit, the man pages and the example config.

The wheel is really built and installed into a fresh virtual environment; the
unit is checked by systemd's own tools and its seccomp sandbox is reproduced
around a real TLS handshake; the man pages are compared with the parser tables
and the argument parser they document, so none of them can drift.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import site
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

import hsd
from hsd import config as config_mod

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "packaging" / "hsd.service"
TEMPLATE = ROOT / "packaging" / "hsd@.service"  # one instance per network namespace
EXAMPLE = ROOT / "packaging" / "hsd.conf.example"
MAN_SOURCES = {"hsd.8": ROOT / "docs" / "hsd.8.md", "hsd.conf.5": ROOT / "docs" / "hsd.conf.5.md"}
DATA_FILES = {  # path inside the wheel -> file in the source tree
    "hsd/data/hsd.service": UNIT,
    "hsd/data/hsd@.service": TEMPLATE,
    "hsd/data/hsd.conf.example": EXAMPLE,
    "hsd/data/man/hsd.8": ROOT / "docs" / "man" / "hsd.8",
    "hsd/data/man/hsd.conf.5": ROOT / "docs" / "man" / "hsd.conf.5",
}
SOURCE_ITEMS = ("pyproject.toml", "README.md", "core", "kit", "plugins", "packaging", "docs")


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=kwargs.pop("timeout", 300), **kwargs)


def need(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} is not installed (scripts/setup installs it)"
    return path


# ------------------------------------------------------------------ what the code says


def config_keys_from_parser() -> set[tuple[str, str]]:
    """(section, key) for every key core/config.py's parser accepts, read from its tables."""
    tree = ast.parse(Path(config_mod.__file__).read_text(encoding="utf-8"))
    constants: dict[str, object] = {}
    functions: dict[str, ast.FunctionDef] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
        elif isinstance(node, ast.FunctionDef):
            functions[node.name] = node
    keys: set[tuple[str, str]] = set()
    for branch in functions["_apply"].body:
        if not (isinstance(branch, ast.If) and isinstance(branch.test, ast.Compare)
                and isinstance(branch.test.left, ast.Name) and branch.test.left.id == "section"):
            continue
        sections = ast.literal_eval(branch.test.comparators[0])
        sections = (sections,) if isinstance(sections, str) else tuple(sections)
        found: set[str] = set()
        for node in ast.walk(branch):
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "key":
                right = node.comparators[0]
                if isinstance(node.ops[0], ast.Eq) and isinstance(right, ast.Constant):
                    found.add(right.value)
                elif isinstance(node.ops[0], (ast.In, ast.NotIn)) and isinstance(right, ast.Name):
                    found.update(constants[right.id])  # type: ignore[arg-type]
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and isinstance(node.func.value, ast.Name) and node.args
                    and isinstance(node.args[0], ast.Name) and node.args[0].id == "key"):
                found.update(constants[node.func.value.id])  # type: ignore[arg-type]
        keys |= {(section, key) for section in sections for key in found}
    return keys


def config_keys_from_man_page() -> set[tuple[str, str]]:
    """(section, key) for every key hsd.conf(5) documents as a definition under a section heading."""
    lines = MAN_SOURCES["hsd.conf.5"].read_text(encoding="utf-8").splitlines()
    keys: set[tuple[str, str]] = set()
    sections: list[str] = []
    for i, line in enumerate(lines):
        if line.startswith("# "):
            sections = re.findall(r"\[([\w.]+)\]", line)
        elif i + 1 < len(lines) and lines[i + 1].startswith(": "):
            match = re.match(r"\*\*([\w.]+)\*\*=", line)
            if match:
                keys |= {(section, match.group(1)) for section in sections}
    return keys


def config_keys_from_example() -> set[tuple[str, str]]:
    keys: set[tuple[str, str]] = set()
    section = ""
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.startswith("["):
            section = line.strip("[] ")
        match = re.match(r"#?([\w.]+)=", line)
        if match and section:
            keys.add((section, match.group(1)))
    return keys


def cli_words() -> set[str]:
    """Every option string and subcommand of `hsd` (from the parser `hsd --help` prints)."""
    from hsd.cli import _parser

    words: set[str] = set()
    pending = [_parser()]
    while pending:
        parser = pending.pop()
        for action in parser._actions:
            words.update(action.option_strings)
            choices = getattr(action, "choices", None)
            if isinstance(choices, dict):
                words.update(choices)
                pending.extend(choices.values())
    return words


def test_the_key_tables_are_read_correctly() -> None:
    keys = config_keys_from_parser()
    assert ("debug", "loglevel") in keys
    assert ("authenticate.server", "x509.crl") in keys
    assert ("hsd.backends", "server.psk") in keys
    assert ("hsd.server", "allowed_client_sans") in keys
    assert len(keys) >= 30


def test_man_page_documents_exactly_the_keys_the_parser_accepts() -> None:
    code, man = config_keys_from_parser(), config_keys_from_man_page()
    assert not code - man, f"keys missing from docs/hsd.conf.5.md: {sorted(code - man)}"
    assert not man - code, f"hsd.conf(5) documents keys the parser does not know: {sorted(man - code)}"


def test_example_config_shows_every_key_and_loads_without_warnings() -> None:
    code, example = config_keys_from_parser(), config_keys_from_example()
    assert not code - example, f"keys missing from packaging/hsd.conf.example: {sorted(code - example)}"
    assert not example - code, f"the example names unknown keys: {sorted(example - code)}"
    cfg = config_mod.parse(EXAMPLE.read_text(encoding="utf-8"), "hsd.conf.example")
    assert cfg.warnings == []


def test_man_page_documents_every_command_line_word() -> None:
    text = MAN_SOURCES["hsd.8"].read_text(encoding="utf-8")
    words = cli_words()
    assert {"-c", "--config", "-s", "-v", "-h", "--backend", "check", "plugins"} <= words
    missing = sorted(word for word in words if f"**{word}**" not in text)
    assert not missing, f"hsd(8) does not document {missing}"


# ------------------------------------------------------------------ man pages


def test_committed_man_pages_are_rendered_from_their_sources() -> None:
    result = run([sys.executable, str(ROOT / "docs" / "build_man.py"), "--check"])
    assert result.returncode == 0, result.stderr


KNOWN_MACROS = {"TH", "SH", "SS", "PP", "TP", "IP", "RS", "RE", "nf", "fi", "br", '\\"'}


@pytest.mark.parametrize("page", sorted(MAN_SOURCES))
def test_man_page_is_well_formed_roff(page: str) -> None:
    roff = (ROOT / "docs" / "man" / page).read_text(encoding="utf-8")
    lines = roff.splitlines()
    assert lines[1].startswith(".TH ")
    for line in lines:
        if line.startswith((".", "'")):
            assert line[1:].split(" ")[0] in KNOWN_MACROS, f"unknown request: {line}"
        assert line.count("\\fB") + line.count("\\fI") == line.count("\\fR"), f"unbalanced fonts: {line}"
    assert lines.count(".nf") == lines.count(".fi")
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "SEE ALSO"):
        assert f'.SH "{section}"' in roff


@pytest.mark.parametrize("page", sorted(MAN_SOURCES))
def test_man_page_renders_without_warnings(page: str, tmp_path: Path) -> None:
    path = ROOT / "docs" / "man" / page
    checked = run([need("groff"), "-man", "-Tutf8", "-ww", "-z", str(path)])
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr
    shown = run([need("man"), "-l", str(path)], env={**os.environ, "MANWIDTH": "80", "MANPAGER": "cat", "PAGER": "cat"})
    assert shown.returncode == 0, shown.stderr
    assert "hsd" in shown.stdout and "SEE ALSO" in shown.stdout
    assert "\\f" not in shown.stdout and "**" not in shown.stdout


# ------------------------------------------------------------------ the systemd unit


def unit_settings(unit: Path = UNIT) -> dict[str, dict[str, list[str]]]:
    """The unit as systemd reads it: repeated keys accumulate."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in unit.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_is_a_notify_service_ordered_like_tlshd() -> None:
    unit = unit_settings()
    service = unit["Service"]
    assert service["Type"] == ["notify"]
    assert service["ExecStart"] == ["/usr/sbin/hsd"]
    assert service["Restart"] == ["on-failure"]
    assert "remote-fs-pre.target" in unit["Unit"]["Before"][0].split()
    assert unit["Unit"]["DefaultDependencies"] == ["no"]
    assert "tlshd.service" in unit["Unit"]["Conflicts"][0].split()
    assert unit["Install"]["WantedBy"] == ["remote-fs.target"]
    assert service["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
    assert service["KeyringMode"] == ["shared"]
    assert service["LimitCORE"] == ["0"], "no core file may carry the daemon's keys and secrets"
    assert "ProcSubset" not in service, "/proc/keys must stay visible: the .nvme keyring is found there"


# what hsd@NAME may differ in from hsd.service: the namespace, its config and control socket, its name
TEMPLATE_OWN = {"Unit": {"Description", "Conflicts"},
                "Service": {"ExecStart", "NetworkNamespacePath", "RuntimeDirectory"}}


def test_template_serves_one_named_network_namespace_with_its_own_config_and_socket() -> None:
    unit = unit_settings(TEMPLATE)
    service = unit["Service"]
    assert service["NetworkNamespacePath"] == ["/run/netns/%i"]
    assert service["ExecStart"] == ["/usr/sbin/hsd --config /etc/hsd/%i.conf --control-socket /run/hsd-netns/%i/control"]
    assert service["RuntimeDirectory"] == ["hsd-netns/%i"] and service["RuntimeDirectoryMode"] == ["0700"]
    # systemd removes hsd.service's RuntimeDirectory (/run/hsd) when it stops: the instances' must lie outside
    (main_runtime,) = unit_settings()["Service"]["RuntimeDirectory"]
    assert not ("hsd-netns/%i/").startswith(main_runtime.rstrip("/") + "/")
    conflicts = unit["Unit"]["Conflicts"][0].split()
    assert "shutdown.target" in conflicts and "tlshd@%i.service" in conflicts
    assert not {"hsd.service", "tlshd.service"} & set(conflicts), "the root namespace's agent runs beside it"
    assert "%i" in unit["Unit"]["Description"][0]
    assert unit["Install"] == unit_settings()["Install"]


def test_template_has_the_sandbox_and_ordering_of_hsd_service() -> None:
    """Every other setting, repeated ones in order, is hsd.service's: a change to one is a change to both."""
    main, template = unit_settings(), unit_settings(TEMPLATE)
    assert set(main) == set(template)
    for section in main:
        own = TEMPLATE_OWN.get(section, set())
        want = {key: values for key, values in main[section].items() if key not in own}
        got = {key: values for key, values in template[section].items() if key not in own}
        assert got == want, f"[{section}] of hsd@.service differs from hsd.service's"


def test_debian_installs_the_template_through_dh_installsystemd() -> None:
    """debian/hsd@.service is what dh_installsystemd installs as the package's template (never enabled:
    a template without DefaultInstance has nothing to enable); it is the one in packaging/."""
    link = ROOT / "debian" / "hsd@.service"
    assert link.is_symlink() and link.resolve() == TEMPLATE
    assert "DefaultInstance" not in unit_settings(TEMPLATE).get("Install", {})


@pytest.fixture(scope="module")
def unit_dir(tmp_path_factory: pytest.TempPathFactory, installed: dict[str, Path]) -> Path:
    """The units, with ExecStart pointing at the hsd the wheel installed (systemd checks it exists)."""
    where = tmp_path_factory.mktemp("unit")
    for unit in (UNIT, TEMPLATE):
        text = unit.read_text(encoding="utf-8").replace("ExecStart=/usr/sbin/hsd", f"ExecStart={installed['hsd']}")
        (where / unit.name).write_text(text, encoding="utf-8")
    return where


@pytest.mark.parametrize("name", ["hsd.service", "hsd@tenant1.service"])
def test_systemd_analyze_verify_accepts_the_unit(unit_dir: Path, name: str) -> None:
    # a template is verified as an instance: `verify hsd@.service` loads nothing and says nothing
    result = run([need("systemd-analyze"), "verify", "--man=no", name], cwd=unit_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == "", "systemd warned:\n" + result.stderr


def test_systemd_analyze_verify_would_see_a_mistake_in_the_template(unit_dir: Path, tmp_path: Path) -> None:
    """The instance check above reads the template: a misspelt key in it is reported."""
    text = (unit_dir / "hsd@.service").read_text(encoding="utf-8")
    (tmp_path / "hsd@.service").write_text(text.replace("NetworkNamespacePath=", "NetworkNamespacePat="),
                                           encoding="utf-8")
    result = run([need("systemd-analyze"), "verify", "--man=no", "hsd@tenant1.service"], cwd=tmp_path)
    assert "Unknown key 'NetworkNamespacePat'" in result.stderr, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["hsd.service", "hsd@tenant1.service"])
def test_systemd_security_exposure_is_low(unit_dir: Path, name: str) -> None:
    result = run([need("systemd-analyze"), "security", "--offline=yes", "--no-pager", name], cwd=unit_dir)
    match = re.search(rf"Overall exposure level for {re.escape(name)}: (\d+\.\d)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    score = float(match.group(1))
    print(f"systemd-analyze security: {name} exposure {score}")
    assert score <= 2.0


# ------------------------------------------------------------------ the unit's sandbox, reproduced

SANDBOX = r'''
import ctypes, errno, json, subprocess, sys
spec = json.loads(sys.argv[1])
lib = ctypes.CDLL("libseccomp.so.2")
class Arg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
ALLOW, EQ, MASKED_EQ = 0x7fff0000, 4, 7
def deny(code): return 0x00050000 | code
ctx = lib.seccomp_init(deny(errno.EPERM))
def rule(action, name, *conds):
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:
        return
    args = (Arg * max(len(conds), 1))(*[Arg(*c) for c in conds])
    assert lib.seccomp_rule_add_array(ctx, action, nr, len(conds), args if conds else None) == 0, name
for name in spec["allow"]:
    if name == "socket" or (spec["mdwe"] and name in ("mmap", "mprotect", "pkey_mprotect", "shmat")):
        continue
    rule(ALLOW, name)
for family in spec["families"]:
    rule(ALLOW, "socket", (0, EQ, family, 0))
if spec["mdwe"]:  # systemd's MemoryDenyWriteExecute= filter, expressed as an allow-list
    rule(ALLOW, "mmap", (2, MASKED_EQ, 6, 0)); rule(ALLOW, "mmap", (2, MASKED_EQ, 6, 2)); rule(ALLOW, "mmap", (2, MASKED_EQ, 6, 4))
    rule(ALLOW, "mprotect", (2, MASKED_EQ, 4, 0)); rule(ALLOW, "pkey_mprotect", (2, MASKED_EQ, 4, 0))
    rule(ALLOW, "shmat", (2, MASKED_EQ, 0o100000, 0))
assert lib.seccomp_load(ctx) == 0
import os
argv = spec.get("exec") or [sys.executable, "-c", spec["workload"]]
os.execv(argv[0], argv)
'''

WORKLOAD = r'''
import datetime, socket, sys
from hsd import config, keyring
from hsd.plugins import PluginHost
cfg = config.load(sys.argv[1] if len(sys.argv) > 1 else None)
host = PluginHost.discover(cfg)
assert "openssl" in host.backends(), host.problems

# netlink (the handshake family) and unix (syslog, sd_notify) sockets must open; IP ones must not
socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16).close()
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).close()
try:
    socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raise SystemExit("AF_INET socket was allowed: the sandbox is not in force")
except OSError:
    pass

# kernel keyrings through the raw syscalls
ring = keyring.keyring_id(keyring.KEY_SPEC_PROCESS_KEYRING, create=True)
serial = keyring.add_key("user", "hsd sandbox probe", b"not a secret", ring)
assert bytes(keyring.read_key(serial)) == b"not a secret"

# a TLS 1.3 handshake with the keylog callback hsd's OpenSSL backend depends on
from OpenSSL import SSL, crypto
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "probe")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256()))
secrets = []
def context(server):
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_keylog_callback(lambda conn, line: secrets.append(line.split()[0]))
    if server:
        ctx.use_certificate(crypto.X509.from_cryptography(cert))
        ctx.use_privatekey(crypto.PKey.from_cryptography_key(key))
    return ctx
server = SSL.Connection(context(True), None); server.set_accept_state()
client = SSL.Connection(context(False), None); client.set_connect_state()
for _ in range(6):
    for a, b in ((client, server), (server, client)):
        try:
            a.do_handshake()
        except SSL.WantReadError:
            pass
        try:
            b.bio_write(a.bio_read(65536))
        except SSL.WantReadError:
            pass
assert client.get_protocol_version_name() == "TLSv1.3"
assert b"CLIENT_TRAFFIC_SECRET_0" in secrets and b"SERVER_TRAFFIC_SECRET_0" in secrets, secrets
print("sandboxed workload ok")
'''


def expand_syscall_group(name: str, analyze: str) -> set[str]:
    out = run([analyze, "syscall-filter", "--no-pager", name]).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        word = line.strip()
        if word and not word.startswith("#"):
            names |= expand_syscall_group(word, analyze) if word.startswith("@") else {word}
    return names


def unit_sandbox(force_mdwe: bool = False) -> dict[str, object]:
    """The seccomp part of the unit (SystemCallFilter, RestrictAddressFamilies, MemoryDenyWriteExecute)."""
    analyze = need("systemd-analyze")
    service = unit_settings()["Service"]
    allow: set[str] = set()
    for entry in service["SystemCallFilter"]:
        negate = entry.startswith("~")
        names: set[str] = set()
        for word in entry.lstrip("~").split():
            names |= expand_syscall_group(word, analyze) if word.startswith("@") else {word}
        allow = allow - names if negate else allow | names
    families = [getattr(socket_mod(), name) for name in service["RestrictAddressFamilies"][0].split()]
    mdwe = force_mdwe or service.get("MemoryDenyWriteExecute", ["no"])[-1] in ("yes", "true")
    return {"allow": sorted(allow), "families": families, "mdwe": mdwe, "workload": WORKLOAD}


def socket_mod():
    import socket

    return socket


def run_sandboxed(spec: dict[str, object]) -> subprocess.CompletedProcess[str]:
    import json

    from ctypes.util import find_library

    assert find_library("seccomp"), "libseccomp is not installed (apt depends on it on Debian)"
    return run([sys.executable, "-c", SANDBOX, json.dumps(spec)], cwd=ROOT, timeout=120)


def test_hsd_works_inside_the_units_seccomp_sandbox() -> None:
    result = run_sandboxed(unit_sandbox())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sandboxed workload ok" in result.stdout


def unit_capability_bound() -> list[str]:
    """setpriv (util-linux, not hsd's own code) applies the unit's capability settings to what it runs.

    As uid 0, exec gives the permitted and effective sets the bounding set: exactly
    what systemd's CapabilityBoundingSet=, AmbientCapabilities= (empty) and
    NoNewPrivileges=yes leave a root service."""
    service = unit_settings()["Service"]
    bound = ",".join(f"+{cap.lower().removeprefix('cap_')}" for cap in service["CapabilityBoundingSet"][0].split())
    assert service["AmbientCapabilities"] == [""] and service["NoNewPrivileges"] == ["yes"]
    return [need("setpriv"), f"--bounding-set=-all,{bound}", "--inh-caps=-all", "--ambient-caps=-all",
            "--no-new-privs"]


def task_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as handle:
        return dict(line.rstrip("\n").split(":\t", 1) for line in handle if ":\t" in line)


def test_hsd_starts_and_serves_under_the_units_syscall_filter_and_capability_bound(tmp_path: Path, hsd_pki) -> None:
    """The real start path (hsd --simulator ... up to "hsd ready"), then one handshake and a clean stop.

    Regression: ~@privileged denies capset(2); the capability drop called it even
    when the sets already fit, failed with EPERM, and every start under the unit
    exited 1 (Restart= looped).  The filter is derived at test time from
    `systemd-analyze syscall-filter` and the unit's own lines, like systemd does."""
    import json
    import signal
    import time

    from hsd_kit.simulator import Simulator
    from hsd_kit import peers

    pki = hsd_pki
    config = tmp_path / "hsd.conf"
    config.write_text(f"[authenticate.client]\nx509.truststore={pki.ca}\n[hsd]\nbackend=openssl\n")
    log = tmp_path / "hsd.log"
    with Simulator() as sim:
        spec = unit_sandbox()
        spec["exec"] = [sys.executable, "-m", "hsd.cli", "-c", str(config), "--simulator", sim.address, "-s"]
        from ctypes.util import find_library

        assert find_library("seccomp"), "libseccomp is not installed (scripts/setup installs libseccomp2)"
        with open(log, "wb") as out:
            proc = subprocess.Popen([*unit_capability_bound(), sys.executable, "-c", SANDBOX, json.dumps(spec)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        server = None
        try:
            deadline = time.monotonic() + 60
            while "hsd ready" not in log.read_text(errors="replace"):
                assert proc.poll() is None, f"hsd exited {proc.returncode} under the unit's sandbox:\n{log.read_text()}"
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            status = task_status(proc.pid)  # the sandbox is really in force on the daemon itself
            assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1", status
            assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == 1 << 12, status
            server = peers.openssl_server(peers.PeerOptions(cert=pki.server.cert, key=pki.server.key,
                                                            ca=pki.ca)).start()
            sock = server.connect()
            request = sim.client_hello_anon(sock, peername="localhost", timeout_ms=10000)
            assert request.wait(30)[0] == 0, log.read_text()
            assert request.done_calls == 1
            sock.close()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log.read_text()
        finally:
            if server is not None:
                server.stop()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "cannot drop" not in text, text
    print(f"hsd under the unit's sandbox: {len(spec['allow'])} system calls allowed, ready, one handshake, "
          "clean stop")


def test_memory_deny_write_execute_would_break_the_openssl_backend() -> None:
    """Why the unit leaves MemoryDenyWriteExecute= off: cffi callbacks need W+X memory.

    If this starts failing, pyOpenSSL/cffi no longer need it: turn the setting on."""
    result = run_sandboxed(unit_sandbox(force_mdwe=True))
    assert result.returncode != 0, "the workload now runs under MemoryDenyWriteExecute=yes: enable it in the unit"
    assert "write+execute memory" in result.stderr or "MemoryError" in result.stderr, result.stderr


# ------------------------------------------------------------------ wheel and sdist


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build the sdist and the wheel from a copy of the source tree (the checkout stays clean)."""
    tree = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc", ".cache")
    for item in SOURCE_ITEMS:
        source = ROOT / item
        if source.is_dir():
            shutil.copytree(source, tree / item, ignore=ignore)
        elif source.exists():
            shutil.copy2(source, tree / item)
    out = tree / "dist"
    if importlib.util.find_spec("build") is not None:
        cmd = [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(tree)]
    else:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out), str(tree)]
    result = run(cmd, cwd=tree, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = {"wheel": next(out.glob("hsd-*.whl"))}
    sdists = list(out.glob("hsd-*.tar.gz"))
    if sdists:
        found["sdist"] = sdists[0]
    print(f"built: {', '.join(p.name for p in found.values())}")
    return found


@pytest.fixture(scope="module")
def installed(dists: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fresh venv with the wheel installed; dependencies come from this interpreter's site-packages."""
    venv = tmp_path_factory.mktemp("venv")
    result = run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)])
    assert result.returncode == 0, result.stderr
    python = venv / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    # dependencies resolve offline from the interpreter running the tests (it may itself be a venv)
    Path(purelib, "hsd-test-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n", encoding="utf-8")
    result = run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall",
                  "--disable-pip-version-check", str(dists["wheel"])], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return {"venv": venv, "python": python, "hsd": venv / "bin" / "hsd", "purelib": Path(purelib)}


def test_wheel_carries_the_unit_man_pages_and_example_config(dists: dict[str, Path]) -> None:
    with zipfile.ZipFile(dists["wheel"]) as wheel:
        names = set(wheel.namelist())
        for inside, source in DATA_FILES.items():
            assert inside in names, f"{inside} missing from {dists['wheel'].name}"
            assert wheel.read(inside) == source.read_bytes(), f"{inside} differs from {source.name}"
        assert "hsd/cli.py" in names and "hsd_openssl/__init__.py" in names


def test_sdist_carries_the_sources_of_the_data_files(dists: dict[str, Path]) -> None:
    assert "sdist" in dists, "the sdist was not built (python -m build is in the test extras)"
    with tarfile.open(dists["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for wanted in ("pyproject.toml", "packaging/hsd.service", "packaging/hsd@.service", "packaging/hsd.conf.example",
                   "docs/man/hsd.8", "docs/man/hsd.conf.5", "core/cli.py"):
        assert wanted in names, f"{wanted} missing from {dists['sdist'].name}"


def test_installed_hsd_reports_its_version(installed: dict[str, Path]) -> None:
    result = run([str(installed["hsd"]), "--version"], timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"hsd {hsd.__version__}"
    where = run([str(installed["python"]), "-c", "import hsd, hsd_openssl; print(hsd.__file__); print(hsd_openssl.__file__)"])
    for line in where.stdout.split():
        assert line.startswith(str(installed["purelib"])), f"not the installed wheel: {line}"


def test_installed_hsd_checks_the_installed_example_config(installed: dict[str, Path]) -> None:
    locate = textwrap.dedent("""
        from importlib.resources import files
        print(files("hsd.data").joinpath("hsd.conf.example"))
    """)
    example = run([str(installed["python"]), "-c", locate]).stdout.strip()
    assert example.startswith(str(installed["purelib"])), example
    result = run([str(installed["hsd"]), "check", "-c", example], timeout=60)
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout
    assert "warning" not in result.stderr.lower(), result.stderr
