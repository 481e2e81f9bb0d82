import grpc
import numpy as np
import pytest

import kvcache


def reference(ns, q, kv):
    """float64 GQA attention over kv [planes][tokens][width] (bf16) for query [heads][width]."""
    kv = kvcache.from_bf16(kv).astype(np.float64)
    g = ns.planes // 2
    k, v = kv[:g], kv[g:]
    heads = q.shape[0]
    out = np.zeros((heads, ns.v_width))
    scale = ns.proto.model.softmax_scale
    for h in range(heads):
        grp = h // (heads // g)
        s = scale * (k[grp] @ q[h].astype(np.float64))
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ v[grp]
    return out


class _Refused(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "refused"


def test_a_write_refused_as_stale_by_one_owner_is_retried_only_where_it_was_not_applied():
    # Nodes learn a new epoch at their own heartbeats: one owner may refuse a write as stale
    # while the other applies it. The retry must not apply it twice at the second.
    c = kvcache.Client.__new__(kvcache.Client)
    c.epoch, refreshes, applied = 4, [], {"a": 0, "b": 0}
    c.owners = lambda ns, seq: ["a", "b"]
    c.refresh = lambda: refreshes.append(1) or setattr(c, "epoch", 5)
    c._stub = lambda addr: addr

    def send(addr, epoch):
        if addr == "a" and epoch < 5:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION)
        applied[addr] += 1
        return addr

    assert sorted(c._write("ns", "s", send)) == ["a", "b"]
    assert applied == {"a": 1, "b": 1}
    assert len(refreshes) == 1
    # Anything but stale or unreachable is the caller's error at once.
    with pytest.raises(kvcache.KvcacheError) as e:
        c._write("ns", "s", lambda addr, epoch: (_ for _ in ()).throw(_Refused(grpc.StatusCode.INVALID_ARGUMENT)))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def client(coordinator):
    return kvcache.Client(coordinator)


def test_placement_matches_the_rust_implementation_on_a_vector():
    # The vector pinned by kvcache-core's placement::vector test.
    cands = [(f"node-{i}", 1.0 + i % 3, "") for i in range(10)]
    key = kvcache._seq_hash("ns", "seq")
    assert kvcache._draw(kvcache._hash64(b"node-0"), key) == 0xCD569956E5EE7E7E
    assert kvcache.place(key, cands, 3) == [4, 3, 7]


def test_put_get_lookup_delete_round_trip(client):
    ns = client.create_namespace("py.rt", preset="qwen2.5-7b", page_tokens=16)
    rng = np.random.default_rng(1)
    kv = kvcache.to_bf16(rng.standard_normal((ns.planes, 40, ns.width)).astype(np.float32))
    assert client.put_sequence("py.rt", "a", 0, kv) == 3
    pages = client.get_pages("py.rt", "a", 0, [0, 1, 2, 3])
    assert pages[3] is None
    assert [p[0] for p in pages[:3]] == [16, 16, 8]
    second = np.frombuffer(pages[1][1], dtype="<u2").reshape(ns.planes, 16, ns.width)
    assert np.array_equal(second, kv[:, 16:32, :])
    lk = client.lookup("py.rt", "a")
    assert lk.exists and lk.layers[0].tokens == 40
    assert client.delete("py.rt", "a") == 3
    assert client.get_pages("py.rt", "a", 0, [0]) == [None]


def test_decode_through_the_worker_matches_float64(client):
    ns = client.create_namespace("py.dec", preset="qwen2.5-7b", page_tokens=16)
    rng = np.random.default_rng(2)
    kv = kvcache.to_bf16(rng.standard_normal((ns.planes, 37, ns.width)).astype(np.float32))
    client.put_sequence("py.dec", "s", 0, kv)
    for step in range(3):
        q = rng.standard_normal((ns.q_heads, ns.width)).astype(np.float32)
        tok = kvcache.to_bf16(rng.standard_normal((ns.planes, 1, ns.width)).astype(np.float32))
        kv = np.concatenate([kv, tok], axis=1)
        results = client.decode("py.dec", 0, [("s", q, tok)])
        (r,) = results
        assert r.ok, r.message
        # The first step pulls the layer (3 pages of 16 tokens); the later ones find it cached
        # and compute while their append is in flight.
        st = results.stats
        if step == 0:
            assert st.pages_pulled == 3 and st.bytes_pulled > 0 and st.sequences_overlapped == 0, st
        else:
            assert st.pages_pulled == 0 and st.sequences_overlapped == 1 and st.sequences_recomputed == 0, st
        assert st.append_micros > 0 and st.compute_micros > 0, st
        assert r.context_tokens == kv.shape[1]
        want = reference(ns, q, kv)
        err = np.linalg.norm(r.output - want) / np.linalg.norm(want)
        assert err < 1e-5, (step, err)
    assert client.append("py.dec", "s", 0, tok) == kv.shape[1] + 1
    # bf16 queries and outputs: the reference attends with the rounded query; the output is
    # rounded once (relative error ≤ 2^-9 per value).
    q = rng.standard_normal((ns.q_heads, ns.width)).astype(np.float32)
    (r,) = client.decode("py.dec", 0, [("s", q)], vector_dtype="bf16")
    assert r.ok, r.message
    kv = np.concatenate([kv, tok], axis=1)
    want = reference(ns, kvcache.from_bf16(kvcache.to_bf16(q)), kv)
    err = np.linalg.norm(r.output - want) / np.linalg.norm(want)
    assert r.output.dtype == np.float32 and err < 2e-3, err
    with pytest.raises(ValueError):
        client.decode("py.dec", 0, [("s", q)], vector_dtype="f16")


def test_misses_and_bad_input(client):
    ns = client.create_namespace("py.bad", preset="qwen2.5-7b", page_tokens=16)
    q = np.zeros((ns.q_heads, ns.width), dtype=np.float32)
    (r,) = client.decode("py.bad", 0, [("never-written", q)])
    assert not r.ok and r.status == "SEQUENCE_STATUS_MISS"
    with pytest.raises(kvcache.KvcacheError) as e:
        client.decode("py.bad", 0, [("x", q[:, :5])])
    assert e.value.code.name == "INVALID_ARGUMENT" and "query has" in str(e.value)
    with pytest.raises(kvcache.KvcacheError):
        client.put_sequence("py.bad", "x", 0, np.zeros((3, 4, 5), dtype=np.uint16))
    with pytest.raises(kvcache.KvcacheError) as e:
        client.namespace("py.nope")
    assert e.value.code.name == "NOT_FOUND"


def test_prefix_reuse_by_content_key(client):
    ns = client.create_namespace("py.prefix", preset="qwen2.5-7b", page_tokens=16)
    tokens = list(range(16 * 5 + 3))
    keys = client.content_keys("py.prefix", tokens)
    assert len(keys) == 5 and all(len(k) == 32 for k in keys)
    # The same chain as the Rust side computes (SHA-256, seeded by the namespace).
    assert keys == kvcache.content_keys(ns.proto.prefix_seed, tokens, 16)
    assert kvcache.content_keys(ns.proto.prefix_seed + 1, tokens, 16)[0] != keys[0]
    assert client.match_prefix("py.prefix", keys) == 0
    rng = np.random.default_rng(5)
    layers = ns.proto.model.num_layers
    body = {(i, l): kvcache.to_bf16(rng.standard_normal((ns.planes, 16, ns.width)).astype(np.float32)).astype("<u2").tobytes()
            for i in range(3) for l in range(layers)}
    written, dedup = client.put_content("py.prefix", [(keys[i], l, body[(i, l)]) for (i, l) in body])
    assert (written, dedup) == (3 * layers, 0)
    assert client.match_prefix("py.prefix", keys) == 3
    assert client.put_content("py.prefix", [(keys[0], 0, body[(0, 0)])]) == (0, 1)
    got = client.get_content("py.prefix", keys[:4], [0, layers - 1])
    assert got[0] == body[(0, 0)] and got[5] == body[(2, layers - 1)] and got[6] is None
    # Another payload under a stored key is refused, never stored.
    with pytest.raises(kvcache.KvcacheError) as e:
        client.put_content("py.prefix", [(keys[0], 0, body[(1, 0)])])
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    # A sequence over the cached prefix: its own tokens follow the prefix's.
    client.create_sequence("py.prefix", "conv-1", keys[:3], pin_ms=10_000)
    kv = kvcache.to_bf16(rng.standard_normal((ns.planes, 2, ns.width)).astype(np.float32))
    assert client.append("py.prefix", "conv-1", 0, kv) == 3 * 16 + 2
    assert list(client.lookup("py.prefix", "conv-1").prefix) == keys[:3]
    # Sealing the turn: its full page becomes a content page the next prompt hits.
    turn = list(range(5000, 5016))
    kv16 = kvcache.to_bf16(rng.standard_normal((ns.planes, 14, ns.width)).astype(np.float32))
    for layer in range(layers):
        if layer > 0:  # layer 0 already holds the turn's first 2 tokens
            client.append("py.prefix", "conv-1", layer, kvcache.to_bf16(
                rng.standard_normal((ns.planes, 2, ns.width)).astype(np.float32)))
        client.append("py.prefix", "conv-1", layer, kv16)
    assert client.seal("py.prefix", "conv-1", turn) == 1
    nxt = client.content_keys("py.prefix", tokens[:3 * 16] + turn)
    assert list(client.lookup("py.prefix", "conv-1").prefix) == nxt
    assert client.match_prefix("py.prefix", nxt) == 4
    # Engine keys (SGLang's hex digests) are used as they are.
    assert kvcache.engine_key(keys[1].hex()) == keys[1]
    assert kvcache.content_sequence_id(keys[0]).startswith("#") and len(kvcache.content_sequence_id(keys[0])) == 44
