"""Tenants: a `kvcache dev --tenants` cluster; the Python client with a tenant's token creates,
writes, reads and decodes in its namespace; no token, an unknown token and another tenant's are
refused; the token can come from KVCACHE_TOKEN."""
import hashlib
import os
import tempfile

import numpy as np
import pytest

import kvcache
from conftest import start_dev, stop_dev


def _h(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture(scope="module")
def tenant_cluster():
    with tempfile.TemporaryDirectory(prefix="kvcache-py-tenants-") as data:
        path = os.path.join(data, "tenants.toml")
        with open(path, "w") as f:
            f.write(f'[tenants.alpha]\ntoken_sha256 = "{_h("alpha-token")}"\nquota = "64MiB"\n'
                    f'[tenants.beta]\ntoken_sha256 = "{_h("beta-token")}"\n')
        proc, addr = start_dev(os.path.join(data, "dev"), "--node-capacity", "128MiB", "--tenants", path)
        yield addr
        stop_dev(proc)


def test_a_tenant_uses_its_namespace_and_nobody_else_can(tenant_cluster, monkeypatch):
    alpha = kvcache.Client(tenant_cluster, token="alpha-token")
    ns = alpha.create_namespace("alpha.m", preset="qwen2.5-7b", page_tokens=16)
    assert ns.proto.tenant == "alpha"
    rng = np.random.default_rng(3)
    kv = kvcache.to_bf16(rng.standard_normal((ns.planes, 20, ns.width)).astype(np.float32))
    assert alpha.put_sequence("alpha.m", "s", 0, kv) == 2
    q = rng.standard_normal((ns.q_heads, ns.width)).astype(np.float32)
    (r,) = alpha.decode("alpha.m", 0, [("s", q)])
    assert r.ok, r.message

    # Another tenant does not see the namespace, and cannot use it by name.
    beta = kvcache.Client(tenant_cluster, token="beta-token")
    with pytest.raises(kvcache.KvcacheError) as e:
        beta.namespace("alpha.m")
    assert e.value.code.name == "NOT_FOUND"
    beta._namespaces["alpha.m"] = ns  # as if it had learnt the definition elsewhere
    with pytest.raises(kvcache.KvcacheError) as e:
        beta.get_pages("alpha.m", "s", 0, [0])
    assert e.value.code.name == "PERMISSION_DENIED"

    # No token, or one nobody has: refused before anything else.
    monkeypatch.delenv("KVCACHE_TOKEN", raising=False)
    for token in (None, "nobody"):
        with pytest.raises(kvcache.KvcacheError) as e:
            kvcache.Client(tenant_cluster, timeout=5.0, token=token)
        assert e.value.code.name == "UNAUTHENTICATED"

    # The token from the environment.
    monkeypatch.setenv("KVCACHE_TOKEN", "alpha-token")
    env = kvcache.Client(tenant_cluster)
    assert env.get_pages("alpha.m", "s", 0, [0])[0][0] == 16
