"""Property-based fuzzing of everything that parses outside input.

The decoders read bytes from the kernel (or anything that can write to a
netlink socket), the config parser reads a file an administrator edits,
CryptoInfo.unpack reads what getsockopt returns, the PSK server reads a
peer's ClientHello before its TLS library does, and key descriptions (PSK
identities, KEYCTL_DESCRIBE, /proc/keys) come from whoever filled the
keyrings.  Whatever the input, each may only fail with its own documented
error: ProtocolError, ConfigError, ValueError, MalformedClientHello,
CredentialError.  Anything else would kill a dispatcher thread or leave a
socket without its DONE.

Runs derandomized (same cases every run, so CI is stable) with no deadline;
18,700 cases in total (`pytest --hypothesis-show-statistics` prints them per
property; README's test command does).
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsd import protocol as p
from hsd.config import ConfigError, parse
from hsd.errors import CredentialError
from hsd.keyring import parse_description
from hsd.ktls import BY_TYPE, TLS_1_2_VERSION, TLS_1_3_VERSION, CryptoInfo
from hsd.protocol import GenlMessage, HandshakeRequest, NetlinkError, ProtocolError
from hsd.tls13 import (MalformedClientHello, OfferedPsks, client_hello_length, handshake_bytes,
                                 offered_psks)
from hsd_psk.identity import nvme_hash, psk_hash
from hsd_psk.keys import keyring_in_proc_keys_line


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


FAMILY_ID = 0x1D
u32s = st.integers(0, 0xFFFFFFFF)
s32s = st.integers(-(1 << 31), (1 << 31) - 1)

# ---------------------------------------------------------------- valid messages to start from

requests = st.builds(
    HandshakeRequest,
    sockfd=s32s,
    message_type=st.sampled_from([0, 1, 2, 3, 0xFFFFFFFF]),
    auth_mode=st.sampled_from([0, 1, 2, 3, 4]),
    timeout_ms=st.one_of(st.just(0), u32s),
    peername=st.one_of(st.none(), st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                                          min_size=1, max_size=40)),
    peer_identities=st.lists(u32s, max_size=p.MAX_PEER_IDENTITIES).map(tuple),
    certificate=st.one_of(st.just(0), s32s),
    privkey=st.one_of(st.just(0), s32s),
    keyring=st.one_of(st.just(0), u32s),
)
dones = st.builds(p.Done, sockfd=s32s, status=st.one_of(st.none(), st.integers(0, p.MAX_STATUS)),
                  remote_auth=st.lists(u32s, max_size=6).map(tuple))
families = st.builds(p.FamilyInfo, id=st.integers(1, 0xFFFF), name=st.sampled_from(["handshake", "nlctrl", "x"]),
                     version=u32s, groups=st.dictionaries(st.sampled_from(["none", "tlshd", "other"]), u32s, max_size=3))
seqs = u32s


@st.composite
def valid_messages(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["reply", "done", "accept", "ready", "newfamily", "getfamily", "error", "ack"]))
    seq = draw(seqs)
    if kind == "reply":
        return p.encode_accept_reply(FAMILY_ID, seq, draw(u32s), draw(requests))
    if kind == "done":
        return p.encode_done(FAMILY_ID, seq, draw(dones))
    if kind == "accept":
        return p.encode_accept(FAMILY_ID, seq, draw(st.integers(0, 3)))
    if kind == "ready":
        return p.encode_ready(FAMILY_ID, draw(st.integers(0, 3)), seq)
    if kind == "newfamily":
        return p.encode_newfamily(draw(families), seq)
    if kind == "getfamily":
        return p.encode_getfamily("handshake", seq)
    inner = p.encode_done(FAMILY_ID, seq, draw(dones))
    return p.encode_error(inner, draw(st.integers(1, 4095)) if kind == "error" else 0)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """One or two valid messages in a buffer, then a few byte-level mutations."""
    buf = bytearray(b"".join(draw(st.lists(valid_messages(), min_size=1, max_size=2))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set16", "set32", "truncate", "insert", "delete"]))
        if not buf:
            break
        i = draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[i] ^= draw(st.integers(1, 255))
        elif op == "set16":  # length and type fields are u16
            buf[i:i + 2] = struct.pack("=H", draw(st.sampled_from([0, 1, 3, 4, 5, 7, 8, 0x8007, 0xFFFF])
                                                  | st.integers(0, 0xFFFF)))
        elif op == "set32":
            buf[i:i + 4] = struct.pack("=I", draw(st.sampled_from([0, 16, 19, 20, 0xFFFFFFFF]) | u32s))
        elif op == "truncate":
            del buf[i:]
        elif op == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=12))
        else:
            del buf[i:i + draw(st.integers(1, 8))]
    return bytes(buf)


# ---------------------------------------------------------------- random attribute streams, framed or not


@st.composite
def attribute_streams(draw: st.DrawFn, depth: int = 1) -> bytes:
    """Well-framed attributes of random types, flags and sizes: reaches every branch of the decoders."""
    out = b""
    for _ in range(draw(st.integers(0, 6))):
        atype = draw(st.integers(0, 12)) | draw(st.sampled_from([0, 0, 0, p.NLA_F_NESTED, p.NLA_F_NET_BYTEORDER]))
        shape = draw(st.integers(0, 3))
        if shape < 2:
            payload = draw(st.binary(min_size=4, max_size=4))
        elif shape == 2 and depth:
            payload = draw(attribute_streams(depth - 1))  # a nest
        else:
            payload = draw(st.binary(max_size=12))
        out += p.attr(atype, payload)
    if draw(st.integers(0, 9)) == 0:
        out += draw(st.binary(max_size=6))  # garbage tail
    return out


def framed(body: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda mtype, flags, cmd, payload: GenlMessage(mtype, flags, 1, 0, cmd, 1, payload).encode(),
        st.sampled_from([FAMILY_ID, p.GENL_ID_CTRL, p.NLMSG_ERROR, p.NLMSG_DONE, 1, 0xFFFF]),
        st.integers(0, 0xFFFF), st.integers(0, 4), body)


# ---------------------------------------------------------------- the harness


def decode_everything(buf: bytes) -> None:
    """Run every decoder that could ever see this buffer; only ProtocolError may escape any of them."""
    try:
        msgs = p.split_messages(buf)
    except ProtocolError:
        return
    for msg in msgs:
        if isinstance(msg, NetlinkError):
            assert msg.error == -struct.unpack("=i", struct.pack("=I", (-msg.error) & 0xFFFFFFFF))[0]
            decode_everything(msg.original)
            continue
        check_genl(msg)


def check_genl(msg: GenlMessage) -> None:
    hint = p.sockfd_hint(msg)
    assert hint is None or isinstance(hint, int)
    try:
        req = p.decode_accept_reply(msg)
    except ProtocolError as exc:
        assert exc.sockfd == hint  # the error names the fd exactly when one can be found
    else:
        assert req.sockfd == hint
        # what we decoded, re-encoded, decodes to the same request (unknown attributes aside)
        again = p.decode_accept_reply(GenlMessage(0, 0, 0, 0, p.Cmd.ACCEPT, 1,
                                                  p.split_messages(p.encode_accept_reply(1, 0, 0, req))[0].payload))
        assert again == HandshakeRequest(**{**req.__dict__, "unknown_attrs": ()})
    try:
        done = p.decode_done_request(msg)
    except ProtocolError:
        pass
    else:
        assert done.status is None or 0 <= done.status <= p.MAX_STATUS
        if done.status is not None:
            assert p.decode_done_request(p.split_messages(p.encode_done(1, 0, done))[0]).sockfd == done.sockfd
    try:
        handler = p.decode_accept_request(msg)
    except ProtocolError:
        pass
    else:
        assert 0 <= handler <= p.HANDLER_CLASS_MAX
    try:
        info = p.decode_newfamily(msg)
    except ProtocolError:
        pass
    else:
        assert 0 < info.id <= 0xFFFF


# ---------------------------------------------------------------- netlink decoders


@fuzz(2500)
@given(st.binary(max_size=300) | framed(st.binary(max_size=120)))
def test_decoders_on_arbitrary_bytes(buf: bytes) -> None:
    decode_everything(buf)


@fuzz(3000)
@given(mutated())
def test_decoders_on_mutated_valid_messages(buf: bytes) -> None:
    decode_everything(buf)


@fuzz(1500)
@given(framed(attribute_streams()))
def test_decoders_on_random_attribute_streams(buf: bytes) -> None:
    decode_everything(buf)
    msg = GenlMessage(FAMILY_ID, 0, 0, 0, p.Cmd.ACCEPT, 1, buf[20:])
    check_genl(msg)


@fuzz(800)
@given(requests, seqs, u32s)
def test_accept_reply_round_trip(req: HandshakeRequest, seq: int, pid: int) -> None:
    (msg,) = p.split_messages(p.encode_accept_reply(FAMILY_ID, seq, pid, req))
    assert (msg.seq, msg.pid) == (seq, pid)
    assert p.decode_accept_reply(msg) == req


@fuzz(500)
@given(dones, seqs)
def test_done_round_trip(done: p.Done, seq: int) -> None:
    (msg,) = p.split_messages(p.encode_done(FAMILY_ID, seq, done))
    expected = done if done.status == 0 else p.Done(done.sockfd, done.status, ())
    assert p.decode_done_request(msg) == expected


@fuzz(300)
@given(valid_messages(), s32s, st.binary(min_size=1, max_size=3), st.integers(1, 12))
def test_a_broken_reply_still_names_its_sockfd(_: bytes, sockfd: int, bad: bytes, atype: int) -> None:
    payload = p.attr_s32(p.AcceptAttr.SOCKFD, sockfd) + p.attr_u32(p.AcceptAttr.MESSAGE_TYPE, 1)
    payload += p.attr(atype, bad) if atype in (2, 3, 4, 5, 6, 9) else bad  # wrong-size u32 or a torn header
    msg = GenlMessage(FAMILY_ID, 0, 0, 0, p.Cmd.ACCEPT, 1, payload)
    try:
        p.decode_accept_reply(msg)
    except ProtocolError as exc:
        assert exc.sockfd == sockfd
    else:
        raise AssertionError("a malformed reply was accepted")


# ---------------------------------------------------------------- config


@fuzz(1000)
@given(st.text(max_size=400))
def test_config_parse_on_arbitrary_text(text: str) -> None:
    try:
        parse(text, "fuzz.conf")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.conf:")


SECTIONS = ["debug", "authenticate", "authenticate.client", "authenticate.server", "hsd", "hsd.backends",
            "hsd.client", "hsd.server", "hsd.psk", "unknown", ""]
KEYS = ["loglevel", "tls", "nl", "keyrings", "x509.truststore", "x509.crl", "x509.certificate", "x509.private_key",
        "x509.pq.certificate", "x509.pq.private_key", "backend", "max_inflight", "handshake_timeout",
        "enable_plugins", "disable_plugins", "client.psk", "server.x509", "client.bogus", "verify_server",
        "require_client_certificate", "allowed_client_sans", "modes", "nope"]
VALUES = ["0", "1", "10", "11", "-1", "0x10", "1_000", "true", "off", "maybe", "", "psk_ke", "psk_dhe_ke;psk_ke",
          "/etc/pki/a.pem", "a;b,c", "9" * 5000, "١٢", " 3 "]

config_lines = st.one_of(
    st.sampled_from(SECTIONS).map(lambda s: f"[{s}]"),
    st.tuples(st.sampled_from(KEYS), st.sampled_from(VALUES) | st.text(max_size=10)).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.sampled_from(["", "# comment", "  ", "[broken", "no equals sign", "=value", "\r"]),
    st.text(max_size=20),
)


@fuzz(1200)
@given(st.lists(config_lines, max_size=12))
def test_config_parse_on_plausible_files(lines: list[str]) -> None:
    text = "\n".join(lines)
    nlines = len(text.split("\n"))
    try:
        cfg = parse(text, "fuzz.conf")
    except ConfigError as exc:
        where = str(exc).split(": ", 1)[0]
        assert where.startswith("fuzz.conf:") and 1 <= int(where.split(":")[1]) <= nlines
    else:
        for warning in cfg.warnings:
            lineno = int(warning.split(":")[1])
            assert 1 <= lineno <= nlines
            if "unknown section [" in warning:  # a section neither tlshd's nor hsd's: warned once, at its header
                assert text.split("\n")[lineno - 1].strip().startswith("[")
                continue
            key = warning.split("unknown key '", 1)[1].rsplit("' in [", 1)[0]
            assert text.split("\n")[lineno - 1].strip().startswith(key)
        assert 0 <= cfg.loglevel <= 10 and 1 <= cfg.max_inflight <= 100000


# ---------------------------------------------------------------- crypto_info


@fuzz(1000)
@given(st.binary(max_size=80))
def test_crypto_info_unpack_on_arbitrary_bytes(raw: bytes) -> None:
    try:
        info = CryptoInfo.unpack(raw)
    except ValueError:
        return
    assert info.pack() == raw


@fuzz(1000)
@given(st.sampled_from([TLS_1_2_VERSION, TLS_1_3_VERSION, 0x0302, 0]), st.sampled_from(sorted(BY_TYPE) + [0, 50, 57]),
       st.integers(0, 70), st.randoms(use_true_random=False))
def test_crypto_info_unpack_on_plausible_headers(version: int, cipher_type: int, tail: int, rnd) -> None:  # type: ignore[no-untyped-def]
    raw = struct.pack("=HH", version, cipher_type) + rnd.randbytes(tail)
    try:
        info = CryptoInfo.unpack(raw)
    except ValueError:
        assert (version not in (TLS_1_2_VERSION, TLS_1_3_VERSION) or cipher_type not in BY_TYPE
                or len(raw) != BY_TYPE[cipher_type].struct_size)
        return
    assert info.pack() == raw and len(raw) == info.spec.struct_size


# ---------------------------------------------------------------- a peer's ClientHello (server-side PSK selection)


def client_hello(identities: list[bytes], modes: list[int], extra_extensions: list[tuple[int, bytes]]) -> bytes:
    """A ClientHello message (RFC 8446 4.1.2) with pre_shared_key and psk_key_exchange_modes."""
    def vec(n: int, data: bytes) -> bytes:
        return len(data).to_bytes(n, "big") + data

    exts = b"".join(t.to_bytes(2, "big") + vec(2, body) for t, body in extra_extensions)
    exts += (45).to_bytes(2, "big") + vec(2, vec(1, bytes(modes)))
    offered = b"".join(vec(2, ident) + b"\0\0\0\0" for ident in identities)
    binders = b"".join(vec(1, b"\x55" * 32) for _ in identities)
    exts += (41).to_bytes(2, "big") + vec(2, vec(2, offered) + vec(2, binders))  # pre_shared_key comes last
    body = b"\x03\x03" + b"\x11" * 32 + vec(1, b"") + vec(2, b"\x13\x01\x13\x02") + vec(1, b"\0") + vec(2, exts)
    return b"\x01" + vec(3, body)


hellos = st.builds(client_hello, st.lists(st.binary(min_size=1, max_size=60), min_size=1, max_size=5),
                   st.lists(st.sampled_from([0, 1]), min_size=1, max_size=2),
                   st.lists(st.tuples(st.sampled_from([0, 10, 13, 43, 51, 0xFAFA]), st.binary(max_size=40)),
                            max_size=4))


def parse_client_hello(data: bytes) -> None:
    """Every ClientHello entry point: a clean MalformedClientHello or a result that fits the input."""
    for parse_one in (client_hello_length, offered_psks, lambda d: handshake_bytes([d])):
        try:
            result = parse_one(data)
        except MalformedClientHello:
            continue
        if isinstance(result, OfferedPsks):
            assert all(ident in data for ident in result.identities)
            assert len(result.identities) <= len(data) // 6


@fuzz(1000)
@given(st.binary(max_size=300) | st.binary(max_size=200).map(lambda b: b"\x01" + len(b).to_bytes(3, "big") + b))
def test_client_hello_parser_on_arbitrary_bytes(data: bytes) -> None:
    parse_client_hello(data)


@fuzz(600)
@given(st.data())
def test_client_hello_parser_reads_back_every_offered_identity(data: st.DataObject) -> None:
    identities = data.draw(st.lists(st.binary(min_size=1, max_size=60), min_size=1, max_size=5))
    modes = data.draw(st.lists(st.sampled_from([0, 1]), min_size=1, max_size=2))
    message = client_hello(identities, modes, [])
    assert client_hello_length(message) == len(message)
    assert offered_psks(message) == OfferedPsks(tuple(identities), tuple(modes))


@fuzz(1500)
@given(hellos, st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, 400))
def test_client_hello_parser_on_mutated_hellos(message: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    buf = bytearray(message)
    for pos, value in flips:
        buf[pos % len(buf)] = value
    parse_client_hello(bytes(buf))
    parse_client_hello(bytes(buf[:cut]))


# ---------------------------------------------------------------- key descriptions


@fuzz(800)
@given(st.text(max_size=120) | st.builds(lambda v, k, h, rest: f"NVMe{v}{k}{h} {rest}", st.integers(0, 9),
                                         st.sampled_from("RGX"), st.sampled_from(["01", "02", "03", "1", ""]),
                                         st.text(max_size=40)),
       st.integers(-1, 100))
def test_psk_hash_from_any_identity_and_length(identity: str, length: int) -> None:
    try:
        hash_name = psk_hash(identity, length)
    except CredentialError as exc:
        assert identity in str(exc)
        return
    assert hash_name in ("sha256", "sha384") and 0 < length <= 48
    named = nvme_hash(identity)
    assert hash_name == (named or {32: "sha256", 48: "sha384"}[length])


@fuzz(600)
@given(st.binary(max_size=120))
def test_key_description_parse_on_arbitrary_bytes(raw: bytes) -> None:
    try:
        ktype, uid, gid, perm, desc = parse_description(raw)
    except ValueError:
        return
    text = raw.decode(errors="replace")
    assert text.startswith(ktype + ";") and text.endswith(";" + desc) and ";" not in ktype
    assert isinstance(uid, int) and isinstance(gid, int) and isinstance(perm, int)


@fuzz(600)
@given(st.sampled_from(["user", "psk", "keyring", "asymmetric"]), st.integers(0, 1 << 32), st.integers(0, 1 << 32),
       st.integers(0, 0xFFFFFFFF), st.text(st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_key_description_parse_round_trip(ktype: str, uid: int, gid: int, perm: int, desc: str) -> None:
    raw = f"{ktype};{uid};{gid};{perm:08x};{desc}".encode()
    assert parse_description(raw) == (ktype, uid, gid, perm, desc)


proc_keys_lines = st.one_of(
    st.text(max_size=160),
    st.builds(lambda serial, kind, name, rest: f"{serial} I--Q---     1 perm 3f030000     0     0 {kind} {name}: {rest}\n",
              st.integers(0, 0xFFFFFFFF).map(lambda n: f"{n:08x}") | st.text(max_size=9),
              st.sampled_from(["keyring", "user", "psk", ""]), st.sampled_from([".nvme", ".nfs", "x", ""]),
              st.text(max_size=30)),
)


@fuzz(800)
@given(proc_keys_lines, st.sampled_from([".nvme", ".nfs", "x"]))
def test_proc_keys_line_parse(line: str, name: str) -> None:
    found = keyring_in_proc_keys_line(line, name)
    if found is None:
        return
    fields = line.split()
    assert fields[7] == "keyring" and fields[8].rstrip(":") == name and found == int(fields[0], 16)
