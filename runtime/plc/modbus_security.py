"""Modbus/TCP Security for the Modbus adapter (``--modbus-certificate/--modbus-private-key/--modbus-trust``).

The Modbus Organization's "MODBUS/TCP Security" protocol carries the same MBAP frames inside TLS 1.2 or
newer, with BOTH ends presenting an X.509 certificate (mutual authentication); port 802 is registered
for it. Plain Modbus TCP has no authentication at all, so this is what lets a server listening on the
cell network check who writes a trigger, beyond the client's IP address (``--modbus-allow``).

Which client certificates are admitted is the OPC UA trust folder's rule (runtime/plc/trust.py, the
same folder layout): listed byte for byte, or issued through a chain (intermediates in ``issuers``) to a
listed authority, none revoked, no CRL past its nextUpdate; the folder is read again when it changes.
OpenSSL runs the handshake and refuses a client without a certificate, or one that chains to nothing in
the folder; the trust folder then decides, before a byte of the connection is read.

Roles: the spec carries a client's role in its certificate (extension OID 1.3.6.1.4.1.50316.802.1, an
ASN.1 UTF8String) and leaves the rules to the server. Here one rule: with ``write_roles`` only a client
whose role is among them may write (function codes 5, 6, 15, 16, 22, 23; the handshake's trigger is a
write); any other admitted client may read, and a write of it is answered with exception 01 (Illegal
Function), as the spec has unauthorised requests answered. Without ``write_roles`` every admitted
client may read and write.
"""

from __future__ import annotations

import logging
import ssl
import sys
from dataclasses import dataclass
from typing import Callable, FrozenSet, Optional

from mrkd.runtime.plc import PlcError
from mrkd.runtime.plc.trust import MODBUS_TRUST, TrustFolder, refusal_said

logger = logging.getLogger(__name__)

ROLE_OID = "1.3.6.1.4.1.50316.802.1"       # the Modbus.org role extension of a client certificate
WRITE_FUNCTIONS = frozenset({5, 6, 15, 16, 22, 23})
UTF8_STRING = 0x0C


@dataclass(frozen=True)
class ModbusSecurity:
    """The server's certificate and key (PEM), the folder of client certificates it trusts, and the
    client roles allowed to write (None: every admitted client)."""

    certificate: str
    private_key: str
    trust: str
    write_roles: Optional[FrozenSet[str]] = None


def parse_roles(text: str) -> FrozenSet[str]:
    """'operator, engineer' -> the role names (PlcError for an empty list or name)."""
    roles = [role.strip() for role in str(text).split(",")]
    if not roles or any(not role for role in roles):
        raise PlcError(f"expected role names separated by commas (operator,engineer), got {text!r}")
    return frozenset(roles)


def certificate_role(certificate_der: bytes) -> Optional[str]:
    """The role in a client certificate's Modbus role extension, or None (absent, twice, or not one
    well-formed UTF8String)."""
    from cryptography import x509
    try:
        extension = x509.load_der_x509_certificate(bytes(certificate_der)).extensions.get_extension_for_oid(
            x509.ObjectIdentifier(ROLE_OID))
    except (ValueError, TypeError, x509.ExtensionNotFound):      # DuplicateExtension is a ValueError
        return None
    data = getattr(extension.value, "value", b"")
    if len(data) < 2 or data[0] != UTF8_STRING:
        return None
    length, start = data[1], 2
    if length & 0x80:                      # long form: the next (length & 0x7F) bytes give the length
        count = length & 0x7F
        if count == 0 or count > 4 or len(data) < 2 + count:
            return None
        length, start = int.from_bytes(data[2:2 + count], "big"), 2 + count
    if len(data) != start + length:
        return None
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError:
        return None


# OpenSSL's reasons for a failed server handshake, as a commissioning engineer needs them
_NOT_TLS = ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "UNKNOWN_PROTOCOL",
            "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "WRONG_SSL_VERSION")
_OLD_TLS = ("UNSUPPORTED_PROTOCOL", "VERSION_TOO_LOW", "TLSV1_ALERT_PROTOCOL_VERSION")


def handshake_refusal(exc: ssl.SSLError) -> str:
    """Why OpenSSL refused a client in the TLS handshake, in words (the OpenSSL reason in brackets)."""
    reason = getattr(exc, "reason", None) or ""
    if reason == "CERTIFICATE_VERIFY_FAILED":
        why = "its certificate does not chain to a certificate of the trust folder"
        detail = getattr(exc, "verify_message", None) or reason
    elif reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        why, detail = "it presented no client certificate", reason
    elif reason in _NOT_TLS:
        why, detail = "it does not speak TLS (a plain Modbus TCP client on the TLS port?)", reason
    elif reason in _OLD_TLS:
        why, detail = "its TLS version is older than 1.2", reason
    else:
        why, detail = "its TLS handshake failed", reason or str(exc)
    return f"TLS handshake: {why} (OpenSSL: {detail})"


def told_handshakes(refused: Callable[[object, str], None]) -> type:
    """An SSLObject class for ``SSLContext.sslobject_class`` whose failed handshake is told to
    ``refused(transport or None, why)`` before it is raised on: asyncio drops a client refused in the
    handshake without a word (debug level), so a PLC with the wrong certificate, or none, was refused and
    nothing said why."""
    class ToldHandshake(ssl.SSLObject):
        def do_handshake(self):
            try:
                return super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError as exc:
                refused(_handshaking_transport(), handshake_refusal(exc))
                raise
    return ToldHandshake


def _handshaking_transport():
    """The transport of the asyncio SSLProtocol whose handshake called in (it holds it as ``_transport``;
    an SSLObject does not know its connection), or None where this Python's asyncio keeps it elsewhere."""
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return None
        transport = getattr(frame.f_locals.get("self"), "_transport", None)
        if transport is not None and hasattr(transport, "get_extra_info"):
            return transport
        frame = frame.f_back
    return None


X509_V_FLAG_NO_CHECK_TIME = 0x200000     # OpenSSL's flag (x509_vfy.h); Python's ssl names no constant for it


class SecureListener:
    """The TLS side of one Modbus server: the SSL context pymodbus listens with, kept in step with the
    trust folder, and the admission of each handshaken connection."""

    def __init__(self, security: ModbusSecurity):
        self.security = security
        self.trust = TrustFolder(security.trust, name=MODBUS_TRUST)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            self.context.load_cert_chain(security.certificate, security.private_key)
        except (OSError, ssl.SSLError) as exc:
            raise PlcError(f"--modbus-certificate {security.certificate} / --modbus-private-key "
                           f"{security.private_key}: cannot load them ({exc})") from None
        self.context.verify_mode = ssl.CERT_REQUIRED
        # OpenSSL only needs a chain ending at any certificate of the folder (a listed self-signed client
        # included); the trust folder's stricter rule (issuers admit no one alone, revocation, overdue
        # CRLs) is applied after the handshake, in refusal().
        self.context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        # Nor the dates: OpenSSL refused a client not yet valid (a device booted at 1970) inside the
        # handshake, unlogged and uncounted. refusal() checks them on every certificate of the chain it
        # trusts (the leaf and the folder's issuers) and says this machine's clock.
        self.context.verify_flags |= X509_V_FLAG_NO_CHECK_TIME
        self._anchors: set = set()
        self._anchored = None          # the trust list whose certificates OpenSSL has
        self._add_anchors()

    def _add_anchors(self) -> None:
        """Hand OpenSSL the certificates of a trust list it has not seen (a context's store only grows; a
        certificate taken out of the folder is refused by refusal())."""
        current = self.trust.current
        if current is self._anchored:
            return
        for der in (current.listed | current.issuers_listed) - self._anchors:
            self.context.load_verify_locations(cadata=der)
            self._anchors.add(der)
        self._anchored = current

    def reload_certificate(self) -> None:
        """Load the server certificate and key again for new connections (a renewal moved into place).
        The pair is first tried in a context of its own, so one that does not load (PlcError) leaves the
        served one as it was."""
        trial = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            trial.load_cert_chain(self.security.certificate, self.security.private_key)
            self.context.load_cert_chain(self.security.certificate, self.security.private_key)
        except (OSError, ssl.SSLError) as exc:
            raise PlcError(f"--modbus-certificate {self.security.certificate} / --modbus-private-key "
                           f"{self.security.private_key}: cannot load them ({exc})") from None

    def refresh(self) -> None:
        """Read the trust folder again if it changed (see TrustFolder); new certificates reach OpenSSL."""
        self.trust.refresh()
        self._add_anchors()         # also after a reload that a client's refusal() check took first

    def refusal(self, transport) -> Optional[str]:
        """None when the connection's client certificate is admitted, else why not (an OPC UA-style status
        name, or a sentence)."""
        der = _peer_certificate(transport)
        if not der:
            return "no client certificate"
        return self.trust.refusal(der)

    def refusal_said(self, transport, refusal: str) -> str:
        """``refusal`` for the log: a time refusal with the certificate's dates and this machine's clock."""
        der = _peer_certificate(transport)
        return refusal_said(self.trust, der, refusal) if der else refusal

    def may_write(self, transport) -> bool:
        """May this (admitted) connection's client write? Every one without write_roles; else those whose
        certificate's role is among them."""
        if self.security.write_roles is None:
            return True
        der = _peer_certificate(transport)
        return bool(der) and certificate_role(der) in self.security.write_roles

    def role(self, transport) -> Optional[str]:
        der = _peer_certificate(transport)
        return certificate_role(der) if der else None


def _peer_certificate(transport) -> Optional[bytes]:
    ssl_object = transport.get_extra_info("ssl_object")
    return ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
