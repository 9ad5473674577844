/* What the native kernels share: bfloat16 <-> float32, rows loaded and stored as float32, a
 * vectorisable exp, and where the compiler targets AVX-512 that exp, a 16-lane row load, a 16-way
 * lane sum or maximum and a base-2 exp for softmax weights in intrinsics; where it targets AVX2
 * (and not AVX-512), the exp, row load and lane sum on 8 lanes. */
#ifndef PIPESPLIT_COMMON_H
#define PIPESPLIT_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

/* bfloat16 dot products in hardware (vdpbf16ps), where the compiler targets a CPU that has them
 * (PIPESPLIT_PORTABLE: the portable loops anyway) */
#if defined(__AVX512BF16__) && defined(__AVX512F__) && !defined(PIPESPLIT_PORTABLE)
#define BF16_DOT 1
#else
#define BF16_DOT 0
#endif
/* 16-lane float32 intrinsics where the compiler targets AVX-512 (BF16_DOT implies it) */
#if defined(__AVX512F__) && !defined(PIPESPLIT_PORTABLE)
#include <immintrin.h>
#define VEC512 1
#else
#define VEC512 0
#endif
/* 8-lane float32 intrinsics where the compiler targets AVX2 with FMA but not AVX-512 (Zen 3 and
 * older, Haswell to Comet Lake): the same kernels' steps on half the lanes */
#if !VEC512 && defined(__AVX2__) && defined(__FMA__) && !defined(PIPESPLIT_PORTABLE)
#include <immintrin.h>
#define VEC256 1
#else
#define VEC256 0
#endif

INLINE float bf16_to_float(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

INLINE uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                        /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* A row of n elements as float32; bf16 selects the storage type (a constant after inlining). */
INLINE void load_row(int bf16, const void *src, float *restrict dst, int n) {
    if (bf16) {
        const uint16_t *s = src;
        for (int i = 0; i < n; i++) dst[i] = bf16_to_float(s[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof *dst);
    }
}

INLINE void store_row(int bf16, const float *restrict src, void *dst, int n) {
    if (bf16) {
        uint16_t *d = dst;
        for (int i = 0; i < n; i++) d[i] = float_to_bf16(src[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof *src);
    }
}

/* exp(x) for x <= 0 (a score minus its row's maximum), relative error about 2e-7: a Cephes-style
 * polynomial after range reduction, written so that the compiler vectorises it (libm's expf is
 * a scalar call per score). */
INLINE float exp_nonpositive(float x) {
    /* x = max(x, -87), on the bits: a float select would keep the loop from vectorising. Negative
     * floats below -87 (-inf included) have larger signed bit patterns than -87's. */
    int32_t bits_of_x;
    memcpy(&bits_of_x, &x, sizeof x);
    const int32_t minus_87 = (int32_t)0xc2ae0000u;
    const int32_t below = -((bits_of_x < 0) & (bits_of_x > minus_87)); /* all ones where x < -87 */
    bits_of_x = (minus_87 & below) | (bits_of_x & ~below);
    memcpy(&x, &bits_of_x, sizeof x);
    /* the integer nearest x * log2(e) (x <= 0: truncating x * log2(e) - 0.5 rounds it); a
     * conversion, which vectorises where roundevenf does not */
    const float n = (float)(int32_t)(x * 1.44269504088896341f - 0.5f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#if VEC512
/* exp_nonpositive on 16 lanes, the same steps */
INLINE __m512 exp_nonpositive16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512i ni = _mm512_cvttps_epi32(_mm512_fmsub_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)));
    const __m512 n = _mm512_cvtepi32_ps(ni);
    const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(ni, _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

/* 16 elements of a bfloat16 (exactly, by widening) or float32 row as float32 */
INLINE __m512 load16(int bf16, const void *p) {
    if (!bf16) return _mm512_loadu_ps(p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* Lane i of the result: the sum (or with max, the maximum) of v[i]'s 16 lanes (a transposing
 * tree of 45 operations, where 16 separate reductions take about 130). */
INLINE __m512 lanes16(const __m512 *v, int max) {
#define COMBINE(a, b) (max ? _mm512_max_ps(a, b) : _mm512_add_ps(a, b))
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) /* lane group g: [v2i, v2i+1, v2i, v2i+1] partial results */
        a[i] = COMBINE(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* lane group g: [v4i .. v4i+3] partial results */
        const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        b[i] = COMBINE(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++) /* [v8i..+3, v8i..+3, v8i+4..+7, v8i+4..+7] */
        c[i] = COMBINE(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                       _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xdd));
    return COMBINE(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xdd));
#undef COMBINE
}

INLINE __m512 sum_lanes16(const __m512 *v) { return lanes16(v, 0); }

/* 2^x for x <= 0 on 16 lanes, relative error about 4e-5 (a tenth of bfloat16's rounding, for
 * weights rounded to it): x clamped at -125 (no subnormals), split into an integer n and f in
 * [-0.5, 0.5], 2^f by its Taylor polynomial of degree 4, scaled by 2^n. Eight operations. */
INLINE __m512 exp2_nonpositive16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-125.0f)); /* NaN (-inf - -inf) becomes -125 too */
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(9.6181291e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

#if VEC256
/* exp_nonpositive on 8 lanes, the same steps */
INLINE __m256 exp_nonpositive8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256i ni = _mm256_cvttps_epi32(_mm256_fmsub_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    const __m256 n = _mm256_cvtepi32_ps(ni);
    const __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x));
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/* 8 elements of a bfloat16 (exactly, by widening) or float32 row as float32 */
INLINE __m256 load8(int bf16, const void *p) {
    if (!bf16) return _mm256_loadu_ps(p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* Lane i of the result: the sum of v[i]'s 8 lanes (lanes16's tree on 8 vectors). */
INLINE __m256 sum_lanes8(const __m256 *v) {
    __m256 a[4], b[2];
    for (int i = 0; i < 4; i++)
        a[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 2; i++) {
        const __m256d x = _mm256_castps_pd(a[2 * i]), y = _mm256_castps_pd(a[2 * i + 1]);
        b[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)), _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
    }
    return _mm256_add_ps(_mm256_permute2f128_ps(b[0], b[1], 0x20), _mm256_permute2f128_ps(b[0], b[1], 0x31));
}

INLINE float reduce_add8(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

INLINE float reduce_max8(__m256 v) {
    const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}
#endif

/* f rounded to the storage dtype and back: what a torch op's bfloat16 result holds. */
INLINE float round_to(int bf16, float f) { return bf16 ? bf16_to_float(float_to_bf16(f)) : f; }

/* Floats of one row a kernel keeps on its stack, per array. */
#define MAX_ROW_FLOATS 32768

#endif
