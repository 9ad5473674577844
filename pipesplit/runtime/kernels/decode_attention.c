/* Decode attention over a paged KV pool, read in place.
 *
 * One query token per sequence attends to its whole context, whose K/V rows sit at arbitrary
 * slots of the pools: each row is read once, straight from the pool, with no gathered copy and
 * no padding to the longest context of the batch. Scores, sums and the output accumulate in
 * float32 whatever the storage dtype (as the CPU flash kernel does). Work is split over
 * (sequence, KV head) pairs with OpenMP; the library links against the OpenMP runtime torch has
 * already loaded.
 *
 * Layouts (strides in elements): q [S, heads, dim] contiguous; out [S, heads, v_dim] contiguous;
 * the K row of (slot, kv head) starts at k + slot * k_slot + head * k_head (dim contiguous
 * elements), V likewise with v_slot, v_head (v_dim elements). Query head h reads KV head
 * h / (heads / kv_heads). slots: every sequence's context slots concatenated; sequence s owns
 * slots[offsets[s] .. offsets[s + 1]). window > 0 keeps each query's last `window` keys;
 * softcap > 0 caps scores as softcap * tanh(score / softcap); sinks (per query head, or NULL)
 * add one logit to each softmax's denominator that attends to nothing.
 */
#include <stdlib.h>

#include "common.h"

/* Floats a task keeps on its stack (query, accumulator): 256 KiB. Larger heads are refused and
 * the caller attends with torch. */
#define MAX_STACK_FLOATS 65536
/* Rows ahead whose cache lines are asked for: a context's slots are scattered over the pool
 * (decode tokens of the running sequences interleave), which the hardware prefetcher cannot follow. */
#define PREFETCH_ROWS 16

INLINE void prefetch_row(const char *row, size_t bytes) {
    for (size_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, 3);
}

/* The K and V rows of (slot, head), asked for during the score pass: the V rows are then in cache
 * when the value pass reads them. */
INLINE void prefetch_kv(const void *k, const void *v, int64_t slot, int head, int dim, int v_dim, int64_t k_slot,
                        int64_t k_head, int64_t v_slot, int64_t v_head, size_t elem) {
    prefetch_row((const char *)k + (size_t)(slot * k_slot + head * k_head) * elem, (size_t)dim * elem);
    prefetch_row((const char *)v + (size_t)(slot * v_slot + head * v_head) * elem, (size_t)v_dim * elem);
}

/* In the vector score loops: the K row of (slot, head) and the prefetch of the rows PREFETCH_ROWS
 * keys ahead. */
#define K_ROW(J) ((const char *)k + (size_t)(slots[J] * k_slot + head * k_head) * elem)
#define PREFETCH_AHEAD(J)                                                                                   \
    if ((J) + PREFETCH_ROWS < context)                                                                      \
        prefetch_kv(k, v, slots[(J) + PREFETCH_ROWS], head, dim, v_dim, k_slot, k_head, v_slot, v_head, elem)

#if VEC512
/* scores[r * context + j] = scale * q_r . k_j, 16 keys at a time: each key's products summed in a
 * vector per query head, the 16 vectors reduced together (sum_lanes16), the rest one by one.
 * bfloat16 rows (dim % 32 == 0, BF16_DOT) multiply in hardware (vdpbf16ps: exact products,
 * float32 sums) straight from the pool; float32 rows need dim % 16 == 0. */
INLINE void vec_scores(int bf16, const void *q, const void *k, const void *v, const int64_t *slots, int64_t context,
                       int head, int n_rep, int dim, int v_dim, int64_t k_slot, int64_t k_head, int64_t v_slot,
                       int64_t v_head, float scale, float *restrict scores) {
    const size_t elem = bf16 ? 2 : 4;
    const int lanes = bf16 ? 32 : 16, chunks = dim / lanes;
    __m512 qv[n_rep * chunks];
    for (int c = 0; c < n_rep * chunks; c++)
        qv[c] = bf16 ? _mm512_castsi512_ps(_mm512_loadu_si512((const uint16_t *)q + 32 * c))
                     : _mm512_loadu_ps((const float *)q + 16 * c);
#if BF16_DOT
#define DOT(ACC, Q, ROW, C)                                                                                     \
    (bf16 ? _mm512_dpbf16_ps(ACC, (__m512bh)(Q), (__m512bh)_mm512_loadu_si512((const uint16_t *)(ROW) + 32 * (C))) \
          : _mm512_fmadd_ps(Q, _mm512_loadu_ps((const float *)(ROW) + 16 * (C)), ACC))
#else
#define DOT(ACC, Q, ROW, C) _mm512_fmadd_ps(Q, _mm512_loadu_ps((const float *)(ROW) + 16 * (C)), ACC)
#endif
    const __m512 scaled = _mm512_set1_ps(scale);
    int64_t j = 0;
    for (; j + 16 <= context; j += 16) {
        const char *rows[16];
        for (int i = 0; i < 16; i++) {
            PREFETCH_AHEAD(j + i);
            rows[i] = K_ROW(j + i);
        }
        for (int r = 0; r < n_rep; r++) {
            __m512 acc[16];
            for (int i = 0; i < 16; i++) {
                acc[i] = _mm512_setzero_ps();
                for (int c = 0; c < chunks; c++) acc[i] = DOT(acc[i], qv[r * chunks + c], rows[i], c);
            }
            _mm512_storeu_ps(scores + r * context + j, _mm512_mul_ps(scaled, sum_lanes16(acc)));
        }
    }
    for (; j < context; j++) {
        PREFETCH_AHEAD(j);
        const char *row = K_ROW(j);
        for (int r = 0; r < n_rep; r++) {
            __m512 acc = _mm512_setzero_ps();
            for (int c = 0; c < chunks; c++) acc = DOT(acc, qv[r * chunks + c], row, c);
            scores[r * context + j] = scale * _mm512_reduce_add_ps(acc);
        }
    }
#undef DOT
}

/* s[j] = exp(s[j] - max) over a row of scores (the sink, where given, counts towards the max and the
 * sum); returns 1 / the sum. */
INLINE float vec_softmax(float *restrict s, int64_t context, const float *sink) {
    __m512 top = _mm512_set1_ps(sink ? *sink : s[0]);
    int64_t j = 0;
    for (; j + 16 <= context; j += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(s + j));
    const __mmask16 tail = (__mmask16)((1u << (context - j)) - 1u);
    top = _mm512_mask_max_ps(top, tail, top, _mm512_maskz_loadu_ps(tail, s + j));
    const float most = _mm512_reduce_max_ps(top);
    const __m512 m = _mm512_set1_ps(most);
    __m512 sum = _mm512_setzero_ps();
    for (j = 0; j + 16 <= context; j += 16) {
        const __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(s + j), m));
        _mm512_storeu_ps(s + j, e);
        sum = _mm512_add_ps(sum, e);
    }
    const __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + j), m));
    _mm512_mask_storeu_ps(s + j, tail, e);
    sum = _mm512_mask_add_ps(sum, tail, sum, e);
    float total = _mm512_reduce_add_ps(sum);
    if (sink) total += exp_nonpositive(*sink - most);
    return 1.0f / total;
}

/* acc[r * v_dim ..] = sum_j p_rj * v_j for V rows with v_dim % 16 == 0 and n_rep * v_dim at most
 * 384 (24 vector accumulators): each row widened to float32 once (16 lanes at a time) and
 * multiply-added for the n_rep query heads into accumulators that stay in registers. */
INLINE void vec_values(int bf16, const void *v, const int64_t *slots, int64_t context, int head, int n_rep, int v_dim,
                       int64_t v_slot, int64_t v_head, const float *restrict scores, float *restrict acc) {
    const size_t elem = bf16 ? 2 : 4;
    const int chunks = v_dim / 16;
    __m512 sums[n_rep * chunks];
    for (int c = 0; c < n_rep * chunks; c++) sums[c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < context; j++) {
        const char *row = (const char *)v + (size_t)(slots[j] * v_slot + head * v_head) * elem;
        for (int c = 0; c < chunks; c++) {
            const __m512 x = load16(bf16, row + 16 * c * elem);
            for (int r = 0; r < n_rep; r++)
                sums[r * chunks + c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[r * context + j]), x, sums[r * chunks + c]);
        }
    }
    for (int c = 0; c < n_rep * chunks; c++) _mm512_storeu_ps(acc + 16 * c, sums[c]);
}
#endif

#if VEC256
/* vec_scores on 8 lanes: 8 keys at a time, bfloat16 rows widened to float32 (no dot-product
 * instruction here); dim % 8 == 0. */
INLINE void vec8_scores(int bf16, const void *q, const void *k, const void *v, const int64_t *slots, int64_t context,
                        int head, int n_rep, int dim, int v_dim, int64_t k_slot, int64_t k_head, int64_t v_slot,
                        int64_t v_head, float scale, float *restrict scores) {
    const size_t elem = bf16 ? 2 : 4;
    const int chunks = dim / 8;
    __m256 qv[n_rep * chunks];
    for (int c = 0; c < n_rep * chunks; c++) qv[c] = load8(bf16, (const char *)q + 8 * c * elem);
    const __m256 scaled = _mm256_set1_ps(scale);
    int64_t j = 0;
    for (; j + 8 <= context; j += 8) {
        const char *rows[8];
        for (int i = 0; i < 8; i++) {
            PREFETCH_AHEAD(j + i);
            rows[i] = K_ROW(j + i);
        }
        for (int r = 0; r < n_rep; r++) {
            __m256 acc[8];
            for (int i = 0; i < 8; i++) {
                acc[i] = _mm256_setzero_ps();
                for (int c = 0; c < chunks; c++)
                    acc[i] = _mm256_fmadd_ps(qv[r * chunks + c], load8(bf16, rows[i] + 8 * c * elem), acc[i]);
            }
            _mm256_storeu_ps(scores + r * context + j, _mm256_mul_ps(scaled, sum_lanes8(acc)));
        }
    }
    for (; j < context; j++) {
        PREFETCH_AHEAD(j);
        const char *row = K_ROW(j);
        for (int r = 0; r < n_rep; r++) {
            __m256 acc = _mm256_setzero_ps();
            for (int c = 0; c < chunks; c++) acc = _mm256_fmadd_ps(qv[r * chunks + c], load8(bf16, row + 8 * c * elem), acc);
            scores[r * context + j] = scale * reduce_add8(acc);
        }
    }
}

/* vec_softmax on 8 lanes (the last context % 8 scores one by one) */
INLINE float vec8_softmax(float *restrict s, int64_t context, const float *sink) {
    __m256 top = _mm256_set1_ps(sink ? *sink : s[0]);
    int64_t j = 0;
    for (; j + 8 <= context; j += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(s + j));
    float most = reduce_max8(top);
    for (int64_t t = j; t < context; t++) most = s[t] > most ? s[t] : most;
    const __m256 m = _mm256_set1_ps(most);
    __m256 sum = _mm256_setzero_ps();
    for (j = 0; j + 8 <= context; j += 8) {
        const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
        _mm256_storeu_ps(s + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    float total = reduce_add8(sum);
    for (; j < context; j++) {
        s[j] = exp_nonpositive(s[j] - most);
        total += s[j];
    }
    if (sink) total += exp_nonpositive(*sink - most);
    return 1.0f / total;
}

/* vec_values on 8 lanes, for v_dim % 8 == 0 and n_rep <= 12: 16 registers hold at most 12
 * accumulators, so the V columns go in groups of 12 / n_rep vectors, one pass over the rows each
 * (the rows of the second pass come from the cache). */
INLINE void vec8_values(int bf16, const void *v, const int64_t *slots, int64_t context, int head, int n_rep, int v_dim,
                        int64_t v_slot, int64_t v_head, const float *restrict scores, float *restrict acc) {
    const size_t elem = bf16 ? 2 : 4;
    const int chunks = v_dim / 8, group = 12 / n_rep;
    for (int c0 = 0; c0 < chunks; c0 += group) {
        const int width = chunks - c0 < group ? chunks - c0 : group;
        __m256 sums[n_rep * group];
        for (int c = 0; c < n_rep * width; c++) sums[c] = _mm256_setzero_ps();
        for (int64_t j = 0; j < context; j++) {
            const char *row = (const char *)v + (size_t)(slots[j] * v_slot + head * v_head) * elem;
            for (int c = 0; c < width; c++) {
                const __m256 x = load8(bf16, row + 8 * (c0 + c) * elem);
                for (int r = 0; r < n_rep; r++)
                    sums[r * width + c] = _mm256_fmadd_ps(_mm256_set1_ps(scores[r * context + j]), x, sums[r * width + c]);
            }
        }
        for (int r = 0; r < n_rep; r++)
            for (int c = 0; c < width; c++) _mm256_storeu_ps(acc + r * v_dim + 8 * (c0 + c), sums[r * width + c]);
    }
}
#endif
#undef K_ROW
#undef PREFETCH_AHEAD

/* One (sequence, KV head): its n_rep query heads over `context` keys. The query, the output
 * accumulator and the row in flight live on the stack: for the common shapes their sizes are
 * constants and the accumulator stays in vector registers. scores: n_rep * context floats. */
INLINE void attend(int bf16, const void *q, const void *k, const void *v, void *out, const int64_t *slots,
                   int64_t context, int64_t seq, int head, int heads, int n_rep, int dim, int v_dim,
                   int64_t k_slot, int64_t k_head, int64_t v_slot, int64_t v_head, float scale, float softcap,
                   const float *sinks, float *restrict scores) {
    const size_t elem = bf16 ? 2 : 4;
    const char *kb = k, *vb = v;
    const int first = head * n_rep; /* its query heads: first .. first + n_rep */
    float qf[n_rep * dim], acc[n_rep * v_dim], row[dim > v_dim ? dim : v_dim], inverse[n_rep];
#if VEC512
    if ((bf16 && BF16_DOT && dim % 32 == 0) || (!bf16 && dim % 16 == 0)) {
        vec_scores(bf16, (const char *)q + ((size_t)seq * heads + first) * dim * elem, k, v, slots, context, head, n_rep,
                   dim, v_dim, k_slot, k_head, v_slot, v_head, scale, scores);
    } else
#elif VEC256
    if (dim % 8 == 0) {
        vec8_scores(bf16, (const char *)q + ((size_t)seq * heads + first) * dim * elem, k, v, slots, context, head,
                    n_rep, dim, v_dim, k_slot, k_head, v_slot, v_head, scale, scores);
    } else
#endif
    {
        for (int r = 0; r < n_rep; r++) {
            load_row(bf16, (const char *)q + ((size_t)seq * heads + first + r) * dim * elem, qf + r * dim, dim);
            for (int i = 0; i < dim; i++) qf[r * dim + i] *= scale;
        }
        for (int64_t j = 0; j < context; j++) {
            if (j + PREFETCH_ROWS < context)
                prefetch_kv(k, v, slots[j + PREFETCH_ROWS], head, dim, v_dim, k_slot, k_head, v_slot, v_head, elem);
            load_row(bf16, kb + (size_t)(slots[j] * k_slot + head * k_head) * elem, row, dim);
            for (int r = 0; r < n_rep; r++) {
                float dot = 0.0f;
                for (int i = 0; i < dim; i++) dot += qf[r * dim + i] * row[i];
                scores[r * context + j] = dot;
            }
        }
    }
    for (int r = 0; r < n_rep; r++) {
        float *restrict s = scores + r * context;
        if (softcap > 0.0f)
            for (int64_t j = 0; j < context; j++) s[j] = softcap * tanhf(s[j] / softcap);
#if VEC512
        inverse[r] = vec_softmax(s, context, sinks ? sinks + first + r : NULL);
#elif VEC256
        inverse[r] = vec8_softmax(s, context, sinks ? sinks + first + r : NULL);
#else
        float top = sinks ? sinks[first + r] : s[0];
        for (int64_t j = 0; j < context; j++) top = s[j] > top ? s[j] : top;
        float sum = 0.0f;
        for (int64_t j = 0; j < context; j++) {
            s[j] = exp_nonpositive(s[j] - top);
            sum += s[j];
        }
        if (sinks) sum += exp_nonpositive(sinks[first + r] - top);
        inverse[r] = 1.0f / sum;
#endif
    }
#if VEC512
    if (v_dim % 16 == 0 && n_rep * v_dim <= 384) {
        vec_values(bf16, v, slots, context, head, n_rep, v_dim, v_slot, v_head, scores, acc);
    } else
#elif VEC256
    if (v_dim % 8 == 0 && n_rep <= 12) {
        vec8_values(bf16, v, slots, context, head, n_rep, v_dim, v_slot, v_head, scores, acc);
    } else
#endif
    {
        memset(acc, 0, sizeof acc);
        for (int64_t j = 0; j < context; j++) {
            load_row(bf16, vb + (size_t)(slots[j] * v_slot + head * v_head) * elem, row, v_dim);
            for (int r = 0; r < n_rep; r++) {
                const float p = scores[r * context + j];
                for (int i = 0; i < v_dim; i++) acc[r * v_dim + i] += p * row[i];
            }
        }
    }
    for (int r = 0; r < n_rep; r++) {
        for (int i = 0; i < v_dim; i++) acc[r * v_dim + i] *= inverse[r];
        store_row(bf16, acc + r * v_dim, (char *)out + ((size_t)seq * heads + first + r) * v_dim * elem, v_dim);
    }
}

/* attend() with the common head shapes as constants, so their loops unroll without remainders. */
INLINE void attend_shaped(int bf16, const void *q, const void *k, const void *v, void *out, const int64_t *slots,
                          int64_t context, int64_t seq, int head, int heads, int n_rep, int dim, int v_dim,
                          int64_t k_slot, int64_t k_head, int64_t v_slot, int64_t v_head, float scale,
                          float softcap, const float *sinks, float *scores) {
#define ATTEND(N_REP, DIM, V_DIM)                                                                            \
    attend(bf16, q, k, v, out, slots, context, seq, head, heads, N_REP, DIM, V_DIM, k_slot, k_head, v_slot, v_head, \
           scale, softcap, sinks, scores)
    if (dim == 64 && v_dim == 64 && n_rep == 3) ATTEND(3, 64, 64);
    else if (dim == 64 && v_dim == 64) ATTEND(n_rep, 64, 64);
    else if (dim == 128 && v_dim == 128) ATTEND(n_rep, 128, 128);
    else ATTEND(n_rep, dim, v_dim);
#undef ATTEND
}

static int run(int bf16, const void *q, const void *k, const void *v, void *out, const int64_t *slots,
               const int64_t *offsets, int64_t num_seqs, int heads, int kv_heads, int dim, int v_dim, int64_t k_slot,
               int64_t k_head, int64_t v_slot, int64_t v_head, float scale, float softcap, const float *sinks,
               int64_t window, int threads) {
    if (kv_heads <= 0 || heads % kv_heads != 0 || (int64_t)(heads / kv_heads) * (dim + v_dim) > MAX_STACK_FLOATS) return 1;
    const int n_rep = heads / kv_heads;
    int64_t longest = 0;
    for (int64_t s = 0; s < num_seqs; s++) {
        int64_t c = offsets[s + 1] - offsets[s];
        if (c <= 0) return 2;
        if (window > 0 && c > window) c = window;
        longest = c > longest ? c : longest;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc((size_t)n_rep * longest * sizeof(float));
        if (!scores) {
#pragma omp atomic write
            failed = 3;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < num_seqs * kv_heads; t++) {
            if (!scores) continue;
            const int64_t s = t / kv_heads;
            const int head = (int)(t % kv_heads);
            int64_t first = offsets[s], context = offsets[s + 1] - offsets[s];
            if (window > 0 && context > window) {
                first += context - window;
                context = window;
            }
            if (bf16)
                attend_shaped(1, q, k, v, out, slots + first, context, s, head, heads, n_rep, dim, v_dim, k_slot,
                              k_head, v_slot, v_head, scale, softcap, sinks, scores);
            else
                attend_shaped(0, q, k, v, out, slots + first, context, s, head, heads, n_rep, dim, v_dim, k_slot,
                              k_head, v_slot, v_head, scale, softcap, sinks, scores);
        }
        free(scores);
    }
    return failed;
}

#define ENTRY(NAME, BF16)                                                                                  \
    int NAME(const void *q, const void *k, const void *v, void *out, const int64_t *slots, const int64_t *offsets, \
             int64_t num_seqs, int heads, int kv_heads, int dim, int v_dim, int64_t k_slot, int64_t k_head,     \
             int64_t v_slot, int64_t v_head, float scale, float softcap, const float *sinks, int64_t window,    \
             int threads) {                                                                                 \
        return run(BF16, q, k, v, out, slots, offsets, num_seqs, heads, kv_heads, dim, v_dim, k_slot, k_head,   \
                   v_slot, v_head, scale, softcap, sinks, window, threads);                                 \
    }

ENTRY(decode_attention_bf16, 1)
ENTRY(decode_attention_f32, 0)
