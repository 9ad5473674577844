/* Fused element-wise kernels of a decoder layer: RMSNorm (optionally after the residual add) and
 * rotate-half rotary embeddings.
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
        float row[dim];
        load_row(bf16, (const char *)x + r * x_stride * esize, row, dim);
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
        store_row(bf16, row, (char *)out + r * (int64_t)dim * esize, dim);
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
            load_row(bf16, (const char *)x + (t * x_stride + (int64_t)h * dim) * esize, row, dim);
            for (int i = 0; i < half; i++) {
                rotated[i] = round_to(bf16, round_to(bf16, row[i] * c[i]) + round_to(bf16, -row[i + half] * s[i]));
                rotated[i + half] = round_to(bf16, round_to(bf16, row[i + half] * c[i + half]) +
                                                       round_to(bf16, row[i] * s[i + half]));
            }
            store_row(bf16, rotated, (char *)out + ((t * heads + h) * (int64_t)dim) * esize, dim);
        }
    }
}

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
    }

ENTRIES(bf16, 1)
ENTRIES(f32, 0)
