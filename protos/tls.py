"""TLS for the cluster (docs/security.md): a cluster CA and certificates (`coordinator certs`),
and the gRPC credentials of mutual TLS between coordinator and workers.

Every certificate the CA signs may serve and be a client: a worker serves its stage and opens
the stream to the next one; the coordinator opens streams to workers and serves its APIs. A
worker with TLS only accepts peers whose certificate the CA signed (mutual TLS); the
coordinator's public APIs ask clients for none (they trust `ca.crt`; an API key authenticates
them).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

NAME_RE = re.compile(r"^[A-Za-z0-9*]([A-Za-z0-9.*:-]{0,252})$")
VALID_DAYS = 5 * 365


@dataclass(frozen=True)
class TLS:
    """This process's certificate and key, and the cluster CA it trusts (PEM bytes)."""

    cert: bytes
    key: bytes
    ca: bytes
    cert_path: Path
    key_path: Path

    @classmethod
    def load(cls, cert: str | Path | None, key: str | Path | None,
             ca: str | Path | None) -> TLS | None:
        """The three files of `--tls-cert`, `--tls-key`, `--tls-ca`; None when none is given,
        ValueError naming the one missing or unreadable."""
        given = {"--tls-cert": cert, "--tls-key": key, "--tls-ca": ca}
        if not any(given.values()):
            return None
        missing = [flag for flag, v in given.items() if not v]
        if missing:
            raise ValueError(f"TLS needs --tls-cert, --tls-key and --tls-ca; missing "
                             f"{', '.join(missing)}")
        data = {}
        for flag, path in given.items():
            try:
                data[flag] = Path(path).expanduser().read_bytes()
            except OSError as e:
                raise ValueError(f"{flag} {path}: {e.strerror}") from None
            if b"-----BEGIN" not in data[flag]:
                raise ValueError(f"{flag} {path}: not a PEM file")
        return cls(data["--tls-cert"], data["--tls-key"], data["--tls-ca"],
                   Path(cert).expanduser(), Path(key).expanduser())

    def server_credentials(self, require_client_cert: bool) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=require_client_cert)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)


_current: TLS | None = None


def use(tls: TLS | None) -> None:
    """Make `tls` the credentials of this process's channels to workers (None: plain)."""
    global _current
    _current = tls


def current() -> TLS | None:
    return _current


def add_arguments(parser: Any, what: str) -> None:
    """--tls-cert, --tls-key, --tls-ca on `worker serve` and `coordinator serve`."""
    parser.add_argument("--tls-cert", type=Path, default=None,
                        help=f"this {what}'s certificate (coordinator certs); with --tls-key "
                        "and --tls-ca: mutual TLS between coordinator and workers")
    parser.add_argument("--tls-key", type=Path, default=None, help="its private key")
    parser.add_argument("--tls-ca", type=Path, default=None,
                        help="the cluster CA (ca.crt): peers must hold a certificate it signed")


# -- coordinator certs ------------------------------------------------------------------------
def _write(path: Path, data: bytes, private: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def check_names(names: list[str]) -> list[str]:
    """Host names, `*.local`-style wildcards or IP addresses; ValueError naming a bad one."""
    if not names:
        raise ValueError("--hosts: give at least one name")
    for name in names:
        if not NAME_RE.match(name) or ".." in name or name.startswith("."):
            raise ValueError(f"--hosts: {name!r} is not a host name or an IP address")
    return names


def make_certs(out: Path, names: list[str]) -> list[Path]:
    """A cluster CA in `out` (kept when `out/ca.key` exists already) and a certificate and key
    for each name (`out/NAME.crt`, `out/NAME.key`); returns the files written."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    check_names(names)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    until = now + datetime.timedelta(days=VALID_DAYS)
    written = []
    ca_key_path, ca_path = out / "ca.key", out / "ca.crt"
    if ca_key_path.is_file() and ca_path.is_file():
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Shardline cluster CA")])
        ca = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(until)
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                           False), critical=True)
              .sign(ca_key, hashes.SHA256()))
        _write(ca_key_path, _pem_key(ca_key), private=True)
        _write(ca_path, ca.public_bytes(serialization.Encoding.PEM))
        written += [ca_path, ca_key_path]
    for name in names:
        try:
            alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            alt = x509.DNSName(name)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(until)
                .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        file = name.replace("*", "_wildcard").replace(":", "_")
        _write(out / f"{file}.key", _pem_key(key), private=True)
        _write(out / f"{file}.crt", cert.public_bytes(serialization.Encoding.PEM))
        written += [out / f"{file}.crt", out / f"{file}.key"]
    return written
