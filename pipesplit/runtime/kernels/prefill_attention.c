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
 * Layouts (strides in elements) as in decode_attention.c: q [T, heads, dim] and out
 * [T, heads, v_dim] contiguous; the K row of (slot, kv head) at k + slot * k_slot + head * k_head.
 * Sequence s owns query rows row_starts[s] .. + query_lens[s] and context slots
 * slots[offsets[s] .. offsets[s + 1]) in order; its new tokens are the context's last ones, so
 * query i sits at context position C - Q + i and sees keys j <= that position (and, with
 * window > 0, j > position - window). softcap > 0 caps scores as softcap * tanh(score / softcap);
 * sinks (per query head, or NULL) add one logit to each softmax's denominator.
 */
#include "common.h"

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

/* Scores of `rows` query rows (qf, [rows][DIM], scaled) against one transposed key block:
 * s[r][j] = sum_d qf[r][d] * kt[d][j]. Four rows at a time share each load of kt. */
INLINE void block_scores(const float *restrict qf, const float *restrict kt, float *restrict s, int rows,
                         int DIM) {
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
}

/* acc[r][:] += sum_j p[r][j] * vr[j][:] over `rows` rows; four rows share each load of vr. */
INLINE void block_values(const float *restrict p, const float *restrict vr, float *restrict acc, int rows,
                         int V_DIM) {
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
                const int64_t pos = first_pos + r / n_rep;
                const int64_t end = pos + 1 - base, start = sh->window > 0 ? pos - sh->window + 1 - base : 0;
                hi = end < BLOCK_KEYS ? (int)end : BLOCK_KEYS;
                lo = start > 0 ? (int)start : 0;
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
    for (int r = 0; r < rows; r++) {
        const int h = head * n_rep + r % n_rep;
        float total = l[r];
        if (sh->sinks) total += expf(sh->sinks[h] - m[r]);
        const float inverse = 1.0f / total;
        float *restrict ar = acc + (size_t)r * V_DIM;
        for (int i = 0; i < V_DIM; i++) ar[i] *= inverse;
        const int64_t token = row_start + q0 + r / n_rep;
        store_row(bf16, ar, (char *)out + ((size_t)token * heads + h) * V_DIM * elem, V_DIM);
    }
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
    const size_t work_floats = (size_t)(sh.block_queries * n_rep) * (dim + v_dim + BLOCK_KEYS + 2);
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
        float *work = malloc(work_floats * sizeof(float));
        if (!work) {
#pragma omp atomic write
            failed = 3;
        }
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
            if (dot) attend_shaped(1, 1, &sh, q, out, row_starts[s], Q, C, q0, nq, head, head_blocks, work);
            else if (bf16) attend_shaped(1, 0, &sh, q, out, row_starts[s], Q, C, q0, nq, head, head_blocks, work);
            else attend_shaped(0, 0, &sh, q, out, row_starts[s], Q, C, q0, nq, head, head_blocks, work);
        }
        free(work);
    }
    free(converted);
    free(block_start);
    return failed;
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
