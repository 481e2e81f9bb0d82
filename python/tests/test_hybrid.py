"""Hybrid models from Python: a gpt-oss namespace (sliding-window layers with attention sinks)
decoded against a numpy float64 reference over exactly the window, pages outside the window
released; a Qwen3-Next namespace's Gated DeltaNet state put, stepped and restored from a
snapshot by a prefix hit; per-layer bad input refused by name."""
import hashlib

import numpy as np
import pytest

import kvcache
from kvcache import KvcacheError, from_bf16, to_bf16


def _reference(ns, q, kv, start, sinks):
    """Attention of q [q_heads, d] over tokens [start:] of kv [planes, n, d] in float64, with one
    sink logit per head in the softmax's denominator."""
    kv = from_bf16(kv).astype(np.float64)
    kvh = ns.planes // 2
    group = ns.q_heads // kvh
    scale = ns.proto.model.softmax_scale
    out = np.zeros((ns.q_heads, ns.v_width))
    for h in range(ns.q_heads):
        k, v = kv[h // group, start:], kv[kvh + h // group, start:]
        s = scale * (k @ q[h].astype(np.float64))
        m = max(s.max(), sinks[h])
        p = np.exp(s - m)
        out[h] = p @ v / (p.sum() + np.exp(sinks[h] - m))
    return out


def test_sliding_layers_with_sinks_decode_over_their_window(coordinator):
    c = kvcache.Client(coordinator)
    ns = c.create_namespace("py.oss", preset="gpt-oss-20b", page_tokens=16)
    assert ns.layer_kind(0) == "sliding" and ns.layer_kind(1) == "full"
    rng = np.random.default_rng(3)
    n = 300
    kv = {layer: to_bf16(rng.standard_normal((ns.planes, n, ns.width)).astype(np.float32)) for layer in (0, 1)}
    for layer in (0, 1):
        c.put_sequence("py.oss", "s", layer, kv[layer])
    # The sliding layer keeps only the window's pages (300 tokens, window 128: tokens 172..300).
    held = {l.layer: l for l in c.lookup("py.oss", "s").layers}
    assert [i for i, w in enumerate(held[0].page_write_seqs) if w] == list(range(172 // 16, 19))
    assert all(held[1].page_write_seqs)
    sinks = rng.standard_normal(ns.q_heads).astype(np.float32)
    for step in range(3):
        for layer in (0, 1):
            q = rng.standard_normal((ns.q_heads, ns.width)).astype(np.float32)
            tok = to_bf16(rng.standard_normal((ns.planes, 1, ns.width)).astype(np.float32))
            kv[layer] = np.concatenate([kv[layer], tok], axis=1)
            (r,) = c.decode("py.oss", layer, [("s", q, tok)], sinks=sinks)
            assert r.ok, r.message
            start, end = ns.window(layer, kv[layer].shape[1])
            assert r.context_tokens == end - start
            want = _reference(ns, q, kv[layer], start, sinks)
            err = np.linalg.norm(r.output - want) / np.linalg.norm(want)
            assert err < 1e-5, (step, layer, err)
    with pytest.raises(KvcacheError, match="sinks must carry 64 f32"):
        c.decode("py.oss", 0, [("s", q)])


def _unit(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_a_gated_deltanet_state_steps_and_a_prefix_hit_restores_it(coordinator):
    c = kvcache.Client(coordinator)
    ns = c.create_namespace("py.qwen", preset="qwen3-next-80b-a3b", page_tokens=16)
    assert ns.layer_kind(0) == "linear" and ns.layer_kind(3) == "full"
    size = ns.state_bytes(0)
    assert size == 2_146_304
    rng = np.random.default_rng(5)
    rec = (rng.standard_normal(32 * 128 * 128) * 0.05).astype("<f4")
    state = rec.tobytes() + bytes(size - rec.nbytes)
    c.put_state("py.qwen", "s", 0, state)
    assert c.get_state("py.qwen", "s", 0) == state
    S = rec.astype(np.float64).reshape(32, 128, 128)
    for _ in range(2):
        q, k = _unit(rng, (16, 128)), _unit(rng, (16, 128))
        v = rng.standard_normal((32, 128)).astype(np.float32)
        g = -np.abs(rng.standard_normal(32)).astype(np.float32)
        beta = np.abs(rng.standard_normal(32)).astype(np.float32) % 1
        (r,) = c.decode_linear("py.qwen", 0, [("s", q, k, v, g, beta)])
        assert r.ok, r.message
        # The delta rule in float64: each key head serves two value heads.
        want = np.zeros((32, 128))
        for h in range(32):
            kh = h // 2
            S[h] *= np.exp(g[h])
            u = beta[h] * (v[h] - S[h].T @ k[kh])
            S[h] += np.outer(k[kh], u)
            want[h] = (S[h].T @ q[kh]) / np.sqrt(128)
        assert np.linalg.norm(r.output - want) / np.linalg.norm(want) < 1e-5
    stepped = c.get_state("py.qwen", "s", 0)
    assert stepped != state
    # A 2-page prompt whose full-attention layers are cached and whose GDN snapshot follows page 2.
    keys = c.content_keys("py.qwen", list(range(32)))
    pages = [(k, layer, bytes(ns.page_bytes)) for k in keys for layer in range(48) if ns.layer_kind(layer) == "full"]
    c.put_content("py.qwen", pages)
    assert c.match_prefix("py.qwen", keys) == 0, "no snapshot: nothing restorable"
    for layer in range(48):
        if ns.layer_kind(layer) == "linear":
            c.put_state_snapshot("py.qwen", keys[1], layer, stepped)
    assert c.match_prefix("py.qwen", keys) == 2
    c.create_sequence("py.qwen", "s2", keys)
    assert c.get_state("py.qwen", "s2", 0) == stepped
    # Bad input by name.
    with pytest.raises(KvcacheError, match="a state is 2146304 bytes"):
        c.put_state("py.qwen", "s", 0, stepped[1:])
    with pytest.raises(KvcacheError, match="linear.q has 100 values, expected 2048"):
        c.decode_linear("py.qwen", 0, [("s", np.zeros(100), k, v, g, beta)])
    with pytest.raises(KvcacheError, match="layer 3 is a full attention layer: linear inputs do not apply"):
        c.decode_linear("py.qwen", 3, [("s", q, k, v, g, beta)])
    assert hashlib.sha256(stepped).digest()[:8] != b"\0" * 8
