"""The OPC UA server's trust folder (``--opcua-trust DIR``): which client certificates may open a session.

A client is admitted when its certificate is, byte for byte, one of the folder's certificates, or when a
chain of certificate authorities leads from it to one of the folder's: each link issued and signed by the
next (basic constraints CA, key usage keyCertSign when given), at most MAX_CHAIN links. The authorities
in the ``issuers`` subfolder may stand in such a chain (an intermediate CA) but admit no one on their
own; that is OPC UA Part 4 §6.1.3's split of a trust list into trusted and issuer certificates. Each
certificate on the way must be within its dates, and not revoked by the CRL of the authority that signed
it (``.crl`` files, DER or PEM, in either folder, each checked against that authority). A CRL past its
nextUpdate no longer says whether a certificate was revoked since: the clients under it are refused
(BadCertificateRevocationUnknown) until a current one is put in place. An authority without any CRL is
accepted with a warning: its certificates cannot be revoked.

``TrustFolder`` reads the folder again when a file in it changes (checked at most once a second, at a
client's session), so a new CRL or certificate needs no restart; a change that does not load (a file
still being written) keeps the last good trust list and is logged in one line.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Dict, FrozenSet, List, Optional, Tuple

from mrkd.runtime.clock_steps import utc_text
from mrkd.runtime.plc import PlcError

if TYPE_CHECKING:      # cryptography loads only when a trust folder is used
    from cryptography import x509

logger = logging.getLogger(__name__)

CERTIFICATE_SUFFIXES = (".der", ".pem", ".crt", ".cer")
CRL_SUFFIXES = (".crl",)
ISSUERS_FOLDER = "issuers"     # intermediate authorities: links of a chain, trusted by nobody on their own
MAX_CHAIN = 5                  # authorities between a client and the trusted one, at most
# how messages name the folder; the Modbus/TCP Security server passes its own (MODBUS_TRUST), so a bad
# --modbus-trust folder is not reported as an OPC UA one
OPCUA_TRUST = "OPC UA trust folder (--opcua-trust)"
MODBUS_TRUST = "Modbus/TCP Security trust folder (--modbus-trust)"

# The OPC UA status each refusal answers with (asyncua's ServiceError takes the code by this name).
UNTRUSTED, TIME_INVALID, ISSUER_TIME_INVALID, REVOKED, INVALID = (
    "BadCertificateUntrusted", "BadCertificateTimeInvalid", "BadCertificateIssuerTimeInvalid",
    "BadCertificateRevoked", "BadCertificateInvalid")
ISSUER_REVOKED, REVOCATION_UNKNOWN, ISSUER_REVOCATION_UNKNOWN = (
    "BadCertificateIssuerRevoked", "BadCertificateRevocationUnknown", "BadCertificateIssuerRevocationUnknown")


@dataclass(frozen=True)
class TrustList:
    """listed: DER bytes of every certificate in the folder (not ``issuers``). authorities: the folder's
    certificate authorities; issuers: those of ``issuers``, links only. revoked: authority -> serial
    numbers its verified CRLs revoke; next_update: authority -> the latest nextUpdate of those CRLs (None:
    a CRL without one). An authority without a CRL is in neither."""

    listed: FrozenSet[bytes]
    authorities: Tuple["x509.Certificate", ...] = ()
    revoked: Dict["x509.Certificate", FrozenSet[int]] = field(default_factory=dict)
    issuers: Tuple["x509.Certificate", ...] = ()
    next_update: Dict["x509.Certificate", Optional[datetime]] = field(default_factory=dict)
    issuers_listed: FrozenSet[bytes] = frozenset()     # DER bytes of the ``issuers`` certificates

    def refusal(self, certificate_der: bytes, now: Optional[datetime] = None) -> Optional[str]:
        """None when a client presenting ``certificate_der`` is admitted, else the OPC UA status name."""
        from cryptography import x509
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
        current = cert
        for depth in range(MAX_CHAIN + 1):
            issuer = self._issuer_of(current)
            if issuer is None or issuer is current:
                return UNTRUSTED
            if not issuer.not_valid_before_utc <= now <= issuer.not_valid_after_utc:
                return ISSUER_TIME_INVALID
            if issuer in self.revoked:
                next_update = self.next_update.get(issuer)
                if next_update is not None and now > next_update:
                    return REVOCATION_UNKNOWN if depth == 0 else ISSUER_REVOCATION_UNKNOWN
                if current.serial_number in self.revoked[issuer]:
                    return REVOKED if depth == 0 else ISSUER_REVOKED
            if any(issuer is trusted for trusted in self.authorities):
                return None
            current = issuer
        return UNTRUSTED

    def _issuer_of(self, cert) -> Optional["x509.Certificate"]:
        """The folder's authority (trusted ones first) that issued and signed ``cert``, or None."""
        from cryptography.exceptions import InvalidSignature
        for authority in self.authorities + self.issuers:
            if cert.issuer != authority.subject:
                continue
            try:
                cert.verify_directly_issued_by(authority)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return authority
        return None


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


def _read_folder(where: Path, name: str = OPCUA_TRUST):
    """(certificates, CRLs) of one folder, each as (path, parsed); PlcError naming a file that does not parse."""
    from cryptography import x509
    certificates, crls = [], []
    for path in sorted(where.iterdir()):
        suffix = path.suffix.lower()
        if not path.is_file() or suffix not in CERTIFICATE_SUFFIXES + CRL_SUFFIXES:
            continue
        data = path.read_bytes()
        pem = data.lstrip().startswith(b"-----")
        try:
            if suffix in CRL_SUFFIXES:
                crls.append((path, x509.load_pem_x509_crl(data) if pem else x509.load_der_x509_crl(data)))
            else:
                certificates.append((path, x509.load_pem_x509_certificate(data) if pem
                                     else x509.load_der_x509_certificate(data)))
        except ValueError as exc:
            kind = "a certificate revocation list" if suffix in CRL_SUFFIXES else "a certificate"
            raise PlcError(f"{name}: {path} is not {kind} ({exc})") from None
    return certificates, crls


def load_trust_folder(folder: str, name: str = OPCUA_TRUST) -> TrustList:
    """The folder's certificates (.der .pem .crt .cer) and CRLs (.crl), DER or PEM, and those of its
    ``issuers`` subfolder; other files are ignored. PlcError for a missing folder, one without
    certificates, a file that does not parse, a certificate in ``issuers`` that is not an authority, or
    a CRL that no certificate authority of the two folders signed."""
    where = Path(folder)
    if not where.is_dir():
        raise PlcError(f"{name} {folder}: not a folder")
    certificates, crls = _read_folder(where, name)
    issuer_certificates, issuer_crls = _read_folder(where / ISSUERS_FOLDER, name) if (where / ISSUERS_FOLDER).is_dir() \
        else ([], [])
    listed = {cert.public_bytes(_der()) for _, cert in certificates}
    if not listed:
        raise PlcError(f"{name} {folder}: no certificates (.der .pem .crt .cer): no client could connect")
    authorities = [cert for _, cert in certificates if _is_authority(cert)]
    for path, cert in issuer_certificates:
        if not _is_authority(cert):
            raise PlcError(f"{name}: {path} is not a certificate authority (basic constraints CA, "
                           f"keyCertSign): {ISSUERS_FOLDER}/ holds only the authorities of a chain")
    issuers = [cert for _, cert in issuer_certificates]
    revoked: Dict["x509.Certificate", FrozenSet[int]] = {}
    updates: Dict["x509.Certificate", List[Optional[datetime]]] = {}
    for path, crl in crls + issuer_crls:
        issuer = next((authority for authority in authorities + issuers
                       if crl.issuer == authority.subject and crl.is_signature_valid(authority.public_key())), None)
        if issuer is None:
            raise PlcError(f"{name}: {path} is not signed by a certificate authority in the folder")
        revoked[issuer] = revoked.get(issuer, frozenset()) | frozenset(entry.serial_number for entry in crl)
        updates.setdefault(issuer, []).append(crl.next_update_utc)
    # the newest CRL of an authority decides whether its revocations are known now (None: never due)
    next_update = {issuer: None if None in dates else max(dates) for issuer, dates in updates.items()}
    for authority in authorities + issuers:
        if authority not in revoked:
            logger.warning("%s: no CRL for the certificate authority %s: the client "
                           "certificates it issued cannot be revoked", name, authority.subject.rfc4514_string())
        elif next_update[authority] is not None and next_update[authority] < datetime.now(timezone.utc):
            logger.warning("%s: the CRL of %s was due for renewal at %s: its clients are refused "
                           "(BadCertificateRevocationUnknown) until a current one is in the folder",
                           name, authority.subject.rfc4514_string(), next_update[authority].isoformat())
    _warn_if_clock_before(certificates + issuer_certificates, f"{name} {folder}")
    return TrustList(frozenset(listed), tuple(authorities), revoked, tuple(issuers), next_update,
                     frozenset(cert.public_bytes(_der()) for cert in issuers))


def _utc(when: datetime) -> str:
    return utc_text(when.timestamp())


def _warn_if_clock_before(certificates, where: str) -> None:
    """Say once when this machine's clock is before the folder's certificates are valid: a device without a
    real-time clock booted at 1970 (NTP not synchronised yet) refuses every client as not yet valid."""
    now = datetime.now(timezone.utc)
    early = [cert for _, cert in certificates if cert.not_valid_before_utc > now]
    if early:
        logger.warning("%s: this machine's clock says %s, before %d of its certificates are valid (the first from "
                       "%s): is the clock wrong (no real-time clock, NTP not synchronised yet)? The clients they admit "
                       "are refused as %s until it is set", where, _utc(now), len(early),
                       _utc(min(cert.not_valid_before_utc for cert in early)), TIME_INVALID)


def refusal_said(trust, certificate_der: bytes, refusal: Optional[str], now: Optional[datetime] = None) -> str:
    """``refusal`` (TrustList/TrustFolder.refusal's answer for ``certificate_der``) for a log line: a time
    refusal says the dates and this machine's clock, which is what is wrong on a device booted at 1970."""
    if refusal not in (TIME_INVALID, ISSUER_TIME_INVALID):
        return str(refusal)
    from cryptography import x509
    now = now or datetime.now(timezone.utc)
    try:
        cert = x509.load_der_x509_certificate(bytes(certificate_der))
    except (TypeError, ValueError):
        return str(refusal)
    if refusal == ISSUER_TIME_INVALID:
        current = getattr(trust, "current", trust)
        cert = current._issuer_of(cert) or cert
    whose = "its issuer is" if refusal == ISSUER_TIME_INVALID else "it is"
    said = f"{refusal} ({whose} valid from {_utc(cert.not_valid_before_utc)} to {_utc(cert.not_valid_after_utc)}"
    if now < cert.not_valid_before_utc:
        return f"{said}; this machine's clock says {_utc(now)}, before that: is the clock wrong?)"
    return f"{said}; this machine's clock says {_utc(now)})"


def _folder_state(folder: Path) -> Tuple:
    """The names and contents' sha256 of the trust folder's certificates and CRLs (and of ``issuers``),
    the files load_trust_folder reads: what a renewal changes, even one rewritten in place at the same
    size within the file system's clock tick. Other files are neither read nor hashed."""
    state: List[Tuple] = []
    for where in (folder, folder / ISSUERS_FOLDER):
        try:
            paths = sorted(where.iterdir())
        except OSError:
            state.append((str(where), None))
            continue
        for path in paths:
            if path.suffix.lower() not in CERTIFICATE_SUFFIXES + CRL_SUFFIXES:
                continue
            try:
                state.append((str(path), hashlib.sha256(path.read_bytes()).hexdigest()))
            except OSError:           # a folder (issuers itself), or a file gone in between
                continue
    return tuple(state)


class TrustFolder:
    """load_trust_folder's list, read again when the folder's files change (see the module's notes).
    ``reloads`` counts the lists taken since the start; ``error`` is the last change that did not load."""

    def __init__(self, folder: str, check_every_s: float = 1.0, name: str = OPCUA_TRUST):
        self.folder, self.check_every_s, self.name = str(folder), check_every_s, name
        self._state = _folder_state(Path(folder))
        self.current = load_trust_folder(self.folder, name)
        self.reloads, self.error = 0, ""
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def refusal(self, certificate_der: bytes, now: Optional[datetime] = None) -> Optional[str]:
        self.refresh()
        return self.current.refusal(certificate_der, now)

    def refresh(self) -> bool:
        """Read the folder again if it changed since the last look; True when a new list was taken."""
        with self._lock:
            if time.monotonic() - self._checked < self.check_every_s:
                return False
            self._checked = time.monotonic()
            state = _folder_state(Path(self.folder))
            if state == self._state:
                return False
            self._state = state
            try:
                self.current = load_trust_folder(self.folder, self.name)
            except (PlcError, OSError) as exc:
                self.error = f"the trust folder changed but does not load, the previous trust list stays: {exc}"
                logger.warning("%s", self.error)
                return False
            self.reloads, self.error = self.reloads + 1, ""
        logger.warning("%s %s read again (%d certificate(s), %d authorit(ies), %d CRL issuer(s))",
                       self.name, self.folder, len(self.current.listed),
                       len(self.current.authorities) + len(self.current.issuers),
                       len(self.current.revoked))
        return True
