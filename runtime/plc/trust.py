"""The OPC UA server's trust folder (``--opcua-trust DIR``): which client certificates may open a session.

A client is admitted when its certificate is, byte for byte, one of the folder's certificates, or was
issued and signed directly by one of the folder's certificate authorities (basic constraints CA, key
usage keyCertSign when given) and is not on that authority's revocation list; the certificate (and its
issuer) must be within their validity dates. That is the trust list of OPC UA Part 4 §6.1.3 in its
simplest form: one level of issuer, CRLs read from the same folder (``.crl``, DER or PEM, each checked
against the authority that signed it). The folder is read once, at start. A certificate authority
without a CRL in the folder is accepted with a warning: its certificates cannot be revoked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Dict, FrozenSet, Optional, Tuple

from mrkd.runtime.plc import PlcError

if TYPE_CHECKING:      # cryptography loads only when a trust folder is used
    from cryptography import x509

logger = logging.getLogger(__name__)

CERTIFICATE_SUFFIXES = (".der", ".pem", ".crt", ".cer")
CRL_SUFFIXES = (".crl",)

# The OPC UA status each refusal answers with (asyncua's ServiceError takes the code by this name).
UNTRUSTED, TIME_INVALID, ISSUER_TIME_INVALID, REVOKED, INVALID = (
    "BadCertificateUntrusted", "BadCertificateTimeInvalid", "BadCertificateIssuerTimeInvalid",
    "BadCertificateRevoked", "BadCertificateInvalid")


@dataclass(frozen=True)
class TrustList:
    """listed: DER bytes of every certificate in the folder. authorities: those that may issue, parsed
    once. revoked: authority -> serial numbers its verified CRL revokes (an authority without a CRL is absent)."""

    listed: FrozenSet[bytes]
    authorities: Tuple["x509.Certificate", ...] = ()
    revoked: Dict["x509.Certificate", FrozenSet[int]] = field(default_factory=dict)

    def refusal(self, certificate_der: bytes, now: Optional[datetime] = None) -> Optional[str]:
        """None when a client presenting ``certificate_der`` is admitted, else the OPC UA status name."""
        from cryptography import x509
        from cryptography.exceptions import InvalidSignature
        now = now or datetime.now(timezone.utc)
        try:
            der = bytes(certificate_der)
            cert = x509.load_der_x509_certificate(der)
        except (TypeError, ValueError):
            return INVALID
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return TIME_INVALID
        if der in self.listed:
            return None
        for authority in self.authorities:
            if cert.issuer != authority.subject:
                continue
            try:
                cert.verify_directly_issued_by(authority)
            except (ValueError, TypeError, InvalidSignature):
                continue
            if not authority.not_valid_before_utc <= now <= authority.not_valid_after_utc:
                return ISSUER_TIME_INVALID
            if cert.serial_number in self.revoked.get(authority, frozenset()):
                return REVOKED
            return None
        return UNTRUSTED


def _der():
    from cryptography.hazmat.primitives.serialization import Encoding
    return Encoding.DER


def _is_authority(cert) -> bool:
    from cryptography import x509
    try:
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    except x509.ExtensionNotFound:
        return False
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    except x509.ExtensionNotFound:
        return True


def load_trust_folder(folder: str) -> TrustList:
    """The folder's certificates (.der .pem .crt .cer) and CRLs (.crl), DER or PEM; other files are
    ignored. PlcError for a missing folder, one without certificates, a file that does not parse, or a
    CRL that no certificate authority of the folder signed."""
    from cryptography import x509
    where = Path(folder)
    if not where.is_dir():
        raise PlcError(f"OPC UA trust folder {folder}: not a folder")
    listed, authorities, crls = set(), [], []
    for path in sorted(where.iterdir()):
        suffix = path.suffix.lower()
        if not path.is_file() or suffix not in CERTIFICATE_SUFFIXES + CRL_SUFFIXES:
            continue
        data = path.read_bytes()
        pem = data.lstrip().startswith(b"-----")
        try:
            if suffix in CRL_SUFFIXES:
                crls.append((path, x509.load_pem_x509_crl(data) if pem else x509.load_der_x509_crl(data)))
                continue
            cert = x509.load_pem_x509_certificate(data) if pem else x509.load_der_x509_certificate(data)
        except ValueError as exc:
            kind = "a certificate revocation list" if suffix in CRL_SUFFIXES else "a certificate"
            raise PlcError(f"OPC UA trust folder: {path} is not {kind} ({exc})") from None
        listed.add(cert.public_bytes(_der()))
        if _is_authority(cert):
            authorities.append(cert)
    if not listed:
        raise PlcError(f"OPC UA trust folder {folder}: no certificates (.der .pem .crt .cer): no client could connect")
    revoked: Dict["x509.Certificate", FrozenSet[int]] = {}
    for path, crl in crls:
        issuer = next((authority for authority in authorities
                       if crl.issuer == authority.subject and crl.is_signature_valid(authority.public_key())), None)
        if issuer is None:
            raise PlcError(f"OPC UA trust folder: {path} is not signed by a certificate authority in the folder")
        revoked[issuer] = revoked.get(issuer, frozenset()) | frozenset(entry.serial_number for entry in crl)
    for authority in authorities:
        if authority not in revoked:
            logger.warning("opcua: trust folder: no CRL for the certificate authority %s: the client "
                           "certificates it issued cannot be revoked", authority.subject.rfc4514_string())
    return TrustList(frozenset(listed), tuple(authorities), revoked)

