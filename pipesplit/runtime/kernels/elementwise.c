/* Fused element-wise kernels of a decoder layer: RMSNorm (optionally after the residual add),
 * rotate-half rotary embeddings and SwiGLU's silu(gate) * up.
 *
 * Each replaces several torch ops that each read and write the whole tensor (RMSNorm alone is
 * seven: to float, pow, mean, add, rsqrt, mul, to dtype, and the weight's mul) with one pass over
 * the rows. They compute in float32 and round to the storage dtype exactly where torch's ops do,
 * so bfloat16 results match torch's up to the order of a row's sum of squares. Rows are split
 * over OpenMP threads (the runtime torch has loaded).
 *
 * Layouts (strides in elements): an input row starts at x + row * x_stride, its elements
 * contiguous; outputs are contiguous.
 */
#include "common.h"

#if VEC512
/* 16 float32 lanes rounded to bfloat16 (to nearest even; NaN are not produced here): the 16-bit
 * patterns, and as float32 again */
INLINE __m256i bf16_bits16(__m512 x) {
#if BF16_DOT
    return (__m256i)_mm512_cvtneps_pbh(x);
#else
    const __m512i u = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16));
#endif
}
INLINE __m512 round16(int bf16, __m512 x) {
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_bits16(x)), 16)) : x;
}
/* 16 float32 lanes stored in the storage dtype (bfloat16 rounded to nearest even) */
INLINE void store16(int bf16, void *p, __m512 x) {
    if (bf16)
        _mm256_storeu_si256((__m256i *)p, bf16_bits16(x));
    else
        _mm512_storeu_ps(p, x);
}
#endif

#if VEC256
/* The AVX-512 helpers above on 8 lanes. 8 float32 lanes rounded to bfloat16 (to nearest even), as the high halves of their bits */
INLINE __m256i bf16_round8(__m256 x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
}
INLINE __m256 round8(int bf16, __m256 x) {
    return bf16 ? _mm256_castsi256_ps(_mm256_and_si256(bf16_round8(x), _mm256_set1_epi32((int)0xffff0000u))) : x;
}
/* 8 float32 lanes stored in the storage dtype */
INLINE void store8(int bf16, void *p, __m256 x) {
    if (bf16) {
        const __m256i high = _mm256_srli_epi32(bf16_round8(x), 16);
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(high, high), 0x08);
        _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(packed));
    } else {
        _mm256_storeu_ps(p, x);
    }
}
#endif

/* ---- RMSNorm: out = weight * to_dtype(x * rsqrt(mean(x^2) + eps)) -------------------------------
 * With `residual` (non-NULL), x is first replaced by sum = to_dtype(residual + x), which is also
 * written to `sum_out` (the layer's new residual stream). */
INLINE void rms_norm_rows(int bf16, const void *x, int64_t x_stride, const void *residual, int64_t r_stride,
                          const void *weight, void *out, void *sum_out, int64_t rows, int dim, float eps,
                          int threads) {
    const size_t esize = bf16 ? 2 : 4;
    float w[dim]; /* the weight, read once and shared by the threads */
    load_row(bf16, weight, w, dim);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const char *xr = (const char *)x + r * x_stride * esize;
        char *o = (char *)out + r * (int64_t)dim * esize;
#if VEC512
        if (dim % 16 == 0) { /* the same steps on 16 lanes */
            const char *rr = residual ? (const char *)residual + r * r_stride * esize : NULL;
            char *so = residual ? (char *)sum_out + r * (int64_t)dim * esize : NULL;
            __m512 squares = _mm512_setzero_ps();
            for (int i = 0; i < dim; i += 16) {
                __m512 v = load16(bf16, xr + i * esize);
                if (rr) {
                    v = round16(bf16, _mm512_add_ps(load16(bf16, rr + i * esize), v));
                    store16(bf16, so + i * esize, v);
                }
                squares = _mm512_fmadd_ps(v, v, squares);
            }
            const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)dim + eps));
            for (int i = 0; i < dim; i += 16) {
                const __m512 v = load16(bf16, (rr ? so : xr) + i * esize); /* the sum as stored */
                store16(bf16, o + i * esize, _mm512_mul_ps(_mm512_loadu_ps(w + i), round16(bf16, _mm512_mul_ps(v, inv))));
            }
            continue;
        }
#elif VEC256
        if (dim % 8 == 0) { /* the same steps on 8 lanes */
            const char *rr = residual ? (const char *)residual + r * r_stride * esize : NULL;
            char *so = residual ? (char *)sum_out + r * (int64_t)dim * esize : NULL;
            __m256 squares = _mm256_setzero_ps();
            for (int i = 0; i < dim; i += 8) {
                __m256 v = load8(bf16, xr + i * esize);
                if (rr) {
                    v = round8(bf16, _mm256_add_ps(load8(bf16, rr + i * esize), v));
                    store8(bf16, so + i * esize, v);
                }
                squares = _mm256_fmadd_ps(v, v, squares);
            }
            const __m256 inv = _mm256_set1_ps(1.0f / sqrtf(reduce_add8(squares) / (float)dim + eps));
            for (int i = 0; i < dim; i += 8) {
                const __m256 v = load8(bf16, (rr ? so : xr) + i * esize); /* the sum as stored */
                store8(bf16, o + i * esize, _mm256_mul_ps(_mm256_loadu_ps(w + i), round8(bf16, _mm256_mul_ps(v, inv))));
            }
            continue;
        }
#endif
        float row[dim];
        load_row(bf16, xr, row, dim);
        if (residual != NULL) {
            float res[dim];
            load_row(bf16, (const char *)residual + r * r_stride * esize, res, dim);
            for (int i = 0; i < dim; i++) row[i] = round_to(bf16, res[i] + row[i]);
            store_row(bf16, row, (char *)sum_out + r * (int64_t)dim * esize, dim);
        }
        float squares = 0.0f;
        for (int i = 0; i < dim; i++) squares += row[i] * row[i];
        const float inv = 1.0f / sqrtf(squares / (float)dim + eps);
        for (int i = 0; i < dim; i++) row[i] = round_to(bf16, w[i] * round_to(bf16, row[i] * inv));
        store_row(bf16, row, o, dim);
    }
}

/* ---- rotate-half rotary: out = x * cos + rotate_half(x) * sin, each product rounded as in torch.
 * x [tokens, heads, dim] (token rows x_stride apart, heads dim apart); cos, sin [tokens, dim]. */
INLINE void rotary_rows(int bf16, const void *x, int64_t x_stride, const void *cos_table, const void *sin_table,
                        void *out, int64_t tokens, int heads, int dim, int threads) {
    const size_t esize = bf16 ? 2 : 4;
    const int half = dim / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        float c[dim], s[dim], row[dim], rotated[dim];
        load_row(bf16, (const char *)cos_table + t * (int64_t)dim * esize, c, dim);
        load_row(bf16, (const char *)sin_table + t * (int64_t)dim * esize, s, dim);
        for (int h = 0; h < heads; h++) {
            const char *xr = (const char *)x + (t * x_stride + (int64_t)h * dim) * esize;
            char *o = (char *)out + ((t * heads + h) * (int64_t)dim) * esize;
#if VEC512
            if (half % 16 == 0) { /* the same steps on 16 lanes */
                for (int i = 0; i < half; i += 16) {
                    const __m512 a = load16(bf16, xr + i * esize), b = load16(bf16, xr + (i + half) * esize);
                    const __m512 c1 = _mm512_loadu_ps(c + i), c2 = _mm512_loadu_ps(c + i + half);
                    const __m512 s1 = _mm512_loadu_ps(s + i), s2 = _mm512_loadu_ps(s + i + half);
                    store16(bf16, o + i * esize, _mm512_add_ps(round16(bf16, _mm512_mul_ps(a, c1)),
                                                               round16(bf16, _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), b), s1))));
                    store16(bf16, o + (i + half) * esize, _mm512_add_ps(round16(bf16, _mm512_mul_ps(b, c2)),
                                                                        round16(bf16, _mm512_mul_ps(a, s2))));
                }
                continue;
            }
#elif VEC256
            if (half % 8 == 0) { /* the same steps on 8 lanes */
                for (int i = 0; i < half; i += 8) {
                    const __m256 a = load8(bf16, xr + i * esize), b = load8(bf16, xr + (i + half) * esize);
                    const __m256 c1 = _mm256_loadu_ps(c + i), c2 = _mm256_loadu_ps(c + i + half);
                    const __m256 s1 = _mm256_loadu_ps(s + i), s2 = _mm256_loadu_ps(s + i + half);
                    store8(bf16, o + i * esize, _mm256_add_ps(round8(bf16, _mm256_mul_ps(a, c1)),
                                                              round8(bf16, _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), b), s1))));
                    store8(bf16, o + (i + half) * esize, _mm256_add_ps(round8(bf16, _mm256_mul_ps(b, c2)),
                                                                       round8(bf16, _mm256_mul_ps(a, s2))));
                }
                continue;
            }
#endif
            load_row(bf16, xr, row, dim);
            for (int i = 0; i < half; i++) {
                rotated[i] = round_to(bf16, round_to(bf16, row[i] * c[i]) + round_to(bf16, -row[i + half] * s[i]));
                rotated[i + half] = round_to(bf16, round_to(bf16, row[i + half] * c[i + half]) +
                                                       round_to(bf16, row[i] * s[i + half]));
            }
            store_row(bf16, rotated, o, dim);
        }
    }
}

/* ---- SwiGLU: out = to_dtype(to_dtype(silu(gate)) * up), torch's silu and mul in one pass. gate and
 * up rows start at gate + row * stride and up + row * stride (the two halves of a fused gate/up
 * GEMM's output). silu(g) = g * sigmoid(g), the sigmoid from e = exp(-|g|): 1 / (1 + e) for g >= 0,
 * e / (1 + e) below (no overflow either side). exp_nonpositive stops at exp(-87), so below g = -87
 * silu gives 0 (torch: -0 from g < -88.7, where its exp(-g) overflows; about 1e-36 in between). */
INLINE float silu(float g) {
    const float e = exp_nonpositive(-fabsf(g));
    const float top = g >= 0.0f ? 1.0f : e;
    return g < -87.0f ? 0.0f : g * top / (1.0f + e);
}

#if VEC512
INLINE __m512 silu16(__m512 g) {
    const __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 top = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_GE_OQ), e, one);
    const __m512 y = _mm512_div_ps(_mm512_mul_ps(g, top), _mm512_add_ps(one, e));
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(g, _mm512_set1_ps(-87.0f), _CMP_GE_OQ), y); /* as silu() */
}
#endif

#if VEC256
INLINE __m256 silu8(__m256 g) {
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    const __m256 e = exp_nonpositive8(_mm256_sub_ps(zero, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), g)));
    const __m256 top = _mm256_blendv_ps(e, one, _mm256_cmp_ps(g, zero, _CMP_GE_OQ));
    const __m256 y = _mm256_div_ps(_mm256_mul_ps(g, top), _mm256_add_ps(one, e));
    return _mm256_and_ps(y, _mm256_cmp_ps(g, _mm256_set1_ps(-87.0f), _CMP_GE_OQ)); /* as silu() */
}
#endif

INLINE void swiglu_rows(int bf16, const void *gate, const void *up, int64_t stride, void *out, int64_t rows, int dim,
                        int threads) {
    const size_t esize = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const char *g = (const char *)gate + r * stride * esize, *u = (const char *)up + r * stride * esize;
        char *o = (char *)out + r * (int64_t)dim * esize;
        int i = 0;
#if VEC512
        for (; i + 16 <= dim; i += 16) {
            store16(bf16, o + i * esize, _mm512_mul_ps(round16(bf16, silu16(load16(bf16, g + i * esize))),
                                                      load16(bf16, u + i * esize)));
        }
#elif VEC256
        for (; i + 8 <= dim; i += 8) {
            store8(bf16, o + i * esize, _mm256_mul_ps(round8(bf16, silu8(load8(bf16, g + i * esize))),
                                                     load8(bf16, u + i * esize)));
        }
#endif
        if (i < dim) { /* the rest (all of it without VEC512), in loops the compiler vectorises */
            const int n = dim - i;
            float gr[n], ur[n];
            load_row(bf16, g + i * esize, gr, n);
            load_row(bf16, u + i * esize, ur, n);
            for (int j = 0; j < n; j++) gr[j] = round_to(bf16, round_to(bf16, silu(gr[j])) * ur[j]);
            store_row(bf16, gr, o + i * esize, n);
        }
    }
}

/* Whether swiglu runs vectorised (the loops alone are slower than torch's vectorised ops). */
int swiglu_vectorised(void) { return VEC512 || VEC256; }

/* ---- entry points: one per storage dtype, the dtype a constant inside */
#define ENTRIES(suffix, bf16)                                                                                 \
    int rms_norm_##suffix(const void *x, int64_t x_stride, const void *residual, int64_t r_stride,           \
                          const void *weight, void *out, void *sum_out, int64_t rows, int dim, float eps,     \
                          int threads) {                                                                      \
        if (dim <= 0 || dim > MAX_ROW_FLOATS) return 1;                                                       \
        rms_norm_rows(bf16, x, x_stride, residual, r_stride, weight, out, sum_out, rows, dim, eps, threads); \
        return 0;                                                                                             \
    }                                                                                                         \
    int rotary_##suffix(const void *x, int64_t x_stride, const void *cos_table, const void *sin_table,       \
                        void *out, int64_t tokens, int heads, int dim, int threads) {                         \
        if (dim <= 0 || dim % 2 || dim > MAX_ROW_FLOATS) return 1;                                            \
        rotary_rows(bf16, x, x_stride, cos_table, sin_table, out, tokens, heads, dim, threads);              \
        return 0;                                                                                             \
    }                                                                                                         \
    int swiglu_##suffix(const void *gate, const void *up, int64_t stride, void *out, int64_t rows, int dim,   \
                        int threads) {                                                                        \
        if (dim <= 0) return 1;                                                                               \
        swiglu_rows(bf16, gate, up, stride, out, rows, dim, threads);                                         \
        return 0;                                                                                             \
    }

ENTRIES(bf16, 1)
ENTRIES(f32, 0)
