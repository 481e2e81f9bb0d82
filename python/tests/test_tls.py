"""mTLS: a `kvcache dev` cluster started with a test CA; the client with a certificate the CA
signed stores, reads and decodes; plaintext and certificate-less clients are refused."""
import datetime
import ipaddress
import os
import tempfile

import numpy as np
import pytest

import kvcache
from conftest import start_dev, stop_dev

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(k):
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pki(directory):
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("test CA")).issuer_name(_name("test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(_name("peer")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {n: os.path.join(directory, n) for n in ("ca.pem", "cert.pem", "key.pem")}
    for n, data in (("ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
                    ("cert.pem", leaf.public_bytes(serialization.Encoding.PEM)), ("key.pem", _pem_key(key))):
        with open(paths[n], "wb") as f:
            f.write(data)
    return paths


@pytest.fixture(scope="module")
def tls_cluster():
    with tempfile.TemporaryDirectory(prefix="kvcache-py-tls-") as data:
        p = _pki(data)
        proc, addr = start_dev(os.path.join(data, "dev"), "--node-capacity", "128MiB", "--tls-cert", p["cert.pem"],
                               "--tls-key", p["key.pem"], "--tls-ca", p["ca.pem"])
        yield addr, p
        stop_dev(proc)


def test_mtls_client_round_trip_and_decode(tls_cluster):
    addr, p = tls_cluster
    c = kvcache.Client(addr, tls=kvcache.Tls.from_files(p["ca.pem"], p["cert.pem"], p["key.pem"]))
    ns = c.create_namespace("py.tls", preset="qwen2.5-7b", page_tokens=16)
    rng = np.random.default_rng(3)
    kv = kvcache.to_bf16(rng.standard_normal((ns.planes, 20, ns.width)).astype(np.float32))
    assert c.put_sequence("py.tls", "a", 0, kv) == 2
    first = c.get_pages("py.tls", "a", 0, [0])[0]
    assert np.array_equal(np.frombuffer(first[1], dtype="<u2").reshape(ns.planes, 16, ns.width), kv[:, :16, :])
    q = rng.standard_normal((ns.proto.model.num_q_heads, ns.width)).astype(np.float32)
    (res,) = c.decode("py.tls", 0, [("a", q)])
    assert res.ok and res.output.shape[0] == ns.proto.model.num_q_heads and res.context_tokens == 20


def test_plaintext_and_certificate_less_clients_are_refused(tls_cluster):
    addr, p = tls_cluster
    with pytest.raises(kvcache.KvcacheError):
        kvcache.Client(addr, timeout=3.0)
    with open(p["ca.pem"], "rb") as f:
        ca = f.read()
    with pytest.raises(kvcache.KvcacheError):
        kvcache.Client(addr, timeout=3.0, tls=kvcache.Tls(ca))
