"""A private CA and the certificates it signs, for TLS on every NATS connection.

Clients check the servers against the CA (``--tls-ca``). Server certificates carry both the
server and the client usage because the hub's routes are mutual TLS (each node is client and
server of the others) and a leaf node presents its certificate to the hub when client
certificates are required. Keys are ECDSA P-256: small, fast, supported by nats-server and
Python's ``ssl``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedjet.deploy.files import write_file, write_secret

VALID_DAYS = 825  # the longest validity that common TLS clients accept for leaf certificates


@dataclass(frozen=True, kw_only=True)
class CertFiles:
    """Where one certificate and its private key were written."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class CertificateAuthority:
    """The CA's key and certificate, kept in memory only while the topology is generated."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, common_name: str) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = _base(name, name, key.public_key())
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        builder = builder.add_extension(_key_usage(ca=True), critical=True)
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        return cls(key, builder.sign(key, hashes.SHA256()))

    def write(self, directory: Path) -> CertFiles:
        """``ca.pem`` (hand it to every client and server) and ``ca-key.pem`` (keep it offline)."""
        cert = write_file(directory / "ca.pem", self.cert.public_bytes(serialization.Encoding.PEM))
        key = write_secret(directory / "ca-key.pem", _key_pem(self.key))
        return CertFiles(cert=cert, key=key)

    def issue(self, common_name: str, *, hosts: tuple[str, ...] = (), server: bool, directory: Path) -> CertFiles:
        """Sign a certificate for ``common_name``; ``hosts`` become its DNS / IP alternative names."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH, *([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])]
        builder = _base(subject, self.cert.subject, key.public_key())
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(_key_usage(ca=False), critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
        stem = "server" if server else "client"
        cert = builder.sign(self.key, hashes.SHA256())
        return CertFiles(
            cert=write_file(directory / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM)),
            key=write_secret(directory / f"{stem}-key.pem", _key_pem(key)),
        )


def _base(subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew between clouds
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _alt_names(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
