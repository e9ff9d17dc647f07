"""The OPC UA trust folder (runtime/plc/trust.py) against OpenSSL's own chain check: certificates
listed byte for byte, or issued through a chain (intermediates in ``issuers``) to a listed certificate
authority, none on its issuer's CRL, no CRL past its nextUpdate, within dates; and the folder read again
when it changes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from peers import require_program
from pki_fixtures import application, authority, revocation_list

from mrkd.runtime.plc import PlcError
from mrkd.runtime.plc.trust import (INVALID, ISSUER_REVOCATION_UNKNOWN, ISSUER_REVOKED, ISSUER_TIME_INVALID,
                                    MAX_CHAIN, REVOCATION_UNKNOWN, REVOKED, TIME_INVALID, UNTRUSTED, TrustFolder,
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


def _bundle(path: Path, items, crl: bool = False) -> Path:
    """Several certificates (or CRLs, DER) in one PEM file, as `openssl verify` takes them."""
    pems = [(x509.load_der_x509_crl(der) if crl else x509.load_der_x509_certificate(der))
            .public_bytes(serialization.Encoding.PEM) for der in items]
    path.write_bytes(b"".join(pems))
    return path


def openssl_chain_accepts(openssl: str, folder: Path, trusted, untrusted, crls, leaf_der: bytes) -> bool:
    """`openssl verify`: trust anchors ``trusted``, chain links ``untrusted``, every link's CRL checked."""
    args = [openssl, "verify", "-CAfile", str(_bundle(folder / "ossl-trusted.pem", trusted)),
            "-untrusted", str(_bundle(folder / "ossl-untrusted.pem", untrusted)),
            "-crl_check_all", "-CRLfile", str(_bundle(folder / "ossl-crls.pem", crls, crl=True)),
            str(_pem(folder / "ossl-leaf.pem", leaf_der))]
    return subprocess.run(args, capture_output=True, text=True).returncode == 0


def test_chains_through_issuers_and_overdue_crls_agree_with_openssl(tmp_path):
    """Intermediate authorities in ``issuers`` link a client to a trusted root, and admit no one on their
    own; an intermediate revoked or expired refuses its clients; a CRL past its nextUpdate refuses the
    clients it speaks for (RevocationUnknown), where OpenSSL says "CRL has expired"."""
    openssl = require_program("openssl", ["openssl"])
    root, late_root, stranger_root = authority("root CA"), authority("root with an overdue CRL"), authority("unlisted")
    line_ca = authority("line CA", issuer=root)
    revoked_ca = authority("revoked CA", issuer=root)
    expired_ca = authority("expired CA", issuer=root, days=-1, start_days=-30)
    late_line_ca = authority("line CA under the overdue root", issuer=late_root)
    stranger_ca = authority("stranger's line CA", issuer=stranger_root)
    lone_root = authority("a root among the issuers")
    station, revoked_station = application(line_ca, "station"), application(line_ca, "revoked-station")
    crls = {"root": revocation_list(root, [revoked_ca]), "line": revocation_list(line_ca, [revoked_station]),
            "late": revocation_list(late_root, [], next_update_days=-1),
            "late-line": revocation_list(late_line_ca, []),
            "revoked": revocation_list(revoked_ca, []), "expired": revocation_list(expired_ca, [])}
    folder = tmp_path / "trusted"
    (folder / "issuers").mkdir(parents=True)
    for name, item in (("root", root), ("late-root", late_root)):
        (folder / f"{name}.der").write_bytes(item.der)
    (folder / "root.crl").write_bytes(crls["root"])
    (folder / "late-root.crl").write_bytes(crls["late"])
    for name, item in (("line", line_ca), ("revoked", revoked_ca), ("expired", expired_ca),
                       ("late-line", late_line_ca), ("stranger", stranger_ca), ("lone", lone_root)):
        (folder / "issuers" / f"{name}.der").write_bytes(item.der)
    for name in ("line", "late-line", "revoked", "expired"):
        (folder / "issuers" / f"{name}.crl").write_bytes(crls[name])
    trust = load_trust_folder(str(folder))
    assert {c.subject for c in trust.authorities} == {root.cert.subject, late_root.cert.subject}
    cases = {
        "through the line CA to the root": (station, None),
        "revoked by the line CA": (revoked_station, REVOKED),
        "under an intermediate the root revoked": (application(revoked_ca, "under-revoked"), ISSUER_REVOKED),
        "under an expired intermediate": (application(expired_ca, "under-expired"), ISSUER_TIME_INVALID),
        "under the root whose CRL is overdue": (application(late_root, "direct-late"), REVOCATION_UNKNOWN),
        "two links under the overdue root": (application(late_line_ca, "under-late"), ISSUER_REVOCATION_UNKNOWN),
        "under an issuer whose root is not trusted": (application(stranger_ca, "visitor"), UNTRUSTED),
        "under a root kept among the issuers": (application(lone_root, "lonely"), UNTRUSTED),
    }
    anchors = [root.der, late_root.der]
    links = [c.der for c in (line_ca, revoked_ca, expired_ca, late_line_ca, stranger_ca, lone_root)]
    for name, (leaf, expected) in cases.items():
        assert trust.refusal(leaf.der) == expected, name
        reference = openssl_chain_accepts(openssl, tmp_path, anchors, links, list(crls.values()), leaf.der)
        assert (expected is None) == reference, (name, expected, reference)
    # the overdue CRL is the whole reason: renewed, the same clients are admitted
    (folder / "late-root.crl").write_bytes(revocation_list(late_root, []))
    renewed = load_trust_folder(str(folder))
    assert renewed.refusal(cases["under the root whose CRL is overdue"][0].der) is None
    assert renewed.refusal(cases["two links under the overdue root"][0].der) is None


def test_a_chain_longer_than_max_chain_is_refused_and_issuers_hold_only_authorities(tmp_path):
    root = authority("root CA")
    chain = [root]
    for i in range(MAX_CHAIN + 1):
        chain.append(authority(f"link {i}", issuer=chain[-1]))
    folder = tmp_path / "trusted"
    (folder / "issuers").mkdir(parents=True)
    (folder / "root.der").write_bytes(root.der)
    for i, link in enumerate(chain[1:]):
        (folder / "issuers" / f"link{i}.der").write_bytes(link.der)
    trust = load_trust_folder(str(folder))
    assert trust.refusal(application(chain[MAX_CHAIN], "deep-enough").der) is None       # MAX_CHAIN links
    assert trust.refusal(application(chain[MAX_CHAIN + 1], "too-deep").der) == UNTRUSTED
    (folder / "issuers" / "client.der").write_bytes(application(root, "a client").der)
    with pytest.raises(PlcError, match=r"client\.der is not a certificate authority"):
        load_trust_folder(str(folder))


def test_trust_folder_is_read_again_when_a_crl_is_renewed_and_keeps_the_last_good_list(tmp_path):
    """TrustFolder: an overdue CRL refuses its clients until a current one is moved in (no restart); a
    file that does not parse (half written) keeps the last good list and says so; a later CRL that
    revokes the client takes effect."""
    ca = authority("line CA")
    station = application(ca, "station")
    folder = tmp_path / "trusted"
    folder.mkdir()
    (folder / "ca.der").write_bytes(ca.der)
    (folder / "ca.crl").write_bytes(revocation_list(ca, [], next_update_days=-1))
    watched = TrustFolder(str(folder), check_every_s=0.0)
    assert watched.refusal(station.der) == REVOCATION_UNKNOWN

    def put(data: bytes):
        (folder / "ca.crl.new").write_bytes(data)
        (folder / "ca.crl.new").replace(folder / "ca.crl")

    put(revocation_list(ca, []))
    assert watched.refusal(station.der) is None and watched.reloads == 1 and watched.error == ""
    (folder / "ca.crl").write_bytes(revocation_list(ca, [station])[:40])       # a copy still being written
    assert watched.refusal(station.der) is None and watched.reloads == 1
    assert "does not load" in watched.error and "ca.crl" in watched.error
    put(revocation_list(ca, [station]))
    assert watched.refusal(station.der) == REVOKED and watched.reloads == 2 and watched.error == ""
    slow = TrustFolder(str(folder), check_every_s=3600.0)            # looks at most once an hour
    put(revocation_list(ca, []))
    assert slow.refusal(station.der) == REVOKED and slow.reloads == 0
