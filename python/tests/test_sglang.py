"""The SGLang HiCache backend against the real `sglang` package: loaded through SGLang's own
backend factory (`--hicache-storage-backend dynamic`), subclassing its `HiCacheStorage`, reading
and writing host pools laid out as SGLang's host pools lay them out (the kv_buffer shapes and the
flat data pages of `MHATokenToKVPoolHost` / `MLATokenToKVPoolHost`)."""
import importlib
import os

import pytest

# CI sets KVCACHE_REQUIRE_SGLANG=1: there a missing package fails the run instead of skipping.
if os.environ.get("KVCACHE_REQUIRE_SGLANG"):
    torch = importlib.import_module("torch")
    hicache = importlib.import_module("sglang.srt.mem_cache.hicache_storage")
else:
    torch = pytest.importorskip("torch", reason="the SGLang backend test needs torch (CI installs it)")
    hicache = pytest.importorskip("sglang.srt.mem_cache.hicache_storage",
                                  reason="the SGLang backend test needs the sglang package (CI installs it)")
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: E402

import kvcache  # noqa: E402
from kvcache.integrations.sglang import KvcacheStorage  # noqa: E402

PAGE = 16


class HostPool:
    """The parts of SGLang's MHA/MLA host pools a storage backend touches, with SGLang's own
    kv_buffer shapes per layout (pool_host/mha.py, pool_host/mla.py `init_kv_buffer`) and flat
    data pages (`get_data_page`, `set_from_flat_data_page`, `get_dummy_flat_data_page`)."""

    def __init__(self, layout, layers=3, heads=2, dim=64, pages=8, mla=None, dtype=torch.bfloat16):
        self.layout, self.layer_num, self.page_size, self.dtype = layout, layers, PAGE, dtype
        self.size, self.page_num = pages * PAGE, pages
        self.device, self.pin_memory = "cpu", False
        if mla:
            self.kv_lora_rank, self.qk_rope_head_dim = mla
            w = sum(mla)
            dims = {"layer_first": (layers, self.size, 1, w), "page_first": (self.size, layers, 1, w),
                    "page_first_direct": (pages, layers, PAGE, 1, w)}[layout]
        else:
            self.head_num, self.head_dim = heads, dim
            dims = {"layer_first": (2, layers, self.size, heads, dim), "page_first": (2, self.size, layers, heads, dim),
                    "page_first_direct": (2, pages, layers, PAGE, heads, dim),
                    "page_head": (2, pages, heads, PAGE, layers, dim)}[layout]
        self.mla = bool(mla)
        self.kv_buffer = torch.zeros(dims, dtype=dtype)

    def fill_random(self, seed):
        g = torch.Generator().manual_seed(seed)
        self.kv_buffer.copy_(torch.randn(self.kv_buffer.shape, generator=g).to(self.dtype))

    def get_data_page(self, index, flat=True):
        b, p = self.kv_buffer, self.page_size
        if self.mla:
            page = {"layer_first": lambda: b[:, index:index + p], "page_first": lambda: b[index:index + p]}[self.layout]()
        else:
            page = {"layer_first": lambda: b[:, :, index:index + p], "page_first": lambda: b[:, index:index + p]}[self.layout]()
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self):
        if self.mla:
            return torch.zeros((self.layer_num, self.page_size, 1, self.kv_lora_rank + self.qk_rope_head_dim),
                               dtype=self.dtype).flatten()
        return torch.zeros((2, self.layer_num, self.page_size, self.head_num, self.head_dim), dtype=self.dtype).flatten()

    def tokens(self, index, layer):
        """Layer `layer` of the page at token `index` as [2][tokens][heads][dim] (MHA) or
        [tokens][width] (MLA), whatever the layout."""
        b, p = self.kv_buffer, self.page_size
        if self.mla:
            return {"layer_first": lambda: b[layer, index:index + p, 0], "page_first": lambda: b[index:index + p, layer, 0],
                    "page_first_direct": lambda: b[index // p, layer, :, 0]}[self.layout]()
        return {"layer_first": lambda: b[:, layer, index:index + p], "page_first": lambda: b[:, index:index + p, layer],
                "page_first_direct": lambda: b[:, index // p, layer],
                "page_head": lambda: b[:, index // p, :, :, layer].permute(0, 2, 1, 3)}[self.layout]()


def backend(coordinator, pool, tp_rank=0, model="test/tiny-llama", **extra):
    cfg = hicache.HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=pool.mla, enable_storage_metrics=False, is_page_first_layout=pool.layout != "layer_first",
        model_name=model,
        extra_config={"backend_name": "kvcache", "module_path": "kvcache.integrations.sglang",
                      "class_name": "KvcacheStorage", "interface_v1": 1, "coordinator": coordinator, **extra})
    b = StorageBackendFactory.create_backend("dynamic", cfg, pool)
    assert isinstance(b, KvcacheStorage) and isinstance(b, hicache.HiCacheStorage)
    b.register_mem_pool_host(pool)
    return b


def keys(n, salt):
    import hashlib
    return [hashlib.sha256(f"{salt}-{i}".encode()).hexdigest() for i in range(n)]


@pytest.mark.parametrize("writer,reader", [("layer_first", "page_first"), ("page_first_direct", "page_head"),
                                           ("page_first", "page_first")])
def test_two_servers_share_pages_through_the_zero_copy_interface(coordinator, writer, reader):
    a, b = HostPool(writer), HostPool(reader)
    a.fill_random(1)
    sa, sb = backend(coordinator, a, model=f"test/mha-{writer}-{reader}"), backend(coordinator, b, model=f"test/mha-{writer}-{reader}")
    assert sa.namespace == sb.namespace
    ks = keys(4, f"{writer}{reader}")
    assert sb.batch_exists(ks) == 0
    # Server A offloads pages 1, 3, 4, 6 of its host pool.
    src = [1, 3, 4, 6]
    host = torch.tensor([p * PAGE + t for p in src for t in range(PAGE)])
    assert sa.batch_set_v1(ks, host) == [True] * 4
    assert sb.batch_exists(ks) == 4
    assert sb.batch_exists(ks + keys(1, "absent")) == 4
    # Server B loads them into pages 0, 2, 5, 7 of its own pool, in its own layout.
    dst = [0, 2, 5, 7]
    got = sb.batch_get_v1(ks, torch.tensor([p * PAGE + t for p in dst for t in range(PAGE)]))
    assert got == [True] * 4
    for s, d in zip(src, dst):
        for layer in range(a.layer_num):
            assert torch.equal(a.tokens(s * PAGE, layer), b.tokens(d * PAGE, layer)), (s, d, layer)
    # What kvcache stores is its own page layout, K then V as [heads][tokens][dim], the layout the
    # attention workers compute from.
    raw = kvcache.Client(coordinator).get_content(sa.namespace, ks[:1], [2])[0]
    page = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).reshape(2, a.head_num, PAGE, a.head_dim)
    assert torch.equal(page, a.tokens(src[0] * PAGE, 2).permute(0, 2, 1, 3))
    # A second offload of the same pages writes nothing.
    written, dedup = kvcache.Client(coordinator).put_content(
        sa.namespace, [(ks[0], layer, sa._geo.read(src[0] * PAGE, layer)) for layer in range(3)])
    assert (written, dedup) == (0, 3)


@pytest.mark.parametrize("layout", ["layer_first", "page_first"])
def test_the_tensor_interface_and_misses(coordinator, layout):
    # SGLang's generic path: flat data pages in the host pool's own order (get_data_page), read
    # back into dummy flat pages that set_from_flat_data_page reshapes by that layout.
    pool = HostPool(layout)
    pool.fill_random(2)
    s = backend(coordinator, pool, model=f"test/mha-tensor-{layout}")
    ks = keys(3, f"tensor-{layout}")
    assert s.batch_set(ks[:2], [pool.get_data_page(PAGE * i) for i in (2, 5)])
    assert s.exists(ks[0]) and s.exists(ks[1]) and not s.exists(ks[2])
    assert s.batch_exists(ks) == 2
    out = s.batch_get(ks, [pool.get_dummy_flat_data_page() for _ in ks])
    assert torch.equal(out[0], pool.get_data_page(PAGE * 2)) and torch.equal(out[1], pool.get_data_page(PAGE * 5))
    assert out[2] is None
    assert s.get(ks[2], pool.get_dummy_flat_data_page()) is None
    assert s.batch_get_v1(ks[2:], torch.arange(PAGE)) == [False]
    # The stored pages are kvcache's layout whatever the host's: a zero-copy reader of another
    # layout sees the same tokens.
    other = HostPool("page_head" if layout == "layer_first" else "layer_first")
    o = backend(coordinator, other, model=f"test/mha-tensor-{layout}")
    assert o.batch_get_v1(ks[:1], torch.arange(PAGE, 2 * PAGE)) == [True]
    for layer in range(3):
        assert torch.equal(other.tokens(PAGE, layer), pool.tokens(2 * PAGE, layer))


def test_mla_pools_store_latent_pages(coordinator):
    a, b = HostPool("page_first", mla=(32, 16)), HostPool("layer_first", mla=(32, 16))
    a.fill_random(3)
    sa, sb = backend(coordinator, a, model="test/tiny-mla"), backend(coordinator, b, model="test/tiny-mla")
    ks = keys(2, "mla")
    assert sa.batch_set_v1(ks, torch.arange(2 * PAGE)) == [True, True]
    assert sb.batch_get_v1(ks, torch.arange(2 * PAGE, 4 * PAGE)) == [True, True]
    for i in range(2):
        for layer in range(3):
            assert torch.equal(a.tokens(i * PAGE, layer), b.tokens((2 + i) * PAGE, layer))
    assert kvcache.Client(coordinator).namespace(sa.namespace).is_mla
    # The generic path with MLA's flat pages ([P][L][1][W] for page_first).
    more = keys(1, "mla-flat")
    assert sa.batch_set(more, [a.get_data_page(3 * PAGE)])
    (flat,) = sb.batch_get(more, [b.get_dummy_flat_data_page()])
    assert torch.equal(flat.view(3, PAGE, 48).permute(1, 0, 2), a.get_data_page(3 * PAGE, flat=False)[:, :, 0])


def test_tensor_parallel_shards_never_mix(coordinator):
    a, b = HostPool("layer_first"), HostPool("layer_first")
    a.fill_random(4)
    s0, s1 = backend(coordinator, a, tp_rank=0, model="test/tp"), backend(coordinator, b, tp_rank=1, model="test/tp")
    assert s0.namespace != s1.namespace
    ks = keys(1, "tp")
    s0.batch_set_v1(ks, torch.arange(PAGE))
    assert s0.batch_exists(ks) == 1 and s1.batch_exists(ks) == 0
