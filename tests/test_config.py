"""The configuration file: every tlshd.conf(5) key, hsd's own sections, and how mistakes are reported.

An existing /etc/tlshd.conf must load unchanged, an unknown key must never stop
start-up (newer tlshd versions add keys), and a bad value must stop it with a
message that names the file and line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from hsd import config
from hsd.config import Config, ConfigError, RoleConfig, load, parse

SRC = "/cfg/tlshd.conf"  # a label only: parse() never opens it

TLSHD_SHIPPED = """\
#
# ktls-utils tlshd configuration file
#

[debug]
loglevel=0
tls=0
nl=0

[authenticate]
#keyrings= <keyring>;<keyring>;<keyring>

[authenticate.client]
#x509.truststore= <pathname>
#x509.certificate= <pathname>
#x509.private_key= <pathname>

[authenticate.server]
#x509.truststore= <pathname>
#x509.certificate= <pathname>
#x509.private_key= <pathname>
"""


def parse_one(section: str, line: str) -> Config:
    return parse(f"[{section}]\n{line}\n", SRC)


def raises_at(line: int, match: str = ""):  # type: ignore[no-untyped-def]
    return pytest.raises(ConfigError, match=rf"^{re.escape(SRC)}:{line}: .*{match}")


# ---------------------------------------------------------------- defaults and the shipped file


def test_defaults() -> None:
    cfg = Config()
    assert (cfg.loglevel, cfg.tls_debug, cfg.nl_debug, cfg.keyrings) == (0, 0, 0, [])
    assert cfg.client == RoleConfig() and cfg.server == RoleConfig()
    assert cfg.client.truststore is None  # None = the system trust store
    assert (cfg.backend, cfg.max_inflight, cfg.handshake_timeout_ms) == ("openssl", 64, 10000)
    assert cfg.verify_server is True and cfg.require_client_certificate is False
    assert cfg.psk_modes == ["psk_dhe_ke"] and cfg.enable_plugins == [] and cfg.disable_plugins == []


def test_the_file_tlshd_ships_loads_without_warnings() -> None:
    cfg = parse(TLSHD_SHIPPED, SRC)
    assert cfg.warnings == [] and cfg.source == SRC
    assert cfg.client == RoleConfig() and cfg.server == RoleConfig() and cfg.keyrings == []


def test_empty_text() -> None:
    cfg = parse("", SRC)
    assert cfg.warnings == [] and cfg.loglevel == 0


# ---------------------------------------------------------------- [debug]


@pytest.mark.parametrize("key,attr", [("loglevel", "loglevel"), ("tls", "tls_debug"), ("nl", "nl_debug")])
def test_debug_levels(key: str, attr: str) -> None:
    assert getattr(parse_one("debug", f"{key}=7"), attr) == 7
    assert getattr(parse_one("debug", f"  {key}  =  0x3  "), attr) == 3
    assert getattr(parse_one("debug", f"{key}=0"), attr) == 0
    assert getattr(parse_one("debug", f"{key}=10"), attr) == 10


@pytest.mark.parametrize("key", ["loglevel", "tls", "nl"])
@pytest.mark.parametrize("value,why", [("11", "outside 0..10"), ("-1", "outside 0..10"), ("high", "not an integer"),
                                       ("", "not an integer"), ("1.5", "not an integer"),
                                       ("1 # GLib has no inline comments", "not an integer")])
def test_debug_levels_invalid(key: str, value: str, why: str) -> None:
    with raises_at(2, why):
        parse_one("debug", f"{key}={value}")


# ---------------------------------------------------------------- [authenticate]


@pytest.mark.parametrize("value,expected", [
    (".nvme", [".nvme"]),
    (".mykeyring;.other", [".mykeyring", ".other"]),
    (" .a ; .b ;; .c ; ", [".a", ".b", ".c"]),
    (".a,.b", [".a", ".b"]),
    ("", []),
])
def test_authenticate_keyrings(value: str, expected: list[str]) -> None:
    assert parse_one("authenticate", f"keyrings={value}").keyrings == expected


def test_unknown_key_in_authenticate_warns() -> None:
    cfg = parse("[authenticate]\nkeyring=.x\n", SRC)
    assert cfg.warnings == [f"{SRC}:2: unknown key 'keyring' in [authenticate] ignored (did you mean 'keyrings'?)"]
    assert cfg.keyrings == []


# ---------------------------------------------------------------- [authenticate.client] / [authenticate.server]

ROLE_KEYS = [
    ("x509.truststore", "truststore"),
    ("x509.crl", "crl"),
    ("x509.certificate", "certificate"),
    ("x509.private_key", "private_key"),
    ("x509.pq.certificate", "pq_certificate"),
    ("x509.pq.private_key", "pq_private_key"),
]


@pytest.mark.parametrize("role", ["client", "server"])
@pytest.mark.parametrize("key,attr", ROLE_KEYS)
def test_role_keys(role: str, key: str, attr: str) -> None:
    cfg = parse_one(f"authenticate.{role}", f"{key}=/etc/pki/{role}/{attr}.pem")
    assert getattr(cfg.role(role), attr) == f"/etc/pki/{role}/{attr}.pem"
    other = cfg.role("server" if role == "client" else "client")
    assert other == RoleConfig()  # the other role is untouched
    assert cfg.warnings == []


def test_every_role_key_at_once() -> None:
    lines = ["[authenticate.client]"] + [f"{k}=/c/{a}" for k, a in ROLE_KEYS]
    lines += ["[authenticate.server]"] + [f"{k}=/s/{a}" for k, a in ROLE_KEYS]
    cfg = parse("\n".join(lines), SRC)
    assert cfg.client == RoleConfig(**{a: f"/c/{a}" for _, a in ROLE_KEYS})
    assert cfg.server == RoleConfig(**{a: f"/s/{a}" for _, a in ROLE_KEYS})


def test_pkcs11_and_values_containing_equals_are_kept_whole() -> None:
    cfg = parse_one("authenticate.client", "x509.private_key = pkcs11:token=hsd;object=key ")
    assert cfg.client.private_key == "pkcs11:token=hsd;object=key"


@pytest.mark.parametrize("key", [k for k, _ in ROLE_KEYS])
def test_empty_path_is_an_error(key: str) -> None:
    with raises_at(2, "empty path"):
        parse_one("authenticate.server", f"{key}=")


def test_unknown_role_key_warns() -> None:
    cfg = parse("[authenticate.client]\nx509.truststore=/a\nx509.certficate=/typo\n", SRC)
    assert cfg.warnings == [f"{SRC}:3: unknown key 'x509.certficate' in [authenticate.client] ignored "
                            "(did you mean 'x509.certificate'?)"]


def test_role_helper() -> None:
    cfg = Config()
    assert cfg.role("server") is cfg.server and cfg.role("client") is cfg.client


# ---------------------------------------------------------------- hsd's own sections


def test_hsd_section() -> None:
    cfg = parse("[hsd]\nbackend=tlslite\nmax_inflight=8\nhandshake_timeout=2500\n"
                "enable_plugins=openssl;psk\ndisable_plugins=tlslite\n", SRC)
    assert (cfg.backend, cfg.max_inflight, cfg.handshake_timeout_ms) == ("tlslite", 8, 2500)
    assert cfg.enable_plugins == ["openssl", "psk"] and cfg.disable_plugins == ["tlslite"]
    assert cfg.warnings == []


@pytest.mark.parametrize("line,why", [
    ("max_inflight=0", "outside 1..100000"),
    ("max_inflight=100001", "outside 1..100000"),
    ("handshake_timeout=0", "outside 1..3600000"),
    ("handshake_timeout=3600001", "outside 1..3600000"),
    ("handshake_timeout=10s", "not an integer"),
])
def test_hsd_section_invalid(line: str, why: str) -> None:
    with raises_at(2, why):
        parse_one("hsd", line)


def test_backends_per_mode() -> None:
    cfg = parse("[hsd]\nbackend=openssl\n[hsd.backends]\nclient.psk=tlslite\nserver.x509 = openssl\n", SRC)
    assert cfg.backends == {"client.psk": "tlslite", "server.x509": "openssl"}
    assert cfg.backend_for("client", "psk") == "tlslite"
    assert cfg.backend_for("client", "x509") == "openssl"  # falls back to [hsd] backend
    assert cfg.backend_for("server", "psk") == "openssl"


@pytest.mark.parametrize("mode", config.MODES)
def test_every_mode_can_have_a_backend(mode: str) -> None:
    assert parse_one("hsd.backends", f"{mode}=tlslite").backends == {mode: "tlslite"}


def test_unknown_mode_is_an_error() -> None:
    with raises_at(2, "'server.unauth' is not a mode"):
        parse_one("hsd.backends", "server.unauth=openssl")


@pytest.mark.parametrize("value,expected", [("true", True), ("YES", True), ("on", True), ("1", True),
                                            ("false", False), ("No", False), ("OFF", False), ("0", False)])
def test_booleans(value: str, expected: bool) -> None:
    assert parse_one("hsd.client", f"verify_server={value}").verify_server is expected
    assert parse_one("hsd.server", f"require_client_certificate={value}").require_client_certificate is expected


@pytest.mark.parametrize("section,key", [("hsd.client", "verify_server"), ("hsd.server", "require_client_certificate")])
def test_invalid_boolean(section: str, key: str) -> None:
    with raises_at(2, "not a boolean"):
        parse_one(section, f"{key}=maybe")


def test_allowed_client_sans() -> None:
    cfg = parse_one("hsd.server", "allowed_client_sans=host1.example;*.lab.example, 192.0.2.7")
    assert cfg.allowed_client_sans == ["host1.example", "*.lab.example", "192.0.2.7"]


@pytest.mark.parametrize("value,expected", [("psk_dhe_ke", ["psk_dhe_ke"]), ("psk_ke", ["psk_ke"]),
                                            ("psk_dhe_ke;psk_ke", ["psk_dhe_ke", "psk_ke"])])
def test_psk_modes(value: str, expected: list[str]) -> None:
    assert parse_one("hsd.psk", f"modes={value}").psk_modes == expected


@pytest.mark.parametrize("value", ["", "psk_rsa", "psk_ke;bogus"])
def test_psk_modes_invalid(value: str) -> None:
    with raises_at(2, "psk modes must be"):
        parse_one("hsd.psk", f"modes={value}")


@pytest.mark.parametrize("section,key,nearest", [
    ("hsd", "backnd", "backend"), ("hsd.client", "verify", "verify_server"),
    ("hsd.server", "require_client_certficate", "require_client_certificate"), ("hsd.psk", "mode", "modes"),
    ("hsd", "strict_permission", "strict_permissions"), ("hsd", "worker", "workers"),
])
def test_unknown_keys_in_hsd_sections_are_errors_naming_the_nearest_key(section: str, key: str,
                                                                        nearest: str) -> None:
    """A typo under [hsd*] would switch a control off without a word: it stops start-up instead."""
    with raises_at(2, re.escape(f"unknown key '{key}' in [{section}] (did you mean '{nearest}'?)")):
        parse_one(section, f"{key}=1")


def test_an_unknown_key_far_from_every_valid_one_lists_the_valid_keys() -> None:
    with raises_at(2, re.escape("unknown key 'zzz' in [hsd.client]; valid keys: verify_server")):
        parse_one("hsd.client", "zzz=1")


@pytest.mark.parametrize("section,nearest", [("hsd.sever", "[hsd.server]"), ("hsd.backend", "[hsd.backends]"),
                                             ("hsd.clients", "[hsd.client]"), ("hsd.pks", "[hsd.psk]")])
def test_unknown_hsd_sections_are_errors_naming_the_nearest_section(section: str, nearest: str) -> None:
    with raises_at(1, re.escape(f"unknown section [{section}] (did you mean {nearest}?)")):
        parse(f"[{section}]\nrequire_client_certificate=true\n", SRC)


def test_an_empty_unknown_hsd_section_is_an_error_too() -> None:
    with raises_at(2, re.escape("unknown section [hsd.extra]")):
        parse("[hsd]\n[hsd.extra]\n", SRC)


def test_unknown_keys_in_tlshd_sections_only_warn() -> None:
    cfg = parse_one("debug", "level=1")
    assert cfg.warnings == [f"{SRC}:2: unknown key 'level' in [debug] ignored (did you mean 'loglevel'?)"]


# ---------------------------------------------------------------- warnings, errors, comments, line numbers


def test_unknown_sections_and_keys_warn_with_file_and_line_and_are_ignored() -> None:
    text = "# header\n\n[debug]\nloglevel=2\nfuture_key=1\n[future]\nanything=goes\n"
    cfg = parse(text, SRC)
    assert cfg.loglevel == 2
    assert cfg.warnings == [
        f"{SRC}:5: unknown key 'future_key' in [debug] ignored",
        f"{SRC}:6: unknown section [future] ignored (neither tlshd's nor hsd's)",
    ]


def test_comments_and_blank_lines() -> None:
    text = "#c\n   # indented comment\n\n[debug]\n# loglevel=9\n\t\nloglevel=1\n"
    cfg = parse(text, SRC)
    assert cfg.loglevel == 1 and cfg.warnings == []


def test_section_header_whitespace_and_crlf() -> None:
    cfg = parse("[ debug ]\r\nloglevel=4\r\n[authenticate.client]\r\nx509.crl=/crl.pem\r\n", SRC)
    assert cfg.loglevel == 4 and cfg.client.crl == "/crl.pem"


def test_last_value_wins() -> None:
    assert parse("[debug]\nloglevel=1\n[debug]\nloglevel=3\n", SRC).loglevel == 3


@pytest.mark.parametrize("text,line,why", [
    ("loglevel=1\n", 1, "key outside any"),
    ("[debug\nloglevel=1\n", 1, "malformed section header"),
    ("[]\n", 1, "malformed section header"),
    ("[debug]\n\nloglevel\n", 3, "expected key=value"),
    ("[debug]\nloglevel=1\n\n# x\nnl=99\n", 5, "outside 0..10"),
])
def test_errors_name_file_and_line(text: str, line: int, why: str) -> None:
    with raises_at(line, why):
        parse(text, SRC)


@pytest.mark.parametrize("separator", ["\x0c", "\x1c", "\x85", "\u2028"])
def test_only_newlines_end_lines(separator: str) -> None:
    # GLib ends a line at \n only; other Unicode line breaks are part of the value and do not shift line numbers
    text = f"[hsd]\nbackend=a{separator}b\n[debug]\nloglevel=x\n"
    with raises_at(4, "not an integer"):
        parse(text, SRC)
    assert parse(f"[hsd]\nbackend=a{separator}b\n", SRC).backend == f"a{separator}b"


def test_default_source_label() -> None:
    with pytest.raises(ConfigError, match=r"^<config>:1: "):
        parse("x=1")


# ---------------------------------------------------------------- files and the default path lookup


def test_load_an_explicit_file(tmp_path: Path) -> None:
    path = tmp_path / "hsd.conf"
    path.write_text("[debug]\nloglevel=3\nbogus=1\n")
    cfg = load(str(path))
    assert cfg.source == str(path) and cfg.loglevel == 3
    assert cfg.warnings == [f"{path}:3: unknown key 'bogus' in [debug] ignored"]


def test_errors_in_a_file_name_that_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.conf"
    path.write_text("[debug]\n\nnl=eleven\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:3: 'eleven' is not an integer"):
        load(str(path))


def test_default_paths_are_the_tlshd_ones_in_order() -> None:
    assert config.DEFAULT_PATHS == ("/etc/tlshd/config", "/etc/tlshd.conf")


def test_default_lookup_prefers_the_first_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "tlshd" / "config", tmp_path / "tlshd.conf"
    first.parent.mkdir()
    first.write_text("[debug]\nloglevel=1\n")
    second.write_text("[debug]\nloglevel=2\n")
    monkeypatch.setattr(config, "DEFAULT_PATHS", (str(first), str(second)))
    cfg = load(None)
    assert (cfg.source, cfg.loglevel) == (str(first), 1)


def test_default_lookup_falls_back_to_the_legacy_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    second = tmp_path / "tlshd.conf"
    second.write_text("[debug]\nloglevel=2\n")
    monkeypatch.setattr(config, "DEFAULT_PATHS", (str(tmp_path / "tlshd" / "config"), str(second)))
    cfg = load(None)
    assert (cfg.source, cfg.loglevel) == (str(second), 2)


def test_no_file_anywhere_gives_built_in_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATHS", (str(tmp_path / "a"), str(tmp_path / "b")))
    cfg = load(None)
    assert cfg == Config()
    assert cfg.source is None


def test_an_explicit_path_that_does_not_exist_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fallback = tmp_path / "tlshd.conf"
    fallback.write_text("[debug]\nloglevel=2\n")
    monkeypatch.setattr(config, "DEFAULT_PATHS", (str(fallback),))
    missing = tmp_path / "missing.conf"
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(missing))}: cannot read config: No such file or directory"):
        load(str(missing))  # never silently falls back to a default file


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    # a directory cannot be read as a file even by root (chmod 000 would not stop root)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))}: cannot read config: Is a directory"):
        load(str(tmp_path))


def test_unreadable_default_file_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATHS", (str(tmp_path),))
    with pytest.raises(ConfigError, match="cannot read config"):
        load(None)


def test_file_without_permission_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "secret.conf"
    path.write_text("[debug]\n")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anyway: make it unreadable another way
        path.unlink()
        os.symlink(path.name + ".loop", path)
        os.symlink(path.name, str(path) + ".loop")  # a symlink loop: ELOOP, for any user
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: cannot read config: "):
        load(str(path))


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.conf"
    path.write_bytes(b"[hsd]\nbackend=caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: not a UTF-8 text file"):
        load(str(path))
