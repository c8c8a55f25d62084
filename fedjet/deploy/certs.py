"""Private CAs and the certificates they sign, for TLS on every NATS connection.

Two CAs, so that nothing a cloud holds can ever pass the hub's route (cluster) port:

* the **client CA** (``ca/ca.pem``, handed to everyone) signs what clients and leaf nodes see
  or present: each server's listening certificate (``SERVER``: server use only) and the client
  certificates of identities and leaf nodes (``CLIENT``: client use only, no host names);
* the **routes CA** (``ca/routes-ca.pem``, kept with the hub nodes) signs only the hub nodes'
  route certificates (``ROUTE``: server *and* client use, since each node both dials and
  accepts the others, plus the route identity as a URI name that the cluster authorizes).

A certificate signed by one CA is worthless at a port that trusts the other, and each
certificate carries only the extended key usage its job needs: a leaf's listening certificate
cannot be presented as a client certificate, a client certificate cannot serve. Keys are ECDSA
P-256: small, fast, supported by nats-server and Python's ``ssl``.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedjet.deploy.files import write_file, write_secret

VALID_DAYS = 825  # the longest validity that common TLS clients accept for leaf certificates


class Use(enum.Enum):
    """What a certificate is for; the value is the stem of its file names (``route.pem``)."""

    SERVER = "server"  # a listener that clients and leaf nodes verify
    CLIENT = "client"  # presented to a server that requires client certificates
    ROUTE = "route"  # a hub node's route: mutual TLS between hub nodes only


_USAGES = {
    Use.SERVER: (ExtendedKeyUsageOID.SERVER_AUTH,),
    Use.CLIENT: (ExtendedKeyUsageOID.CLIENT_AUTH,),
    Use.ROUTE: (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
}


@dataclass(frozen=True, kw_only=True)
class CertFiles:
    """Where one certificate and its private key were written, and the pin of its public key."""

    cert: Path
    key: Path
    pin: str  # hex SHA-256 of the DER SubjectPublicKeyInfo: nats-server's ``pinned_certs`` form


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA's key and certificate, kept in memory only while the topology is generated."""

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

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: Path, stem: str = "ca") -> CertFiles:
        """``<stem>.pem`` (the certificate to trust) and ``<stem>-key.pem`` (keep it offline)."""
        cert = write_file(directory / f"{stem}.pem", self.pem)
        key = write_secret(directory / f"{stem}-key.pem", _key_pem(self.key))
        return CertFiles(cert=cert, key=key, pin=spki_pin(self.cert))

    def issue(
        self,
        common_name: str,
        *,
        use: Use,
        directory: Path,
        hosts: tuple[str, ...] = (),
        uris: tuple[str, ...] = (),
    ) -> CertFiles:
        """Sign ``<use>.pem`` / ``<use>-key.pem`` for ``common_name`` in ``directory``.

        ``hosts`` become DNS / IP alternative names (a listener's; a client certificate names
        no host), ``uris`` URI alternative names (the route identity).
        """
        if use is Use.CLIENT and hosts:
            raise ValueError("a client certificate names no host")
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = _base(subject, self.cert.subject, key.public_key())
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(_key_usage(ca=False), critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(_USAGES[use])), critical=False)
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        names = _alt_names(hosts) + [x509.UniformResourceIdentifier(uri) for uri in uris]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return CertFiles(
            cert=write_file(directory / f"{use.value}.pem", cert.public_bytes(serialization.Encoding.PEM)),
            key=write_secret(directory / f"{use.value}-key.pem", _key_pem(key)),
            pin=spki_pin(cert),
        )


def spki_pin(cert: x509.Certificate) -> str:
    """What nats-server compares for ``pinned_certs``: SHA-256 of the certificate's SubjectPublicKeyInfo."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


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
