"""The `handshake` family codec, attribute by attribute.

The kernel is strict and the daemon must not be: these tests pin the wire
format (against hand-built bytes and an independent decoder, pyroute2), the
kernel's attribute order in ACCEPT replies, the daemon's tolerance of future
attributes, and the kernel-side strictness the simulator relies on.
"""

from __future__ import annotations

import errno
import logging
import struct
import sys

import pytest

from hsd import protocol as p
from hsd.protocol import (
    AcceptAttr,
    AuthMode,
    Cmd,
    DoneAttr,
    GenlMessage,
    HandshakeRequest,
    MessageType,
    NetlinkError,
    ProtocolError,
    X509Attr,
)

FAMILY_ID = 0x1D
little_endian_only = pytest.mark.skipif(sys.byteorder != "little", reason="hand-built bytes are little-endian")


def only(buf: bytes) -> GenlMessage:
    """The single generic-netlink message in buf."""
    msgs = p.split_messages(buf)
    assert len(msgs) == 1 and isinstance(msgs[0], GenlMessage)
    return msgs[0]


def genl(cmd: int, payload: bytes, family: int = FAMILY_ID, flags: int = 0, seq: int = 1) -> GenlMessage:
    return GenlMessage(family, flags, seq, 0, cmd, p.FAMILY_VERSION, payload)


def u32(atype: int, value: int) -> bytes:
    return p.attr_u32(atype, value)


def attr_types(raw: bytes) -> list[int]:
    return [atype for atype, _ in only(raw).attrs()]


FULL_REQUEST = HandshakeRequest(
    sockfd=9, message_type=MessageType.CLIENTHELLO, auth_mode=AuthMode.X509, timeout_ms=10000,
    peername="nfs.example.net", peer_identities=(101, 102), certificate=201, privkey=202, keyring=301,
)


# ---------------------------------------------------------------- attributes


@pytest.mark.parametrize("payload,padded", [(b"", 4), (b"a", 8), (b"ab", 8), (b"abc", 8), (b"abcd", 8), (b"abcde", 12)])
def test_attribute_length_excludes_padding_and_padding_is_zero(payload: bytes, padded: int) -> None:
    raw = p.attr(5, payload)
    assert len(raw) == padded
    length, atype = struct.unpack_from("=HH", raw)
    assert (length, atype) == (4 + len(payload), 5)
    assert raw[4 + len(payload):] == b"\0" * (padded - 4 - len(payload))
    assert p.parse_attrs(raw) == [(5, payload)]


def test_u32_and_s32_are_exactly_four_bytes() -> None:
    assert p.attr_u32(1, 0xFFFFFFFF) == struct.pack("=HHI", 8, 1, 0xFFFFFFFF)
    assert p.attr_u32(1, -1) == struct.pack("=HHI", 8, 1, 0xFFFFFFFF)  # masked, never longer
    assert p.attr_s32(1, -5) == struct.pack("=HHi", 8, 1, -5)
    assert p.get_u32(struct.pack("=I", 4095)) == 4095
    assert p.get_s32(struct.pack("=i", -2)) == -2


@pytest.mark.parametrize("size", [0, 1, 2, 3, 5, 8])
def test_u32_and_s32_of_any_other_size_are_rejected(size: int) -> None:
    with pytest.raises(ProtocolError, match="u32 attribute has"):
        p.get_u32(b"\1" * size)
    with pytest.raises(ProtocolError, match="s32 attribute has"):
        p.get_s32(b"\1" * size)


def test_strings_are_nul_terminated_and_must_be_utf8() -> None:
    raw = p.attr_str(8, "héllo")
    (atype, payload), = p.parse_attrs(raw)
    assert payload == "héllo".encode() + b"\0"
    assert p.get_str(payload) == "héllo"
    assert p.get_str(b"abc") == "abc"  # a missing NUL is tolerated
    assert p.get_str(b"ab\0cd\0") == "ab"  # text ends at the first NUL
    with pytest.raises(ProtocolError, match="UTF-8"):
        p.get_str(b"\xff\xfe\0")


def test_nest_sets_nla_f_nested() -> None:
    raw = p.attr_nest(7, p.attr_s32(1, 3))
    (atype, inner), = p.parse_attrs(raw)
    assert atype == 7 | p.NLA_F_NESTED == 0x8007
    assert p.parse_attrs(inner) == [(1, struct.pack("=i", 3))]


@pytest.mark.parametrize("raw,why", [
    (b"\x08\x00", "truncated attribute header"),
    (b"\x03\x00\x01\x00", "out of bounds"),  # length below the header size
    (b"\x0c\x00\x01\x00\0\0\0\0", "out of bounds"),  # length past the buffer
    (p.attr_u32(1, 1) + b"\x05\x00", "truncated attribute header"),  # trailing bytes
])
def test_malformed_attribute_streams(raw: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        p.parse_attrs(raw)


def test_unpadded_last_attribute_is_accepted_like_the_kernel() -> None:
    # the kernel's nla_ok() only needs nla_len <= remaining; the final padding may be absent
    raw = struct.pack("=HH", 5, 8) + b"x"
    assert p.parse_attrs(raw) == [(8, b"x")]


# ---------------------------------------------------------------- hand-built bytes (pins the wire format)


@little_endian_only
def test_ready_bytes() -> None:
    expected = bytes.fromhex(
        "1c000000" "1d00" "0000" "00000000" "00000000"  # nlmsghdr: len 28, type 0x1d, flags 0, seq 0, pid 0
        "01" "01" "0000"  # genlmsghdr: READY, version 1
        "0800" "0200" "01000000"  # handler-class = 1
    )
    assert p.encode_ready(FAMILY_ID) == expected


@little_endian_only
def test_accept_request_bytes() -> None:
    expected = bytes.fromhex(
        "1c000000" "1d00" "0100" "07000000" "00000000"  # NLM_F_REQUEST, seq 7
        "02" "01" "0000"  # ACCEPT
        "0800" "0200" "01000000"
    )
    assert p.encode_accept(FAMILY_ID, 7) == expected


@little_endian_only
def test_accept_reply_bytes() -> None:
    req = HandshakeRequest(sockfd=5, message_type=MessageType.SERVERHELLO, auth_mode=AuthMode.PSK,
                           timeout_ms=10000, peername="ab", peer_identities=(0x11223344,), keyring=0x55)
    expected = bytes.fromhex(
        "4c000000" "1d00" "0000" "03000000" "2a000000"  # len 76, seq 3, pid 42
        "02" "01" "0000"
        "0800" "0100" "05000000"  # sockfd 5
        "0800" "0300" "02000000"  # message-type serverhello
        "0700" "0800" "616200" "00"  # peername "ab\0" + 1 byte padding
        "0800" "0400" "10270000"  # timeout 10000
        "0800" "0900" "55000000"  # keyring
        "0800" "0500" "02000000"  # auth-mode psk
        "0800" "0600" "44332211"  # peer-identity
    )
    assert p.encode_accept_reply(FAMILY_ID, 3, 42, req) == expected
    assert p.decode_accept_reply(only(expected)) == req


@little_endian_only
def test_accept_reply_certificate_nest_bytes() -> None:
    req = HandshakeRequest(sockfd=5, message_type=1, auth_mode=3, certificate=7, privkey=8)
    raw = p.encode_accept_reply(FAMILY_ID, 1, 0, req)
    assert raw[-20:] == bytes.fromhex(
        "1400" "0780"  # certificate, NLA_F_NESTED
        "0800" "0100" "07000000"  # cert
        "0800" "0200" "08000000"  # privkey
    )


@little_endian_only
def test_done_bytes() -> None:
    expected = bytes.fromhex(
        "2c000000" "1d00" "0500" "09000000" "00000000"  # NLM_F_REQUEST|NLM_F_ACK, seq 9
        "03" "01" "0000"
        "0800" "0100" "00000000"  # status 0
        "0800" "0200" "feffffff"  # sockfd -2 (s32)
        "0800" "0300" "78563412"  # remote-auth
    )
    assert p.encode_done(FAMILY_ID, 9, p.Done(-2, 0, (0x12345678,))) == expected


@little_endian_only
def test_getfamily_bytes() -> None:
    expected = bytes.fromhex(
        "24000000" "1000" "0100" "04000000" "00000000"
        "03" "01" "0000"  # CTRL_CMD_GETFAMILY
        "0e00" "0200" "68616e647368616b6500" "0000"  # "handshake\0" + 2 bytes padding
    )
    assert p.encode_getfamily("handshake", 4) == expected


@little_endian_only
def test_ack_bytes() -> None:
    request = p.encode_done(FAMILY_ID, 9, p.Done(4, 0))
    expected = bytes.fromhex("24000000" "0200" "0000" "09000000" "00000000" "00000000") + request[:16]
    assert p.encode_error(request, 0) == expected


# ---------------------------------------------------------------- ACCEPT reply: every attribute


def test_accept_reply_round_trip_with_every_attribute() -> None:
    raw = p.encode_accept_reply(FAMILY_ID, 5, 77, FULL_REQUEST)
    msg = only(raw)
    assert (msg.type, msg.seq, msg.pid, msg.cmd, msg.version) == (FAMILY_ID, 5, 77, Cmd.ACCEPT, 1)
    req = p.decode_accept_reply(msg)
    assert req == FULL_REQUEST
    assert req.role == "client" and req.auth == "x509"
    assert isinstance(req.message_type, MessageType) and isinstance(req.auth_mode, AuthMode)


def test_accept_reply_attributes_in_the_kernels_order() -> None:
    # tls_handshake_accept: SOCKFD, MESSAGE_TYPE, PEERNAME, TIMEOUT, KEYRING, AUTH_MODE, PEER_IDENTITY*, CERTIFICATE
    raw = p.encode_accept_reply(FAMILY_ID, 1, 0, FULL_REQUEST)
    assert attr_types(raw) == [1, 3, 8, 4, 9, 5, 6, 6, 7 | p.NLA_F_NESTED]


def test_accept_reply_omits_unset_optional_attributes() -> None:
    req = HandshakeRequest(sockfd=3, message_type=MessageType.CLIENTHELLO, auth_mode=AuthMode.UNAUTH)
    raw = p.encode_accept_reply(FAMILY_ID, 1, 0, req)
    assert attr_types(raw) == [AcceptAttr.SOCKFD, AcceptAttr.MESSAGE_TYPE, AcceptAttr.AUTH_MODE]
    decoded = p.decode_accept_reply(only(raw))
    assert decoded == req
    assert (decoded.peername, decoded.timeout_ms, decoded.keyring, decoded.certificate, decoded.privkey) == (None, 0, 0, 0, 0)
    assert decoded.peer_identities == () and decoded.unknown_attrs == ()


@pytest.mark.parametrize("count", range(0, p.MAX_PEER_IDENTITIES + 1))
def test_multi_peer_identity_keeps_order(count: int) -> None:
    serials = tuple(1000 + 7 * i for i in range(count))
    req = HandshakeRequest(sockfd=4, message_type=MessageType.CLIENTHELLO, auth_mode=AuthMode.PSK, peer_identities=serials)
    raw = p.encode_accept_reply(FAMILY_ID, 1, 0, req)
    assert attr_types(raw).count(AcceptAttr.PEER_IDENTITY) == count
    assert p.decode_accept_reply(only(raw)).peer_identities == serials


def test_server_psk_peer_identity_zero_is_sent_and_kept() -> None:
    req = HandshakeRequest(sockfd=4, message_type=MessageType.SERVERHELLO, auth_mode=AuthMode.PSK, peer_identities=(0,))
    decoded = p.decode_accept_reply(only(p.encode_accept_reply(FAMILY_ID, 1, 0, req)))
    assert decoded.peer_identities == (0,) and decoded.role == "server" and decoded.auth == "psk"


@pytest.mark.parametrize("cert,key", [(7, 0), (0, 8), (7, 8), (-1, 5)])
def test_certificate_nest_when_cert_or_key_set(cert: int, key: int) -> None:
    req = HandshakeRequest(sockfd=4, message_type=1, auth_mode=AuthMode.X509, certificate=cert, privkey=key)
    raw = p.encode_accept_reply(FAMILY_ID, 1, 0, req)
    (ctype, nest), = [(t, v) for t, v in only(raw).attrs() if t & p.NLA_TYPE_MASK == AcceptAttr.CERTIFICATE]
    assert ctype & p.NLA_F_NESTED
    assert p.parse_attrs(nest) == [(X509Attr.CERT, struct.pack("=i", cert)), (X509Attr.PRIVKEY, struct.pack("=i", key))]
    decoded = p.decode_accept_reply(only(raw))
    assert (decoded.certificate, decoded.privkey) == (cert, key)


def test_no_certificate_nest_without_cert_or_key() -> None:
    req = HandshakeRequest(sockfd=4, message_type=1, auth_mode=AuthMode.X509)
    assert AcceptAttr.CERTIFICATE | p.NLA_F_NESTED not in attr_types(p.encode_accept_reply(FAMILY_ID, 1, 0, req))


def test_certificate_nest_without_the_nested_flag_is_still_read() -> None:
    payload = (p.attr_s32(1, 4) + u32(3, 1) + u32(5, 3)
               + p.attr(AcceptAttr.CERTIFICATE, p.attr_s32(X509Attr.CERT, 11)))
    decoded = p.decode_accept_reply(genl(Cmd.ACCEPT, payload))
    assert decoded.certificate == 11 and decoded.privkey == 0


def test_peername_timeout_keyring_values() -> None:
    req = HandshakeRequest(sockfd=0, message_type=2, auth_mode=2, timeout_ms=0xFFFFFFFF,
                           peername="x" * 300, keyring=0xFFFFFFFE)
    decoded = p.decode_accept_reply(only(p.encode_accept_reply(FAMILY_ID, 1, 0, req)))
    assert decoded == req


def test_empty_peername_decodes_as_none() -> None:
    payload = p.attr_s32(1, 4) + u32(3, 1) + u32(5, 1) + p.attr(AcceptAttr.PEERNAME, b"\0")
    assert p.decode_accept_reply(genl(Cmd.ACCEPT, payload)).peername is None


def test_negative_sockfd_is_signed() -> None:
    req = HandshakeRequest(sockfd=-1, message_type=1, auth_mode=1)
    assert p.decode_accept_reply(only(p.encode_accept_reply(FAMILY_ID, 1, 0, req))).sockfd == -1


def test_handler_class_in_a_reply_is_checked_but_not_kept() -> None:
    payload = p.attr_s32(1, 4) + u32(AcceptAttr.HANDLER_CLASS, 1) + u32(3, 1) + u32(5, 1)
    assert p.decode_accept_reply(genl(Cmd.ACCEPT, payload)).sockfd == 4
    bad = p.attr_s32(1, 4) + p.attr(AcceptAttr.HANDLER_CLASS, b"\1\0") + u32(3, 1) + u32(5, 1)
    with pytest.raises(ProtocolError) as info:
        p.decode_accept_reply(genl(Cmd.ACCEPT, bad))
    assert info.value.sockfd == 4


def test_unknown_enum_values_are_kept_as_numbers() -> None:
    req = HandshakeRequest(sockfd=4, message_type=9, auth_mode=17)
    decoded = p.decode_accept_reply(only(p.encode_accept_reply(FAMILY_ID, 1, 0, req)))
    assert decoded.message_type == 9 and not isinstance(decoded.message_type, MessageType)
    assert decoded.role == "unknown" and decoded.auth == "auth17"


def test_byte_order_flag_is_masked_from_the_type() -> None:
    payload = p.attr_s32(1 | p.NLA_F_NET_BYTEORDER, 4) + u32(3, 1) + u32(5, 1)
    assert p.decode_accept_reply(genl(Cmd.ACCEPT, payload)).sockfd == 4


# ---------------------------------------------------------------- ACCEPT reply: tolerance and errors


def test_unknown_future_attributes_are_tolerated_kept_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    raw = p.encode_accept_reply(FAMILY_ID, 1, 0, FULL_REQUEST)
    msg = only(raw)
    msg.payload += p.attr(10, b"future!") + u32(42, 1) + p.attr_nest(99, u32(1, 1))
    with caplog.at_level(logging.DEBUG, logger="hsd.protocol"):
        decoded = p.decode_accept_reply(msg)
    assert decoded.unknown_attrs == (10, 42, 99)
    assert decoded.sockfd == FULL_REQUEST.sockfd and decoded.peer_identities == FULL_REQUEST.peer_identities
    debug = [r for r in caplog.records if r.name == "hsd.protocol" and r.levelno == logging.DEBUG]
    assert [r.getMessage() for r in debug] == [
        "ignoring unknown accept attribute 10 (7 bytes)",
        "ignoring unknown accept attribute 42 (4 bytes)",
        "ignoring unknown accept attribute 99 (8 bytes)",
    ]


def test_unknown_attributes_are_not_logged_above_debug(caplog: pytest.LogCaptureFixture) -> None:
    msg = only(p.encode_accept_reply(FAMILY_ID, 1, 0, FULL_REQUEST))
    msg.payload += u32(42, 1)
    with caplog.at_level(logging.INFO, logger="hsd.protocol"):
        p.decode_accept_reply(msg)
    assert not caplog.records


def test_unknown_x509_attribute_is_tolerated_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    nest = p.attr_s32(X509Attr.CERT, 5) + u32(3, 1) + p.attr_s32(X509Attr.PRIVKEY, 6)
    payload = p.attr_s32(1, 4) + u32(3, 1) + u32(5, 3) + p.attr_nest(AcceptAttr.CERTIFICATE, nest)
    with caplog.at_level(logging.DEBUG, logger="hsd.protocol"):
        decoded = p.decode_accept_reply(genl(Cmd.ACCEPT, payload))
    assert (decoded.certificate, decoded.privkey) == (5, 6)
    assert "ignoring unknown x509 attribute 3" in caplog.text


@pytest.mark.parametrize("missing", ["sockfd", "message_type", "auth_mode"])
def test_required_attributes(missing: str) -> None:
    parts = {"sockfd": p.attr_s32(1, 4), "message_type": u32(3, 1), "auth_mode": u32(5, 1)}
    payload = b"".join(v for k, v in parts.items() if k != missing)
    with pytest.raises(ProtocolError, match=f"lacks {missing}") as info:
        p.decode_accept_reply(genl(Cmd.ACCEPT, payload))
    assert info.value.sockfd == (None if missing == "sockfd" else 4)


def test_wrong_command_is_rejected() -> None:
    payload = p.attr_s32(1, 4) + u32(3, 1) + u32(5, 1)
    with pytest.raises(ProtocolError, match="expected ACCEPT") as info:
        p.decode_accept_reply(genl(Cmd.DONE, payload))
    assert info.value.sockfd == 4


@pytest.mark.parametrize("atype", [AcceptAttr.MESSAGE_TYPE, AcceptAttr.TIMEOUT, AcceptAttr.AUTH_MODE,
                                   AcceptAttr.PEER_IDENTITY, AcceptAttr.KEYRING])
def test_u32_attributes_of_the_wrong_size_carry_the_sockfd(atype: int) -> None:
    payload = p.attr_s32(1, 12) + u32(3, 1) + u32(5, 1) + p.attr(atype, b"\1\2\3")
    with pytest.raises(ProtocolError, match="u32 attribute has 3 bytes") as info:
        p.decode_accept_reply(genl(Cmd.ACCEPT, payload))
    assert info.value.sockfd == 12


def test_bad_x509_sizes_carry_the_sockfd() -> None:
    payload = p.attr_s32(1, 12) + u32(3, 1) + u32(5, 3) + p.attr_nest(7, p.attr(X509Attr.CERT, b"\1\2"))
    with pytest.raises(ProtocolError, match="s32 attribute has 2 bytes") as info:
        p.decode_accept_reply(genl(Cmd.ACCEPT, payload))
    assert info.value.sockfd == 12


def test_truncated_attribute_after_the_sockfd_still_names_the_sockfd() -> None:
    payload = p.attr_s32(1, 12) + u32(3, 1) + b"\x10\x00\x05\x00\x01"
    with pytest.raises(ProtocolError, match="out of bounds|truncated") as info:
        p.decode_accept_reply(genl(Cmd.ACCEPT, payload))
    assert info.value.sockfd == 12


def test_malformed_reply_with_a_bad_sockfd_has_no_hint() -> None:
    payload = p.attr(1, b"\1\2") + u32(3, 1) + u32(5, 1)
    with pytest.raises(ProtocolError) as info:
        p.decode_accept_reply(genl(Cmd.ACCEPT, payload))
    assert info.value.sockfd is None


def test_non_utf8_peername_carries_the_sockfd() -> None:
    payload = p.attr_s32(1, 6) + u32(3, 1) + p.attr(AcceptAttr.PEERNAME, b"\xc3\x28\0") + u32(5, 1)
    with pytest.raises(ProtocolError, match="UTF-8") as info:
        p.decode_accept_reply(genl(Cmd.ACCEPT, payload))
    assert info.value.sockfd == 6


def test_protocol_error_is_a_value_error_without_sockfd_by_default() -> None:
    err = ProtocolError("x")
    assert isinstance(err, ValueError) and err.sockfd is None and str(err) == "x"


# ---------------------------------------------------------------- ACCEPT request (kernel side, strict)


@pytest.mark.parametrize("handler", [0, 1, 2])
def test_accept_request_round_trip(handler: int) -> None:
    msg = only(p.encode_accept(FAMILY_ID, 3, handler))
    assert msg.flags == p.NLM_F_REQUEST and msg.cmd == Cmd.ACCEPT
    assert p.decode_accept_request(msg) == handler


def test_accept_request_rejects_handler_class_above_the_policy_max() -> None:
    with pytest.raises(ProtocolError, match="handler-class 3"):
        p.decode_accept_request(only(p.encode_accept(FAMILY_ID, 3, 3)))


def test_accept_request_strictness() -> None:
    with pytest.raises(ProtocolError, match="lacks handler-class"):
        p.decode_accept_request(genl(Cmd.ACCEPT, b""))
    with pytest.raises(ProtocolError, match="unexpected attribute 1"):
        p.decode_accept_request(genl(Cmd.ACCEPT, u32(2, 1) + p.attr_s32(1, 3)))
    with pytest.raises(ProtocolError, match="unexpected attribute 0"):
        p.decode_accept_request(genl(Cmd.ACCEPT, u32(2, 1) + u32(0, 3)))
    with pytest.raises(ProtocolError, match="u32 attribute has 8 bytes"):
        p.decode_accept_request(genl(Cmd.ACCEPT, p.attr(2, b"\1" * 8)))
    with pytest.raises(ProtocolError, match="NLA_F_NESTED not expected"):
        p.decode_accept_request(genl(Cmd.ACCEPT, u32(2 | p.NLA_F_NESTED, 1)))
    with pytest.raises(ProtocolError):
        p.decode_accept_request(genl(Cmd.ACCEPT, u32(2, 1) + b"\1\2"))


# ---------------------------------------------------------------- DONE


def test_done_success_carries_status_sockfd_and_remote_auth() -> None:
    done = p.Done(sockfd=8, status=0, remote_auth=(5, 6, 7))
    raw = p.encode_done(FAMILY_ID, 4, done)
    msg = only(raw)
    assert msg.flags == p.NLM_F_REQUEST | p.NLM_F_ACK and msg.cmd == Cmd.DONE and msg.seq == 4
    assert [t for t, _ in msg.attrs()] == [DoneAttr.STATUS, DoneAttr.SOCKFD] + [DoneAttr.REMOTE_AUTH] * 3
    assert all(len(v) == 4 for _, v in msg.attrs())
    assert p.decode_done_request(msg) == done


@pytest.mark.parametrize("status", [errno.EACCES, errno.ETIMEDOUT, errno.EIO, errno.EKEYREJECTED, p.MAX_STATUS])
def test_done_failure_never_carries_remote_auth(status: int) -> None:
    raw = p.encode_done(FAMILY_ID, 4, p.Done(sockfd=8, status=status, remote_auth=(5, 6)))
    msg = only(raw)
    assert [t for t, _ in msg.attrs()] == [DoneAttr.STATUS, DoneAttr.SOCKFD]
    assert p.decode_done_request(msg) == p.Done(8, status, ())


@pytest.mark.parametrize("status", [-1, p.MAX_STATUS + 1, 1 << 31])
def test_done_status_range_is_enforced_by_the_encoder(status: int) -> None:
    with pytest.raises(ValueError, match="not a positive errno"):
        p.encode_done(FAMILY_ID, 1, p.Done(3, status))


def test_done_without_status_models_a_malformed_done() -> None:
    msg = only(p.encode_done(FAMILY_ID, 1, p.Done(3, None, (9,))))
    assert [t for t, _ in msg.attrs()] == [DoneAttr.SOCKFD]
    assert p.decode_done_request(msg) == p.Done(3, None, ())


def test_done_decoder_is_strict() -> None:
    with pytest.raises(ProtocolError, match="status above 4095"):
        p.decode_done_request(genl(Cmd.DONE, u32(1, 4096) + p.attr_s32(2, 3)))
    with pytest.raises(ProtocolError, match="lacks sockfd"):
        p.decode_done_request(genl(Cmd.DONE, u32(1, 0)))
    with pytest.raises(ProtocolError, match="unknown done attribute 4"):
        p.decode_done_request(genl(Cmd.DONE, u32(1, 0) + p.attr_s32(2, 3) + u32(4, 1)))
    with pytest.raises(ProtocolError, match="unknown done attribute 0"):
        p.decode_done_request(genl(Cmd.DONE, u32(0, 0) + p.attr_s32(2, 3)))
    with pytest.raises(ProtocolError, match="u32 attribute has 2 bytes"):
        p.decode_done_request(genl(Cmd.DONE, p.attr(1, b"\0\0") + p.attr_s32(2, 3)))
    with pytest.raises(ProtocolError, match="s32 attribute has 8 bytes"):
        p.decode_done_request(genl(Cmd.DONE, u32(1, 0) + p.attr(2, b"\0" * 8)))
    with pytest.raises(ProtocolError, match="u32 attribute has 5 bytes"):
        p.decode_done_request(genl(Cmd.DONE, u32(1, 0) + p.attr_s32(2, 3) + p.attr(3, b"\0" * 5)))
    with pytest.raises(ProtocolError, match="NLA_F_NESTED not expected"):
        p.decode_done_request(genl(Cmd.DONE, u32(1, 0) + p.attr_nest(2, b"\3\0\0\0")))


def test_done_decoder_keeps_every_remote_auth_in_order() -> None:
    payload = u32(1, 0) + p.attr_s32(2, 3) + b"".join(u32(3, s) for s in (9, 8, 7, 6, 5, 4))
    assert p.decode_done_request(genl(Cmd.DONE, payload)).remote_auth == (9, 8, 7, 6, 5, 4)


# ---------------------------------------------------------------- READY


def test_ready() -> None:
    msg = only(p.encode_ready(FAMILY_ID))
    assert p.is_ready(msg, FAMILY_ID)
    assert not p.is_ready(msg, FAMILY_ID + 1)
    assert msg.attrs() == [(AcceptAttr.HANDLER_CLASS, struct.pack("=I", 1))]
    assert not p.is_ready(only(p.encode_accept(FAMILY_ID, 1)), FAMILY_ID)
    assert not p.is_ready(NetlinkError(1, 0, 0), FAMILY_ID)


# ---------------------------------------------------------------- controller


def test_getfamily_request() -> None:
    msg = only(p.encode_getfamily(p.FAMILY_NAME, 11))
    assert (msg.type, msg.cmd, msg.flags, msg.seq) == (p.GENL_ID_CTRL, p.CTRL_CMD_GETFAMILY, p.NLM_F_REQUEST, 11)
    assert msg.attrs() == [(p.CTRL_ATTR_FAMILY_NAME, b"handshake\0")]


def test_newfamily_round_trip() -> None:
    info = p.FamilyInfo(0x1D, "handshake", 1, {"none": 9, "tlshd": 10})
    raw = p.encode_newfamily(info, 11, pid=1234)
    msg = only(raw)
    assert (msg.type, msg.cmd, msg.seq, msg.pid) == (p.GENL_ID_CTRL, p.CTRL_CMD_NEWFAMILY, 11, 1234)
    assert [t for t, _ in msg.attrs()] == [1, 2, 3, 7 | p.NLA_F_NESTED]
    assert p.decode_newfamily(msg) == info


def test_newfamily_without_groups() -> None:
    info = p.FamilyInfo(0x22, "handshake", 1)
    assert p.decode_newfamily(only(p.encode_newfamily(info, 1))) == info


def test_newfamily_decoder_errors_and_tolerance() -> None:
    name = p.attr_str(p.CTRL_ATTR_FAMILY_NAME, "handshake")
    with pytest.raises(ProtocolError, match="without an id"):
        p.decode_newfamily(genl(p.CTRL_CMD_NEWFAMILY, name, family=p.GENL_ID_CTRL))
    with pytest.raises(ProtocolError, match="must be u16"):
        p.decode_newfamily(genl(p.CTRL_CMD_NEWFAMILY, u32(p.CTRL_ATTR_FAMILY_ID, 5), family=p.GENL_ID_CTRL))
    # unknown controller attributes (ops, hdrsize, maxattr ...) are ignored; a group without id is skipped
    group_no_id = p.attr_nest(1, p.attr_str(p.CTRL_ATTR_MCAST_GRP_NAME, "tlshd"))
    group_ok = p.attr_nest(2, p.attr_str(p.CTRL_ATTR_MCAST_GRP_NAME, "none") + u32(p.CTRL_ATTR_MCAST_GRP_ID, 4)
                           + u32(9, 1))
    payload = (p.attr(p.CTRL_ATTR_FAMILY_ID, struct.pack("=H", 30)) + name + u32(5, 16)
               + p.attr_nest(p.CTRL_ATTR_MCAST_GROUPS, group_no_id + group_ok))
    info = p.decode_newfamily(genl(p.CTRL_CMD_NEWFAMILY, payload, family=p.GENL_ID_CTRL))
    assert info == p.FamilyInfo(30, "handshake", 0, {"none": 4})


# ---------------------------------------------------------------- framing, several messages, errors and ACKs


def test_several_messages_in_one_buffer() -> None:
    ready = p.encode_ready(FAMILY_ID, seq=1)
    reply = p.encode_accept_reply(FAMILY_ID, 2, 0, FULL_REQUEST)
    ack = p.encode_error(p.encode_done(FAMILY_ID, 3, p.Done(9, 0)), 0)
    done_marker = struct.pack("=IHHII", 20, p.NLMSG_DONE, p.NLM_F_MULTI, 4, 0) + b"\0\0\0\0"
    family = p.encode_newfamily(p.FamilyInfo(FAMILY_ID, "handshake", 1, {"tlshd": 3}), 5)
    msgs = p.split_messages(ready + reply + ack + done_marker + family)
    assert len(msgs) == 4  # NLMSG_DONE carries nothing and is dropped
    assert p.is_ready(msgs[0], FAMILY_ID)
    assert p.decode_accept_reply(msgs[1]) == FULL_REQUEST
    assert isinstance(msgs[2], NetlinkError) and msgs[2].error == 0 and msgs[2].seq == 3
    assert p.decode_newfamily(msgs[3]).groups == {"tlshd": 3}


def test_messages_are_aligned_to_four_bytes() -> None:
    # a message whose length is not a multiple of 4 is followed by padding
    odd = GenlMessage(FAMILY_ID, 0, 1, 0, Cmd.READY, 1, b"\1").encode()
    assert len(odd) == 21
    msgs = p.split_messages(odd + b"\0\0\0" + p.encode_ready(FAMILY_ID, seq=2))
    assert [m.seq for m in msgs] == [1, 2]
    assert msgs[0].payload == b"\1"


def test_empty_buffer_has_no_messages() -> None:
    assert p.split_messages(b"") == []


@pytest.mark.parametrize("raw,why", [
    (b"\0" * 10, "truncated netlink header"),
    (struct.pack("=IHHII", 8, FAMILY_ID, 0, 0, 0), "out of bounds"),
    (struct.pack("=IHHII", 40, FAMILY_ID, 0, 0, 0) + b"\0" * 4, "out of bounds"),
    (struct.pack("=IHHII", 18, FAMILY_ID, 0, 0, 0) + b"\0\0", "truncated generic-netlink header"),
    (struct.pack("=IHHII", 18, p.NLMSG_ERROR, 0, 0, 0) + b"\0\0", "truncated netlink error"),
    (p.encode_ready(FAMILY_ID) + b"\1\2", "truncated netlink header"),
])
def test_malformed_framing(raw: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        p.split_messages(raw)


def test_error_echoes_the_whole_original_request() -> None:
    request = p.encode_done(FAMILY_ID, 21, p.Done(9, 0, (1, 2)))
    raw = p.encode_error(request, errno.EINVAL, pid=77)
    (err,) = p.split_messages(raw)
    assert isinstance(err, NetlinkError)
    assert (err.seq, err.pid, err.error) == (21, 77, errno.EINVAL)
    assert err.original == request
    assert struct.unpack_from("=i", raw, 16)[0] == -errno.EINVAL
    # the echoed request is itself a valid message
    assert p.decode_done_request(only(err.original)) == p.Done(9, 0, (1, 2))


def test_ack_echoes_only_the_header() -> None:
    request = p.encode_accept(FAMILY_ID, 8)
    (ack,) = p.split_messages(p.encode_error(request, 0))
    assert isinstance(ack, NetlinkError)
    assert (ack.seq, ack.error, ack.original) == (8, 0, request[:16])


def test_error_sequence_can_be_overridden() -> None:
    (err,) = p.split_messages(p.encode_error(p.encode_accept(FAMILY_ID, 8), errno.EAGAIN, seq=99))
    assert (err.seq, err.error) == (99, errno.EAGAIN)


def test_errno_name() -> None:
    assert p.errno_name(errno.EACCES) == "EACCES"
    assert p.errno_name(99999) == "99999"


def test_enums_match_the_uapi() -> None:
    assert [c.value for c in Cmd] == [1, 2, 3]
    assert [m.value for m in MessageType] == [0, 1, 2]
    assert [a.value for a in AuthMode] == [0, 1, 2, 3]
    assert [a.value for a in AcceptAttr] == list(range(1, 10))
    assert [a.value for a in X509Attr] == [1, 2] and [a.value for a in DoneAttr] == [1, 2, 3]
    assert p.MAX_STATUS == 4095 and p.MAX_PEER_IDENTITIES == 5


# ---------------------------------------------------------------- independent cross-check with pyroute2


def _pyroute2_classes():  # type: ignore[no-untyped-def]
    from pyroute2.netlink import genlmsg, nla

    class AcceptMsg(genlmsg):
        nla_map = (
            ("HANDSHAKE_A_ACCEPT_UNSPEC", "none"),
            ("HANDSHAKE_A_ACCEPT_SOCKFD", "int32"),
            ("HANDSHAKE_A_ACCEPT_HANDLER_CLASS", "uint32"),
            ("HANDSHAKE_A_ACCEPT_MESSAGE_TYPE", "uint32"),
            ("HANDSHAKE_A_ACCEPT_TIMEOUT", "uint32"),
            ("HANDSHAKE_A_ACCEPT_AUTH_MODE", "uint32"),
            ("HANDSHAKE_A_ACCEPT_PEER_IDENTITY", "uint32"),
            ("HANDSHAKE_A_ACCEPT_CERTIFICATE", "x509"),
            ("HANDSHAKE_A_ACCEPT_PEERNAME", "asciiz"),
            ("HANDSHAKE_A_ACCEPT_KEYRING", "uint32"),
        )

        class x509(nla):
            nla_flags = 0x8000
            nla_map = (
                ("HANDSHAKE_A_X509_UNSPEC", "none"),
                ("HANDSHAKE_A_X509_CERT", "int32"),
                ("HANDSHAKE_A_X509_PRIVKEY", "int32"),
            )

    class DoneMsg(genlmsg):
        nla_map = (
            ("HANDSHAKE_A_DONE_UNSPEC", "none"),
            ("HANDSHAKE_A_DONE_STATUS", "uint32"),
            ("HANDSHAKE_A_DONE_SOCKFD", "int32"),
            ("HANDSHAKE_A_DONE_REMOTE_AUTH", "uint32"),
        )

    return AcceptMsg, DoneMsg


def test_pyroute2_decodes_our_accept_reply_and_done() -> None:
    accept_cls, done_cls = _pyroute2_classes()
    msg = accept_cls(p.encode_accept_reply(FAMILY_ID, 5, 42, FULL_REQUEST))
    msg.decode()
    assert msg["cmd"] == Cmd.ACCEPT and msg["version"] == 1
    assert (msg["header"]["type"], msg["header"]["sequence_number"], msg["header"]["pid"]) == (FAMILY_ID, 5, 42)
    assert msg.get_attr("HANDSHAKE_A_ACCEPT_SOCKFD") == 9
    assert msg.get_attr("HANDSHAKE_A_ACCEPT_MESSAGE_TYPE") == MessageType.CLIENTHELLO
    assert msg.get_attr("HANDSHAKE_A_ACCEPT_AUTH_MODE") == AuthMode.X509
    assert msg.get_attr("HANDSHAKE_A_ACCEPT_TIMEOUT") == 10000
    assert msg.get_attr("HANDSHAKE_A_ACCEPT_KEYRING") == 301
    assert msg.get_attr("HANDSHAKE_A_ACCEPT_PEERNAME") == "nfs.example.net"
    assert msg.get_attrs("HANDSHAKE_A_ACCEPT_PEER_IDENTITY") == [101, 102]
    cert = msg.get_attr("HANDSHAKE_A_ACCEPT_CERTIFICATE")
    assert (cert.get_attr("HANDSHAKE_A_X509_CERT"), cert.get_attr("HANDSHAKE_A_X509_PRIVKEY")) == (201, 202)

    done = done_cls(p.encode_done(FAMILY_ID, 6, p.Done(-3, 0, (77, 78))))
    done.decode()
    assert done["cmd"] == Cmd.DONE and done["header"]["flags"] == p.NLM_F_REQUEST | p.NLM_F_ACK
    assert done.get_attr("HANDSHAKE_A_DONE_STATUS") == 0
    assert done.get_attr("HANDSHAKE_A_DONE_SOCKFD") == -3
    assert done.get_attrs("HANDSHAKE_A_DONE_REMOTE_AUTH") == [77, 78]


def test_pyroute2_encoding_is_byte_identical_to_ours() -> None:
    accept_cls, done_cls = _pyroute2_classes()
    msg = accept_cls()
    msg["cmd"] = Cmd.ACCEPT
    msg["version"] = 1
    msg["header"]["type"] = FAMILY_ID
    msg["header"]["sequence_number"] = 5
    msg["header"]["pid"] = 42
    msg["attrs"] = [
        ("HANDSHAKE_A_ACCEPT_SOCKFD", 9),
        ("HANDSHAKE_A_ACCEPT_MESSAGE_TYPE", 1),
        ("HANDSHAKE_A_ACCEPT_PEERNAME", "nfs.example.net"),
        ("HANDSHAKE_A_ACCEPT_TIMEOUT", 10000),
        ("HANDSHAKE_A_ACCEPT_KEYRING", 301),
        ("HANDSHAKE_A_ACCEPT_AUTH_MODE", 3),
        ("HANDSHAKE_A_ACCEPT_PEER_IDENTITY", 101),
        ("HANDSHAKE_A_ACCEPT_PEER_IDENTITY", 102),
        ("HANDSHAKE_A_ACCEPT_CERTIFICATE",
         {"attrs": [("HANDSHAKE_A_X509_CERT", 201), ("HANDSHAKE_A_X509_PRIVKEY", 202)]}),
    ]
    msg.encode()
    theirs = bytes(msg.data)
    assert theirs == p.encode_accept_reply(FAMILY_ID, 5, 42, FULL_REQUEST)
    assert p.decode_accept_reply(only(theirs)) == FULL_REQUEST

    done = done_cls()
    done["cmd"] = Cmd.DONE
    done["version"] = 1
    done["header"]["type"] = FAMILY_ID
    done["header"]["flags"] = p.NLM_F_REQUEST | p.NLM_F_ACK
    done["header"]["sequence_number"] = 6
    done["attrs"] = [("HANDSHAKE_A_DONE_STATUS", 0), ("HANDSHAKE_A_DONE_SOCKFD", 4),
                     ("HANDSHAKE_A_DONE_REMOTE_AUTH", 55)]
    done.encode()
    assert bytes(done.data) == p.encode_done(FAMILY_ID, 6, p.Done(4, 0, (55,)))


def test_more_peer_identities_than_the_kernel_sends_are_still_read() -> None:
    # the kernel sends at most 5; the agent side stays lenient and keeps whatever arrives
    payload = p.attr_s32(1, 4) + u32(3, 1) + u32(5, 2) + b"".join(u32(6, s) for s in range(1, 9))
    assert p.decode_accept_reply(genl(Cmd.ACCEPT, payload)).peer_identities == tuple(range(1, 9))


def test_an_accept_reply_with_two_sockfds_is_refused_and_names_the_first() -> None:
    """Found by the fuzzer: the decoder kept the last SOCKFD while the error path names the first,
    so a malformed reply could be served on one fd and failed on another."""
    attrs = (struct.pack("=HHi", 8, p.AcceptAttr.SOCKFD, 7) + struct.pack("=HHi", 8, p.AcceptAttr.SOCKFD, 9)
             + struct.pack("=HHI", 8, p.AcceptAttr.MESSAGE_TYPE, 1) + struct.pack("=HHI", 8, p.AcceptAttr.AUTH_MODE, 1))
    msg = p.GenlMessage(29, 0, 1, 0, p.Cmd.ACCEPT, 1, attrs)
    with pytest.raises(p.ProtocolError) as info:
        p.decode_accept_reply(msg)
    assert info.value.sockfd == 7 == p.sockfd_hint(msg)
