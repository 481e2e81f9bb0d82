"""kvcache as SGLang's HiCache L3 storage: a shared, distributed prompt cache for SGLang servers.

Start SGLang with

    --enable-hierarchical-cache --hicache-storage-backend dynamic \\
    --hicache-storage-backend-extra-config '{"backend_name": "kvcache",
        "module_path": "kvcache.integrations.sglang", "class_name": "KvcacheStorage",
        "coordinator": "kvcache-coordinator:7000"}'

and every SGLang server pointed at the same cluster shares its cached prefixes: a page one server
computed is a hit for the others. `"interface_v1": 1` makes SGLang use the zero-copy
`batch_get_v1` / `batch_set_v1` over its host pool; without it SGLang passes flat data pages
(`batch_get` / `batch_set`), which work too, with one more copy.

How SGLang's pages become kvcache pages:

- SGLang names a page by a 64-hex-digit SHA-256 of its tokens and everything before them; that
  is used as the content key as is (`kvcache.engine_key`), so the key covers the whole prefix.
- One SGLang page holds every layer; kvcache stores one page per layer, in its own layout (K then
  V, each [kv_heads][page_tokens][head_dim]; MLA [page_tokens][latent + rope]), the layout the
  attention workers compute from. The host pool's layout (layer_first, page_first,
  page_first_direct, page_head) is read and written in place: servers with different host
  layouts share pages.
- The namespace is created from the host pool's geometry on first use: the model name, the
  tensor-parallel shard (MHA heads are split over TP ranks; MLA latents are replicated, written
  by one rank) and the page size name it, so different models or shardings never mix.

Extra-config keys besides the three SGLang reads: `coordinator` (default
`$KVCACHE_COORDINATOR` or 127.0.0.1:7000), `namespace` (override the derived name), `replication`
(default 1), `timeout` (seconds, default 10), `tenant`.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, List, Optional

import torch

import kvcache
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

logger = logging.getLogger(__name__)

_CODECS = {torch.bfloat16: "bf16", torch.float16: "f16"}


def _ns_name(s: str) -> str:
    s = re.sub(r"[^a-z0-9._-]+", "-", s.lower()).strip("-._") or "model"
    return s[:63]


class _Geometry:
    """Where page `index` (a token index, page-aligned) of layer `l` sits in a host pool's
    kv_buffer, as a view in kvcache's page layout: MHA [2][heads][tokens][dim], MLA
    [tokens][width]."""

    def __init__(self, pool, is_mla: bool):
        self.pool = pool
        self.is_mla = is_mla
        self.layout = pool.layout
        self.page = pool.page_size
        self.layers = pool.layer_num
        if is_mla:
            self.width = pool.kv_lora_rank + pool.qk_rope_head_dim
        else:
            self.heads, self.dim = pool.head_num, pool.head_dim
            if getattr(pool, "v_head_dim", self.dim) != self.dim:
                raise ValueError("kvcache stores K and V of one head width; this model's V width differs")
        if pool.dtype not in _CODECS:
            raise ValueError(f"kvcache stores bf16 or f16 pages; the host pool holds {pool.dtype}")
        supported = ("layer_first", "page_first", "page_first_direct") + (() if is_mla else ("page_head",))
        if self.layout not in supported:
            raise ValueError(f"host pool layout {self.layout!r} is not supported (supported: {', '.join(supported)})")

    def view(self, index: int, layer: int) -> torch.Tensor:
        b, p, lay = self.pool.kv_buffer, self.page, self.layout
        if self.is_mla:
            if lay == "layer_first":  # [L][size][1][W]
                return b[layer, index:index + p, 0, :]
            if lay == "page_first":  # [size][L][1][W]
                return b[index:index + p, layer, 0, :]
            return b[index // p, layer, :, 0, :]  # page_first_direct: [pages][L][P][1][W]
        if lay == "layer_first":  # [2][L][size][H][D]
            return b[:, layer, index:index + p].permute(0, 2, 1, 3)
        if lay == "page_first":  # [2][size][L][H][D]
            return b[:, index:index + p, layer].permute(0, 2, 1, 3)
        if lay == "page_first_direct":  # [2][pages][L][P][H][D]
            return b[:, index // p, layer].permute(0, 2, 1, 3)
        return b[:, index // p, :, :, layer, :]  # page_head: [2][pages][H][P][L][D]

    def read(self, index: int, layer: int) -> bytes:
        return self.view(index, layer).contiguous().view(torch.uint8).numpy().tobytes()

    def write(self, index: int, layer: int, payload: bytes) -> None:
        v = self.view(index, layer)
        src = torch.frombuffer(bytearray(payload), dtype=self.pool.dtype).reshape(v.shape)
        v.copy_(src)

    def _flat_layer(self, flat: torch.Tensor, layer: int) -> torch.Tensor:
        """Layer `layer` of a flat data page as SGLang's host pool flattens one
        (`get_data_page(flat=True)`, whose order follows the pool's layout), viewed in kvcache's
        page layout."""
        P, L, lay = self.page, self.layers, self.layout
        if self.is_mla:
            if lay == "page_first":  # [P][L][1][W]
                return flat.view(P, L, self.width)[:, layer]
            return flat.view(L, P, self.width)[layer]  # layer_first, page_first_direct
        H, D = self.heads, self.dim
        if lay == "page_first":  # [2][P][L][H][D]
            return flat.view(2, P, L, H, D)[:, :, layer].permute(0, 2, 1, 3)
        if lay == "page_head":  # [2][1][H][P][L][D]
            return flat.view(2, H, P, L, D)[:, :, :, layer]
        return flat.view(2, L, P, H, D)[:, layer].permute(0, 2, 1, 3)  # layer_first, page_first_direct

    def flat_to_pages(self, flat: torch.Tensor) -> List[bytes]:
        """A flat data page (`get_data_page(flat=True)`) as one kvcache page per layer."""
        flat = flat.contiguous()
        return [self._flat_layer(flat, l).contiguous().view(torch.uint8).numpy().tobytes() for l in range(self.layers)]

    def pages_to_flat(self, pages: List[bytes], out: Optional[torch.Tensor]) -> torch.Tensor:
        """kvcache pages (one per layer) as a flat data page in the host pool's order, written
        into `out` (SGLang's dummy flat page) when given."""
        dt = self.pool.dtype
        n = len(pages[0]) // dt.itemsize * self.layers
        flat = out if out is not None and out.is_contiguous() and out.numel() == n else torch.empty(n, dtype=dt)
        for l, p in enumerate(pages):
            v = self._flat_layer(flat, l)
            v.copy_(torch.frombuffer(bytearray(p), dtype=dt).reshape(v.shape))
        if out is not None and flat is not out:
            out.copy_(flat.reshape(out.shape))
            return out
        return flat


class KvcacheStorage(HiCacheStorage):
    """SGLang `HiCacheStorage` over a kvcache cluster (see the module documentation)."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None):
        self.config = storage_config
        extra = dict(storage_config.extra_config or {})
        self.coordinator = extra.get("coordinator") or os.environ.get("KVCACHE_COORDINATOR", "127.0.0.1:7000")
        # The tenant's token: extra config "token", else KVCACHE_TOKEN (clusters with tenants).
        self.client = kvcache.Client(self.coordinator, timeout=float(extra.get("timeout", 10.0)),
                                     token=extra.get("token"))
        self._extra = extra
        self._geo: Optional[_Geometry] = None
        self.namespace: Optional[str] = None
        # MLA latents are the same on every TP rank: one rank writes, all read.
        self.is_writer = getattr(storage_config, "is_storage_writer", True)

    # ---- setup ----

    def register_mem_pool_host(self, mem_pool_host) -> None:
        super().register_mem_pool_host(mem_pool_host)
        self._geo = _Geometry(mem_pool_host, self.config.is_mla_model)
        self.namespace = self._ensure_namespace()

    def _ensure_namespace(self) -> str:
        g, c, extra = self._geo, self.config, self._extra
        model = (c.model_name or "model").split("/")[-1]
        if g.is_mla:
            name = extra.get("namespace") or _ns_name(f"sglang.{model}.mla.p{g.page}")
            rope = self.mem_pool_host.qk_rope_head_dim
            spec = kvcache.pb.ModelSpec(name=f"sglang:{model}", attention=kvcache.pb.ATTENTION_KIND_MLA,
                                        num_layers=g.layers, num_q_heads=int(extra.get("q_heads", 128)),
                                        head_dim=int(extra.get("v_head_dim", 128)),
                                        kv_lora_rank=g.width - rope, rope_dim=rope)
        else:
            shard = f"tp{c.tp_rank}of{c.tp_size}"
            name = extra.get("namespace") or _ns_name(f"sglang.{model}.{shard}.p{g.page}")
            kind = kvcache.pb.ATTENTION_KIND_MQA if g.heads == 1 else kvcache.pb.ATTENTION_KIND_GQA
            spec = kvcache.pb.ModelSpec(name=f"sglang:{model}", attention=kind, num_layers=g.layers,
                                        num_q_heads=int(extra.get("q_heads", g.heads)), num_kv_heads=g.heads,
                                        head_dim=g.dim)
        ns = self.client.create_namespace(name, model=spec, codec=_CODECS[self.mem_pool_host.dtype],
                                          page_tokens=g.page, replication=int(extra.get("replication", 1)),
                                          tenant=extra.get("tenant", ""))
        logger.info("kvcache HiCache storage: namespace %s on %s", ns.name, self.coordinator)
        return ns.name

    def _need(self) -> _Geometry:
        if self._geo is None:
            raise RuntimeError("register_mem_pool_host must be called before the storage is used")
        return self._geo

    # ---- the zero-copy batch interface over the host pool ----

    def batch_exists(self, keys: List[str], extra_info=None) -> int:
        self._need()
        if not keys:
            return 0
        try:
            return self.client.match_prefix(self.namespace, keys)
        except kvcache.KvcacheError as e:
            logger.warning("kvcache match failed: %s", e)
            return 0

    def _fetch(self, keys: List[str]) -> List[Optional[List[bytes]]]:
        """Every layer's page of each key, or None for a key missing any (a miss, as is a cluster
        that cannot be reached: SGLang then computes the page)."""
        g = self._need()
        try:
            pages = self.client.get_content(self.namespace, keys, range(g.layers))
        except kvcache.KvcacheError as e:
            logger.warning("kvcache get failed: %s", e)
            return [None] * len(keys)
        per_key = [pages[i * g.layers:(i + 1) * g.layers] for i in range(len(keys))]
        return [p if all(x is not None for x in p) else None for p in per_key]

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info=None) -> List[bool]:
        g = self._need()
        out = []
        for i, got in enumerate(self._fetch(keys)):
            ok = got is not None
            if ok:
                index = int(host_indices[i * g.page])
                for l, p in enumerate(got):
                    g.write(index, l, p)
            out.append(ok)
        return out

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info=None) -> List[bool]:
        g = self._need()
        if not self.is_writer:
            return [True] * len(keys)  # another rank writes the replicated MLA pages
        pages = []
        for i, k in enumerate(keys):
            index = int(host_indices[i * g.page])
            pages.extend((k, l, g.read(index, l)) for l in range(g.layers))
        try:
            self.client.put_content(self.namespace, pages)
            return [True] * len(keys)
        except kvcache.KvcacheError as e:
            logger.warning("kvcache put failed: %s", e)
            return [False] * len(keys)

    # ---- the tensor interface (flat data pages in layer_first order) ----

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def get(self, key: str, target_location: Optional[Any] = None, target_sizes: Optional[Any] = None):
        return self.batch_get([key], [target_location] if target_location is not None else None)[0]

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None, target_sizes: Optional[Any] = None):
        g = self._need()
        out = []
        for i, got in enumerate(self._fetch(keys)):
            if got is None:
                out.append(None)
                continue
            dst = target_locations[i] if target_locations is not None else None
            out.append(g.pages_to_flat(got, dst))
        return out

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: List[str], values: Optional[Any] = None, target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> bool:
        g = self._need()
        if not self.is_writer:
            return True
        pages = []
        for k, v in zip(keys, values):
            pages.extend((k, l, p) for l, p in enumerate(g.flat_to_pages(v)))
        try:
            self.client.put_content(self.namespace, pages)
            return True
        except kvcache.KvcacheError as e:
            logger.warning("kvcache put failed: %s", e)
            return False

    def clear(self) -> None:
        # A shared cache is not this server's to clear; pages age out by LRU.
        logger.info("kvcache HiCache storage: clear() leaves the shared cluster as it is")

    def get_stats(self):
        return None
