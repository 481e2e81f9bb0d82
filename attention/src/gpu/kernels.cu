// kvcache decode-attention kernels for NVIDIA GPUs, compiled at first use by NVRTC for the
// device's architecture (see gpu/mod.rs). They read pages in the byte layout the cache nodes
// store (core/src/layout.rs) in device slots of a full page each, through a table of device
// pointers, one per page:
//   GQA/MHA/MQA: K[kv_heads][KV_PT][row] then V[kv_heads][KV_PT][row];
//   MLA:         [KV_PT][row], row = latent (KV_DL) then rope key (KV_DR).
// A stored payload of n < KV_PT tokens is compact (planes n rows apart); the upload spreads its
// planes KV_PT rows apart (a no-op for MLA), so appending a token to a device page writes its
// rows in place. Every page of a sequence holds KV_PT tokens except its last.
//
// Macros set by the host for each compiled variant:
//   KV_CODEC  0 bf16, 1 f16, 2 fp8-e4m3 (f32 power-of-two scale per 128 elements), 3 int8 (f32
//             scale per row); quantized rows are [main][scales][bf16 tail]
//   KV_ROW    bytes of one row;  KV_PT  tokens in a full page
//   GQA:      KV_D head dim, KV_KV kv heads, KV_G query heads per kv head, KV_GC heads per block
//   MLA:      KV_DL latent width, KV_DR rope width
//
// Softmax runs in the log2 domain: the host folds log2(e) into the query scale, partial results
// carry lse2 = m + log2(l), and the merge kernel turns the final one back into a natural log.
// Nothing here hides a NaN: a non-finite page yields a non-finite output, which the host refuses.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ float bf16_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }

__device__ __forceinline__ void f16x2_to_f32(u32 w, float& a, float& b) {
    asm("{.reg .f16 l, h;\n mov.b32 {l, h}, %2;\n cvt.f32.f16 %0, l;\n cvt.f32.f16 %1, h;}"
        : "=f"(a), "=f"(b) : "r"(w));
}

// Four e4m3fn bytes (little-endian in w) to floats, unscaled.
__device__ __forceinline__ void e4m3x4_to_f32(u32 w, float* x) {
#if __CUDA_ARCH__ >= 890
    u32 lo, hi;
    u16 wl = (u16)(w & 0xffff), wh = (u16)(w >> 16);
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(lo) : "h"(wl));
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(hi) : "h"(wh));
    f16x2_to_f32(lo, x[0], x[1]);
    f16x2_to_f32(hi, x[2], x[3]);
#else
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        u32 b = (w >> (8 * i)) & 0xff;
        float v = __uint_as_float(((b & 0x80u) << 24) | ((b & 0x7fu) << 20)) * 1.329228e36f;  // 2^120
        x[i] = ((b & 0x7fu) == 0x7fu) ? __int_as_float(0x7fc00000) : v;
    }
#endif
}

__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Words of raw row data one lane loads for E elements.
#if KV_CODEC <= 1
#define ELEM_BYTES 2
#else
#define ELEM_BYTES 1
#endif

// Decode `nw` words holding consecutive elements into floats (unscaled).
template <int NW>
__device__ __forceinline__ void decode_words(const u32* w, float* x) {
    #pragma unroll
    for (int i = 0; i < NW; i++) {
#if KV_CODEC == 0
        x[2 * i] = bf16_lo(w[i]);
        x[2 * i + 1] = bf16_hi(w[i]);
#elif KV_CODEC == 1
        f16x2_to_f32(w[i], x[2 * i], x[2 * i + 1]);
#elif KV_CODEC == 2
        e4m3x4_to_f32(w[i], x + 4 * i);
#else
        #pragma unroll
        for (int j = 0; j < 4; j++) x[4 * i + j] = (float)(signed char)((w[i] >> (8 * j)) & 0xff);
#endif
    }
}

// The scale of the quantized elements starting at e0 of a row of `main` quantized elements.
__device__ __forceinline__ float row_scale(const u8* row, int e0, int main) {
#if KV_CODEC == 2
    return __ldg((const float*)(row + main) + e0 / 128);
#elif KV_CODEC == 3
    return __ldg((const float*)(row + main));
#else
    return 1.0f;
#endif
}

// ------------------------------------------------------------------------------------------
// Tensor-core helpers shared by the MLA kernel and the GQA tensor-core kernel.
#if defined(KV_DL) || defined(KV_MMA)
#if KV_CODEC == 1
#define MMA_T "f16"
__device__ __forceinline__ u32 pack_ab(float lo, float hi) {
    u32 r;
    asm("{.reg .f16 l, h;\n cvt.rn.f16.f32 l, %1;\n cvt.rn.f16.f32 h, %2;\n mov.b32 %0, {l, h};}" : "=r"(r) : "f"(lo), "f"(hi));
    return r;
}
#else
#define MMA_T "bf16"
__device__ __forceinline__ u32 pack_ab(float lo, float hi) { return pack_bf16x2(lo, hi); }
#endif

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_wait0() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ void ldsm_x4(u32& r0, u32& r1, u32& r2, u32& r3, const void* p) {
    u32 a = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_t(u32& r0, u32& r1, u32& r2, u32& r3, const void* p) {
    u32 a = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
}
__device__ __forceinline__ void mma16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32." MMA_T "." MMA_T ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

#endif

// ------------------------------------------------------------------------------------------
// GQA / MHA / MQA: one block per (work item, kv head, chunk of KV_GC query heads). Each group of
// L lanes holds one token's row (E elements per lane); a warp takes TPW tokens per slot and U
// slots per iteration, so every lane has 2·U row chunks in flight before it computes. Each
// (warp, token slot) keeps its own online softmax; the block merges them at the end.
#ifdef KV_D
// The end of a GQA block: NS online-softmax states of query row r (state s's max, sum and output
// at sm_m[s·stride + r], sm_l[s·stride + r], sm_o[(s·stride + r)·KV_D + d]) merged into output dim d
// of the work item's partial (normalized output, log2-LSE) for head `ho`. A row no state saw
// anything for answers zeros and −∞.
template <int NS>
__device__ __forceinline__ void merge_states(const float* sm_m, const float* sm_l, const float* sm_o, int stride, int r,
                                             int d, size_t ho, float* __restrict__ part_o, float* __restrict__ part_lse) {
    float M = NEG_INF;
    #pragma unroll
    for (int s = 0; s < NS; s++) M = fmaxf(M, sm_m[s * stride + r]);
    if (M == NEG_INF) {
        part_o[ho * KV_D + d] = 0.f;
        if (d == 0) part_lse[ho] = NEG_INF;
        return;
    }
    float sl = 0.f, so = 0.f;
    #pragma unroll
    for (int s = 0; s < NS; s++) {
        const float w = exp2f(sm_m[s * stride + r] - M);
        sl += w * sm_l[s * stride + r];
        so += w * sm_o[(s * stride + r) * KV_D + d];
    }
    part_o[ho * KV_D + d] = so / sl;
    if (d == 0) part_lse[ho] = M + log2f(sl);
}
#endif

#if defined(KV_D) && !defined(KV_MMA)
#define NWARP 4
#define L ((KV_D / 8) < 32 ? (KV_D / 8) : 32)
#define E (KV_D / L)
#define TPW (32 / L)
#define U 4
#define NSTATE (NWARP * TPW)
#define RAWN (E * ELEM_BYTES / 4)

struct Slot {
    u32 k[RAWN], v[RAWN];
    float ks, vs;
    bool valid;
};

// Start loading this lane's part of token t's K and V rows (nothing past t1).
__device__ __forceinline__ void gqa_load(Slot& sl, const u64* pages, int h, int t, int t1, int e0) {
    sl.valid = t < t1;
    sl.ks = 0.f;
    sl.vs = 0.f;
    #pragma unroll
    for (int i = 0; i < RAWN; i++) sl.k[i] = sl.v[i] = 0u;
    if (!sl.valid) return;
    const int p = t / KV_PT, off = t - p * KV_PT;
    const u8* pg = (const u8*)pages[p];
    const u8* krow = pg + ((size_t)h * KV_PT + off) * KV_ROW;
    const u8* vrow = pg + ((size_t)(KV_KV + h) * KV_PT + off) * KV_ROW;
#if ELEM_BYTES == 2
    #pragma unroll
    for (int i = 0; i < RAWN / 4; i++) {
        uint4 a = __ldg((const uint4*)(krow + e0 * 2) + i);
        uint4 c = __ldg((const uint4*)(vrow + e0 * 2) + i);
        sl.k[4 * i] = a.x; sl.k[4 * i + 1] = a.y; sl.k[4 * i + 2] = a.z; sl.k[4 * i + 3] = a.w;
        sl.v[4 * i] = c.x; sl.v[4 * i + 1] = c.y; sl.v[4 * i + 2] = c.z; sl.v[4 * i + 3] = c.w;
    }
#else
    #pragma unroll
    for (int i = 0; i < RAWN; i++) {
        sl.k[i] = __ldg((const u32*)(krow + e0) + i);
        sl.v[i] = __ldg((const u32*)(vrow + e0) + i);
    }
#endif
    sl.ks = row_scale(krow, e0, KV_D);
    sl.vs = row_scale(vrow, e0, KV_D);
}

extern "C" __global__ void __launch_bounds__(128) gqa_decode(
    const u64* __restrict__ page_ptrs, const int* __restrict__ seq_page0,
    const int* __restrict__ seq_tokens, const int4* __restrict__ work,
    const float* __restrict__ q, float qscale, float* __restrict__ part_o,
    float* __restrict__ part_lse) {
    extern __shared__ float smem[];
    const int wi = blockIdx.x, h = blockIdx.y, hc = blockIdx.z;
    const int4 wk = work[wi];
    const int b = wk.x, t0 = wk.y, t1 = wk.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int sub = lane / L, li = lane % L, e0 = li * E;
    const int QH = KV_KV * KV_G;
    const int head0 = h * KV_G + hc * KV_GC;

    float qr[KV_GC][E];
    #pragma unroll
    for (int g = 0; g < KV_GC; g++) {
        const float* qp = q + ((size_t)b * QH + head0 + g) * KV_D + e0;
        #pragma unroll
        for (int e = 0; e < E; e++) qr[g][e] = qp[e] * qscale;
    }
    float o[KV_GC][E];
    float m[KV_GC], l[KV_GC];
    #pragma unroll
    for (int g = 0; g < KV_GC; g++) {
        m[g] = NEG_INF;
        l[g] = 0.f;
        #pragma unroll
        for (int e = 0; e < E; e++) o[g][e] = 0.f;
    }

    const u64* pages = page_ptrs + seq_page0[b];

    // Software-pipelined: the rows of the next iteration are in flight while this one computes.
    Slot cur[U], nxt[U];
    int base = t0 + warp * TPW * U;
    #pragma unroll
    for (int u = 0; u < U; u++) gqa_load(cur[u], pages, h, base + u * TPW + sub, t1, e0);
    for (; base < t1; base += NWARP * TPW * U) {
        #pragma unroll
        for (int u = 0; u < U; u++) gqa_load(nxt[u], pages, h, base + NWARP * TPW * U + u * TPW + sub, t1, e0);
        u32 kr[U][RAWN], vr[U][RAWN];
#if KV_CODEC >= 2
        float ks[U], vs[U];
#endif
        bool valid[U];
        #pragma unroll
        for (int u = 0; u < U; u++) {
            valid[u] = cur[u].valid;
#if KV_CODEC >= 2
            ks[u] = cur[u].ks;
            vs[u] = cur[u].vs;
#endif
            #pragma unroll
            for (int i = 0; i < RAWN; i++) {
                kr[u][i] = cur[u].k[i];
                vr[u][i] = cur[u].v[i];
            }
            cur[u] = nxt[u];
        }
        float s[U][KV_GC];
        #pragma unroll
        for (int u = 0; u < U; u++) {
            float x[E];
            decode_words<RAWN>(kr[u], x);
            #pragma unroll
            for (int g = 0; g < KV_GC; g++) {
                float acc = 0.f;
                #pragma unroll
                for (int e = 0; e < E; e++) acc = fmaf(qr[g][e], x[e], acc);
#if KV_CODEC <= 1
                s[u][g] = acc;  // no unit scale multiply: 5-6% faster on the H200
#else
                s[u][g] = acc * ks[u];
#endif
            }
        }
        #pragma unroll
        for (int u = 0; u < U; u++) {
            #pragma unroll
            for (int g = 0; g < KV_GC; g++) {
                #pragma unroll
                for (int off = L / 2; off > 0; off >>= 1) s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], off);
                if (!valid[u]) s[u][g] = NEG_INF;
            }
        }
        float pw[U][KV_GC];
        #pragma unroll
        for (int g = 0; g < KV_GC; g++) {
            float mx = s[0][g];
            #pragma unroll
            for (int u = 1; u < U; u++) mx = fmaxf(mx, s[u][g]);
            const float mn = fmaxf(m[g], mx);
            if (mn == NEG_INF) {
                #pragma unroll
                for (int u = 0; u < U; u++) pw[u][g] = 0.f;
                continue;
            }
            const float alpha = exp2f(m[g] - mn);
            m[g] = mn;
            l[g] *= alpha;
            #pragma unroll
            for (int e = 0; e < E; e++) o[g][e] *= alpha;
            #pragma unroll
            for (int u = 0; u < U; u++) {
                const float p = exp2f(s[u][g] - mn);
                l[g] += p;
#if KV_CODEC <= 1
                pw[u][g] = p;  // bf16/f16 rows carry no scale (invalid slots have p = 0)
#else
                pw[u][g] = p * vs[u];
#endif
            }
        }
        #pragma unroll
        for (int u = 0; u < U; u++) {
            float x[E];
            decode_words<RAWN>(vr[u], x);
            #pragma unroll
            for (int g = 0; g < KV_GC; g++) {
                #pragma unroll
                for (int e = 0; e < E; e++) o[g][e] = fmaf(pw[u][g], x[e], o[g][e]);
            }
        }
    }

    // Merge the NSTATE online-softmax states of the block.
    float* sm_m = smem;                       // [NSTATE][KV_GC]
    float* sm_l = sm_m + NSTATE * KV_GC;      // [NSTATE][KV_GC]
    float* sm_o = sm_l + NSTATE * KV_GC;      // [NSTATE][KV_GC][KV_D]
    const int st = warp * TPW + sub;
    #pragma unroll
    for (int g = 0; g < KV_GC; g++) {
        if (li == 0) {
            sm_m[st * KV_GC + g] = m[g];
            sm_l[st * KV_GC + g] = l[g];
        }
        #pragma unroll
        for (int e = 0; e < E; e++) sm_o[(st * KV_GC + g) * KV_D + e0 + e] = o[g][e];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < KV_GC * KV_D; idx += blockDim.x) {
        const int g = idx / KV_D, d = idx - g * KV_D;
        merge_states<NSTATE>(sm_m, sm_l, sm_o, KV_GC, g, d, (size_t)wi * QH + head0 + g, part_o, part_lse);
    }
}
#endif

// ------------------------------------------------------------------------------------------
// GQA / MHA / MQA on tensor cores, bf16 and fp8 pages (head dims a multiple of 16 up to 128;
// fp8 rows are widened to bf16 in shared memory, exactly, see below): one block
// of 4 warps per (work item, kv head, chunk of KV_GC ≤ 8 query heads). The heads are the rows
// of mma.sync m16n8k16, the tokens its columns. Each warp walks
// its own tiles of TB tokens (tiles w, w+4, ...) through a private NSTG-stage cp.async ring in
// shared memory — no block-wide barrier until the end — and keeps its own online softmax; the
// block merges the four states at the end.
//
// Precision as the f32 kernels: the query (scaled) and P enter the tensor cores as two bf16
// parts each, x = hi + lo with |lo| ≤ 2^-9 |x|, so every product is exact in the f32
// accumulators up to the lo part's own rounding (2^-17 relative). The hi parts are rows 0-7 of
// the A operand and the lo parts rows 8-15, so one mma multiplies both (heads past the chunk
// are zero rows).
#ifdef KV_MMA
#define TB 16
#define NSTG 2
#define KROW (KV_D + 8)
#define KSTEPS (KV_D / 16)
#define NTILES (KV_D / 8)

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gsrc, int bytes_valid) {
    u32 d = (u32)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(gsrc), "r"(bytes_valid));
}
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// x = hi + lo, both bf16x2 (lo holds what rounding x to bf16 left out).
__device__ __forceinline__ void split_bf16x2(float x0, float x1, u32& hi, u32& lo) {
    hi = pack_bf16x2(x0, x1);
    lo = pack_bf16x2(x0 - bf16_lo(hi), x1 - bf16_hi(hi));
}

// This lane's share of copying tile rows tt0..tt0+TB (K and V of kv head h) into the warp's
// stage; rows past t1 are zero-filled (P is 0 there, and 0·garbage could be NaN). A tile spans
// at most two pages (TB ≤ KV_PT), so the page table is read once per tile.
__device__ __forceinline__ void gqa_mma_issue(u16* ks, u16* vs, const u64* pages, int h, int tt0, int t1, int lane) {
    constexpr int CH = KV_D / 8;  // 16-byte chunks per row
    const int p0 = tt0 / KV_PT, off0 = tt0 - p0 * KV_PT;
    const int last = (t1 - 1) / KV_PT;
    const u8* base0 = (const u8*)pages[p0] + (size_t)h * KV_PT * KV_ROW;
    const u8* base1 = p0 + 1 <= last ? (const u8*)pages[p0 + 1] + (size_t)h * KV_PT * KV_ROW : base0;
    constexpr size_t VOFF = (size_t)KV_KV * KV_PT * KV_ROW;
    #pragma unroll
    for (int c = lane; c < TB * CH; c += 32) {
        const int r = c / CH, k = c - r * CH;
        const int t = tt0 + r, off = off0 + r;
        const u8* src = (off < KV_PT ? base0 + (size_t)off * KV_ROW : base1 + (size_t)(off - KV_PT) * KV_ROW) + k * 16;
        const int n = t < t1 ? 16 : 0;
        if (n == 0) src = base0;
        cp_async16(ks + r * KROW + k * 8, src, n);
        cp_async16(vs + r * KROW + k * 8, src + VOFF, n);
    }
}

#if KV_CODEC == 2
// fp8 pages: rows of KV_D e4m3 bytes and an f32 power-of-two scale per 128 (4-byte aligned,
// not 16), copied raw into the warp's ring 4 bytes at a time, then widened into one bf16 tile —
// exactly: an e4m3 value times a power of two is a bf16 value.
#define RAW_TILE (TB * KV_ROW)
#define WARP_SMEM (NSTG * 2 * RAW_TILE + 2 * TB * KROW * 2)
__device__ __forceinline__ void cp_async4(void* smem_dst, const void* gsrc, int bytes_valid) {
    u32 d = (u32)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(gsrc), "r"(bytes_valid));
}
__device__ __forceinline__ void gqa_mma_issue_raw(u8* kr, u8* vr, const u64* pages, int h, int tt0, int t1, int lane) {
    constexpr int W = KV_ROW / 4;  // words per row
    const int p0 = tt0 / KV_PT, off0 = tt0 - p0 * KV_PT;
    const int last = (t1 - 1) / KV_PT;
    const u8* base0 = (const u8*)pages[p0] + (size_t)h * KV_PT * KV_ROW;
    constexpr size_t VOFF = (size_t)KV_KV * KV_PT * KV_ROW;
    // The usual tile: whole, inside one page, starting on a 16-byte boundary (its rows are
    // contiguous there): copied in 16-byte pieces, a quarter of the requests.
    const u8* src = base0 + (size_t)off0 * KV_ROW;
    if (off0 + TB <= KV_PT && tt0 + TB <= t1 && (((size_t)src | VOFF) & 15) == 0) {
        #pragma unroll 4
        for (int c = lane; c < RAW_TILE / 16; c += 32) {
            cp_async16(kr + 16 * c, src + 16 * c, 16);
            cp_async16(vr + 16 * c, src + VOFF + 16 * c, 16);
        }
        return;
    }
    const u8* base1 = p0 + 1 <= last ? (const u8*)pages[p0 + 1] + (size_t)h * KV_PT * KV_ROW : base0;
    #pragma unroll 4
    for (int c = lane; c < TB * W; c += 32) {
        const int r = c / W, w = c - r * W;
        const int t = tt0 + r, off = off0 + r;
        const u8* src = (off < KV_PT ? base0 + (size_t)off * KV_ROW : base1 + (size_t)(off - KV_PT) * KV_ROW) + 4 * w;
        const int n = t < t1 ? 4 : 0;
        if (n == 0) src = base0;
        cp_async4(kr + r * KV_ROW + 4 * w, src, n);
        cp_async4(vr + r * KV_ROW + 4 * w, src + VOFF, n);
    }
}
__device__ __forceinline__ void gqa_mma_widen(u16* tile, const u8* raw, int lane) {
    constexpr int W = KV_D / 4;  // quantized words per row
    #pragma unroll 4
    for (int c = lane; c < TB * W; c += 32) {
        const int r = c / W, w = c - r * W;
        const u8* row = raw + r * KV_ROW;
        const u32 word = *(const u32*)(row + 4 * w);
        const float sc = *((const float*)(row + KV_D) + (4 * w) / 128);
        float x[4];
        e4m3x4_to_f32(word, x);
        u32* out = (u32*)(tile + r * KROW + 4 * w);
        out[0] = pack_bf16x2(x[0] * sc, x[1] * sc);
        out[1] = pack_bf16x2(x[2] * sc, x[3] * sc);
    }
}
#else
#define WARP_SMEM (NSTG * 2 * TB * KROW * 2)
#endif

extern "C" __global__ void __launch_bounds__(128, 3) gqa_mma(
    const u64* __restrict__ page_ptrs, const int* __restrict__ seq_page0,
    const int* __restrict__ seq_tokens, const int4* __restrict__ work,
    const float* __restrict__ q, float qscale, float* __restrict__ part_o,
    float* __restrict__ part_lse) {
    extern __shared__ __align__(16) u8 smem_raw[];
    const int wi = blockIdx.x, h = blockIdx.y, hc = blockIdx.z;
    const int4 wk = work[wi];
    const int b = wk.x, t0 = wk.y, t1 = wk.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, tq = lane & 3;
    const int QH = KV_KV * KV_G;
    const int head0 = h * KV_G + hc * KV_GC;
    const bool row_ok = g < KV_GC && hc * KV_GC + g < KV_G;
#if KV_CODEC == 2
    u8* ring = smem_raw + warp * WARP_SMEM;                       // [NSTG][K, V][TB][KV_ROW] raw
    u16* tile = (u16*)(ring + NSTG * 2 * RAW_TILE);               // [K, V][TB][KROW] bf16
#else
    u16* ring = (u16*)(smem_raw + warp * WARP_SMEM);              // [NSTG][K, V][TB][KROW]
#endif
    const u64* pages = page_ptrs + seq_page0[b];

    const int ntile = (t1 - t0 + TB - 1) / TB;
    const int mine = ntile > warp ? (ntile - warp + 3) / 4 : 0;
    #pragma unroll
    for (int s = 0; s < NSTG - 1; s++) {
        if (s < mine) {
#if KV_CODEC == 2
            u8* st = ring + s * 2 * RAW_TILE;
            gqa_mma_issue_raw(st, st + RAW_TILE, pages, h, t0 + (warp + 4 * s) * TB, t1, lane);
#else
            u16* st = ring + s * 2 * TB * KROW;
            gqa_mma_issue(st, st + TB * KROW, pages, h, t0 + (warp + 4 * s) * TB, t1, lane);
#endif
        }
        cp_commit();
    }

    // The query rows of this lane's A fragments (row g: hi, row g+8: lo), scaled, split.
    u32 qhi[KSTEPS][2], qlo[KSTEPS][2];
    {
        const float* qp = q + ((size_t)b * QH + head0 + g) * KV_D;
        #pragma unroll
        for (int ks = 0; ks < KSTEPS; ks++) {
            #pragma unroll
            for (int j = 0; j < 2; j++) {
                const int d = ks * 16 + j * 8 + 2 * tq;
                const float x0 = row_ok ? qp[d] * qscale : 0.f;
                const float x1 = row_ok ? qp[d + 1] * qscale : 0.f;
                split_bf16x2(x0, x1, qhi[ks][j], qlo[ks][j]);
            }
        }
    }

    float o[NTILES][4];
    #pragma unroll
    for (int i = 0; i < NTILES; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m = NEG_INF, l = 0.f;

    for (int i = 0; i < mine; i++) {
        // Every lane is done reading the stage the next copy overwrites.
        __syncwarp();
        if (i + NSTG - 1 < mine) {
#if KV_CODEC == 2
            u8* st = ring + ((i + NSTG - 1) % NSTG) * 2 * RAW_TILE;
            gqa_mma_issue_raw(st, st + RAW_TILE, pages, h, t0 + (warp + 4 * (i + NSTG - 1)) * TB, t1, lane);
#else
            u16* st = ring + ((i + NSTG - 1) % NSTG) * 2 * TB * KROW;
            gqa_mma_issue(st, st + TB * KROW, pages, h, t0 + (warp + 4 * (i + NSTG - 1)) * TB, t1, lane);
#endif
        }
        cp_commit();
        cp_wait<NSTG - 1>();
        __syncwarp();
#if KV_CODEC == 2
        {
            const u8* st = ring + (i % NSTG) * 2 * RAW_TILE;
            gqa_mma_widen(tile, st, lane);
            gqa_mma_widen(tile + TB * KROW, st + RAW_TILE, lane);
        }
        __syncwarp();
        const u16* Kt = tile;
#else
        const u16* Kt = ring + (i % NSTG) * 2 * TB * KROW;
#endif
        const u16* Vt = Kt + TB * KROW;
        const int tt0 = t0 + (warp + 4 * i) * TB;

        // S = Q·Kᵀ: rows g = the heads' hi parts, rows g+8 their lo parts; columns = the tile's
        // 16 tokens (two n-tiles).
        float sa[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        const u16* kb = Kt + (((lane >> 4) << 3) + (lane & 7)) * KROW + ((lane >> 3) & 1) * 8;
        #pragma unroll
        for (int ks = 0; ks < KSTEPS; ks++) {
            u32 b0, b1, b2, b3;
            ldsm_x4(b0, b1, b2, b3, kb + ks * 16);
            mma16816(sa[0], qhi[ks][0], qlo[ks][0], qhi[ks][1], qlo[ks][1], b0, b1);
            mma16816(sa[1], qhi[ks][0], qlo[ks][0], qhi[ks][1], qlo[ks][1], b2, b3);
        }
        float s[4];  // row g: tokens 2tq, 2tq+1 (n-tile 0), 8+2tq, 9+2tq (n-tile 1)
        s[0] = sa[0][0] + sa[0][2];
        s[1] = sa[0][1] + sa[0][3];
        s[2] = sa[1][0] + sa[1][2];
        s[3] = sa[1][1] + sa[1][3];
        const int c0 = tt0 + 2 * tq;
        if (c0 >= t1) s[0] = NEG_INF;
        if (c0 + 1 >= t1) s[1] = NEG_INF;
        if (c0 + 8 >= t1) s[2] = NEG_INF;
        if (c0 + 9 >= t1) s[3] = NEG_INF;
        float mx = fmaxf(fmaxf(s[0], s[1]), fmaxf(s[2], s[3]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mn = fmaxf(m, mx);
        float p[4];
        #pragma unroll
        for (int c = 0; c < 4; c++) p[c] = mn == NEG_INF ? 0.f : exp2f(s[c] - mn);
        const float alpha = mn == NEG_INF ? 1.f : exp2f(m - mn);
        m = mn;
        float rs = (p[0] + p[1]) + (p[2] + p[3]);
        rs += __shfl_xor_sync(0xffffffffu, rs, 1);
        rs += __shfl_xor_sync(0xffffffffu, rs, 2);
        l = l * alpha + rs;
        // The running max moves rarely after the first tiles: rescale only when it did.
        if (__any_sync(0xffffffffu, alpha != 1.f)) {
            #pragma unroll
            for (int j = 0; j < NTILES; j++) {
                o[j][0] *= alpha;
                o[j][1] *= alpha;
                o[j][2] *= alpha;
                o[j][3] *= alpha;
            }
        }
        // O += P·V: P (rows g = hi parts, rows g+8 = lo parts; k = the 16 tokens) from the score
        // fragments, V by transposing loads (k = tokens, n = 8 dims per n-tile). Each head's
        // output is the sum of its two rows.
        u32 ph0, pl0, ph1, pl1;
        split_bf16x2(p[0], p[1], ph0, pl0);
        split_bf16x2(p[2], p[3], ph1, pl1);
        const u16* vb = Vt + (((lane >> 3) & 1) * 8 + (lane & 7)) * KROW + (lane >> 4) * 8;
        #pragma unroll
        for (int j = 0; j < NTILES; j += 2) {
            u32 b0, b1, b2, b3;
            ldsm_x4_t(b0, b1, b2, b3, vb + j * 8);
            mma16816(o[j], ph0, pl0, ph1, pl1, b0, b1);
            mma16816(o[j + 1], ph0, pl0, ph1, pl1, b2, b3);
        }
    }
    cp_wait<0>();
    __syncthreads();

    // Merge the four warps' states (the rings are free now).
    float* sm_m = (float*)smem_raw;          // [4][8]
    float* sm_l = sm_m + 4 * 8;              // [4][8]
    float* sm_o = sm_l + 4 * 8;              // [4][8][KV_D]
    if (tq == 0) {
        sm_m[warp * 8 + g] = m;
        sm_l[warp * 8 + g] = l;
    }
    #pragma unroll
    for (int j = 0; j < NTILES; j++) {
        sm_o[(warp * 8 + g) * KV_D + j * 8 + 2 * tq] = o[j][0] + o[j][2];
        sm_o[(warp * 8 + g) * KV_D + j * 8 + 2 * tq + 1] = o[j][1] + o[j][3];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < KV_GC * KV_D; idx += blockDim.x) {
        const int r = idx / KV_D, d = idx - r * KV_D;
        if (hc * KV_GC + r >= KV_G) continue;
        merge_states<4>(sm_m, sm_l, sm_o, 8, r, d, (size_t)wi * QH + head0 + r, part_o, part_lse);
    }
}
#endif

// ------------------------------------------------------------------------------------------
// Absorbed MLA on tensor cores (mma.sync m16n8k16, bf16 in, f32 accumulate). One block of 8
// warps per (work item, 64 query heads); tiles of 32 tokens. Warp w owns heads 16·(w&3)..+16:
// it scores them against tokens 16·(w>>2)..+16 of the tile (S = Q·Kᵀ over the 576-wide row),
// the pair of warps sharing those heads agrees on the running max through shared memory, writes
// P (bf16) there, and then each accumulates O over the whole tile for its half of the 512 latent
// dims (O += P·V, V = the latent part of the same rows). bf16 pages are copied into shared
// memory with cp.async one tile ahead; quantized pages are copied raw the same way and widened
// to bf16 (scales applied, exactly) in shared memory.
#ifdef KV_DL
#define HB 64
#define BN 32
#define MW (KV_DL + KV_DR)
#define SROW (MW + 8)
#define PROW (BN + 8)
#define NTHREADS 256
#if KV_ROW % 16 == 0
#define CPB 16
#else
#define CPB 4
#endif
#define RAWROW (((KV_ROW + 15) / 16) * 16)
// bf16 and f16 pages are copied into shared memory as they are and multiplied in their own type
// (the query and P rounded to it); fp8/int8 pages are widened to bf16 there, exactly.
#if KV_CODEC <= 1
#define MLA_DIRECT 1
#else
#define MLA_DIRECT 0
#endif
__device__ __forceinline__ void cp_async(void* smem_dst, const void* gsrc, int bytes_valid) {
    u32 d = (u32)__cvta_generic_to_shared(smem_dst);
#if CPB == 16
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(gsrc), "r"(bytes_valid));
#else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(gsrc), "r"(bytes_valid));
#endif
}
// Start copying tile `tt0..tt0+BN` (clipped to t1) into `dst` (bf16 rows of SROW elements when
// the codec is bf16, raw rows of RAWROW bytes otherwise); rows past t1 are zero-filled.
__device__ __forceinline__ void mla_issue_tile(u8* dst, const u64* pages, int tt0, int t1) {
    constexpr int chunks = KV_ROW / CPB;
#if MLA_DIRECT
    constexpr int dst_row = SROW * 2;
#else
    constexpr int dst_row = RAWROW;
#endif
    for (int c = threadIdx.x; c < BN * chunks; c += NTHREADS) {
        const int r = c / chunks, k = c - r * chunks;
        const int t = tt0 + r;
        u8* d = dst + r * dst_row + k * CPB;
        if (t < t1) {
            const int p = t / KV_PT, off = t - p * KV_PT;
            const u8* src = (const u8*)pages[p] + (size_t)off * KV_ROW + k * CPB;
            cp_async(d, src, CPB);
        } else {
            cp_async(d, (const void*)pages[0], 0);
        }
    }
}

#if !MLA_DIRECT
// Widen raw rows to bf16 rows of SROW elements, scales applied.
__device__ __forceinline__ void mla_widen(u16* ks, const u8* raw) {
    constexpr int groups = KV_DL / 4 + KV_DR / 2;  // 4 quantized elements or 2 bf16 per word
    for (int c = threadIdx.x; c < BN * groups; c += NTHREADS) {
        const int r = c / groups, k = c - r * groups;
        const u8* row = raw + r * RAWROW;
        u32* out = (u32*)(ks + r * SROW);
        if (k < KV_DL / 4) {
            const u32 w = *(const u32*)(row + 4 * k);
#if KV_CODEC == 2
            const float sc = *((const float*)(row + KV_DL) + (4 * k) / 128);
            float x[4];
            e4m3x4_to_f32(w, x);
#else
            const float sc = *(const float*)(row + KV_DL);
            float x[4];
            #pragma unroll
            for (int j = 0; j < 4; j++) x[j] = (float)(signed char)((w >> (8 * j)) & 0xff);
#endif
            out[2 * k] = pack_bf16x2(x[0] * sc, x[1] * sc);
            out[2 * k + 1] = pack_bf16x2(x[2] * sc, x[3] * sc);
        } else {
            const int kk = k - KV_DL / 4;
#if KV_CODEC == 2
            constexpr int tail = KV_DL + 4 * ((KV_DL + 127) / 128);
#else
            constexpr int tail = KV_DL + 4;
#endif
            out[KV_DL / 2 + kk] = *(const u32*)(row + tail + 4 * kk);
        }
    }
}
#endif

extern "C" __global__ void __launch_bounds__(NTHREADS, 1) mla_decode(
    const u64* __restrict__ page_ptrs, const int* __restrict__ seq_page0,
    const int* __restrict__ seq_tokens, const int4* __restrict__ work,
    const float* __restrict__ q, float qscale, int q_heads, float* __restrict__ part_o,
    float* __restrict__ part_lse) {
    extern __shared__ __align__(16) u8 smem_raw[];
    u16* Qs = (u16*)smem_raw;                       // [HB][SROW]
    u16* Ks = Qs + HB * SROW;                       // [2][BN][SROW] (bf16) or [BN][SROW]
#if MLA_DIRECT
    u16* Ps = Ks + 2 * BN * SROW;                   // [HB][PROW]
#else
    u16* Ps = Ks + BN * SROW;
#endif
    float* red_m = (float*)(Ps + HB * PROW);        // [2][HB]
    float* red_l = red_m + 2 * HB;                  // [2][HB]
#if !MLA_DIRECT
    u8* raw = (u8*)(red_l + 2 * HB);                // [2][BN][RAWROW]
#endif

    const int wi = blockIdx.x, hb = blockIdx.y;
    const int4 wk = work[wi];
    const int b = wk.x, t0 = wk.y, t1 = wk.z;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int hg = warp & 3, half = warp >> 2;
    const int g = lane >> 2, tq = lane & 3;
    const u64* pages = page_ptrs + seq_page0[b];
    const int ntiles = (t1 - t0 + BN - 1) / BN;

    if (ntiles > 0) {
#if MLA_DIRECT
        mla_issue_tile((u8*)Ks, pages, t0, t1);
#else
        mla_issue_tile(raw, pages, t0, t1);
#endif
    }
    cp_commit();

    // Query rows (scaled, rounded to bf16); heads past q_heads are zero.
    for (int i = tid; i < HB * (MW / 2); i += NTHREADS) {
        const int r = i / (MW / 2), c = i - r * (MW / 2);
        const int head = hb * HB + r;
        float a = 0.f, bb = 0.f;
        if (head < q_heads) {
            const float* qp = q + ((size_t)b * q_heads + head) * MW + 2 * c;
            a = qp[0];
            bb = qp[1];
        }
        ((u32*)(Qs + r * SROW))[c] = pack_ab(a, bb);
    }

    float oacc[32][4];
    #pragma unroll
    for (int i = 0; i < 32; i++) oacc[i][0] = oacc[i][1] = oacc[i][2] = oacc[i][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;

    for (int j = 0; j < ntiles; j++) {
        const int tt0 = t0 + j * BN;
        cp_wait0();
        __syncthreads();
#if MLA_DIRECT
        const u16* Kt = Ks + (j & 1) * BN * SROW;
        if (j + 1 < ntiles) mla_issue_tile((u8*)(Ks + ((j + 1) & 1) * BN * SROW), pages, tt0 + BN, t1);
        cp_commit();
#else
        mla_widen(Ks, raw + (j & 1) * BN * RAWROW);
        if (j + 1 < ntiles) mla_issue_tile(raw + ((j + 1) & 1) * BN * RAWROW, pages, tt0 + BN, t1);
        cp_commit();
        __syncthreads();
        const u16* Kt = Ks;
#endif
        // S = Q·Kᵀ for 16 heads × 16 tokens.
        // Two accumulators per n-tile (even and odd k-steps): four independent mma chains.
        float sacc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        float sodd[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        const u16* qa = Qs + (hg * 16 + (lane & 15)) * SROW + (lane >> 4) * 8;
        const u16* kb = Kt + (half * 16 + (lane & 7) + ((lane >> 4) << 3)) * SROW + ((lane >> 3) & 1) * 8;
        #pragma unroll 3
        for (int ks = 0; ks < MW / 16; ks += 2) {
            u32 a0, a1, a2, a3, b0, b1, b2, b3;
            u32 c0, c1, c2, c3, d0, d1, d2, d3;
            ldsm_x4(a0, a1, a2, a3, qa + ks * 16);
            ldsm_x4(b0, b1, b2, b3, kb + ks * 16);
            ldsm_x4(c0, c1, c2, c3, qa + ks * 16 + 16);
            ldsm_x4(d0, d1, d2, d3, kb + ks * 16 + 16);
            mma16816(sacc[0], a0, a1, a2, a3, b0, b1);
            mma16816(sacc[1], a0, a1, a2, a3, b2, b3);
            mma16816(sodd[0], c0, c1, c2, c3, d0, d1);
            mma16816(sodd[1], c0, c1, c2, c3, d2, d3);
        }
        #pragma unroll
        for (int nt = 0; nt < 2; nt++) {
            #pragma unroll
            for (int c = 0; c < 4; c++) sacc[nt][c] += sodd[nt][c];
        }
        // Scale (after the product: a bf16 query goes in exactly), mask tokens past the range,
        // take row maxima over this warp's 16 tokens.
        float mx0 = NEG_INF, mx1 = NEG_INF;
        #pragma unroll
        for (int nt = 0; nt < 2; nt++) {
            #pragma unroll
            for (int c = 0; c < 4; c++) sacc[nt][c] *= qscale;
            const int col = tt0 + half * 16 + nt * 8 + 2 * tq;
            if (col >= t1) { sacc[nt][0] = NEG_INF; sacc[nt][2] = NEG_INF; }
            if (col + 1 >= t1) { sacc[nt][1] = NEG_INF; sacc[nt][3] = NEG_INF; }
            mx0 = fmaxf(mx0, fmaxf(sacc[nt][0], sacc[nt][1]));
            mx1 = fmaxf(mx1, fmaxf(sacc[nt][2], sacc[nt][3]));
        }
        #pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
        }
        const int r0 = hg * 16 + g, r1 = r0 + 8;
        if (tq == 0) {
            red_m[half * HB + r0] = mx0;
            red_m[half * HB + r1] = mx1;
        }
        __syncthreads();
        const float n0 = fmaxf(m0, fmaxf(red_m[r0], red_m[HB + r0]));
        const float n1 = fmaxf(m1, fmaxf(red_m[r1], red_m[HB + r1]));
        const float al0 = n0 == NEG_INF ? 1.f : exp2f(m0 - n0);
        const float al1 = n1 == NEG_INF ? 1.f : exp2f(m1 - n1);
        m0 = n0;
        m1 = n1;
        float rs0 = 0.f, rs1 = 0.f;
        #pragma unroll
        for (int nt = 0; nt < 2; nt++) {
            const float p0 = n0 == NEG_INF ? 0.f : exp2f(sacc[nt][0] - n0);
            const float p1 = n0 == NEG_INF ? 0.f : exp2f(sacc[nt][1] - n0);
            const float p2 = n1 == NEG_INF ? 0.f : exp2f(sacc[nt][2] - n1);
            const float p3 = n1 == NEG_INF ? 0.f : exp2f(sacc[nt][3] - n1);
            rs0 += p0 + p1;
            rs1 += p2 + p3;
            const int col = half * 16 + nt * 8 + 2 * tq;
            *(u32*)(Ps + r0 * PROW + col) = pack_ab(p0, p1);
            *(u32*)(Ps + r1 * PROW + col) = pack_ab(p2, p3);
        }
        rs0 += __shfl_xor_sync(0xffffffffu, rs0, 1);
        rs0 += __shfl_xor_sync(0xffffffffu, rs0, 2);
        rs1 += __shfl_xor_sync(0xffffffffu, rs1, 1);
        rs1 += __shfl_xor_sync(0xffffffffu, rs1, 2);
        l0 = l0 * al0 + rs0;
        l1 = l1 * al1 + rs1;
        #pragma unroll
        for (int i = 0; i < 32; i++) {
            oacc[i][0] *= al0;
            oacc[i][1] *= al0;
            oacc[i][2] *= al1;
            oacc[i][3] *= al1;
        }
        __syncthreads();
        // O += P·V for 16 heads × 256 latent dims (this warp's half).
        #pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            u32 a0, a1, a2, a3;
            ldsm_x4(a0, a1, a2, a3, Ps + (hg * 16 + (lane & 15)) * PROW + kk * 16 + (lane >> 4) * 8);
            const u16* vb = Kt + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SROW + half * (KV_DL / 2) + (lane >> 4) * 8;
            #pragma unroll
            for (int np = 0; np < 16; np++) {
                u32 b0, b1, b2, b3;
                ldsm_x4_t(b0, b1, b2, b3, vb + np * 16);
                mma16816(oacc[2 * np], a0, a1, a2, a3, b0, b1);
                mma16816(oacc[2 * np + 1], a0, a1, a2, a3, b2, b3);
            }
        }
        __syncthreads();
    }
    cp_wait0();

    // The pair of warps sharing these heads each summed P over its own half of every tile.
    const int r0 = hg * 16 + g, r1 = r0 + 8;
    if (tq == 0) {
        red_l[half * HB + r0] = l0;
        red_l[half * HB + r1] = l1;
    }
    __syncthreads();
    const float lt0 = red_l[r0] + red_l[HB + r0];
    const float lt1 = red_l[r1] + red_l[HB + r1];
    const int h0 = hb * HB + r0, h1 = hb * HB + r1;
    // A NaN sum stays NaN (the host refuses it); only an empty range answers zeros.
    const float i0 = lt0 == 0.f ? 0.f : 1.f / lt0;
    const float i1 = lt1 == 0.f ? 0.f : 1.f / lt1;
    #pragma unroll
    for (int i = 0; i < 32; i++) {
        const int col = half * (KV_DL / 2) + i * 8 + 2 * tq;
        if (h0 < q_heads) {
            float2 v = make_float2(oacc[i][0] * i0, oacc[i][1] * i0);
            *(float2*)(part_o + ((size_t)wi * q_heads + h0) * KV_DL + col) = v;
        }
        if (h1 < q_heads) {
            float2 v = make_float2(oacc[i][2] * i1, oacc[i][3] * i1);
            *(float2*)(part_o + ((size_t)wi * q_heads + h1) * KV_DL + col) = v;
        }
    }
    if (half == 0 && tq == 0) {
        if (h0 < q_heads) part_lse[(size_t)wi * q_heads + h0] = lt0 == 0.f ? NEG_INF : m0 + log2f(lt0);
        if (h1 < q_heads) part_lse[(size_t)wi * q_heads + h1] = lt1 == 0.f ? NEG_INF : m1 + log2f(lt1);
    }
}
#endif

// ------------------------------------------------------------------------------------------
// Absorbed MLA on Hopper's warpgroup tensor cores (`wgmma`, sm_90a; bf16 pages, and fp8 pages
// widened to bf16 on their way into shared memory, below). One block of
// two warpgroups per (work item, 64 query heads), tiles of 64 tokens. The operands stay in
// shared memory, in the 128-byte-swizzled layout `wgmma` reads (rows of 64 elements, 16-byte
// chunk c of row r stored at chunk c ^ (r mod 8)): the query (64 heads × 576, 9 column blocks),
// two K tiles (64 tokens × 576) and P (64 × 64). Warpgroup 0 computes S = Q·Kᵀ (m64n64k16 × 36:
// the tensor cores read Q and K once per warpgroup, not once per warp as `mma.sync` does through
// ldmatrix), runs the online softmax in registers (each warp owns 16 whole rows: no cross-warp
// reduction), and accumulates O += P·V for latent dims 0..256 with P from registers
// (m64n256k16; V = the latent part of the same K tile read N-major, no copy). Warpgroup 1 copies
// the K tiles (cp.async, one tile ahead) and accumulates dims 256..512 with P from shared memory.
// 50-53% of the bf16 GEMM rate on an H200 (docs/BENCHMARKS.md); what bounds the rest there.
#ifdef KV_WG
#define WG_BN 64
#define WG_MW (KV_DL + KV_DR)
#define WG_KB (WG_MW / 64)          // 64-wide column blocks of a row
#define WG_QBYTES (64 * WG_MW * 2)  // the query, and one K tile
#define WG_PBYTES (64 * 128)
#if KV_DL != 512 || WG_MW % 192 != 0 || !(KV_CODEC == 0 || (KV_CODEC == 2 && KV_DR == 64))
#error "the wgmma MLA kernel takes bf16 pages with a 512-wide latent and rows a multiple of 192 wide, or fp8 pages of 512 + 64"
#endif

__device__ __forceinline__ u64 wg_desc(u32 saddr, u32 lbo, u32 sbo) {
    return (u64)((saddr & 0x3FFFF) >> 4) | ((u64)((lbo & 0x3FFFF) >> 4) << 16) |
           ((u64)((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);  // 128-byte swizzle
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Shared-memory writes of the generic proxy (st.shared, cp.async) made visible to the tensor
// cores' reads (the async proxy).
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keep the compiler from moving accumulator reads or writes across the asynchronous MMAs.
__device__ __forceinline__ void wg_keep(float* d, int n) {
    #pragma unroll
    for (int i = 0; i < n; i++) asm volatile("" : "+f"(d[i])::"memory");
}
// Byte offset of element pair (r, c) (c even) of a swizzled [rows][64] block.
__device__ __forceinline__ u32 swz(int r, int c) {
    return (u32)(r * 128 + ((((c >> 3) ^ r) & 7) << 4) + (c & 7) * 2);
}

// The accumulator operands of an m64nN f32 wgmma: N/2 registers per thread, d[0..N/2).
#define WG_REGS32 \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define WG_OUTS32(d) \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define WG_REGS128 \
    WG_REGS32 ", " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define WG_OUTS128(d) \
    WG_OUTS32(d), \
    "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
    "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
    "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
    "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
    "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
    "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
    "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
    "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
    "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
    "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
    "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
    "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])

// S += Q·Kᵀ slice: m64n64k16, A and B from shared memory (both K-major).
__device__ __forceinline__ void wgmma_n64(float* d, u64 da, u64 db, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {" WG_REGS32 "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : WG_OUTS32(d)
        : "l"(da), "l"(db), "r"(accumulate)
        : "memory");
}
// O += P·V slice: m64n256k16, A (P) from shared memory, B (V) from shared memory N-major.
__device__ __forceinline__ void wgmma_n256_tb(float* d, u64 da, u64 db, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {" WG_REGS128 "}, %128, %129, p, 1, 1, 0, 1;\n}\n"
        : WG_OUTS128(d)
        : "l"(da), "l"(db), "r"(accumulate)
        : "memory");
}
// The same with A (P) from registers: four b32 of bf16 pairs per thread, mma.sync's A layout.
__device__ __forceinline__ void wgmma_n256_rs_tb(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u64 db, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {" WG_REGS128 "}, {%128, %129, %130, %131}, %132, p, 1, 1, 1;\n}\n"
        : WG_OUTS128(d)
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(db), "r"(accumulate)
        : "memory");
}

// Named barriers between the two warpgroups (one arrives, the other waits; 256 threads each).
#define BAR_PFULL 2   // P and the rescale factors of tile j are written (warpgroup 0)
#define BAR_PEMPTY 3  // warpgroup 1 is done reading P (and its half of V) of tile j
#define BAR_KEMPTY 4  // warpgroup 0 is done reading K tile j
__device__ __forceinline__ void bar_wait(int id) { asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory"); }
__device__ __forceinline__ void bar_arrive(int id) { asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory"); }
__device__ __forceinline__ void mbar_init(u32 bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// The mbarrier receives this thread's arrival once all its earlier cp.async copies have landed.
__device__ __forceinline__ void cp_arrive(u32 bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, int parity) {
    u32 done;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    } while (!done);
}

// Start copying tokens tt0..tt0+64 (clipped to t1; rows past it zero-filled) into a K tile;
// the four warps of warpgroup 1 issue it, 16 rows each, column block by column block (a warp
// instruction moves 4 rows × 128 bytes), and each thread arrives on the tile's mbarrier g once
// its copies of the g-th third of the blocks have landed: S can start on the first blocks while the last
// are still in flight.
__device__ __forceinline__ void wg_issue_tile(u32 dst, u32 bars, const u64* pages, int tt0, int t1, int warp, int lane) {
    const u8* rows[4];
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        const int tok = min(tt0 + warp * 16 + 4 * i + (lane >> 3), t1 - 1);
        const int p = tok / KV_PT;
        rows[i] = (const u8*)pages[p] + (size_t)(tok - p * KV_PT) * KV_ROW;
    }
    #pragma unroll
    for (int blk = 0; blk < WG_KB; blk++) {
        #pragma unroll
        for (int i = 0; i < 4; i++) {
            const int r = warp * 16 + 4 * i + (lane >> 3), k = blk * 8 + (lane & 7);
            const int n = tt0 + r < t1 ? 16 : 0;
            const u32 d = dst + blk * (WG_BN * 128) + r * 128 + (((k ^ r) & 7) << 4);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(rows[i] + k * 16), "r"(n));
        }
        if (blk % (WG_KB / 3) == WG_KB / 3 - 1) cp_arrive(bars + 8 * (blk / (WG_KB / 3)));
    }
}

#if KV_CODEC == 2
// fp8 pages (rows of 512 e4m3 bytes, four f32 power-of-two scales — one per 128 — then the
// 64-wide bf16 rope key: 656 bytes, 16-byte aligned) are widened by warpgroup 1 into the same
// bf16 K tile, exactly (an e4m3 value times a power of two is a bf16 value), through registers:
// the two K tiles fill shared memory, so there is no room to land raw rows first. A thread holds
// rows warp·16 + 4i + (lane>>3), i < 4, and 16-byte pieces (lane&7) + 8g of their latent (g: the
// scale group), so eight lanes read 128 contiguous bytes of a row. Half h of a tile is scale
// groups 2h and 2h+1 (column blocks 4h..4h+4); the rope key (block 8) goes with the second half.
// Each half is signalled by its own mbarrier (ordinary arrivals, after the stores).
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// This thread's four rows of the tile at tt0 (clipped to t1 - 1) and which of them are real.
__device__ __forceinline__ u32 wg8_rows(const u8** rows, const u64* pages, int tt0, int t1, int warp, int lane) {
    u32 ok = 0;
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        const int t = tt0 + warp * 16 + 4 * i + (lane >> 3);
        const int tok = min(t, t1 - 1);
        const int p = tok / KV_PT;
        rows[i] = (const u8*)pages[p] + (size_t)(tok - p * KV_PT) * KV_ROW;
        ok |= (t < t1 ? 1u : 0u) << i;
    }
    return ok;
}
// Load half h's latent pieces and their scales (rows past the range: zeros, scale 0).
__device__ __forceinline__ void wg8_load(uint4* v, float2* sc, const u8* const* rows, u32 ok, int h, int lane) {
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        #pragma unroll
        for (int g = 0; g < 2; g++) v[2 * i + g] = __ldg((const uint4*)(rows[i] + 16 * ((lane & 7) + 8 * (2 * h + g))));
        sc[i] = __ldg((const float2*)(rows[i] + KV_DL + 8 * h));
        if (h == 0) {  // the second half's lines into L2 while the first is widened
            #pragma unroll
            for (int g = 2; g < 4; g++)
                asm volatile("prefetch.global.L2 [%0];\n" ::"l"(rows[i] + 16 * ((lane & 7) + 8 * g)));
            asm volatile("prefetch.global.L2 [%0];\n" ::"l"(rows[i] + KV_DL + 16 + 16 * (lane & 7)));
        }
    }
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        if (!((ok >> i) & 1)) {
            v[2 * i] = make_uint4(0, 0, 0, 0);
            v[2 * i + 1] = make_uint4(0, 0, 0, 0);
            sc[i] = make_float2(0.f, 0.f);
        }
    }
}
// Widen half h into the swizzled tile at dst: a 16-byte piece is 16 elements, two 16-byte bf16
// chunks of one column block. Lanes 4-7 of a row store their upper chunk first, so the eight
// lanes of a row hit eight different bank groups in each store.
__device__ __forceinline__ void wg8_store(u32 dst, const uint4* v, const float2* sc, int h, int warp, int lane) {
    const bool swap = (lane & 4) != 0;
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        const int r = warp * 16 + 4 * i + (lane >> 3);
        #pragma unroll
        for (int g = 0; g < 2; g++) {
            const int ch = (lane & 7) + 8 * (2 * h + g);
            const float s = g ? sc[i].y : sc[i].x;
            const u32 w[4] = {v[2 * i + g].x, v[2 * i + g].y, v[2 * i + g].z, v[2 * i + g].w};
            u32 out[8];
            #pragma unroll
            for (int k = 0; k < 4; k++) {
                float x[4];
                e4m3x4_to_f32(w[k], x);
                out[2 * k] = pack_bf16x2(x[0] * s, x[1] * s);
                out[2 * k + 1] = pack_bf16x2(x[2] * s, x[3] * s);
            }
            const u32 blk = dst + (ch >> 2) * (WG_BN * 128) + r * 128;
            const int k0 = 2 * (ch & 3);
            const uint4 lo = make_uint4(out[0], out[1], out[2], out[3]), hi = make_uint4(out[4], out[5], out[6], out[7]);
            const uint4 a = swap ? hi : lo, b = swap ? lo : hi;
            const int ka = swap ? k0 + 1 : k0, kb = swap ? k0 : k0 + 1;
            asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(blk + (((ka ^ r) & 7) << 4)), "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w) : "memory");
            asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(blk + (((kb ^ r) & 7) << 4)), "r"(b.x), "r"(b.y), "r"(b.z), "r"(b.w) : "memory");
        }
    }
}
// The rope key: piece lane&7 of each row, as it is, into column block 8.
__device__ __forceinline__ void wg8_rope(u32 dst, const u8* const* rows, u32 ok, int warp, int lane) {
    uint4 v[4];
    #pragma unroll
    for (int i = 0; i < 4; i++) v[i] = __ldg((const uint4*)(rows[i] + KV_DL + 16 + 16 * (lane & 7)));
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        const int r = warp * 16 + 4 * i + (lane >> 3), k = lane & 7;
        const uint4 a = ((ok >> i) & 1) ? v[i] : make_uint4(0, 0, 0, 0);
        asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst + 8 * (WG_BN * 128) + r * 128 + (((k ^ r) & 7) << 4)),
                     "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w) : "memory");
    }
}
// Fill a K tile from tokens tt0..tt0+64 (clipped to t1): each half loaded, widened, stored and
// signalled in turn (the second half's lines prefetched into L2 while the first is widened).
__device__ __forceinline__ void wg8_tile(u32 dst, u32 bars, const u64* pages, int tt0, int t1, int warp, int lane) {
    const u8* rows[4];
    uint4 v[8];
    float2 sc[4];
    const u32 ok = wg8_rows(rows, pages, tt0, t1, warp, lane);
    #pragma unroll
    for (int h = 0; h < 2; h++) {
        wg8_load(v, sc, rows, ok, h, lane);
        if (h == 1) wg8_rope(dst, rows, ok, warp, lane);
        wg8_store(dst, v, sc, h, warp, lane);
        fence_async_smem();
        mbar_arrive(bars + 8 * h);
    }
}
#endif

// 2^x on the special-function unit (subnormal results flush to zero: P underflows to 0).
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// O's rows scaled by their factor of this tile (rows g and g+8 of the warp's 16). Once the row
// maxima settle, most tiles change none of a warp's rows: the multiplications by 1 are skipped.
__device__ __forceinline__ void wg_rescale(float* o, float al0, float al1) {
    if (__any_sync(0xffffffffu, al0 != 1.f || al1 != 1.f)) {
        #pragma unroll
        for (int i = 0; i < 32; i++) {
            o[4 * i] *= al0;
            o[4 * i + 1] *= al0;
            o[4 * i + 2] *= al1;
            o[4 * i + 3] *= al1;
        }
    }
}

// Issue S = Q·Kᵀ for a 64-token tile (36 k-steps; the caller commits and waits), each group of
// column blocks once its mbarrier says it landed (thirds of the row for bf16 pages, halves for
// fp8 ones).
__device__ __forceinline__ void wg_s(float* s, u32 q_s, u32 kt, u32 bars, int parity) {
    wg_fence();
    #pragma unroll
    for (int kk = 0; kk < WG_MW / 16; kk++) {
#if KV_CODEC == 2
        if (kk == 0 || kk == 16) {  // halves: latent dims 0..256, then the rest
            mbar_wait(bars + 8 * (kk / 16), parity);
            fence_async_smem();
        }
#else
        if (kk % (WG_MW / 48) == 0) {  // thirds of the row
            mbar_wait(bars + 8 * (kk / (WG_MW / 48)), parity);
            fence_async_smem();
        }
#endif
        const u32 off = (kk >> 2) * (64 * 128) + (kk & 3) * 32;
        wgmma_n64(s, wg_desc(q_s + off, 16, 1024), wg_desc(kt + off, 16, 1024), kk > 0);
    }
}

// Per tile j: warpgroup 0 waits for K(j), computes S and the softmax, waits until warpgroup 1
// has released P(j-1), writes P(j), and accumulates its half of O; warpgroup 1 copies K(j+1)
// (into the buffer K(j-1) used, once warpgroup 0 released it), waits for P(j), accumulates its
// half of O, and signals K(j+1) and the release of P(j). So warpgroup 1's P·V of tile j runs on
// the tensor cores while warpgroup 0 computes S of tile j+1, and no barrier stops the block.
extern "C" __global__ void __launch_bounds__(256, 1) mla_wgmma(
    const u64* __restrict__ page_ptrs, const int* __restrict__ seq_page0,
    const int* __restrict__ seq_tokens, const int4* __restrict__ work,
    const float* __restrict__ q, float qscale, int q_heads, float* __restrict__ part_o,
    float* __restrict__ part_lse) {
    extern __shared__ __align__(16) u8 smem_raw[];
    // The swizzle pattern repeats every 1024 bytes: align the operands to that.
    const u32 raw_s = (u32)__cvta_generic_to_shared(smem_raw);
    const u32 base_s = (raw_s + 1023u) & ~1023u;
    u8* base = smem_raw + (base_s - raw_s);
    const u32 q_s = base_s, k_s = base_s + WG_QBYTES, p_s = k_s + 2 * WG_QBYTES;
    u8* Pg = base + 3 * WG_QBYTES;
    float* alpha = (float*)(Pg + WG_PBYTES);   // [64] rescale factor of each row this tile
    float* rows_l = alpha + 64;                // [64] final sums
    float* rows_m = rows_l + 64;               // [64] final maxima
    // Six mbarriers (K tile buffer 0 and 1, column blocks 0-2, 3-5, 6-8 landed): each of
    // warpgroup 1's threads arrives when its copies have landed (cp.async.mbarrier.arrive), so
    // warpgroup 0 waits for the data itself, not for warpgroup 1 to reach a point in its program.
    const u32 kfull = base_s + 3 * WG_QBYTES + WG_PBYTES + 3 * 64 * 4;

    const int wi = blockIdx.x, hb = blockIdx.y;
    const int4 wk = work[wi];
    const int b = wk.x, t0 = wk.y, t1 = wk.z;
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, tq = lane & 3;
    const int r0 = warp * 16 + g, r1 = r0 + 8;  // the rows (heads of this block) a thread holds
    const u64* pages = page_ptrs + seq_page0[b];
    const int ntiles = (t1 - t0 + WG_BN - 1) / WG_BN;

    if (tid < 6) mbar_init(kfull + 8 * tid, 128);
    __syncthreads();
    if (wg == 1 && ntiles > 0) {
#if KV_CODEC == 2
        wg8_tile(k_s, kfull, pages, t0, t1, warp, lane);
#else
        wg_issue_tile(k_s, kfull, pages, t0, t1, warp, lane);
#endif
    }
    // Query rows (scaled after the product, rounded to bf16); heads past q_heads are zero.
    #pragma unroll 6
    for (int i = tid; i < 64 * (WG_MW / 4); i += 256) {
        const int r = i / (WG_MW / 4), c = 4 * (i - r * (WG_MW / 4));
        const int head = hb * 64 + r;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (head < q_heads) v = __ldg((const float4*)(q + ((size_t)b * q_heads + head) * WG_MW + c));
        *(uint2*)(base + (c >> 6) * (64 * 128) + swz(r, c & 63)) = make_uint2(pack_bf16x2(v.x, v.y), pack_bf16x2(v.z, v.w));
    }
    fence_async_smem();
    __syncthreads();

    float o[128];
    #pragma unroll
    for (int i = 0; i < 128; i++) o[i] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;

    if (wg == 0) {
        // Software-pipelined: S of tile j+1 is issued right behind this warpgroup's P·V of
        // tile j (P from registers), so the tensor cores have both queued.
        float s[32];
        if (ntiles > 0) {
            wg_s(s, q_s, k_s, kfull, 0);
            wg_commit();
            wg_wait0();
            wg_keep(s, 32);
        }
        for (int j = 0; j < ntiles; j++) {
            const int tt0 = t0 + j * WG_BN;
            const u32 kt = k_s + (j & 1) * WG_QBYTES;
            // Scale, mask tokens past the range (last tile only), row maxima (a row's 64
            // columns sit in the four lanes of one quad).
            #pragma unroll
            for (int c = 0; c < 32; c++) s[c] *= qscale;
            if (tt0 + WG_BN > t1) {
                #pragma unroll
                for (int i = 0; i < 8; i++) {
                    const int col = tt0 + 8 * i + 2 * tq;
                    if (col >= t1) { s[4 * i] = NEG_INF; s[4 * i + 2] = NEG_INF; }
                    if (col + 1 >= t1) { s[4 * i + 1] = NEG_INF; s[4 * i + 3] = NEG_INF; }
                }
            }
            float mx0 = NEG_INF, mx1 = NEG_INF;
            #pragma unroll
            for (int i = 0; i < 8; i++) {
                mx0 = fmaxf(mx0, fmaxf(s[4 * i], s[4 * i + 1]));
                mx1 = fmaxf(mx1, fmaxf(s[4 * i + 2], s[4 * i + 3]));
            }
            #pragma unroll
            for (int off = 1; off <= 2; off <<= 1) {
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
            }
            const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
            const float al0 = n0 == NEG_INF ? 1.f : ex2(m0 - n0);
            const float al1 = n1 == NEG_INF ? 1.f : ex2(m1 - n1);
            // A row with nothing unmasked yet subtracts 0: its P is exp2(-inf) = 0.
            const float b0 = n0 == NEG_INF ? 0.f : n0, b1 = n1 == NEG_INF ? 0.f : n1;
            m0 = n0;
            m1 = n1;
            // P in the register layout of wgmma's A operand: pk[4k..4k+4] is k-slice k.
            u32 pk[16];
            float rs0 = 0.f, rs1 = 0.f;
            #pragma unroll
            for (int i = 0; i < 8; i++) {
                const float p0 = ex2(s[4 * i] - b0), p1 = ex2(s[4 * i + 1] - b0);
                const float p2 = ex2(s[4 * i + 2] - b1), p3 = ex2(s[4 * i + 3] - b1);
                rs0 += p0 + p1;
                rs1 += p2 + p3;
                pk[2 * i] = pack_bf16x2(p0, p1);
                pk[2 * i + 1] = pack_bf16x2(p2, p3);
            }
            l0 = l0 * al0 + rs0;  // this thread's columns; the quad sums at the end
            l1 = l1 * al1 + rs1;
            wg_rescale(o, al0, al1);
            // O[:, 0..256] += P·V (V: the tile's latent read N-major, column blocks 0..4).
            wg_keep(o, 128);
            wg_fence();
            #pragma unroll
            for (int kk = 0; kk < WG_BN / 16; kk++)
                wgmma_n256_rs_tb(o, pk[4 * kk], pk[4 * kk + 1], pk[4 * kk + 2], pk[4 * kk + 3],
                                 wg_desc(kt + kk * 16 * 128, WG_BN * 128, 1024), 1);
            wg_commit();
            // Hand P to warpgroup 1 once it released the previous one.
            if (j > 0) bar_wait(BAR_PEMPTY);
            #pragma unroll
            for (int i = 0; i < 8; i++) {
                *(u32*)(Pg + swz(r0, 8 * i + 2 * tq)) = pk[2 * i];
                *(u32*)(Pg + swz(r1, 8 * i + 2 * tq)) = pk[2 * i + 1];
            }
            if (tq == 0) {
                alpha[r0] = al0;
                alpha[r1] = al1;
            }
            fence_async_smem();
            bar_arrive(BAR_PFULL);
            if (j + 1 < ntiles) {
                #pragma unroll
                for (int i = 0; i < 32; i++) s[i] = 0.f;
                wg_keep(s, 32);
                wg_s(s, q_s, k_s + ((j + 1) & 1) * WG_QBYTES, kfull + 24 * ((j + 1) & 1), ((j + 1) >> 1) & 1);
                wg_commit();
                asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");  // P·V of tile j
                wg_keep(o, 128);
                if (j + 2 < ntiles) bar_arrive(BAR_KEMPTY);
            }
            wg_wait0();
            wg_keep(o, 128);
            wg_keep(s, 32);
        }
    } else {
        for (int j = 0; j < ntiles; j++) {
            const u32 kt = k_s + (j & 1) * WG_QBYTES;
            const bool next = j + 1 < ntiles;
            const u32 knext = k_s + ((j + 1) & 1) * WG_QBYTES, bnext = kfull + 24 * ((j + 1) & 1);
#if KV_CODEC == 2
            // The next tile is widened as soon as its buffer is free, before this tile's P·V
            // (widening it while that P·V runs on the tensor cores measured 2-4% slower).
            if (next) {
                if (j > 0) bar_wait(BAR_KEMPTY);
                wg8_tile(knext, bnext, pages, t0 + (j + 1) * WG_BN, t1, warp, lane);
            }
#else
            if (next) {
                if (j > 0) bar_wait(BAR_KEMPTY);
                wg_issue_tile(knext, bnext, pages, t0 + (j + 1) * WG_BN, t1, warp, lane);
            }
#endif
            bar_wait(BAR_PFULL);
            const float al0 = alpha[r0], al1 = alpha[r1];
            wg_rescale(o, al0, al1);
            // O[:, 256..512] += P·V (column blocks 4..8 of the tile).
            wg_keep(o, 128);
            wg_fence();
            #pragma unroll
            for (int kk = 0; kk < WG_BN / 16; kk++)
                wgmma_n256_tb(o, wg_desc(p_s + kk * 32, 16, 1024),
                              wg_desc(kt + 4 * (WG_BN * 128) + kk * 16 * 128, WG_BN * 128, 1024), 1);
            wg_commit();
            wg_wait0();
            wg_keep(o, 128);
            if (next) bar_arrive(BAR_PEMPTY);
        }
    }
    cp_wait0();

    if (wg == 0) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
        l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
        if (tq == 0) {
            rows_l[r0] = l0;
            rows_l[r1] = l1;
            rows_m[r0] = m0;
            rows_m[r1] = m1;
        }
    }
    __syncthreads();
    const float lt0 = rows_l[r0], lt1 = rows_l[r1];
    const int h0 = hb * 64 + r0, h1 = hb * 64 + r1;
    // A NaN sum stays NaN (the host refuses it); only an empty range answers zeros.
    const float i0 = lt0 == 0.f ? 0.f : 1.f / lt0;
    const float i1 = lt1 == 0.f ? 0.f : 1.f / lt1;
    #pragma unroll
    for (int i = 0; i < 32; i++) {
        const int col = 256 * wg + 8 * i + 2 * tq;
        if (h0 < q_heads)
            *(float2*)(part_o + ((size_t)wi * q_heads + h0) * KV_DL + col) = make_float2(o[4 * i] * i0, o[4 * i + 1] * i0);
        if (h1 < q_heads)
            *(float2*)(part_o + ((size_t)wi * q_heads + h1) * KV_DL + col) = make_float2(o[4 * i + 2] * i1, o[4 * i + 3] * i1);
    }
    if (wg == 0 && tq == 0) {
        if (h0 < q_heads) part_lse[(size_t)wi * q_heads + h0] = lt0 == 0.f ? NEG_INF : rows_m[r0] + log2f(lt0);
        if (h1 < q_heads) part_lse[(size_t)wi * q_heads + h1] = lt1 == 0.f ? NEG_INF : rows_m[r1] + log2f(lt1);
    }
}
#endif

// ------------------------------------------------------------------------------------------
// Merge the partial results of a sequence's work items (split-K) into its output: exact
// log-sum-exp weighting. One block of 128 threads per (sequence, head), or, when the sequences
// have many partials (grid z > 1, the host's choice), per (sequence, head, 32 output dims): the
// partial LSEs are read in parallel into weights in shared memory, then with few partials each
// thread sums its dims over all of them, with many each warp sums a quarter of the partials for
// the block's 32 dims (lanes) with independent coalesced loads (a thread per dim walking 49
// partials serially took ~13 µs per launch at 1 × 128K, latency-bound; split, 9 µs).
#ifdef KV_MERGE
#define MERGE_T 128
#define MERGE_W 1024
__device__ __forceinline__ float block_max(float x, float* red) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = x;
    __syncthreads();
    x = fmaxf(fmaxf(red[0], red[1]), fmaxf(red[2], red[3]));
    __syncthreads();
    return x;
}
__device__ __forceinline__ float block_sum(float x, float* red) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = x;
    __syncthreads();
    x = (red[0] + red[1]) + (red[2] + red[3]);
    __syncthreads();
    return x;
}

extern "C" __global__ void __launch_bounds__(MERGE_T) merge_partials(const float* __restrict__ part_o,
                                          const float* __restrict__ part_lse,
                                          const int* __restrict__ seq_work0, int heads, int dv,
                                          float* __restrict__ out, float* __restrict__ lse) {
    __shared__ float wts[MERGE_W];
    __shared__ float red[4];
    const int b = blockIdx.x, h = blockIdx.y;
    const int w0 = seq_work0[b], n = seq_work0[b + 1] - w0;
    float M = NEG_INF;
    int nan = 0;
    for (int i = threadIdx.x; i < n; i += MERGE_T) {
        const float x = part_lse[(size_t)(w0 + i) * heads + h];
        nan |= x != x;
        M = fmaxf(M, x);
    }
    nan = __syncthreads_or(nan);
    M = block_max(M, red);
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += MERGE_T) {
        const float wt = M == NEG_INF ? 0.f : exp2f(part_lse[(size_t)(w0 + i) * heads + h] - M);
        if (i < MERGE_W) wts[i] = wt;
        s += wt;
    }
    __syncthreads();
    const float sum = nan ? __int_as_float(0x7fc00000) : block_sum(s, red);
    const int nw = n < MERGE_W ? n : MERGE_W;
    const float inv = 1.f / sum;
    const size_t stride = (size_t)heads * dv;
    const float* po0 = part_o + ((size_t)w0 * heads + h) * dv;
    if (gridDim.z == 1) {
        // Few partials per sequence (the host's choice): a thread per dim, over every partial.
        for (int d = threadIdx.x; d < dv; d += MERGE_T) {
            float acc = 0.f;
            if (M != NEG_INF) {
                for (int i = 0; i < nw; i++) acc += wts[i] * po0[i * stride + d];
                for (int i = MERGE_W; i < n; i++) acc += exp2f(part_lse[(size_t)(w0 + i) * heads + h] - M) * po0[i * stride + d];
                acc *= inv;
            }
            if (nan) acc = sum;
            out[((size_t)b * heads + h) * dv + d] = acc;
        }
    } else {
        // Many partials: this block's 32 dims (lane = dim), warp j summing partials j, j+4, …
        // with independent coalesced loads; then the four warps' sums are added.
        __shared__ float part[4][32];
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        const int d = blockIdx.z * 32 + lane;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
        if (M != NEG_INF && d < dv) {
            const float* po = po0 + d;
            int i = warp;
            for (; i + 12 < nw; i += 16) {
                a0 += wts[i] * po[i * stride];
                a1 += wts[i + 4] * po[(i + 4) * stride];
                a2 += wts[i + 8] * po[(i + 8) * stride];
                a3 += wts[i + 12] * po[(i + 12) * stride];
            }
            for (; i < nw; i += 4) a0 += wts[i] * po[i * stride];
            // Past MERGE_W partials (a very long sequence on a big grid), weights on the fly.
            for (i = MERGE_W + warp; i < n; i += 4) a0 += exp2f(part_lse[(size_t)(w0 + i) * heads + h] - M) * po[i * stride];
        }
        part[warp][lane] = (a0 + a1) + (a2 + a3);
        __syncthreads();
        if (warp == 0 && d < dv) {
            float acc = M == NEG_INF ? 0.f : ((part[0][lane] + part[1][lane]) + (part[2][lane] + part[3][lane])) * inv;
            if (nan) acc = sum;
            out[((size_t)b * heads + h) * dv + d] = acc;
        }
    }
    if (blockIdx.z != 0) return;
    if (threadIdx.x == 0) lse[(size_t)b * heads + h] = M == NEG_INF && !nan ? NEG_INF : (M + log2f(sum)) * 0.6931471805599453f;
}

// bf16 vectors as they travel (little-endian u16): queries widened exactly to f32 before the
// decode, outputs rounded to the nearest bf16 (ties to even; NaN stays a quiet NaN of its sign,
// as the host's kvcache_proto::bf16le::round) after the merge.
extern "C" __global__ void widen_bf16(const unsigned short* __restrict__ in, float* __restrict__ out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __uint_as_float(((u32)in[i]) << 16);
}
extern "C" __global__ void round_bf16(const float* __restrict__ in, unsigned short* __restrict__ out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const u32 b = __float_as_uint(in[i]);
        out[i] = (b & 0x7fffffffu) > 0x7f800000u ? (unsigned short)((b >> 16) | 0x40u)
                                                 : (unsigned short)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
    }
}

// Appended rows into their page slots: row r (`words` 4-byte words at src + r * words) goes to
// the address dst[r]. One block per row; a warm step's rows (one per plane and sequence) in one
// launch after one copy.
extern "C" __global__ void scatter_rows(const unsigned long long* __restrict__ dst, const u32* __restrict__ src,
                                        int words, int n) {
    const int r = blockIdx.x;
    if (r >= n) return;
    u32* d = reinterpret_cast<u32*>(dst[r]);
    const u32* s = src + (size_t)r * words;
    for (int i = threadIdx.x; i < words; i += blockDim.x) d[i] = s[i];
}

// Streaming read of `n` 16-byte words: the HBM read-bandwidth baseline of the bench.
extern "C" __global__ void read_bandwidth(const uint4* __restrict__ src, size_t n, u32* __restrict__ sink) {
    u32 acc = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const uint4 v = __ldg(src + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9e3779b9u) sink[0] = acc;
}
#endif
