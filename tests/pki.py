"""A throwaway PKI for the tests that talk TLS to the broker."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CA_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tapgate test CA")])


def make_pki(directory: Path, *clients: str) -> dict[str, tuple[Path, Path]]:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate per name
    (CN = the name, which the broker takes as the user name), written to ``directory``:
    name -> (certificate, key); "ca" -> (the CA's certificate, its key)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())

    def issue(cn: str, key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
              ip: str | None = None) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(CA_NAME).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(hours=1))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ip is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    def write(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
              ) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        return cert_path, key_path

    out = {"ca": write("ca", issue("tapgate test CA", ca_key, ca=True), ca_key)}
    server_key = ec.generate_private_key(ec.SECP256R1())
    out["server"] = write("server", issue("127.0.0.1", server_key, ip="127.0.0.1"), server_key)
    for name in clients:
        key = ec.generate_private_key(ec.SECP256R1())
        out[name] = write(name, issue(name, key), key)
    return out
