"""Python client of kvcache.

    import numpy as np, kvcache
    c = kvcache.Client("127.0.0.1:7000")
    ns = c.create_namespace("demo.llama", preset="llama-3-8b")
    kv = kvcache.to_bf16(np.random.randn(ns.planes, 100, ns.width).astype(np.float32))
    c.put_sequence("demo.llama", "req-1", layer=0, kv=kv)
    out = c.decode("demo.llama", layer=0, items=[("req-1", query)])

The client fetches the shard map from the coordinator, routes each sequence to its owners with
the same weighted rendezvous hashing as the Rust client (xxh3 keys, folded 32-bit multiply
draws), writes to every live owner, reads from the first that answers, and sends decode steps to the sequence's
sticky worker. Page payloads use the namespace's layout: K then V as [kv_heads][tokens][head_dim]
(or MLA [tokens][latent + rope]); this wrapper speaks bf16 (numpy uint16 views) and f16.
"""

from __future__ import annotations

import base64
import hashlib
import collections
import math
import os
import struct
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import crc32c as _crc32c
import grpc
import numpy as np
import xxhash

from kvcache.v1 import cache_node_pb2 as node_pb
from kvcache.v1 import cache_node_pb2_grpc as node_grpc
from kvcache.v1 import common_pb2 as pb
from kvcache.v1 import coordinator_pb2 as coord_pb
from kvcache.v1 import coordinator_pb2_grpc as coord_grpc
from kvcache.v1 import worker_pb2 as worker_pb
from kvcache.v1 import worker_pb2_grpc as worker_grpc

__all__ = ["place", "Client", "Tls", "Namespace", "DecodeResult", "DecodeResults", "DecodeStats", "KvcacheError", "to_bf16", "from_bf16",
           "content_keys", "engine_key", "content_sequence_id"]

_MAX_MSG = 256 << 20
# Accept 1 MiB HTTP/2 frames as the Rust clients do: pages then arrive in a frame or two
# instead of 16 KiB pieces.
_OPTS = [
    ("grpc.max_send_message_length", _MAX_MSG),
    ("grpc.max_receive_message_length", _MAX_MSG),
    ("grpc.http2.max_frame_size", (1 << 20) - 1),
]
_CODECS = {"bf16": pb.CODEC_BF16, "f16": pb.CODEC_F16, "fp8-e4m3": pb.CODEC_FP8_E4M3, "int8": pb.CODEC_INT8}


@dataclass(frozen=True)
class Tls:
    """TLS for every channel, like the servers' `--tls-*` flags: `ca` (PEM) verifies the
    servers; `cert` and `key` (PEM) are this client's identity for clusters that require mTLS;
    `server_name` overrides the name verified (default: each address's host)."""

    ca: bytes
    cert: Optional[bytes] = None
    key: Optional[bytes] = None
    server_name: Optional[str] = None

    @classmethod
    def from_files(cls, ca: str, cert: Optional[str] = None, key: Optional[str] = None,
                   server_name: Optional[str] = None) -> "Tls":
        def read(p):
            with open(p, "rb") as f:
                return f.read()
        return cls(read(ca), read(cert) if cert else None, read(key) if key else None, server_name)

    def channel(self, addr: str):
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                             certificate_chain=self.cert)
        opts = list(_OPTS)
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.secure_channel(addr, creds, options=opts)


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                          "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of a channel."""

    def __init__(self, token: str):
        self._md = ("authorization", f"Bearer {token}")

    def _details(self, d):
        md = list(d.metadata or []) + [self._md]
        return _CallDetails(d.method, d.timeout, md, d.credentials, getattr(d, "wait_for_ready", None),
                            getattr(d, "compression", None))

    def intercept_unary_unary(self, cont, d, req):
        return cont(self._details(d), req)

    def intercept_unary_stream(self, cont, d, req):
        return cont(self._details(d), req)

    def intercept_stream_unary(self, cont, d, reqs):
        return cont(self._details(d), reqs)

    def intercept_stream_stream(self, cont, d, reqs):
        return cont(self._details(d), reqs)


class KvcacheError(Exception):
    """A failure reaching the caller, with the gRPC code when there is one."""

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None):
        super().__init__(message)
        self.code = code


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 → bf16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(b: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) → float32 (exact)."""
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


@dataclass
class Namespace:
    """A namespace and the geometry its pages have."""

    proto: pb.Namespace

    @property
    def name(self) -> str:
        return self.proto.name

    @property
    def page_tokens(self) -> int:
        return self.proto.page_tokens

    @property
    def is_mla(self) -> bool:
        return self.proto.model.attention == pb.ATTENTION_KIND_MLA

    @property
    def planes(self) -> int:
        """Rows per token: 2·kv_heads (K then V), or 1 for MLA."""
        return 1 if self.is_mla else 2 * self.proto.model.num_kv_heads

    @property
    def width(self) -> int:
        """Elements per row: head_dim, or kv_lora_rank + rope_dim for MLA."""
        m = self.proto.model
        return m.kv_lora_rank + m.rope_dim if self.is_mla else m.head_dim

    @property
    def q_heads(self) -> int:
        return self.proto.model.num_q_heads

    @property
    def v_width(self) -> int:
        m = self.proto.model
        return m.kv_lora_rank if self.is_mla else m.head_dim

    @property
    def num_layers(self) -> int:
        return self.proto.model.num_layers

    def layer_kind(self, layer: int) -> str:
        """The kind of a layer: full, sliding, chunked, linear, mamba2 or none (model layers;
        an indexer layer num_layers + l is the kind of layer l)."""
        m = self.proto.model
        if m.HasField("indexer") and m.num_layers <= layer < 2 * m.num_layers:
            layer -= m.num_layers
        if not m.layers:
            return "full"
        return m.layers[layer].WhichOneof("kind")

    def window(self, layer: int, tokens: int) -> tuple:
        """The token range [start, end) the query of the last of `tokens` tokens attends to."""
        if not self.proto.model.layers:
            return 0, tokens
        spec = self.proto.model.layers[layer]
        kind = spec.WhichOneof("kind")
        if kind == "sliding":
            return max(0, tokens - spec.sliding.window), tokens
        if kind == "chunked":
            return ((tokens - 1) // spec.chunked.chunk * spec.chunked.chunk if tokens else 0), tokens
        return (0, tokens) if kind == "full" else (0, 0)

    def state_bytes(self, layer: int) -> int:
        """Bytes of one sequence's state in a linear-attention or Mamba2 layer (0 otherwise):
        the f32 recurrent state, then the bf16 conv state [conv_dim][conv_kernel - 1]."""
        if not self.proto.model.layers or layer >= self.num_layers:
            return 0
        spec = self.proto.model.layers[layer]
        kind = spec.WhichOneof("kind")
        if kind == "linear":
            x = spec.linear
            conv = 2 * x.num_k_heads * x.head_k_dim + x.num_v_heads * x.head_v_dim
            return x.num_v_heads * x.head_k_dim * x.head_v_dim * 4 + conv * (x.conv_kernel - 1) * 2
        if kind == "mamba2":
            x = spec.mamba2
            conv = x.num_heads * x.head_dim + 2 * x.n_groups * x.state_size
            return x.num_heads * x.head_dim * x.state_size * 4 + conv * (x.conv_kernel - 1) * 2
        return 0

    @property
    def page_bytes(self) -> int:
        """Payload bytes of a full page of model rows."""
        m = self.proto.model
        row = _row_bytes(self.proto.codec, self.width, m.rope_dim if self.is_mla else 0)
        return self.planes * row * self.page_tokens

    def state_pages(self, layer: int) -> int:
        b = self.state_bytes(layer)
        return -(-b // self.page_bytes) if b else 0

    def held_groups(self) -> int:
        """The layer groups a content key of this model holds when whole (MatchPrefix bits)."""
        g = 0
        for layer in range(self.num_layers):
            g |= _GROUP[self.layer_kind(layer)]
        return g

    def restorable_prefix(self, held: Sequence[int]) -> int:
        """The longest prefix every layer can be restored from (see ModelSpec::restorable_prefix
        in kvcache-core): every page of a full layer, the pages a sliding or chunked layer's last
        token reads, the state snapshot at the prefix's end."""
        groups, pt = self.held_groups(), self.page_tokens
        lead = len(held)
        if groups & HELD_FULL:
            lead = next((i for i, h in enumerate(held) if not h & HELD_FULL), len(held))
        counts = {}
        for bit in (HELD_WINDOW, HELD_CHUNK):
            c = [0]
            for h in held:
                c.append(c[-1] + (1 if h & bit else 0))
            counts[bit] = c
        kinds = [layer for layer in range(self.num_layers) if self.layer_kind(layer) in ("sliding", "chunked")]

        def next_start(layer: int, n: int) -> int:
            # The first token the next token (position n) reads: its window's or chunk's start.
            spec = self.proto.model.layers[layer]
            if spec.WhichOneof("kind") == "sliding":
                return max(0, n + 1 - spec.sliding.window)
            return n // spec.chunked.chunk * spec.chunked.chunk

        for p in range(lead, 0, -1):
            ok = True
            for layer in kinds:
                first = next_start(layer, p * pt) // pt
                c = counts[_GROUP[self.layer_kind(layer)]]
                ok = ok and (first >= p or c[p] - c[first] == p - first)
            if ok and (not groups & HELD_STATE or held[p - 1] & HELD_STATE):
                return p
        return 0


# MatchPrefixResponse.held bits.
HELD_FULL, HELD_WINDOW, HELD_STATE, HELD_CHUNK = 1, 2, 4, 8
_GROUP = {"full": HELD_FULL, "sliding": HELD_WINDOW, "chunked": HELD_CHUNK, "linear": HELD_STATE,
          "mamba2": HELD_STATE, "none": 0}


def _row_bytes(codec: int, width: int, tail: int) -> int:
    """Encoded bytes of one row (kvcache-core Codec::row_bytes)."""
    if codec in (pb.CODEC_BF16, pb.CODEC_F16):
        return 2 * width
    main = width - tail
    if codec == pb.CODEC_FP8_E4M3:
        return main + 4 * -(-main // 128) + 2 * tail
    return main + 4 + 2 * tail  # int8: one f32 scale per row


def state_stamp(state: bytes) -> int:
    """The stamp every page of a state carries (prefix_hash): the first 8 bytes of its
    SHA-256, little-endian, never 0."""
    return int.from_bytes(hashlib.sha256(state).digest()[:8], "little") or 1


@dataclass
class DecodeResult:
    sequence_id: str
    ok: bool
    status: str
    output: Optional[np.ndarray]  # [q_heads, v_width] float32
    lse: Optional[np.ndarray]  # [q_heads] float32
    context_tokens: int
    message: str


@dataclass
class DecodeStats:
    """What a decode step cost the workers (summed over the workers it went to; times are the
    slowest worker's). `sequences_overlapped`: computed while their append was in flight and
    kept; `sequences_recomputed`: computed that way, refuted by an owner's answer, and computed
    again."""
    bytes_pulled: int = 0
    pages_pulled: int = 0
    pages_cached: int = 0
    compute_micros: int = 0
    fetch_micros: int = 0
    append_micros: int = 0
    sequences_overlapped: int = 0
    sequences_recomputed: int = 0

    def add(self, s) -> None:
        """Fold one worker's DecodeStats message in."""
        for f in ("bytes_pulled", "pages_pulled", "pages_cached", "sequences_overlapped", "sequences_recomputed"):
            setattr(self, f, getattr(self, f) + getattr(s, f))
        for f in ("compute_micros", "fetch_micros", "append_micros"):
            setattr(self, f, max(getattr(self, f), getattr(s, f)))


class DecodeResults(list):
    """A decode step's DecodeResult per item, in request order, and the step's `stats`."""

    def __init__(self, results=(), stats: Optional[DecodeStats] = None):
        super().__init__(results)
        self.stats = stats if stats is not None else DecodeStats()


def _hash64(b: bytes) -> int:
    return xxhash.xxh3_64_intdigest(b)


def _draw(node_hash: int, key_hash: int) -> int:
    m = 0xFFFFFFFF
    rot = ((key_hash << 32) | (key_hash >> 32)) & 0xFFFFFFFFFFFFFFFF
    x = node_hash ^ rot
    y, z = x ^ 0x9E3779B97F4A7C15, x ^ 0xBF58476D1CE4E5B9
    p = (y & m) * (y >> 32)
    q = (z & m) * (z >> 32)
    return (((p ^ (p >> 32)) & m) << 32) | ((q ^ (q >> 32)) & m)


def _score(draw: int, weight: float) -> float:
    u = ((draw >> 11) + 0.5) / float(1 << 53)
    return -weight / math.log(u)


def place(key_hash: int, candidates: Sequence[tuple], r: int) -> list:
    """Indices of the top-r candidates (node_id, weight, zone) — kvcache_core::placement::place."""
    scored = []
    for i, (nid, w, _z) in enumerate(candidates):
        if w > 0 and math.isfinite(w):
            scored.append((-_score(_draw(_hash64(nid.encode()), key_hash), w), i))
    scored.sort()
    out, zones = [], []
    for _, i in scored:
        if len(out) == r:
            break
        z = candidates[i][2]
        if z == "" or z not in zones:
            out.append(i)
            zones.append(z)
    for _, i in scored:
        if len(out) == r:
            break
        if i not in out:
            out.append(i)
    return out


_CHAIN_TAG = b"kvcache/page/v1"
_ENGINE_TAG = b"kvcache/engine-key/v1"


def content_keys(seed: int, tokens: Sequence[int], page_tokens: int) -> list:
    """The 32-byte content keys of every full page of `tokens` (kvcache-core `content`):
    k_i = SHA-256("kvcache/page/v1" || seed || k_{i-1} (zeros for the first) || token ids), all
    little-endian. Use `Client.content_keys` to take the namespace's seed and page size."""
    out, prev = [], bytes(32)
    for start in range(0, len(tokens) - page_tokens + 1, page_tokens):
        h = hashlib.sha256(_CHAIN_TAG + struct.pack("<Q", seed) + prev)
        h.update(np.asarray(tokens[start:start + page_tokens], dtype="<u4").tobytes())
        prev = h.digest()
        out.append(prev)
    return out


def engine_key(key) -> bytes:
    """An engine's own page key as a content key: 64 hex digits (SGLang's SHA-256 page keys) are
    used as is, any other string or bytes are hashed (as the Rust client does)."""
    if isinstance(key, bytes) and len(key) == 32:
        return key
    if isinstance(key, str) and len(key) == 64:
        try:
            return bytes.fromhex(key)
        except ValueError:
            pass
    raw = key.encode() if isinstance(key, str) else bytes(key)
    return hashlib.sha256(_ENGINE_TAG + raw).digest()


def _content_key_of(page) -> bytes:
    """The content key of a content page on the wire (its sequence id is '#' + base64url)."""
    sid = page.key.sequence.sequence_id[1:]
    return base64.urlsafe_b64decode(sid + "=" * (-len(sid) % 4))


def content_sequence_id(key: bytes) -> str:
    """The reserved sequence id a content page is stored under: '#' + base64url(key)."""
    return "#" + base64.urlsafe_b64encode(key).decode().rstrip("=")


def _stale_epoch(e: grpc.RpcError) -> bool:
    """A write refused for a stale shard-map epoch (the node's epoch rides in a trailer; a
    FAILED_PRECONDITION without it is something else, e.g. a content conflict)."""
    if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return False
    md = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    return any(k == "kvcache-epoch" for k, _ in (md or ()))


def _seq_hash(namespace: str, sequence_id: str) -> int:
    return _hash64(namespace.encode() + b"\0" + sequence_id.encode())


class Client:
    """A handle on a kvcache cluster.

    `token`: the tenant's token, sent as `authorization: Bearer <token>` on every call when the
    cluster runs with tenants (default: the KVCACHE_TOKEN environment variable; none on an open
    cluster)."""

    def __init__(self, coordinator: str, timeout: float = 10.0, tls: Optional[Tls] = None,
                 token: Optional[str] = None):
        self.timeout = timeout
        self._tls = tls
        token = token if token is not None else os.environ.get("KVCACHE_TOKEN") or None
        self._bearer = _Bearer(token.strip()) if token else None
        self._coord = coord_grpc.CoordinatorStub(self._channel(coordinator))
        self._channels: dict = {}
        self.refresh()

    def refresh(self) -> None:
        """Fetch the shard map."""
        m = self._call(self._coord.GetShardMap, coord_pb.GetShardMapRequest())
        self.epoch = m.epoch
        self._up = [(n.node.node_id, n.weight, n.node.zone, n.node.address) for n in m.nodes if n.state == coord_pb.NODE_STATE_UP and n.weight > 0]
        self._workers = [(w.worker_id, 1.0, "", w.address) for w in m.workers]
        self._namespaces = {n.name: Namespace(n) for n in m.namespaces}

    def _call(self, fn, req):
        try:
            return fn(req, timeout=self.timeout)
        except grpc.RpcError as e:  # noqa: PERF203
            raise KvcacheError(f"{e.code().name}: {e.details()}", e.code()) from None

    def _channel(self, addr: str):
        ch = self._tls.channel(addr) if self._tls else grpc.insecure_channel(addr, options=_OPTS)
        return grpc.intercept_channel(ch, self._bearer) if self._bearer else ch

    def _node(self, addr: str):
        if addr not in self._channels:
            self._channels[addr] = self._channel(addr)
        return self._channels[addr]

    def namespace(self, name: str) -> Namespace:
        if name not in self._namespaces:
            self.refresh()
        if name not in self._namespaces:
            raise KvcacheError(f"unknown namespace {name!r}", grpc.StatusCode.NOT_FOUND)
        return self._namespaces[name]

    def create_namespace(self, name: str, preset: str = "", model: Optional[pb.ModelSpec] = None, codec: str = "bf16",
                         page_tokens: int = 64, replication: int = 1, tenant: str = "") -> Namespace:
        """Create (or open, if identical) a namespace and make sure every live node knows it."""
        req = coord_pb.CreateNamespaceRequest(name=name, tenant=tenant, preset=preset, model=model, codec=_CODECS[codec],
                                              page_tokens=page_tokens, replication=replication)
        ns = self._call(self._coord.CreateNamespace, req)
        self.refresh()
        for _, _, _, addr in self._up:
            node_grpc.CacheNodeStub(self._node(addr)).EnsureNamespace(node_pb.EnsureNamespaceRequest(namespace=ns), timeout=self.timeout)
        return self._namespaces[name]

    def owners(self, namespace: str, sequence_id: str) -> list:
        """Addresses of the sequence's live owners, best first."""
        r = self.namespace(namespace).proto.replication or 1
        cands = [(n, w, z) for n, w, z, _ in self._up]
        return [self._up[i][3] for i in place(_seq_hash(namespace, sequence_id), cands, r)]

    def _key(self, namespace, sequence_id, layer, page):
        return pb.PageKey(sequence=pb.SequenceKey(namespace=namespace, sequence_id=sequence_id), layer=layer, page_index=page)

    def _stub(self, addr: str):
        return node_grpc.CacheNodeStub(self._node(addr))

    def _write(self, namespace: str, sequence_id: str, send) -> list:
        """Run `send(stub, epoch)` on every live owner; after a stale-epoch refusal refresh the
        map and retry. Owners that acknowledged stay acknowledged: the retry goes only to the
        owners still missing, so an append one owner applied is never applied there twice
        (nodes learn a new epoch at their own heartbeats, so one owner can refuse while the
        other applies)."""
        done: dict = {}
        for attempt in range(3):
            stale = False
            for addr in self.owners(namespace, sequence_id):
                if addr in done:
                    continue
                try:
                    done[addr] = send(self._stub(addr), self.epoch)
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.FAILED_PRECONDITION and attempt < 2:
                        stale = True
                    elif e.code() != grpc.StatusCode.UNAVAILABLE:
                        raise KvcacheError(f"{e.code().name}: {e.details()}", e.code()) from None
            if stale:
                self.refresh()
                continue
            if not done:
                raise KvcacheError("no owner of the sequence could be reached", grpc.StatusCode.UNAVAILABLE)
            return list(done.values())
        raise KvcacheError("stale shard map after retries", grpc.StatusCode.UNAVAILABLE)

    def _payload(self, ns: Namespace, kv: np.ndarray) -> bytes:
        kv = np.asarray(kv)
        if kv.dtype != np.uint16:
            raise KvcacheError("kv must be a uint16 array of bf16/f16 bit patterns (see to_bf16)", grpc.StatusCode.INVALID_ARGUMENT)
        if kv.ndim != 3 or kv.shape[0] != ns.planes or kv.shape[2] != ns.width:
            raise KvcacheError(f"kv has shape {kv.shape}, expected ({ns.planes}, tokens, {ns.width})", grpc.StatusCode.INVALID_ARGUMENT)
        return np.ascontiguousarray(kv).astype("<u2").tobytes()

    def put_sequence(self, namespace: str, sequence_id: str, layer: int, kv: np.ndarray) -> int:
        """Store a prefill of one layer: kv is [planes][tokens][width] (uint16). Returns pages."""
        ns = self.namespace(namespace)
        kv = np.asarray(kv)
        self._payload(ns, kv)
        pages = []
        pt = ns.page_tokens
        for i, start in enumerate(range(0, kv.shape[1], pt)):
            body = self._payload(ns, kv[:, start:start + pt, :])
            n = min(pt, kv.shape[1] - start)
            pages.append(pb.Page(key=self._key(namespace, sequence_id, layer, i), codec=ns.proto.codec, token_count=n,
                                 payload_crc32c=_crc32c.crc32c(body), payload=body))
        self._write(namespace, sequence_id, lambda s, e: s.PutPages(iter([node_pb.PutPagesRequest(epoch=e, pages=pages)]), timeout=self.timeout))
        return len(pages)

    def append(self, namespace: str, sequence_id: str, layer: int, kv: np.ndarray) -> int:
        """Append tokens (kv [planes][n][width], uint16) to one layer. Returns the layer's tokens."""
        ns = self.namespace(namespace)
        body = self._payload(ns, kv)
        req = lambda e: node_pb.AppendTokensRequest(epoch=e, sequence=pb.SequenceKey(namespace=namespace, sequence_id=sequence_id),  # noqa: E731
                                                    layer=layer, token_count=np.asarray(kv).shape[1], payload=body)
        res = self._write(namespace, sequence_id, lambda s, e: s.AppendTokens(req(e), timeout=self.timeout))
        return res[0].layer_tokens[0]

    def get_pages(self, namespace: str, sequence_id: str, layer: int, pages: Iterable[int]) -> list:
        """Pages as (token_count, payload bytes) or None for a miss, trying owners in order."""
        pages = list(pages)
        out: list = [None] * len(pages)
        for addr in self.owners(namespace, sequence_id):
            want = [i for i, p in enumerate(out) if p is None]
            if not want:
                break
            items = self._get_from(addr, [self._key(namespace, sequence_id, layer, pages[i]) for i in want])
            if items is None:
                continue
            for i, it in zip(want, items):
                if self._ok(it):
                    out[i] = (it.page.token_count, bytes(it.page.payload))
                elif it.status == pb.PAGE_STATUS_INVALID:
                    raise KvcacheError(it.message, grpc.StatusCode.INVALID_ARGUMENT)
        return out

    def _get_from(self, addr: str, keys: list):
        """GetPages of `keys` from one node: its items in order, or None when it cannot be
        reached (the caller tries the next replica)."""
        try:
            req = node_pb.GetPagesRequest(keys=keys)
            return [it for m in self._stub(addr).GetPages(req, timeout=self.timeout) for it in m.items]
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return None
            raise KvcacheError(f"{e.code().name}: {e.details()}", e.code()) from None

    @staticmethod
    def _ok(it) -> bool:
        """A served page whose payload matches its CRC."""
        return it.status == pb.PAGE_STATUS_OK and _crc32c.crc32c(it.page.payload) == it.page.payload_crc32c

    def lookup(self, namespace: str, sequence_id: str) -> node_pb.LookupResponse:
        req = node_pb.LookupRequest(sequence=pb.SequenceKey(namespace=namespace, sequence_id=sequence_id))
        return self._call(node_grpc.CacheNodeStub(self._node(self.owners(namespace, sequence_id)[0])).Lookup, req)

    def delete(self, namespace: str, sequence_id: str) -> int:
        req = lambda e: node_pb.DeleteSequenceRequest(epoch=e, sequence=pb.SequenceKey(namespace=namespace, sequence_id=sequence_id))  # noqa: E731
        return max(r.pages_deleted for r in self._write(namespace, sequence_id, lambda s, e: s.DeleteSequence(req(e), timeout=self.timeout)))

    # ---- prefix reuse: content pages by key ----

    def content_keys(self, namespace: str, tokens: Sequence[int]) -> list:
        """Content keys of every full page of `tokens` in `namespace` (its seed and page size)."""
        ns = self.namespace(namespace)
        return content_keys(ns.proto.prefix_seed, tokens, ns.page_tokens)

    def _by_owner(self, namespace: str, keys: Sequence[bytes], rank: int = 0, all_owners: bool = False) -> dict:
        """Group key indices by the address of their rank-th owner (or every owner)."""
        groups: dict = {}
        for i, k in enumerate(keys):
            owners = self.owners(namespace, content_sequence_id(k))
            chosen = owners if all_owners else owners[rank:rank + 1]
            for addr in chosen:
                groups.setdefault(addr, []).append(i)
        return groups

    def match_prefix(self, namespace: str, keys: Sequence[bytes], lease_ms: int = 0) -> int:
        """How many leading `keys` (content keys in chain order) the cluster holds with every
        layer: one MatchPrefix per owner node. An unreachable node's keys are asked of their
        next replica; without one they count as absent (a shorter prefix, not an error)."""
        keys = [engine_key(k) for k in keys]
        present = [False] * len(keys)
        held = [0] * len(keys)
        ns = self.namespace(namespace)
        replicas = ns.proto.replication or 1
        pending = list(range(len(keys)))
        for rank in range(replicas):
            failed = []
            for addr, idx in self._by_owner(namespace, [keys[i] for i in pending], rank).items():
                idx = [pending[i] for i in idx]
                req = node_pb.MatchPrefixRequest(namespace=namespace, keys=[keys[i] for i in idx], lease_ms=lease_ms)
                try:
                    r = self._stub(addr).MatchPrefix(req, timeout=self.timeout)
                except grpc.RpcError as e:
                    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        failed.extend(idx)
                        continue
                    if e.code() == grpc.StatusCode.NOT_FOUND:
                        continue  # a node that does not know the namespace holds none of it
                    raise KvcacheError(f"{e.code().name}: {e.details()}", e.code()) from None
                hs = list(r.held) if len(r.held) == len(r.present) else [ns.held_groups() if p else 0 for p in r.present]
                for i, p, h in zip(idx, r.present, hs):
                    present[i] = present[i] or p
                    held[i] |= h
            pending = sorted(failed)
            if not pending:
                break
        if ns.proto.model.layers:
            # A hybrid model: the longest prefix every layer kind can restore.
            return ns.restorable_prefix(held)
        n = 0
        while n < len(present) and present[n]:
            n += 1
        return n

    def put_content(self, namespace: str, pages: Sequence[tuple]) -> tuple:
        """Store content pages: (key, layer, payload bytes) each, a full page in the namespace's
        layout, on every live owner (one PutPages per node). Returns (pages written, pages already
        held with the same bytes). A key held with other bytes is refused: KvcacheError with
        FAILED_PRECONDITION."""
        ns = self.namespace(namespace)
        wire = []
        for key, layer, payload in pages:
            key = engine_key(key)
            wire.append(pb.Page(key=self._key(namespace, content_sequence_id(key), layer, 0), codec=ns.proto.codec,
                                token_count=ns.page_tokens, payload_crc32c=_crc32c.crc32c(payload), payload=payload))
        return self._put_wire(namespace, wire)

    def _put_wire(self, namespace: str, wire: list) -> tuple:
        """PutPages of content pages (wire form) to every live owner of their keys."""
        written = dedup = 0
        keys = [engine_key(_content_key_of(p)) for p in wire]
        for attempt in range(3):
            stale = reached = False
            for addr, idx in self._by_owner(namespace, keys, all_owners=True).items():
                msgs, cur, size = [], [], 0
                for i in idx:
                    if cur and size + len(wire[i].payload) > (16 << 20):
                        msgs.append(node_pb.PutPagesRequest(epoch=self.epoch, pages=cur))
                        cur, size = [], 0
                    cur.append(wire[i])
                    size += len(wire[i].payload)
                msgs.append(node_pb.PutPagesRequest(epoch=self.epoch, pages=cur))
                try:
                    r = self._stub(addr).PutPages(iter(msgs), timeout=self.timeout)
                except grpc.RpcError as e:
                    if _stale_epoch(e) and attempt < 2:
                        stale = True
                        continue
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        continue
                    raise KvcacheError(f"{e.code().name}: {e.details()}", e.code()) from None
                reached = True
                written += r.pages_written
                dedup += r.pages_deduplicated
            if stale:
                self.refresh()
                continue
            if not reached and wire:
                raise KvcacheError("no owner of the pages could be reached", grpc.StatusCode.UNAVAILABLE)
            return written, dedup
        raise KvcacheError("stale shard map after retries", grpc.StatusCode.UNAVAILABLE)

    def create_sequence(self, namespace: str, sequence_id: str, prefix: Sequence[bytes], pin_ms: int = 0) -> None:
        """Create a sequence over the content pages `prefix` (referenced, never copied): its own
        pages and appends start after them. With `pin_ms`, the prefix's pages are pinned on
        their nodes for that long. Idempotent; over another prefix: FAILED_PRECONDITION."""
        prefix = [engine_key(k) for k in prefix]
        if pin_ms:
            self.match_prefix(namespace, prefix, lease_ms=pin_ms)
        # A state layer starts from the snapshot at the prefix's end, copied (decode overwrites it).
        ns = self.namespace(namespace)
        states = []
        for layer in range(ns.num_layers if prefix else 0):
            if ns.state_bytes(layer):
                st = self.get_state_snapshot(namespace, prefix[-1], layer)
                if st is None:
                    raise KvcacheError(f"no state snapshot of layer {layer} at the prefix's end", grpc.StatusCode.NOT_FOUND)
                states.append((layer, st))
        seq = pb.SequenceKey(namespace=namespace, sequence_id=sequence_id)
        self._write(namespace, sequence_id, lambda s, e: s.CreateSequence(
            node_pb.CreateSequenceRequest(epoch=e, sequence=seq, prefix=prefix), timeout=self.timeout))
        for layer, st in states:
            self.put_state(namespace, sequence_id, layer, st)

    def seal(self, namespace: str, sequence_id: str, token_ids: Sequence[int]) -> int:
        """Seal the full pages a sequence holds after its prefix into content pages (the next
        request whose prompt continues the same way finds them): `token_ids` are its token ids
        from the end of its prefix on. Each page full on every layer is put under its chained key
        with its chain record (the nodes check it), then the prefix is extended over those pages
        and the sequence's own copies dropped. Returns the pages sealed."""
        ns = self.namespace(namespace)
        held = self.lookup(namespace, sequence_id)
        layers, pt = ns.proto.model.num_layers, ns.page_tokens
        if not held.exists or len(held.layers) != layers:
            return 0
        prefix = [bytes(k) for k in held.prefix]
        n = min(min(l.tokens for l in held.layers) // pt - len(prefix), len(token_ids) // pt)
        if n <= 0:
            return 0
        pages, keys, parent = [], [], prefix[-1] if prefix else None
        for j in range(n):
            index = len(prefix) + j
            toks = list(token_ids[j * pt:(j + 1) * pt])
            h = hashlib.sha256(_CHAIN_TAG + struct.pack("<Q", ns.proto.prefix_seed) + (parent or bytes(32)))
            h.update(np.asarray(toks, dtype="<u4").tobytes())
            key = h.digest()
            for layer in range(layers):
                (got,) = self.get_pages(namespace, sequence_id, layer, [index])
                if got is None or got[0] != pt:
                    raise KvcacheError(f"page {index} of layer {layer} is not a full page of {sequence_id!r}",
                                       grpc.StatusCode.FAILED_PRECONDITION)
                pages.append(pb.Page(key=self._key(namespace, content_sequence_id(key), layer, 0), codec=ns.proto.codec,
                                     token_count=pt, payload_crc32c=_crc32c.crc32c(got[1]), payload=got[1],
                                     token_ids=toks, parent_key=parent or b""))
            keys.append(key)
            parent = key
        self._put_wire(namespace, pages)
        seq = pb.SequenceKey(namespace=namespace, sequence_id=sequence_id)
        self._write(namespace, sequence_id, lambda s, e: s.CreateSequence(
            node_pb.CreateSequenceRequest(epoch=e, sequence=seq, prefix=prefix + keys, seal=True), timeout=self.timeout))
        return n

    def get_content(self, namespace: str, keys: Sequence[bytes], layers: Sequence[int]) -> list:
        """Content pages: for each key, each of `layers` (key-major), the payload bytes or None
        for a miss on every replica. Every payload's CRC is checked."""
        keys = [engine_key(k) for k in keys]
        layers = list(layers)
        out: list = [None] * (len(keys) * len(layers))
        replicas = self.namespace(namespace).proto.replication or 1
        for rank in range(replicas):
            want_keys = sorted({i // len(layers) for i, p in enumerate(out) if p is None})
            if not want_keys:
                break
            for addr, idx in self._by_owner(namespace, [keys[k] for k in want_keys], rank).items():
                items = [(want_keys[j] * len(layers) + li) for j in idx for li in range(len(layers))]
                items = [i for i in items if out[i] is None]
                got = self._get_from(addr, [
                    self._key(namespace, content_sequence_id(keys[i // len(layers)]), layers[i % len(layers)], 0)
                    for i in items])
                if got is None:
                    continue
                for i, it in zip(items, got):
                    if self._ok(it):
                        out[i] = bytes(it.page.payload)
        return out

    # ---- states of linear-attention and Mamba2 layers ----

    def _state_pages(self, ns: Namespace, sequence_id: str, layer: int, state: bytes) -> list:
        size = ns.state_bytes(layer)
        if not size:
            raise KvcacheError(f"layer {layer} is a {ns.layer_kind(layer)} layer: it keeps no state",
                               grpc.StatusCode.INVALID_ARGUMENT)
        if len(state) != size:
            raise KvcacheError(f"layer {layer}: a state is {size} bytes, got {len(state)}", grpc.StatusCode.INVALID_ARGUMENT)
        stamp, pb_ = state_stamp(state), ns.page_bytes
        pages = []
        for i in range(ns.state_pages(layer)):
            body = state[i * pb_:(i + 1) * pb_].ljust(pb_, b"\0")
            pages.append(pb.Page(key=self._key(ns.name, sequence_id, layer, i), codec=ns.proto.codec,
                                 token_count=ns.page_tokens, prefix_hash=stamp, payload_crc32c=_crc32c.crc32c(body),
                                 payload=body))
        return pages

    def _join_state(self, ns: Namespace, layer: int, items: list) -> Optional[bytes]:
        if any(it is None for it in items):
            return None
        size = ns.state_bytes(layer)
        body = b"".join(bytes(it.payload) for it in items)
        state = body[:size]
        if any(body[size:]) or any(it.prefix_hash != state_stamp(state) for it in items):
            return None  # pages of two writes (a torn read) or damaged: a miss
        return state

    def put_state(self, namespace: str, sequence_id: str, layer: int, state: bytes) -> None:
        """Replace the state of a linear-attention or Mamba2 layer on every owner: the f32
        recurrent state then the bf16 conv state ([conv_dim][conv_kernel - 1])."""
        pages = self._state_pages(self.namespace(namespace), sequence_id, layer, bytes(state))
        self._write(namespace, sequence_id, lambda s, e: s.PutPages(iter([node_pb.PutPagesRequest(epoch=e, pages=pages)]), timeout=self.timeout))

    def get_state(self, namespace: str, sequence_id: str, layer: int) -> Optional[bytes]:
        """The state of a state layer, or None (never put, evicted, or a read that met a write)."""
        ns = self.namespace(namespace)
        if not ns.state_bytes(layer):
            raise KvcacheError(f"layer {layer} keeps no state", grpc.StatusCode.INVALID_ARGUMENT)
        for addr in self.owners(namespace, sequence_id):
            got = self._get_from(addr, [self._key(namespace, sequence_id, layer, i) for i in range(ns.state_pages(layer))])
            if got is None:
                continue
            st = self._join_state(ns, layer, [it.page if self._ok(it) else None for it in got])
            if st is not None:
                return st
        return None

    def put_state_snapshot(self, namespace: str, key: bytes, layer: int, state: bytes) -> tuple:
        """Store a state layer's snapshot at the end of content page `key` (what a prefix hit
        that ends there restores). Returns (written, deduplicated)."""
        ns = self.namespace(namespace)
        return self._put_wire(namespace, self._state_pages(ns, content_sequence_id(engine_key(key)), layer, bytes(state)))

    def get_state_snapshot(self, namespace: str, key: bytes, layer: int) -> Optional[bytes]:
        return self.get_state(namespace, content_sequence_id(engine_key(key)), layer)

    def decode_linear(self, namespace: str, layer: int, items: Sequence[tuple], scale: float = 0.0) -> list:
        """One decode step of a linear-attention layer (Gated DeltaNet, KDA) on each sequence's
        stored state. items: (sequence_id, q, k, v, g, beta[, conv_input]) float32 arrays —
        q, k [num_k_heads, head_k_dim] L2-normalized, v [num_v_heads, head_v_dim], g the log
        decay [num_v_heads] (KDA: [num_v_heads, head_k_dim]), beta [num_v_heads]. The state is
        advanced and written back; output is [num_v_heads, head_v_dim]."""
        ns = self.namespace(namespace)
        f = lambda a: np.ascontiguousarray(a, dtype=np.float32).ravel().astype("<f4").tobytes()  # noqa: E731
        spec = ns.proto.model.layers[layer].linear if ns.layer_kind(layer) == "linear" else None
        wire = []
        for it in items:
            conv = f(it[6]) if len(it) > 6 and it[6] is not None else b""
            step = worker_pb.LinearStep(q=f(it[1]), k=f(it[2]), v=f(it[3]), g=f(it[4]), beta=f(it[5]), conv_input=conv)
            wire.append(worker_pb.DecodeItem(sequence_id=it[0], linear=step))
        shape = (spec.num_v_heads, spec.head_v_dim) if spec else None
        return self._decode(ns, layer, wire, worker_pb.DecodeRequest(softmax_scale=scale), shape)

    def decode(self, namespace: str, layer: int, items: Sequence[tuple], softmax_scale: float = 0.0,
               sinks: Optional[np.ndarray] = None, vector_dtype: str = "f32") -> list:
        """One decode step for one layer. items: (sequence_id, query [q_heads, qk_width] float32,
        optional new token kv [planes, 1, width] uint16[, indexer query [heads, dim] float32,
        indexer weights [heads] float32, new indexer key bytes]) — the last three for sparse MLA
        (DeepSeek-V3.2) layers. `sinks`: the layer's sink logit per query head, for models with
        attention sinks (gpt-oss). A sliding-window or chunked layer attends to its window.
        `vector_dtype="bf16"` sends the queries and receives the outputs as bfloat16 (half the
        bytes; queries rounded to nearest even here, outputs by the worker), returned as float32.
        Returns a DecodeResults: a DecodeResult per item, in order, and the step's `stats`."""
        if vector_dtype not in ("f32", "bf16"):
            raise ValueError(f"vector_dtype must be 'f32' or 'bf16', not {vector_dtype!r}")
        ns = self.namespace(namespace)
        f = lambda a: np.ascontiguousarray(a, dtype=np.float32).ravel().astype("<f4").tobytes()  # noqa: E731
        q = (lambda a: to_bf16(a).ravel().astype("<u2").tobytes()) if vector_dtype == "bf16" else f  # noqa: E731
        wire = []
        for it in items:
            new_kv = self._payload(ns, it[2]) if len(it) > 2 and it[2] is not None else b""
            d = worker_pb.DecodeItem(sequence_id=it[0], query=q(it[1]), new_kv=new_kv)
            if len(it) > 4:
                d.index_query, d.index_weights = f(it[3]), f(it[4])
            if len(it) > 5 and it[5] is not None:
                d.new_index_key = bytes(it[5])
            wire.append(d)
        req = worker_pb.DecodeRequest(softmax_scale=softmax_scale, sinks=f(sinks) if sinks is not None else b"",
                                      vector_dtype=worker_pb.VECTOR_DTYPE_BF16 if vector_dtype == "bf16"
                                      else worker_pb.VECTOR_DTYPE_F32)
        return self._decode(ns, layer, wire, req, (ns.q_heads, ns.v_width))

    def _decode(self, ns: Namespace, layer: int, wire: list, base, shape) -> list:
        # Outputs come back in base.vector_dtype (decode_linear leaves it f32).
        namespace = ns.name
        if not self._workers:
            self.refresh()
        if not self._workers:
            raise KvcacheError("no worker registered", grpc.StatusCode.UNAVAILABLE)
        groups: dict = {}
        for idx, d in enumerate(wire):
            w = place(_seq_hash(namespace, d.sequence_id), [(a, b, c) for a, b, c, _ in self._workers], 1)[0]
            # Vectors travel as little-endian f32 bytes (see worker.proto).
            groups.setdefault(w, []).append((idx, d))
        results: list = [None] * len(wire)
        stats = DecodeStats()
        for w, group in groups.items():
            stub = worker_grpc.AttentionWorkerStub(self._node(self._workers[w][3]))
            req = worker_pb.DecodeRequest()
            req.CopyFrom(base)
            req.namespace, req.layer = namespace, layer
            req.items.extend([g[1] for g in group])
            resp = self._call(stub.Decode, req)
            if resp.HasField("stats"):
                stats.add(resp.stats)
            for (idx, _), r in zip(group, resp.results):
                ok = r.status == worker_pb.SEQUENCE_STATUS_OK
                out = None
                if ok and base.vector_dtype == worker_pb.VECTOR_DTYPE_BF16:
                    out = from_bf16(np.frombuffer(r.output, dtype="<u2"))
                elif ok:
                    out = np.frombuffer(r.output, dtype="<f4").astype(np.float32)
                results[idx] = DecodeResult(
                    sequence_id=r.sequence_id, ok=ok, status=worker_pb.SequenceStatus.Name(r.status),
                    output=out.reshape(shape) if ok and shape else out,
                    lse=np.array(r.lse, dtype=np.float32) if ok else None,
                    context_tokens=r.context_tokens, message=r.message)
        return DecodeResults(results, stats)
