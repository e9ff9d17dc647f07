"""The OPC UA trust folder (runtime/plc/trust.py) against OpenSSL's own chain check: certificates
listed byte for byte, or issued by a listed certificate authority and not on its CRL, within dates."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from peers import require_program
from pki_fixtures import application, authority, revocation_list

from mrkd.runtime.plc import PlcError
from mrkd.runtime.plc.trust import (INVALID, ISSUER_TIME_INVALID, REVOKED, TIME_INVALID, UNTRUSTED,
                                    load_trust_folder)


def _pem(path: Path, der: bytes, crl: bool = False) -> Path:
    item = x509.load_der_x509_crl(der) if crl else x509.load_der_x509_certificate(der)
    path.write_bytes(item.public_bytes(serialization.Encoding.PEM))
    return path


def openssl_accepts(openssl: str, folder: Path, authority_der: bytes, leaf_der: bytes, crl_der=None) -> bool:
    """`openssl verify` of the leaf against the authority alone (and its CRL)."""
    args = [openssl, "verify", "-CAfile", str(_pem(folder / "ossl-ca.pem", authority_der))]
    if crl_der is not None:
        args += ["-crl_check", "-CRLfile", str(_pem(folder / "ossl-crl.pem", crl_der, crl=True))]
    done = subprocess.run(args + [str(_pem(folder / "ossl-leaf.pem", leaf_der))], capture_output=True, text=True)
    return done.returncode == 0


def test_trust_folder_agrees_with_openssl_on_chains_revocation_and_dates(tmp_path):
    openssl = require_program("openssl", ["openssl"])
    ca, other_ca = authority("line CA"), authority("someone else's CA")
    expired_ca = authority("expired CA", days=-1, start_days=-30)
    not_a_ca = authority("a plain certificate", ca=False, key_cert_sign=False)
    good, revoked = application(ca, "station-1"), application(ca, "station-2")
    expired = application(ca, "station-old", days=-1, start_days=-30)
    forged = application(other_ca, "forger", issuer_name=ca.cert.subject)     # claims the line CA
    crl = revocation_list(ca, [revoked])
    folder = tmp_path / "trusted"
    folder.mkdir()
    listed = application(None, "listed").save(tmp_path, "listed")              # self-signed, listed as is
    for name, item in (("ca", ca), ("expired-ca", expired_ca), ("plain", not_a_ca), ("listed", listed)):
        (folder / f"{name}.der").write_bytes(item.der)
    (folder / "ca.crl").write_bytes(crl)
    (folder / "notes.txt").write_text("ignored")
    trust = load_trust_folder(str(folder))
    cases = {   # name: (leaf, the authority OpenSSL is given, our answer)
        "issued by the listed CA": (good, ca, None),
        "revoked on its CRL": (revoked, ca, REVOKED),
        "expired": (expired, ca, TIME_INVALID),
        "signed by another key, claiming the CA": (forged, ca, UNTRUSTED),
        "issued by an unlisted CA": (application(other_ca, "visitor"), other_ca, UNTRUSTED),
        "issued by an expired CA": (application(expired_ca, "late"), expired_ca, ISSUER_TIME_INVALID),
        "issued by a listed non-CA": (application(not_a_ca, "sub"), not_a_ca, UNTRUSTED),
    }
    for name, (leaf, issuer, expected) in cases.items():
        assert trust.refusal(leaf.der) == expected, name
        in_folder = issuer.der in trust.listed
        reference = in_folder and openssl_accepts(openssl, tmp_path, issuer.der, leaf.der,
                                                  crl if issuer is ca else None)
        assert (expected is None) == reference, (name, expected, reference)
    assert trust.refusal(listed.der) is None                                    # byte for byte
    assert trust.refusal(application(None, "listed").der) == UNTRUSTED          # same name, another key
    assert trust.refusal(b"\x30\x03junk") == INVALID


def test_trust_folder_mistakes_are_one_line_errors(tmp_path):
    ca, other_ca = authority("line CA"), authority("other CA")
    folder = tmp_path / "trusted"
    folder.mkdir()
    (folder / "ca.der").write_bytes(ca.der)
    (folder / "other.crl").write_bytes(revocation_list(other_ca, []))          # no listed CA signed it
    with pytest.raises(PlcError, match=r"other\.crl is not signed by a certificate authority in the folder"):
        load_trust_folder(str(folder))
    (folder / "other.crl").write_text("-----BEGIN X509 CRL-----\nnope\n-----END X509 CRL-----\n")
    with pytest.raises(PlcError, match=r"other\.crl is not a certificate revocation list"):
        load_trust_folder(str(folder))
    (folder / "other.crl").unlink()
    assert load_trust_folder(str(folder)).revoked == {}      # a CA without a CRL: accepted, with a warning
