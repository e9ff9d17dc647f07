"""A small certificate authority for the OPC UA trust tests, built with cryptography (not our code):
RSA keys (Basic256Sha256 needs RSA), OPC UA application certificates with their URI in the subject
alternative names, certificate revocation lists."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = datetime.datetime.now(datetime.timezone.utc)


class Issued:
    """A certificate and its key; ``save(folder, name)`` writes name.der and name.pem (PKCS#8 key)."""

    def __init__(self, cert: x509.Certificate, key):
        self.cert, self.key = cert, key

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def save(self, folder: Path, name: str) -> "Issued":
        (folder / f"{name}.der").write_bytes(self.der)
        (folder / f"{name}.pem").write_bytes(self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return self


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mrkd tests")])


def authority(common_name: str = "mrkd test CA", days: float = 30, start_days: float = -1,
              key_cert_sign: bool = True, ca: bool = True, issuer: Optional[Issued] = None) -> Issued:
    """A certificate authority: self-signed (a root), or ``issuer``'s intermediate."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claimed = issuer.cert.subject if issuer is not None else _name(common_name)
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(claimed)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW + datetime.timedelta(days=start_days))
               .not_valid_after(NOW + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign,
                                            crl_sign=key_cert_sign, encipher_only=False, decipher_only=False),
                              critical=True))
    return Issued(builder.sign(issuer.key if issuer is not None else key, hashes.SHA256()), key)


def application(issuer: Optional[Issued], name: str, days: float = 30, start_days: float = -1,
                serial: Optional[int] = None, issuer_name: Optional[x509.Name] = None) -> Issued:
    """An OPC UA client application certificate (URI urn:mrkd:test-NAME), signed by ``issuer`` (None:
    self-signed). ``issuer_name``: the issuer field to claim (a forgery test: another key signs)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signer = issuer.key if issuer is not None else key
    claimed = issuer_name or (issuer.cert.subject if issuer is not None else _name(name))
    builder = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(claimed)
               .public_key(key.public_key()).serial_number(serial or x509.random_serial_number())
               .not_valid_before(NOW + datetime.timedelta(days=start_days))
               .not_valid_after(NOW + datetime.timedelta(days=days))
               .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"urn:mrkd:test-{name}"),
                                                           x509.DNSName("localhost")]), critical=False)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=True,
                                            data_encipherment=True, key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    return Issued(builder.sign(signer, hashes.SHA256()), key)


def revocation_list(issuer: Issued, revoked: Sequence[Issued], next_update_days: float = 7) -> bytes:
    """A DER CRL of ``issuer`` revoking ``revoked``, due for renewal in ``next_update_days`` (< 0: overdue)."""
    last_update = NOW - datetime.timedelta(hours=1) + datetime.timedelta(days=min(0.0, next_update_days - 1))
    builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer.cert.subject)
               .last_update(last_update).next_update(NOW + datetime.timedelta(days=next_update_days)))
    for item in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(item.cert.serial_number)
            .revocation_date(NOW - datetime.timedelta(minutes=30)).build())
    return builder.sign(issuer.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
