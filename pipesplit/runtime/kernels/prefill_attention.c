/* Causal attention of several new tokens per sequence (prefill chunks) over a paged KV pool.
 *
 * The CPU flash kernel under torch's SDPA needs the context gathered into a padded tensor and an
 * additive mask, and it computes every masked score. This kernel reads the context's K/V rows
 * in place from the pools, skips the key blocks the causal (and sliding-window) mask hides, and
 * accumulates in float32 whatever the storage dtype.
 *
 * Two phases, each split over OpenMP threads:
 *  1. every (sequence, KV head, block of BLOCK_KEYS keys) is copied out of the pool as float32:
 *     K transposed ([dim][BLOCK_KEYS], so that a query's scores against the block are one vector
 *     loop), V as rows ([BLOCK_KEYS][v_dim]); keys past the context are zero;
 *  2. every (sequence, KV head, block of queries) runs an online softmax (flash attention) over
 *     the key blocks its queries see. A block's rows are its queries x the n_rep query heads that
 *     share the KV head, so each K/V block is read once for all of them.
 *
 * bfloat16 on AVX512-BF16 keeps phase 1's blocks as bfloat16 pairs for vdpbf16ps (pair_block);
 * with AMX, phase 2 multiplies them in tiles instead (amx_attend_block: scores and values as tile
 * products, the softmax in base 2 on 16 rows at once): on the AMX Xeon, 512 queries over 1,536
 * keys of SmolLM2's heads took 3.7 ms on one core against 15 ms (2 cores) with vdpbf16ps and 7.5
 * with torch's SDPA. On AVX2 without AVX-512, phase 2's float32 block products run as tiles of
 * up to 6 rows x 16 columns held in 12 registers (rows_times): on the AVX2 Zen 3, one sequence of
 * 512 queries (SmolLM2's heads, 2 threads) took 4.4-5.3 ms against 6.25 with the plain loops.
 *
 * Layouts (strides in elements) as in decode_attention.c: q [T, heads, dim] and out
 * [T, heads, v_dim] contiguous; the K row of (slot, kv head) at k + slot * k_slot + head * k_head.
 * Sequence s owns query rows row_starts[s] .. + query_lens[s] and context slots
 * slots[offsets[s] .. offsets[s + 1]) in order; its new tokens are the context's last ones, so
 * query i sits at context position C - Q + i and sees keys j <= that position (and, with
 * window > 0, j > position - window). softcap > 0 caps scores as softcap * tanh(score / softcap);
 * sinks (per query head, or NULL) add one logit to each softmax's denominator.
 */
#include "common.h"

/* AMX tile products for bfloat16 (Sapphire Rapids and later), where the compiler targets them
 * (PIPESPLIT_NO_AMX: the vdpbf16ps loops anyway) and the OS lets the process use the tiles */
#if BF16_DOT && defined(__AMX_BF16__) && defined(__AMX_TILE__) && !defined(PIPESPLIT_NO_AMX)
#define AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define AMX 0
#endif

#define BLOCK_KEYS 64
/* Query rows (queries x heads sharing a KV head) a block holds, at least. */
#define BLOCK_ROWS 48

typedef struct {
    int heads, kv_heads, n_rep, dim, v_dim, block_queries;
    int64_t k_slot, k_head, v_slot, v_head;
    float scale, softcap;
    const float *sinks;
    int64_t window;
} Shape;

/* Phase 1 for one (sequence, head, key block). */
INLINE void convert_block(int bf16, const Shape *sh, const void *k, const void *v, const int64_t *slots,
                          int64_t context, int64_t block, int head, float *restrict kt, float *restrict vr) {
    const size_t elem = bf16 ? 2 : 4;
    const int dim = sh->dim, v_dim = sh->v_dim;
    const int64_t first = block * BLOCK_KEYS;
    const int n = context - first < BLOCK_KEYS ? (int)(context - first) : BLOCK_KEYS;
    float row[dim > v_dim ? dim : v_dim];
    for (int j = 0; j < n; j++) {
        const int64_t slot = slots[first + j];
        load_row(bf16, (const char *)k + (size_t)(slot * sh->k_slot + head * sh->k_head) * elem, row, dim);
        for (int d = 0; d < dim; d++) kt[d * BLOCK_KEYS + j] = row[d];
        load_row(bf16, (const char *)v + (size_t)(slot * sh->v_slot + head * sh->v_head) * elem,
                 vr + (size_t)j * v_dim, v_dim);
    }
    for (int j = n; j < BLOCK_KEYS; j++) {
        for (int d = 0; d < dim; d++) kt[d * BLOCK_KEYS + j] = 0.0f;
        memset(vr + (size_t)j * v_dim, 0, (size_t)v_dim * sizeof *vr);
    }
}

/* The keys [*lo, *hi) of the key block at `base` that the query at context position pos sees
 * (causal, and within the window): *hi <= *lo where it sees none. */
INLINE void visible_keys(const Shape *sh, int64_t pos, int64_t base, int *lo, int *hi) {
    const int64_t end = pos + 1 - base, start = sh->window > 0 ? pos - sh->window + 1 - base : 0;
    *hi = end < BLOCK_KEYS ? (end > 0 ? (int)end : 0) : BLOCK_KEYS;
    *lo = start > 0 ? (int)start : 0;
}

/* Each of the task's rows (row r: query r / n_rep, head head * n_rep + r % n_rep) divided by its
 * softmax's sum (and the sink's weight) and stored: acc [rows][V_DIM], m the rows' maxima (in
 * base 2 with log2_units), l their sums. */
INLINE void store_rows(int bf16, const Shape *sh, float *restrict acc, const float *m, const float *l, int rows,
                       int head, int64_t first_token, void *out, int V_DIM, int log2_units) {
    const size_t elem = bf16 ? 2 : 4;
    const int n_rep = sh->n_rep, heads = sh->heads;
    for (int r = 0; r < rows; r++) {
        const int h = head * n_rep + r % n_rep;
        float total = l[r];
        if (sh->sinks)
            total += log2_units ? exp2f(sh->sinks[h] * 1.44269504088896341f - m[r]) : expf(sh->sinks[h] - m[r]);
        const float inverse = 1.0f / total;
        float *restrict ar = acc + (size_t)r * V_DIM;
        for (int i = 0; i < V_DIM; i++) ar[i] *= inverse;
        store_row(bf16, ar, (char *)out + ((size_t)(first_token + r / n_rep) * heads + h) * V_DIM * elem, V_DIM);
    }
}

#if BF16_DOT
/* Phase 1 for vdpbf16ps (bfloat16 storage, even dim, v_dim % 16 == 0): K as bf16 pairs along
 * dim, transposed (kp[d / 2][j] holds K[j][d], K[j][d + 1]); V as pairs of consecutive keys
 * (vp[j / 2][i] holds V[j][i], V[j + 1][i]). The same bytes as the bf16 rows, in the block's
 * float buffer. */
INLINE void pair_block(const Shape *sh, const uint16_t *k, const uint16_t *v, const int64_t *slots, int64_t context,
                       int64_t block, int head, uint32_t *restrict kp, uint32_t *restrict vp) {
    const int pairs = sh->dim / 2, v_dim = sh->v_dim;
    const int64_t first = block * BLOCK_KEYS;
    const int n = context - first < BLOCK_KEYS ? (int)(context - first) : BLOCK_KEYS;
    for (int j = 0; j < BLOCK_KEYS; j++) {
        const uint32_t *row = j < n ? (const uint32_t *)(k + slots[first + j] * sh->k_slot + head * sh->k_head) : NULL;
        for (int d = 0; d < pairs; d++) kp[d * BLOCK_KEYS + j] = row ? row[d] : 0u;
    }
    for (int j = 0; j < BLOCK_KEYS; j += 2) {
        const uint16_t *a = j < n ? v + slots[first + j] * sh->v_slot + head * sh->v_head : NULL;
        const uint16_t *b = j + 1 < n ? v + slots[first + j + 1] * sh->v_slot + head * sh->v_head : NULL;
        uint32_t *out = vp + (size_t)(j / 2) * v_dim;
        if (a && b)
            for (int i = 0; i < v_dim; i++) out[i] = (uint32_t)a[i] | (uint32_t)b[i] << 16;
        else if (a)
            for (int i = 0; i < v_dim; i++) out[i] = (uint32_t)a[i];
        else
            memset(out, 0, (size_t)v_dim * sizeof *out);
    }
}

/* block_scores on bf16 pairs: s[r][j] = scale * sum_d q[r][d] k[j][d], qp [rows][DIM / 2]. */
INLINE void block_scores_dot(const uint32_t *restrict qp, const uint32_t *restrict kp, float *restrict s, int rows,
                             int DIM, float scale) {
    const int pairs = DIM / 2, lanes = BLOCK_KEYS / 16;
    const __m512 scaled = _mm512_set1_ps(scale);
    int r = 0;
    for (; r + 4 <= rows; r += 4) {
        __m512 a[4][BLOCK_KEYS / 16];
        for (int x = 0; x < 4; x++)
            for (int c = 0; c < lanes; c++) a[x][c] = _mm512_setzero_ps();
        for (int d = 0; d < pairs; d++) {
            __m512bh kd[BLOCK_KEYS / 16];
            for (int c = 0; c < lanes; c++) kd[c] = (__m512bh)_mm512_loadu_si512(kp + d * BLOCK_KEYS + 16 * c);
            for (int x = 0; x < 4; x++) {
                const __m512bh qd = (__m512bh)_mm512_set1_epi32((int)qp[(size_t)(r + x) * pairs + d]);
                for (int c = 0; c < lanes; c++) a[x][c] = _mm512_dpbf16_ps(a[x][c], qd, kd[c]);
            }
        }
        for (int x = 0; x < 4; x++)
            for (int c = 0; c < lanes; c++)
                _mm512_storeu_ps(s + (size_t)(r + x) * BLOCK_KEYS + 16 * c, _mm512_mul_ps(a[x][c], scaled));
    }
    for (; r < rows; r++) {
        __m512 a[BLOCK_KEYS / 16];
        for (int c = 0; c < lanes; c++) a[c] = _mm512_setzero_ps();
        for (int d = 0; d < pairs; d++) {
            const __m512bh qd = (__m512bh)_mm512_set1_epi32((int)qp[(size_t)r * pairs + d]);
            for (int c = 0; c < lanes; c++)
                a[c] = _mm512_dpbf16_ps(a[c], qd, (__m512bh)_mm512_loadu_si512(kp + d * BLOCK_KEYS + 16 * c));
        }
        for (int c = 0; c < lanes; c++) _mm512_storeu_ps(s + (size_t)r * BLOCK_KEYS + 16 * c, _mm512_mul_ps(a[c], scaled));
    }
}

/* block_values on bf16 pairs: acc[r][:] += sum_j p[r][j] v[j][:], the weights p (already
 * bfloat16 values) paired along j; two rows at a time. */
INLINE void block_values_dot(const float *restrict p, const uint32_t *restrict vp, float *restrict acc, int rows,
                             int V_DIM) {
    const int lanes = V_DIM / 16;
    for (int r = 0; r < rows; r += 2) {
        const int both = r + 1 < rows;
        uint32_t w[2][BLOCK_KEYS / 2];
        for (int x = 0; x < 2; x++) {
            const float *pr = p + (size_t)(both || x == 0 ? r + x : r) * BLOCK_KEYS;
            for (int j = 0; j < BLOCK_KEYS / 2; j++)
                w[x][j] = (uint32_t)float_to_bf16(pr[2 * j]) | (uint32_t)float_to_bf16(pr[2 * j + 1]) << 16;
        }
        __m512 a[2][V_DIM / 16];
        for (int x = 0; x < 2; x++)
            for (int c = 0; c < lanes; c++) a[x][c] = _mm512_loadu_ps(acc + (size_t)(both ? r + x : r) * V_DIM + 16 * c);
        for (int j = 0; j < BLOCK_KEYS / 2; j++) {
            const __m512bh w0 = (__m512bh)_mm512_set1_epi32((int)w[0][j]), w1 = (__m512bh)_mm512_set1_epi32((int)w[1][j]);
            for (int c = 0; c < lanes; c++) {
                const __m512bh vj = (__m512bh)_mm512_loadu_si512(vp + (size_t)j * V_DIM + 16 * c);
                a[0][c] = _mm512_dpbf16_ps(a[0][c], w0, vj);
                a[1][c] = _mm512_dpbf16_ps(a[1][c], w1, vj);
            }
        }
        for (int c = 0; c < lanes; c++) _mm512_storeu_ps(acc + (size_t)r * V_DIM + 16 * c, a[0][c]);
        if (both)
            for (int c = 0; c < lanes; c++) _mm512_storeu_ps(acc + (size_t)(r + 1) * V_DIM + 16 * c, a[1][c]);
    }
}
#endif

#if AMX
/* -- AMX: both products of a block as tile products ----------------------------------------------
 * Every tile is 16 rows x 64 bytes. Scores: C (16 rows x 16 keys) += the query rows (16 x 32 dims,
 * the A tile) x the keys' dim pairs (16 pairs x 16 keys, pair_block's layout, the B tile); tiles
 * 0/1 hold C for 32 keys, 2 A, 3/4 B. Values: C = the accumulator (16 rows x 16 columns, loaded
 * and stored back), A = the weights (16 rows x 32 keys in bfloat16), B = the values' key pairs (16
 * pairs x 16 columns, pair_block's layout). The online softmax between them runs on 16 lanes. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* GCC's _tile_loadd and _tile_loadconfig do not tell the compiler that they read memory, so the
 * stores that fill it may be moved after them: these do. */
#define TILE_LOAD(T, BASE, STRIDE) \
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #T ::"r"((const void *)(BASE)), "r"((long)(STRIDE)) : "memory")
#define TILE_STORE(T, BASE, STRIDE) \
    __asm__ volatile("tilestored %%tmm" #T ", (%0,%1,1)" ::"r"((void *)(BASE)), "r"((long)(STRIDE)) : "memory")
INLINE void tile_config_load(const tile_config *c) { __asm__ volatile("ldtilecfg %0" ::"m"(*c) : "memory"); }
INLINE void tile_config_store(tile_config *c) { __asm__ volatile("sttilecfg %0" : "=m"(*c)::"memory"); }

/* Whether this process may use the tile registers (Linux has a process ask for them once). */
static int amx_permitted(void) {
    static int state; /* 0: not asked yet, 1: yes, -1: no */
    int known = __atomic_load_n(&state, __ATOMIC_RELAXED);
    if (known == 0) {
        known = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0 ? 1 : -1;
        __atomic_store_n(&state, known, __ATOMIC_RELAXED);
    }
    return known > 0;
}

INLINE tile_config amx_config(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 5; t++) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    return c;
}

/* Queries per task: whole tiles of rows (queries x n_rep), about 64 rows. */
INLINE int amx_block_queries(int n_rep) {
    int unit = 1;
    while ((unit * n_rep) % 16) unit++;
    const int rows = unit * n_rep;
    return unit * (rows < 64 ? 64 / rows : 1);
}
/* The online softmax of one tile's 16 rows over a key block, in base 2 (m holds each row's running
 * maximum of score * scale * log2(e), l its sum of weights): the scores s become bfloat16 weights
 * p, the accumulator rows are rescaled where the maximum grew. The rows' maxima and sums come
 * out of transposing trees, 16 rows at once. */
INLINE void amx_softmax_tile(const Shape *sh, float *restrict s, uint16_t *restrict p, float *restrict acc,
                             float *restrict m, float *restrict l, int t, int rows, int cut, int64_t base,
                             int64_t first_pos, int V_DIM) {
    const int n_rep = sh->n_rep;
    uint64_t seen[16]; /* the keys of the block each row sees */
    for (int i = 0; i < 16; i++) {
        const int r = 16 * t + i;
        int lo = 0, hi = BLOCK_KEYS;
        if (r >= rows) {
            hi = 0;
        } else if (cut) {
            visible_keys(sh, first_pos + r / n_rep, base, &lo, &hi);
        }
        seen[i] = hi <= lo ? 0 : (hi == 64 ? ~0ull : (1ull << hi) - 1) & ~((1ull << lo) - 1);
        if (seen[i] && sh->softcap > 0.0f) {
            float *restrict sr = s + (size_t)r * BLOCK_KEYS;
            for (int j = 0; j < BLOCK_KEYS; j++) sr[j] = sh->softcap * tanhf(sr[j] * sh->scale / sh->softcap);
        }
    }
    const float scale = (sh->softcap > 0.0f ? 1.0f : sh->scale) * 1.44269504088896341f;
    const __m512 scaled = _mm512_set1_ps(scale), minus_inf = _mm512_set1_ps(-INFINITY);
    __m512 v[16];
    for (int i = 0; i < 16; i++) { /* each row's maximum, 16 lanes wide */
        const float *sr = s + (size_t)(16 * t + i) * BLOCK_KEYS;
        v[i] = minus_inf;
        for (int c = 0; c < BLOCK_KEYS / 16; c++)
            v[i] = _mm512_mask_max_ps(v[i], (__mmask16)(seen[i] >> (16 * c)), v[i],
                                      _mm512_mul_ps(_mm512_loadu_ps(sr + 16 * c), scaled));
    }
    const __m512 old = _mm512_loadu_ps(m + 16 * t), top = _mm512_max_ps(old, lanes16(v, 1));
    const __mmask16 any = _mm512_cmp_ps_mask(top, minus_inf, _CMP_NEQ_OQ); /* rows that have seen a key */
    const __m512 correction = _mm512_mask_mov_ps(_mm512_set1_ps(1.0f), any,
                                                 exp2_nonpositive16(_mm512_sub_ps(old, top)));
    float tops[16], corrections[16];
    _mm512_storeu_ps(tops, top);
    _mm512_storeu_ps(corrections, correction);
    for (int i = 0; i < 16; i++) { /* the weights, rounded to bfloat16 for the tiles, and their sums */
        const int r = 16 * t + i;
        const float *sr = s + (size_t)r * BLOCK_KEYS;
        uint16_t *restrict pr = p + (size_t)r * BLOCK_KEYS;
        v[i] = _mm512_setzero_ps();
        if (!seen[i]) {
            memset(pr, 0, BLOCK_KEYS * sizeof *pr);
            continue;
        }
        const __m512 row_top = _mm512_set1_ps(tops[i]);
        for (int c = 0; c < BLOCK_KEYS / 16; c++) {
            const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(sr + 16 * c), scaled, row_top);
            const __m512 e = _mm512_maskz_mov_ps((__mmask16)(seen[i] >> (16 * c)), exp2_nonpositive16(x));
            _mm256_storeu_si256((__m256i *)(pr + 16 * c), (__m256i)_mm512_cvtneps_pbh(e));
            v[i] = _mm512_add_ps(v[i], e);
        }
    }
    _mm512_storeu_ps(l + 16 * t, _mm512_fmadd_ps(_mm512_loadu_ps(l + 16 * t), correction, lanes16(v, 0)));
    _mm512_storeu_ps(m + 16 * t, top);
    for (unsigned grew = _mm512_cmp_ps_mask(correction, _mm512_set1_ps(1.0f), _CMP_NEQ_OQ); grew; grew &= grew - 1) {
        const int i = __builtin_ctz(grew);
        const __m512 f = _mm512_set1_ps(corrections[i]);
        float *restrict ar = acc + (size_t)(16 * t + i) * V_DIM;
        for (int x = 0; x < V_DIM; x += 16) _mm512_storeu_ps(ar + x, _mm512_mul_ps(_mm512_loadu_ps(ar + x), f));
    }
}

/* Phase 2 of attend_block with tile products: bfloat16, DIM % 32 == 0, V_DIM % 32 == 0, blocks
 * as pair_block lays them out. work: the query rows (bf16, rows rounded up to 16 x DIM), the
 * weights (bf16, x BLOCK_KEYS), the scores, the accumulator, m, l. */
INLINE void amx_attend_block(const Shape *sh, const uint16_t *q, uint16_t *out, int64_t row_start, int64_t Q,
                             int64_t C, int64_t q0, int nq, int head, const float *blocks, float *work, int DIM,
                             int V_DIM) {
    const size_t per_block = (size_t)BLOCK_KEYS * (DIM + V_DIM);
    const int n_rep = sh->n_rep, heads = sh->heads, rows = nq * n_rep, tiles = (rows + 15) / 16;
    const int padded = tiles * 16;
    uint16_t *restrict qb = (uint16_t *)work, *restrict p = qb + (size_t)padded * DIM;
    float *restrict s = (float *)(p + (size_t)padded * BLOCK_KEYS), *restrict acc = s + (size_t)padded * BLOCK_KEYS,
                    *restrict m = acc + (size_t)padded * V_DIM, *restrict l = m + padded;
    for (int r = 0; r < rows; r++) { /* row r = query r / n_rep, head head * n_rep + r % n_rep */
        const int64_t token = row_start + q0 + r / n_rep;
        memcpy(qb + (size_t)r * DIM, q + ((size_t)token * heads + head * n_rep + r % n_rep) * DIM, (size_t)DIM * 2);
    }
    for (int r = 0; r < padded; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(qb + (size_t)rows * DIM, 0, (size_t)(padded - rows) * DIM * 2);
    memset(acc, 0, (size_t)padded * V_DIM * sizeof *acc);
    const int64_t first_pos = C - Q + q0, last_pos = first_pos + nq - 1;
    const int64_t lowest = sh->window > 0 ? first_pos - sh->window + 1 : 0;
    const int64_t b_first = lowest > 0 ? lowest / BLOCK_KEYS : 0, b_last = last_pos / BLOCK_KEYS;
    for (int64_t b = b_first; b <= b_last; b++) {
        const int64_t base = b * BLOCK_KEYS;
        const uint32_t *kp = (const uint32_t *)(blocks + (size_t)b * per_block), *vp = kp + (size_t)DIM / 2 * BLOCK_KEYS;
        for (int t = 0; t < tiles; t++)
            for (int half = 0; half < BLOCK_KEYS; half += 32) {
                _tile_zero(0);
                _tile_zero(1);
                for (int e = 0; e < DIM / 32; e++) {
                    TILE_LOAD(2, qb + (size_t)t * 16 * DIM + e * 32, DIM * 2);
                    TILE_LOAD(3, kp + (size_t)e * 16 * BLOCK_KEYS + half, BLOCK_KEYS * 4);
                    TILE_LOAD(4, kp + (size_t)e * 16 * BLOCK_KEYS + half + 16, BLOCK_KEYS * 4);
                    _tile_dpbf16ps(0, 2, 3);
                    _tile_dpbf16ps(1, 2, 4);
                }
                TILE_STORE(0, s + (size_t)t * 16 * BLOCK_KEYS + half, BLOCK_KEYS * 4);
                TILE_STORE(1, s + (size_t)t * 16 * BLOCK_KEYS + half + 16, BLOCK_KEYS * 4);
            }
        const int cut = base + BLOCK_KEYS - 1 > first_pos || (sh->window > 0 && base <= last_pos - sh->window);
        for (int t = 0; t < tiles; t++) amx_softmax_tile(sh, s, p, acc, m, l, t, rows, cut, base, first_pos, V_DIM);
        for (int t = 0; t < tiles; t++)
            for (int col = 0; col < V_DIM; col += 32) {
                float *a = acc + (size_t)t * 16 * V_DIM + col;
                TILE_LOAD(0, a, V_DIM * 4);
                TILE_LOAD(1, a + 16, V_DIM * 4);
                for (int half = 0; half < BLOCK_KEYS; half += 32) {
                    TILE_LOAD(2, p + (size_t)t * 16 * BLOCK_KEYS + half, BLOCK_KEYS * 2);
                    TILE_LOAD(3, vp + (size_t)half / 2 * V_DIM + col, V_DIM * 4);
                    TILE_LOAD(4, vp + (size_t)half / 2 * V_DIM + col + 16, V_DIM * 4);
                    _tile_dpbf16ps(0, 2, 3);
                    _tile_dpbf16ps(1, 2, 4);
                }
                TILE_STORE(0, a, V_DIM * 4);
                TILE_STORE(1, a + 16, V_DIM * 4);
            }
    }
    store_rows(1, sh, acc, m, l, rows, head, row_start + q0, out, V_DIM, 1);
}

/* The work floats amx_attend_block needs for block_queries queries. */
INLINE size_t amx_work_floats(int block_queries, int n_rep, int dim, int v_dim) {
    const size_t padded = (size_t)(block_queries * n_rep + 15) / 16 * 16;
    return padded * ((size_t)dim / 2 + BLOCK_KEYS / 2 + BLOCK_KEYS + v_dim + 2);
}
#endif

#if VEC256
/* out[r][c .. c + 16) (+)= sum_t a[r][t] * b[t][c .. c + 16) for R <= 6 rows (strides lda, ldb, ldo):
 * 12 accumulators in registers, each load of b shared by the R rows (the compiler's loops over
 * four whole rows of 64 floats keep their sums in memory instead). */
INLINE void rows_times_16(const int R, const float *restrict a, int lda, const float *restrict b, int ldb, int T,
                          float *restrict out, int ldo, int accumulate) {
    __m256 acc[6][2];
    for (int r = 0; r < R; r++) {
        acc[r][0] = accumulate ? _mm256_loadu_ps(out + (size_t)r * ldo) : _mm256_setzero_ps();
        acc[r][1] = accumulate ? _mm256_loadu_ps(out + (size_t)r * ldo + 8) : _mm256_setzero_ps();
    }
    for (int t = 0; t < T; t++) {
        const __m256 b0 = _mm256_loadu_ps(b + (size_t)t * ldb), b1 = _mm256_loadu_ps(b + (size_t)t * ldb + 8);
        for (int r = 0; r < R; r++) {
            const __m256 x = _mm256_broadcast_ss(a + (size_t)r * lda + t);
            acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(out + (size_t)r * ldo, acc[r][0]);
        _mm256_storeu_ps(out + (size_t)r * ldo + 8, acc[r][1]);
    }
}

/* out [rows][N] (+)= a [rows][T] x b [T][N] for N a multiple of 16, in tiles of rows_times_16. */
INLINE void rows_times(const float *restrict a, int lda, const float *restrict b, int ldb, int T, float *restrict out,
                       int ldo, int rows, int N, int accumulate) {
    for (int r = 0; r < rows; r += 6) {
        const float *ar = a + (size_t)r * lda;
        float *o = out + (size_t)r * ldo;
        for (int c = 0; c < N; c += 16) {
            switch (rows - r < 6 ? rows - r : 6) {
            case 1: rows_times_16(1, ar, lda, b + c, ldb, T, o + c, ldo, accumulate); break;
            case 2: rows_times_16(2, ar, lda, b + c, ldb, T, o + c, ldo, accumulate); break;
            case 3: rows_times_16(3, ar, lda, b + c, ldb, T, o + c, ldo, accumulate); break;
            case 4: rows_times_16(4, ar, lda, b + c, ldb, T, o + c, ldo, accumulate); break;
            case 5: rows_times_16(5, ar, lda, b + c, ldb, T, o + c, ldo, accumulate); break;
            default: rows_times_16(6, ar, lda, b + c, ldb, T, o + c, ldo, accumulate); break;
            }
        }
    }
}
#endif

/* Scores of `rows` query rows (qf, [rows][DIM], scaled) against one transposed key block:
 * s[r][j] = sum_d qf[r][d] * kt[d][j]. Four rows at a time share each load of kt. */
INLINE void block_scores(const float *restrict qf, const float *restrict kt, float *restrict s, int rows,
                         int DIM) {
#if VEC256
    rows_times(qf, DIM, kt, BLOCK_KEYS, DIM, s, BLOCK_KEYS, rows, BLOCK_KEYS, 0);
#else
    int r = 0;
    for (; r + 4 <= rows; r += 4) {
        float s0[BLOCK_KEYS] = {0}, s1[BLOCK_KEYS] = {0}, s2[BLOCK_KEYS] = {0}, s3[BLOCK_KEYS] = {0};
        const float *q0 = qf + (size_t)r * DIM, *q1 = q0 + DIM, *q2 = q1 + DIM, *q3 = q2 + DIM;
        for (int d = 0; d < DIM; d++) {
            const float *kd = kt + d * BLOCK_KEYS;
            const float a0 = q0[d], a1 = q1[d], a2 = q2[d], a3 = q3[d];
            for (int j = 0; j < BLOCK_KEYS; j++) {
                s0[j] += a0 * kd[j];
                s1[j] += a1 * kd[j];
                s2[j] += a2 * kd[j];
                s3[j] += a3 * kd[j];
            }
        }
        memcpy(s + (size_t)r * BLOCK_KEYS, s0, sizeof s0);
        memcpy(s + (size_t)(r + 1) * BLOCK_KEYS, s1, sizeof s1);
        memcpy(s + (size_t)(r + 2) * BLOCK_KEYS, s2, sizeof s2);
        memcpy(s + (size_t)(r + 3) * BLOCK_KEYS, s3, sizeof s3);
    }
    for (; r < rows; r++) {
        float s0[BLOCK_KEYS] = {0};
        const float *q0 = qf + (size_t)r * DIM;
        for (int d = 0; d < DIM; d++)
            for (int j = 0; j < BLOCK_KEYS; j++) s0[j] += q0[d] * kt[d * BLOCK_KEYS + j];
        memcpy(s + (size_t)r * BLOCK_KEYS, s0, sizeof s0);
    }
#endif
}

/* acc[r][:] += sum_j p[r][j] * vr[j][:] over `rows` rows; four rows share each load of vr. */
INLINE void block_values(const float *restrict p, const float *restrict vr, float *restrict acc, int rows,
                         int V_DIM) {
#if VEC256
    if (V_DIM % 16 == 0) {
        rows_times(p, BLOCK_KEYS, vr, V_DIM, BLOCK_KEYS, acc, V_DIM, rows, V_DIM, 1);
        return;
    }
#endif
    int r = 0;
    for (; r + 4 <= rows; r += 4) {
        float *a0 = acc + (size_t)r * V_DIM, *a1 = a0 + V_DIM, *a2 = a1 + V_DIM, *a3 = a2 + V_DIM;
        const float *p0 = p + (size_t)r * BLOCK_KEYS, *p1 = p0 + BLOCK_KEYS, *p2 = p1 + BLOCK_KEYS,
                    *p3 = p2 + BLOCK_KEYS;
        for (int j = 0; j < BLOCK_KEYS; j++) {
            const float *vj = vr + (size_t)j * V_DIM;
            const float b0 = p0[j], b1 = p1[j], b2 = p2[j], b3 = p3[j];
            for (int i = 0; i < V_DIM; i++) {
                a0[i] += b0 * vj[i];
                a1[i] += b1 * vj[i];
                a2[i] += b2 * vj[i];
                a3[i] += b3 * vj[i];
            }
        }
    }
    for (; r < rows; r++)
        for (int j = 0; j < BLOCK_KEYS; j++)
            for (int i = 0; i < V_DIM; i++) acc[(size_t)r * V_DIM + i] += p[(size_t)r * BLOCK_KEYS + j] * vr[(size_t)j * V_DIM + i];
}

/* Phase 2 for one (sequence, head, query block): queries q0 .. q0 + nq of a sequence with
 * query_len Q and context C. blocks: the sequence's converted key blocks for this head, each
 * DIM * BLOCK_KEYS floats of K then BLOCK_KEYS * V_DIM of V. work: the task's scratch (qf, acc,
 * s, m, l). */
INLINE void attend_block(int bf16, int dot, const Shape *sh, const void *q, void *out, int64_t row_start, int64_t Q,
                         int64_t C, int64_t q0, int nq, int head, const float *blocks, float *work, int DIM,
                         int V_DIM) {
    const size_t per_block = (size_t)BLOCK_KEYS * (DIM + V_DIM);
    const size_t elem = bf16 ? 2 : 4;
    const int n_rep = sh->n_rep, heads = sh->heads, rows = nq * n_rep;
    float *restrict qf = work, *restrict acc = qf + (size_t)rows * DIM, *restrict s = acc + (size_t)rows * V_DIM,
                    *restrict m = s + (size_t)rows * BLOCK_KEYS, *restrict l = m + rows;
    /* row r = query (r / n_rep), head head * n_rep + r % n_rep */
    for (int r = 0; r < rows; r++) {
        const int64_t token = row_start + q0 + r / n_rep;
        const int h = head * n_rep + r % n_rep;
        if (dot) { /* the query's bf16 pairs as they are: the scale multiplies the scores */
            memcpy((uint32_t *)qf + (size_t)r * DIM / 2, (const char *)q + ((size_t)token * heads + h) * DIM * elem, DIM * 2);
        } else {
            load_row(bf16, (const char *)q + ((size_t)token * heads + h) * DIM * elem, qf + (size_t)r * DIM, DIM);
            for (int d = 0; d < DIM; d++) qf[(size_t)r * DIM + d] *= sh->scale;
        }
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(acc, 0, (size_t)rows * V_DIM * sizeof *acc);
    const int64_t first_pos = C - Q + q0, last_pos = first_pos + nq - 1; /* context positions */
    const int64_t lowest = sh->window > 0 ? first_pos - sh->window + 1 : 0; /* first key any row sees */
    const int64_t b_first = lowest > 0 ? lowest / BLOCK_KEYS : 0, b_last = last_pos / BLOCK_KEYS;
    for (int64_t b = b_first; b <= b_last; b++) {
        const int64_t base = b * BLOCK_KEYS;
        const float *kt = blocks + (size_t)b * per_block;
#if BF16_DOT
        if (dot) block_scores_dot((const uint32_t *)qf, (const uint32_t *)kt, s, rows, DIM, sh->scale);
        else
#endif
            block_scores(qf, kt, s, rows, DIM);
        /* the block is cut for some rows if a key lies past the first query or, with a window,
         * before the last query's window */
        const int cut = base + BLOCK_KEYS - 1 > first_pos || (sh->window > 0 && base <= last_pos - sh->window);
        for (int r = 0; r < rows; r++) {
            float *restrict sr = s + (size_t)r * BLOCK_KEYS;
            if (sh->softcap > 0.0f)
                for (int j = 0; j < BLOCK_KEYS; j++) sr[j] = sh->softcap * tanhf(sr[j] / sh->softcap);
            int lo = 0, hi = BLOCK_KEYS; /* the keys of this block the row sees: [lo, hi) */
            if (cut) {
                visible_keys(sh, first_pos + r / n_rep, base, &lo, &hi);
                if (hi <= lo) {
                    memset(sr, 0, BLOCK_KEYS * sizeof *sr);
                    continue;
                }
            }
            float top = m[r];
            for (int j = lo; j < hi; j++) top = sr[j] > top ? sr[j] : top;
            const float correction = exp_nonpositive(m[r] - top); /* 0 while m is -inf */
            float sum = 0.0f;
            for (int j = lo; j < hi; j++) {
                sr[j] = exp_nonpositive(sr[j] - top);
                if (dot) sr[j] = round_to(1, sr[j]); /* the weights vdpbf16ps sums, and their sum */
                sum += sr[j];
            }
            for (int j = 0; j < lo; j++) sr[j] = 0.0f;
            for (int j = hi; j < BLOCK_KEYS; j++) sr[j] = 0.0f;
            l[r] = l[r] * correction + sum;
            m[r] = top;
            if (correction != 1.0f)
                for (int i = 0; i < V_DIM; i++) acc[(size_t)r * V_DIM + i] *= correction;
        }
#if BF16_DOT
        if (dot) block_values_dot(s, (const uint32_t *)kt + (size_t)DIM / 2 * BLOCK_KEYS, acc, rows, V_DIM);
        else
#endif
            block_values(s, kt + (size_t)DIM * BLOCK_KEYS, acc, rows, V_DIM);
    }
    store_rows(bf16, sh, acc, m, l, rows, head, row_start + q0, out, V_DIM, 0);
}

INLINE void attend_shaped(int bf16, int dot, const Shape *sh, const void *q, void *out, int64_t row_start,
                          int64_t Q, int64_t C, int64_t q0, int nq, int head, const float *blocks, float *work) {
#define ATTEND(DIM, V_DIM) \
    attend_block(bf16, dot, sh, q, out, row_start, Q, C, q0, nq, head, blocks, work, DIM, V_DIM)
    if (sh->dim == 64 && sh->v_dim == 64) ATTEND(64, 64);
    else if (sh->dim == 128 && sh->v_dim == 128) ATTEND(128, 128);
    else ATTEND(sh->dim, sh->v_dim);
#undef ATTEND
}

static int run(int bf16, const void *q, const void *k, const void *v, void *out, const int64_t *slots,
               const int64_t *offsets, const int64_t *row_starts, const int64_t *query_lens, int64_t num_seqs,
               int heads, int kv_heads, int dim, int v_dim, int64_t k_slot, int64_t k_head, int64_t v_slot,
               int64_t v_head, float scale, float softcap, const float *sinks, int64_t window, int threads) {
    if (kv_heads <= 0 || heads % kv_heads != 0 || dim <= 0 || v_dim <= 0 || dim > MAX_ROW_FLOATS ||
        v_dim > MAX_ROW_FLOATS)
        return 1;
    const int n_rep = heads / kv_heads;
    /* vdpbf16ps where the CPU has it and the shapes pair up */
    const int dot = BF16_DOT && bf16 && dim % 2 == 0 && v_dim % 16 == 0;
    Shape sh = {heads, kv_heads, n_rep, dim, v_dim, (BLOCK_ROWS + n_rep - 1) / n_rep,
                k_slot, k_head, v_slot, v_head, scale, softcap, sinks, window};
#if AMX /* and tile products where the CPU and the OS allow them and the shapes fill tiles */
    const int amx = dot && dim % 32 == 0 && v_dim % 32 == 0 && amx_permitted();
    if (amx) sh.block_queries = amx_block_queries(n_rep);
#endif
    /* where each sequence's converted blocks start (in blocks), and its query blocks */
    int64_t *block_start = malloc((size_t)(num_seqs + 1) * 2 * sizeof(int64_t));
    if (!block_start) return 3;
    int64_t *task_start = block_start + num_seqs + 1;
    block_start[0] = task_start[0] = 0;
    for (int64_t s = 0; s < num_seqs; s++) {
        const int64_t C = offsets[s + 1] - offsets[s], Q = query_lens[s];
        if (Q <= 0 || C < Q) {
            free(block_start);
            return 2;
        }
        block_start[s + 1] = block_start[s] + (C + BLOCK_KEYS - 1) / BLOCK_KEYS;
        task_start[s + 1] = task_start[s] + (Q + sh.block_queries - 1) / sh.block_queries;
    }
    const int64_t blocks = block_start[num_seqs], per_block = (int64_t)BLOCK_KEYS * (dim + v_dim);
    float *converted = malloc((size_t)(blocks * kv_heads * per_block) * sizeof(float));
    if (!converted) {
        free(block_start);
        return 3;
    }
    /* block (s, head, b) at converted + ((block_start[s] * kv_heads + head * nb_s + b) * per_block):
     * its K part first (dim * BLOCK_KEYS), then V (BLOCK_KEYS * v_dim) */
    int failed = 0;
    size_t work_floats = (size_t)(sh.block_queries * n_rep) * (dim + v_dim + BLOCK_KEYS + 2);
#if AMX
    if (amx) work_floats = amx_work_floats(sh.block_queries, n_rep, dim, v_dim);
#endif
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(dynamic, 4)
        for (int64_t t = 0; t < blocks * kv_heads; t++) {
            /* t = block_start[s] * kv_heads + head * nb_s + b, sequence by sequence */
            int64_t s = 0;
            while (block_start[s + 1] * kv_heads <= t) s++;
            const int64_t nb = block_start[s + 1] - block_start[s], local = t - block_start[s] * kv_heads;
            const int head = (int)(local / nb);
            const int64_t b = local % nb;
            float *kt = converted + (size_t)t * per_block;
            const int64_t C = offsets[s + 1] - offsets[s];
#if BF16_DOT
            if (dot)
                pair_block(&sh, k, v, slots + offsets[s], C, b, head, (uint32_t *)kt,
                           (uint32_t *)kt + (size_t)dim / 2 * BLOCK_KEYS);
            else
#endif
            if (bf16) convert_block(1, &sh, k, v, slots + offsets[s], C, b, head, kt, kt + (size_t)dim * BLOCK_KEYS);
            else convert_block(0, &sh, k, v, slots + offsets[s], C, b, head, kt, kt + (size_t)dim * BLOCK_KEYS);
        }
        float *work = aligned_alloc(64, (work_floats * sizeof(float) + 63) / 64 * 64);
        if (!work) {
#pragma omp atomic write
            failed = 3;
        }
#if AMX
        /* the tile registers as this thread had them (oneDNN's GEMMs configure their own), put back below */
        tile_config saved;
        if (amx) {
            tile_config_store(&saved);
            const tile_config mine = amx_config();
            tile_config_load(&mine);
        }
#endif
        const int64_t tasks = task_start[num_seqs] * kv_heads;
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++) {
            if (!work) continue;
            int64_t s = 0;
            while (task_start[s + 1] * kv_heads <= t) s++;
            const int64_t nt = task_start[s + 1] - task_start[s], local = t - task_start[s] * kv_heads;
            const int head = (int)(local / nt);
            const int64_t qb = local % nt, Q = query_lens[s], C = offsets[s + 1] - offsets[s];
            const int64_t q0 = qb * sh.block_queries;
            const int nq = (int)(Q - q0 < sh.block_queries ? Q - q0 : sh.block_queries);
            const int64_t nb = block_start[s + 1] - block_start[s];
            const float *head_blocks = converted + (size_t)(block_start[s] * kv_heads + head * nb) * per_block;
#if AMX
            if (amx && dim == 64 && v_dim == 64)
                amx_attend_block(&sh, q, out, row_starts[s], Q, C, q0, nq, head, head_blocks, work, 64, 64);
            else if (amx)
                amx_attend_block(&sh, q, out, row_starts[s], Q, C, q0, nq, head, head_blocks, work, dim, v_dim);
            else
#endif
            if (dot) attend_shaped(1, 1, &sh, q, out, row_starts[s], Q, C, q0, nq, head, head_blocks, work);
            else if (bf16) attend_shaped(1, 0, &sh, q, out, row_starts[s], Q, C, q0, nq, head, head_blocks, work);
            else attend_shaped(0, 0, &sh, q, out, row_starts[s], Q, C, q0, nq, head, head_blocks, work);
        }
#if AMX
        if (amx) {
            if (saved.palette)
                tile_config_load(&saved);
            else
                _tile_release();
        }
#endif
        free(work);
    }
    free(converted);
    free(block_start);
    return failed;
}

/* Whether bfloat16 prefill chunks multiply in AMX tiles here (the compiler targets them and the OS
 * grants them; the shapes must fill tiles too). */
int prefill_tiles(void) {
#if AMX
    return amx_permitted();
#else
    return 0;
#endif
}

#define ENTRY(NAME, BF16)                                                                                  \
    int NAME(const void *q, const void *k, const void *v, void *out, const int64_t *slots, const int64_t *offsets, \
             const int64_t *row_starts, const int64_t *query_lens, int64_t num_seqs, int heads, int kv_heads,  \
             int dim, int v_dim, int64_t k_slot, int64_t k_head, int64_t v_slot, int64_t v_head, float scale,  \
             float softcap, const float *sinks, int64_t window, int threads) {                              \
        return run(BF16, q, k, v, out, slots, offsets, row_starts, query_lens, num_seqs, heads, kv_heads, dim, \
                   v_dim, k_slot, k_head, v_slot, v_head, scale, softcap, sinks, window, threads);           \
    }

ENTRY(prefill_attention_bf16, 1)
ENTRY(prefill_attention_f32, 0)
