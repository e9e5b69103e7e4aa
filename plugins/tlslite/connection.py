"""A TLSConnection that shows hsd the handshake messages as they pass.

tlslite has no certificate-verification callback and no way to ask which PSK
was selected, so this subclass hooks its two message funnels (_getMsg for
what the peer sends, _sendMsg for what we send) and hands every handshake
message to a MessageObserver.  When the observer rejects one (an untrusted
server certificate, a server that skipped our PSK), we abort right there with
a fatal alert, before our Finished is sent - the same moment OpenSSL's own
verification would fail.  Pinned to tlslite-ng 0.8's private method names; the
tests fail loudly if they change (a bad certificate would then be accepted).

It also notes the record_size_limit (RFC 8449) the peer announced, in its
ClientHello or EncryptedExtensions, for Session.peer_record_size_limit:
tlslite keeps only its own clamped send limit, under a private name.

wipe_secrets() zeroes the bytearrays in which tlslite keeps this connection's
secrets, once hsd has its own copies (sessions.build_session) and, as a
backstop for failed handshakes, when the connection is dropped.
"""

from __future__ import annotations

from typing import Protocol

from tlslite.constants import ExtensionType
from tlslite.messages import Alert, CertificateRequest, ClientHello, EncryptedExtensions
from tlslite.tlsconnection import TLSConnection

from hsd.errors import HandshakeError
from hsd.secret import wipe
from hsd.tlstrace import TlsTrace

# tlslite.session.Session attributes holding TLS 1.3 secrets (tlslite-ng 0.8)
SESSION_SECRETS = ("masterSecret", "cl_app_secret", "sr_app_secret", "exporterMasterSecret",
                   "resumptionMasterSecret")
# tlslite.recordlayer.RecordLayer attributes holding a ConnectionState (its keys and IVs)
RECORD_STATES = ("_writeState", "_readState", "_pendingWriteState", "_pendingReadState")


class Rejection(HandshakeError):
    """Raised by an observer: abort the handshake with `alert` (a TLS AlertDescription)."""

    def __init__(self, error: HandshakeError, alert: int) -> None:
        super().__init__(error.reason, error.status)
        self.error = error
        self.alert = alert


class MessageObserver(Protocol):
    def received(self, message: object) -> None: ...
    def sent(self, message: object) -> None: ...


class ObservedConnection(TLSConnection):
    """TLSConnection that never closes its socket and reports handshake messages to an observer."""

    def __init__(self, sock, observer: MessageObserver) -> None:
        super().__init__(sock)
        self.closeSocket = False  # a failed handshake must leave the fd to the core (DONE)
        self.observer = observer
        self.rejection: Rejection | None = None
        self.hook_calls = 0
        self.peer_record_size_limit: int | None = None  # as the peer announced it (None: it did not)

    def _getMsg(self, expectedType, secondaryType=None, constructorType=None):
        for result in super()._getMsg(expectedType, secondaryType, constructorType):
            if isinstance(result, int):  # 0/1: would block (never with our blocking transport)
                yield result
                continue
            self.hook_calls += 1
            if isinstance(result, (ClientHello, EncryptedExtensions)):  # the last hello counts (after a HRR)
                ext = result.getExtension(ExtensionType.record_size_limit)
                self.peer_record_size_limit = ext.record_size_limit if ext is not None else None
            try:
                self.observer.received(result)
            except Rejection as rejection:
                self.rejection = rejection
                for step in self._sendError(rejection.alert, rejection.reason):
                    yield step
            yield result
            return

    def _queue_message(self, msg):
        # tlslite's TLS 1.3 CertificateRequest always carries compress_certificate, empty when
        # certificate compression is off (settings.py); RFC 8879 forbids an empty list and
        # OpenSSL >= 3.2 clients abort with decode_error.  No list means no extension.
        if isinstance(msg, CertificateRequest) and msg.extensions:
            msg.extensions = [ext for ext in msg.extensions
                              if ext.extType != ExtensionType.compress_certificate or ext.algorithms]
        super()._queue_message(msg)

    def wipe_secrets(self) -> None:
        """Zero tlslite's copies of the session secrets and record keys; the connection is dead afterwards.

        Only bytearrays can be zeroed: the AES key schedules and GHASH tables
        tlslite's pure-Python ciphers derive are lists of ints (docs/secrets.md).
        Never raises (it also runs from __del__)."""
        session = getattr(self, "session", None)
        for name in SESSION_SECRETS:
            wipe(getattr(session, name, None))
        layer = getattr(self, "_recordLayer", None)
        for name in RECORD_STATES:
            state = getattr(layer, name, None)
            wipe(getattr(state, "fixedNonce", None))
            for context in (getattr(state, "encContext", None), getattr(state, "macContext", None)):
                wipe(getattr(context, "key", None))

    def __del__(self) -> None:
        self.wipe_secrets()

    def _sendMsg(self, msg, randomizeFirstBlock=True, update_hashes=True):
        if not isinstance(msg, Alert):
            self.observer.sent(msg)
        yield from super()._sendMsg(msg, randomizeFirstBlock, update_hashes)

    # [debug] tls: every record's plaintext, as tlslite sends it and after it decrypted it (hsd.tlstrace)
    trace: TlsTrace | None = None

    def _sendMsgThroughSocket(self, msg):
        if self.trace is not None:
            self.trace.record(True, msg.contentType, msg.write())
        yield from super()._sendMsgThroughSocket(msg)

    def _getNextRecordFromSocket(self):
        for result in super()._getNextRecordFromSocket():
            if self.trace is not None and not isinstance(result, int):
                header, parser = result
                self.trace.record(False, header.type, parser.bytes)
            yield result
