"""TLS with a self-signed certificate (made here with `cryptography`), alone and with a token."""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .conftest import IDS_OOV, TOKEN, expected_lookup


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return directory / "cert.pem", directory / "key.pem"


def test_tls_serves_verified_clients_only(model_a, certificate, serve, connect):
    cert, key = certificate
    server = serve(model_a[1], tls_cert=cert, tls_key=key, token=TOKEN)
    client = connect(server, tls_root_cert=cert, token=TOKEN)
    np.testing.assert_array_equal(client.lookup("a", IDS_OOV), expected_lookup(model_a[0], "a", IDS_OOV).numpy())
    assert client.health() == "SERVING"
    # by host name, checked against the certificate's DNS name
    by_name = connect(f"localhost:{server.port}", tls_root_cert=cert.read_bytes(), token=TOKEN)
    assert by_name.model_info()["checksum"] == client.model_info()["checksum"]
    # TLS without the token is still refused
    with pytest.raises(grpc.RpcError) as info:
        connect(server, tls_root_cert=cert).lookup("a", [1])
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # a plaintext client cannot talk to the TLS port
    with pytest.raises(grpc.RpcError) as info:
        connect(server, token=TOKEN).lookup("a", [1], timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_client_rejects_an_untrusted_server(model_a, certificate, tmp_path, serve, connect):
    cert, key = certificate
    server = serve(model_a[1], tls_cert=cert, tls_key=key)
    other = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone else")])
    now = datetime.datetime.now(datetime.timezone.utc)
    stranger = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(other.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(other, hashes.SHA256())
    )  # fmt: skip
    with pytest.raises(grpc.RpcError) as info:
        connect(server, tls_root_cert=stranger.public_bytes(serialization.Encoding.PEM)).lookup("a", [1], timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
