// AVX2 + FMA loops behind NormKit's `Span` kernels; see include/NormSIMD.h.
#include "NormSIMD.h"

#if defined(__x86_64__)
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NK_WIDE __attribute__((target("avx2,fma")))

int nk_simd_level(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
}

int nk_simd_enabled(void) {
    const char *setting = getenv("NORMKIT_SIMD");
    if (setting && strcmp(setting, "baseline") == 0) return 0;
    return nk_simd_level();
}

// Elements to write one by one before y is 32-byte aligned (non-temporal stores need it).
static inline long nk_head(const float *y, long n, int stream) {
    if (!stream) return 0;
    long past = (long)(((uintptr_t)y & 31) / sizeof(float));
    long head = past ? 8 - past : 0;
    return head < n ? head : n;
}

NK_WIDE static inline float nk_hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
    __m128 c = _mm_add_ss(b, _mm_shuffle_ps(b, b, 1));
    return _mm_cvtss_f32(c);
}

NK_WIDE static inline void nk_put(float *p, __m256 v, int stream) {
    if (stream) {
        _mm256_stream_ps(p, v);
    } else {
        _mm256_storeu_ps(p, v);
    }
}

NK_WIDE void nk_affine(const float *x, float *y, long n, float s, float a, float b, int stream) {
    long i = nk_head(y, n, stream);
    for (long j = 0; j < i; j++) y[j] = __builtin_fmaf(x[j] - s, a, b);
    const __m256 sv = _mm256_set1_ps(s), av = _mm256_set1_ps(a), bv = _mm256_set1_ps(b);
    for (; i + 16 <= n; i += 16) {
        __m256 v0 = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), sv), av, bv);
        __m256 v1 = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), sv), av, bv);
        nk_put(y + i, v0, stream);
        nk_put(y + i + 8, v1, stream);
    }
    for (; i + 8 <= n; i += 8) {
        nk_put(y + i, _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), sv), av, bv), stream);
    }
    for (; i < n; i++) y[i] = __builtin_fmaf(x[i] - s, a, b);
    if (stream) _mm_sfence();
}

NK_WIDE void nk_elementwise(const float *x, float *y, long n, float s, float r, float t,
                            const float *gamma, const float *beta, int stream) {
    long i = nk_head(y, n, stream);
    for (long j = 0; j < i; j++) {
        float v = __builtin_fmaf(x[j] - s, r, t);
        if (gamma) v *= gamma[j];
        if (beta) v += beta[j];
        y[j] = v;
    }
    const __m256 sv = _mm256_set1_ps(s), rv = _mm256_set1_ps(r), tv = _mm256_set1_ps(t);
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), sv), rv, tv);
        if (gamma) v = _mm256_mul_ps(v, _mm256_loadu_ps(gamma + i));
        if (beta) v = _mm256_add_ps(v, _mm256_loadu_ps(beta + i));
        nk_put(y + i, v, stream);
    }
    for (; i < n; i++) {
        float v = __builtin_fmaf(x[i] - s, r, t);
        if (gamma) v *= gamma[i];
        if (beta) v += beta[i];
        y[i] = v;
    }
    if (stream) _mm_sfence();
}

enum { NK_BLOCK = 2048 };

// Σ w and Σ w·(x − s), with w = dy, or w = x − s when dy is NULL (then the sums are Σ(x − s) and
// Σ(x − s)²). Float accumulators over blocks of NK_BLOCK elements, added to Double per block.
// Always inlined into its two callers, so the NULL test folds away.
NK_WIDE __attribute__((always_inline)) static inline void nk_weighted_sums(
    const float *x, const float *dy, long n, float s, double *first, double *second) {
    const __m256 sv = _mm256_set1_ps(s);
    double t1 = 0, t2 = 0;
    long i = 0;
    while (i < n) {
        long end = i + NK_BLOCK < n ? i + NK_BLOCK : n;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, q0 = a0, q1 = a0;
        for (; i + 16 <= end; i += 16) {
            __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(x + i), sv);
            __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(x + i + 8), sv);
            __m256 w0 = dy ? _mm256_loadu_ps(dy + i) : d0;
            __m256 w1 = dy ? _mm256_loadu_ps(dy + i + 8) : d1;
            a0 = _mm256_add_ps(a0, w0);
            a1 = _mm256_add_ps(a1, w1);
            q0 = _mm256_fmadd_ps(w0, d0, q0);
            q1 = _mm256_fmadd_ps(w1, d1, q1);
        }
        for (; i + 8 <= end; i += 8) {
            __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(x + i), sv);
            __m256 w0 = dy ? _mm256_loadu_ps(dy + i) : d0;
            a0 = _mm256_add_ps(a0, w0);
            q0 = _mm256_fmadd_ps(w0, d0, q0);
        }
        float r1 = 0, r2 = 0;
        for (; i < end; i++) {
            float d = x[i] - s;
            float w = dy ? dy[i] : d;
            r1 += w;
            r2 = __builtin_fmaf(w, d, r2);
        }
        t1 += (double)nk_hsum(_mm256_add_ps(a0, a1)) + (double)r1;
        t2 += (double)nk_hsum(_mm256_add_ps(q0, q1)) + (double)r2;
    }
    *first = t1;
    *second = t2;
}

NK_WIDE void nk_shifted_sums(const float *x, long n, float s, double *sum, double *squares) {
    nk_weighted_sums(x, NULL, n, s, sum, squares);
}

NK_WIDE void nk_gradient_sums(const float *x, const float *dy, long n, float s, double *sum,
                              double *products) {
    nk_weighted_sums(x, dy, n, s, sum, products);
}

// R rows (R ≤ 4, a constant after inlining) of length n, `stride` apart, sharing γ: per row
// Σ g and Σ g·(x − s) with g = dy·γ (Float over blocks of NK_BLOCK columns, then Double), and
// Σ over the R rows of dy·x̂ and dy added to dgamma and dbeta once per column: the partials
// are read and written once per R rows instead of once per row.
NK_WIDE __attribute__((always_inline)) static inline void nk_rows_gradient_sums(
    int R, const float *x, const float *dy, long stride, long n, const float *s, const float *r,
    const float *t, const float *gamma, float *dgamma, float *dbeta, double *sums,
    double *products) {
    double t1[4] = {0, 0, 0, 0}, t2[4] = {0, 0, 0, 0};
    long i = 0;
    while (i < n) {
        long end = i + NK_BLOCK < n ? i + NK_BLOCK : n;
        __m256 a[4], q[4];
        for (int k = 0; k < R; k++) a[k] = q[k] = _mm256_setzero_ps();
        for (; i + 8 <= end; i += 8) {
            const __m256 gv = _mm256_loadu_ps(gamma + i);
            __m256 dg = _mm256_setzero_ps(), db = dg;
            for (int k = 0; k < R; k++) {
                __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + k * stride + i), _mm256_set1_ps(s[k]));
                __m256 dyv = _mm256_loadu_ps(dy + k * stride + i);
                __m256 g = _mm256_mul_ps(dyv, gv);
                a[k] = _mm256_add_ps(a[k], g);
                q[k] = _mm256_fmadd_ps(g, d, q[k]);
                __m256 xhat = _mm256_fmadd_ps(d, _mm256_set1_ps(r[k]), _mm256_set1_ps(t[k]));
                dg = _mm256_fmadd_ps(dyv, xhat, dg);
                db = _mm256_add_ps(db, dyv);
            }
            _mm256_storeu_ps(dgamma + i, _mm256_add_ps(_mm256_loadu_ps(dgamma + i), dg));
            _mm256_storeu_ps(dbeta + i, _mm256_add_ps(_mm256_loadu_ps(dbeta + i), db));
        }
        float r1[4] = {0, 0, 0, 0}, r2[4] = {0, 0, 0, 0};
        for (; i < end; i++) {
            float dg = 0, db = 0;
            for (int k = 0; k < R; k++) {
                float d = x[k * stride + i] - s[k];
                float dyk = dy[k * stride + i];
                float g = dyk * gamma[i];
                r1[k] += g;
                r2[k] = __builtin_fmaf(g, d, r2[k]);
                dg = __builtin_fmaf(dyk, __builtin_fmaf(d, r[k], t[k]), dg);
                db += dyk;
            }
            dgamma[i] += dg;
            dbeta[i] += db;
        }
        for (int k = 0; k < R; k++) {
            t1[k] += (double)nk_hsum(a[k]) + (double)r1[k];
            t2[k] += (double)nk_hsum(q[k]) + (double)r2[k];
        }
    }
    for (int k = 0; k < R; k++) {
        sums[k] = t1[k];
        products[k] = t2[k];
    }
}

NK_WIDE void nk_elementwise_gradient_sums(const float *x, const float *dy, long n, float s,
                                          float r, float t, const float *gamma, float *dgamma,
                                          float *dbeta, double *sum, double *products) {
    nk_rows_gradient_sums(1, x, dy, 0, n, &s, &r, &t, gamma, dgamma, dbeta, sum, products);
}

NK_WIDE void nk_rows_elementwise_gradient_sums(long rows, const float *x, const float *dy,
                                               long stride, long n, const float *s,
                                               const float *r, const float *t,
                                               const float *gamma, float *dgamma, float *dbeta,
                                               double *sums, double *products) {
    switch (rows) {
    case 1: nk_rows_gradient_sums(1, x, dy, stride, n, s, r, t, gamma, dgamma, dbeta, sums, products); break;
    case 2: nk_rows_gradient_sums(2, x, dy, stride, n, s, r, t, gamma, dgamma, dbeta, sums, products); break;
    case 3: nk_rows_gradient_sums(3, x, dy, stride, n, s, r, t, gamma, dgamma, dbeta, sums, products); break;
    default: nk_rows_gradient_sums(4, x, dy, stride, n, s, r, t, gamma, dgamma, dbeta, sums, products); break;
    }
}

NK_WIDE void nk_gradient(const float *x, const float *dy, float *dx, long n, float s, float a,
                         float b, float c, const float *gamma, int stream) {
    long i = nk_head(dx, n, stream);
    for (long j = 0; j < i; j++) {
        float g = gamma ? dy[j] * gamma[j] : dy[j];
        dx[j] = __builtin_fmaf(g, a, __builtin_fmaf(x[j] - s, b, c));
    }
    const __m256 sv = _mm256_set1_ps(s), av = _mm256_set1_ps(a), bv = _mm256_set1_ps(b),
                 cv = _mm256_set1_ps(c);
    for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(dy + i);
        if (gamma) g = _mm256_mul_ps(g, _mm256_loadu_ps(gamma + i));
        __m256 v = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), sv), bv, cv);
        nk_put(dx + i, _mm256_fmadd_ps(g, av, v), stream);
    }
    for (; i < n; i++) {
        float g = gamma ? dy[i] * gamma[i] : dy[i];
        dx[i] = __builtin_fmaf(g, a, __builtin_fmaf(x[i] - s, b, c));
    }
    if (stream) _mm_sfence();
}

NK_WIDE void nk_column_row(const float *x, float *y, long n, const float *shift, const float *a,
                           const float *b, float gamma, float beta, int stream) {
    long i = nk_head(y, n, stream);
    for (long j = 0; j < i; j++) {
        y[j] = __builtin_fmaf(__builtin_fmaf(x[j] - shift[j], a[j], b[j]), gamma, beta);
    }
    const __m256 gv = _mm256_set1_ps(gamma), bv = _mm256_set1_ps(beta);
    for (; i + 8 <= n; i += 8) {
        __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(shift + i));
        __m256 v = _mm256_fmadd_ps(d, _mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i));
        nk_put(y + i, _mm256_fmadd_ps(v, gv, bv), stream);
    }
    for (; i < n; i++) {
        y[i] = __builtin_fmaf(__builtin_fmaf(x[i] - shift[i], a[i], b[i]), gamma, beta);
    }
    if (stream) _mm_sfence();
}

NK_WIDE void nk_column_sums(const float *x, long rows, long n, const float *shift, float *acc,
                            float *sq) {
    long r = 0;
    for (; r + 4 <= rows; r += 4) {
        const float *row = x + r * n;
        long i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 sv = _mm256_loadu_ps(shift + i);
            __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(row + i), sv);
            __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(row + n + i), sv);
            __m256 d2 = _mm256_sub_ps(_mm256_loadu_ps(row + 2 * n + i), sv);
            __m256 d3 = _mm256_sub_ps(_mm256_loadu_ps(row + 3 * n + i), sv);
            __m256 total = _mm256_add_ps(_mm256_add_ps(d0, d1), _mm256_add_ps(d2, d3));
            __m256 squares = _mm256_fmadd_ps(
                d0, d0, _mm256_fmadd_ps(d1, d1, _mm256_fmadd_ps(d2, d2, _mm256_mul_ps(d3, d3))));
            _mm256_storeu_ps(acc + i, _mm256_add_ps(_mm256_loadu_ps(acc + i), total));
            _mm256_storeu_ps(sq + i, _mm256_add_ps(_mm256_loadu_ps(sq + i), squares));
        }
        for (; i < n; i++) {
            for (long k = 0; k < 4; k++) {
                float d = row[k * n + i] - shift[i];
                acc[i] += d;
                sq[i] = __builtin_fmaf(d, d, sq[i]);
            }
        }
    }
    for (; r < rows; r++) {
        const float *row = x + r * n;
        long i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 d = _mm256_sub_ps(_mm256_loadu_ps(row + i), _mm256_loadu_ps(shift + i));
            _mm256_storeu_ps(acc + i, _mm256_add_ps(_mm256_loadu_ps(acc + i), d));
            _mm256_storeu_ps(sq + i, _mm256_fmadd_ps(d, d, _mm256_loadu_ps(sq + i)));
        }
        for (; i < n; i++) {
            float d = row[i] - shift[i];
            acc[i] += d;
            sq[i] = __builtin_fmaf(d, d, sq[i]);
        }
    }
}

NK_WIDE void nk_column_accumulate(const float *x, const float *dy, long n, const float *shift,
                                  const float *rstd, const float *term, float gamma, float *sums,
                                  float *products, int rowSums, float *rowXhat, float *rowDy) {
    const __m256 gv = _mm256_set1_ps(gamma);
    __m256 rx = _mm256_setzero_ps(), rd = rx;
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(shift + i));
        __m256 dyv = _mm256_loadu_ps(dy + i);
        __m256 g = _mm256_mul_ps(dyv, gv);
        _mm256_storeu_ps(sums + i, _mm256_add_ps(_mm256_loadu_ps(sums + i), g));
        _mm256_storeu_ps(products + i, _mm256_fmadd_ps(g, d, _mm256_loadu_ps(products + i)));
        if (rowSums) {
            __m256 xhat = _mm256_fmadd_ps(d, _mm256_loadu_ps(rstd + i), _mm256_loadu_ps(term + i));
            rx = _mm256_fmadd_ps(dyv, xhat, rx);
            rd = _mm256_add_ps(rd, dyv);
        }
    }
    float tx = 0, td = 0;
    for (; i < n; i++) {
        float d = x[i] - shift[i];
        float g = dy[i] * gamma;
        sums[i] += g;
        products[i] = __builtin_fmaf(g, d, products[i]);
        if (rowSums) {
            tx = __builtin_fmaf(dy[i], __builtin_fmaf(d, rstd[i], term[i]), tx);
            td += dy[i];
        }
    }
    if (rowSums) {
        *rowXhat = nk_hsum(rx) + tx;
        *rowDy = nk_hsum(rd) + td;
    }
}

NK_WIDE void nk_column_gradient_row(const float *x, const float *dy, float *dx, long n,
                                    const float *shift, const float *a, const float *b,
                                    const float *c, float gamma, int stream) {
    long i = nk_head(dx, n, stream);
    for (long j = 0; j < i; j++) {
        float inner = __builtin_fmaf(x[j] - shift[j], b[j], c[j]);
        dx[j] = __builtin_fmaf(dy[j] * gamma, a[j], inner);
    }
    const __m256 gv = _mm256_set1_ps(gamma);
    for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_mul_ps(_mm256_loadu_ps(dy + i), gv);
        __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(shift + i));
        __m256 v = _mm256_fmadd_ps(d, _mm256_loadu_ps(b + i), _mm256_loadu_ps(c + i));
        nk_put(dx + i, _mm256_fmadd_ps(g, _mm256_loadu_ps(a + i), v), stream);
    }
    for (; i < n; i++) {
        float inner = __builtin_fmaf(x[i] - shift[i], b[i], c[i]);
        dx[i] = __builtin_fmaf(dy[i] * gamma, a[i], inner);
    }
    if (stream) _mm_sfence();
}

// c = a·b for small row-major matrices (a m×k, b k×n, c m×n, no aliasing). Two rows of c at a
// time, 16 columns each, stay in eight registers (enough independent FMAs to cover the FMA
// latency) while the k rows of b stream past; each load of b serves both rows.
NK_WIDE static inline void nk_dgemm_rows(long rows, long n, long k, const double *a,
                                         const double *b, double *c) {
    const double *a0 = a, *a1 = rows > 1 ? a + k : a;
    long j = 0;
    for (; j + 16 <= n; j += 16) {
        __m256d c0 = _mm256_setzero_pd(), c1 = c0, c2 = c0, c3 = c0;
        __m256d c4 = c0, c5 = c0, c6 = c0, c7 = c0;
        for (long p = 0; p < k; p++) {
            const double *bp = b + p * n + j;
            const __m256d b0 = _mm256_loadu_pd(bp), b1 = _mm256_loadu_pd(bp + 4);
            const __m256d b2 = _mm256_loadu_pd(bp + 8), b3 = _mm256_loadu_pd(bp + 12);
            const __m256d s = _mm256_set1_pd(a0[p]), t = _mm256_set1_pd(a1[p]);
            c0 = _mm256_fmadd_pd(s, b0, c0);
            c1 = _mm256_fmadd_pd(s, b1, c1);
            c2 = _mm256_fmadd_pd(s, b2, c2);
            c3 = _mm256_fmadd_pd(s, b3, c3);
            c4 = _mm256_fmadd_pd(t, b0, c4);
            c5 = _mm256_fmadd_pd(t, b1, c5);
            c6 = _mm256_fmadd_pd(t, b2, c6);
            c7 = _mm256_fmadd_pd(t, b3, c7);
        }
        _mm256_storeu_pd(c + j, c0);
        _mm256_storeu_pd(c + j + 4, c1);
        _mm256_storeu_pd(c + j + 8, c2);
        _mm256_storeu_pd(c + j + 12, c3);
        if (rows > 1) {
            _mm256_storeu_pd(c + n + j, c4);
            _mm256_storeu_pd(c + n + j + 4, c5);
            _mm256_storeu_pd(c + n + j + 8, c6);
            _mm256_storeu_pd(c + n + j + 12, c7);
        }
    }
    for (; j + 4 <= n; j += 4) {
        __m256d c0 = _mm256_setzero_pd(), c4 = c0;
        for (long p = 0; p < k; p++) {
            const __m256d bv = _mm256_loadu_pd(b + p * n + j);
            c0 = _mm256_fmadd_pd(_mm256_set1_pd(a0[p]), bv, c0);
            c4 = _mm256_fmadd_pd(_mm256_set1_pd(a1[p]), bv, c4);
        }
        _mm256_storeu_pd(c + j, c0);
        if (rows > 1) _mm256_storeu_pd(c + n + j, c4);
    }
    for (; j < n; j++) {
        double v0 = 0, v1 = 0;
        for (long p = 0; p < k; p++) {
            v0 = __builtin_fma(a0[p], b[p * n + j], v0);
            v1 = __builtin_fma(a1[p], b[p * n + j], v1);
        }
        c[j] = v0;
        if (rows > 1) c[n + j] = v1;
    }
}

NK_WIDE void nk_small_dgemm(long m, long n, long k, const double *a, const double *b, double *c) {
    for (long i = 0; i < m; i += 2) {
        nk_dgemm_rows(m - i > 1 ? 2 : 1, n, k, a + i * k, b, c + i * n);
    }
}

// Rows r of C (r ≤ 4) over columns [j, j + w·8) for w ≤ 2 vectors: C += A·B (accumulate) or
// C = A·B, with the r×w accumulators in registers for all k.
#define NK_SGEMM_BLOCK(R, W)                                                                      \
    do {                                                                                          \
        __m256 acc[4][2];                                                                         \
        for (int r = 0; r < (R); r++)                                                             \
            for (int v = 0; v < (W); v++)                                                         \
                acc[r][v] = accumulate ? _mm256_loadu_ps(c + (i + r) * ldc + j + 8 * v)           \
                                       : _mm256_setzero_ps();                                     \
        for (long p = 0; p < k; p++) {                                                            \
            __m256 bv[2];                                                                         \
            for (int v = 0; v < (W); v++) bv[v] = _mm256_loadu_ps(b + p * ldb + j + 8 * v);       \
            for (int r = 0; r < (R); r++) {                                                       \
                const __m256 s = _mm256_broadcast_ss(a + (i + r) * lda + p);                      \
                for (int v = 0; v < (W); v++) acc[r][v] = _mm256_fmadd_ps(s, bv[v], acc[r][v]);   \
            }                                                                                     \
        }                                                                                         \
        for (int r = 0; r < (R); r++)                                                             \
            for (int v = 0; v < (W); v++) _mm256_storeu_ps(c + (i + r) * ldc + j + 8 * v, acc[r][v]); \
    } while (0)

NK_WIDE void nk_small_sgemm(long m, long n, long k, const float *a, long lda, const float *b,
                            long ldb, float *c, long ldc, int accumulate) {
    long i = 0;
    for (; i + 4 <= m; i += 4) {
        long j = 0;
        for (; j + 16 <= n; j += 16) NK_SGEMM_BLOCK(4, 2);
        for (; j + 8 <= n; j += 8) NK_SGEMM_BLOCK(4, 1);
        for (; j < n; j++) {
            for (int r = 0; r < 4; r++) {
                float v = accumulate ? c[(i + r) * ldc + j] : 0;
                for (long p = 0; p < k; p++) v = __builtin_fmaf(a[(i + r) * lda + p], b[p * ldb + j], v);
                c[(i + r) * ldc + j] = v;
            }
        }
    }
    for (; i < m; i++) {
        long j = 0;
        for (; j + 16 <= n; j += 16) NK_SGEMM_BLOCK(1, 2);
        for (; j + 8 <= n; j += 8) NK_SGEMM_BLOCK(1, 1);
        for (; j < n; j++) {
            float v = accumulate ? c[i * ldc + j] : 0;
            for (long p = 0; p < k; p++) v = __builtin_fmaf(a[i * lda + p], b[p * ldb + j], v);
            c[i * ldc + j] = v;
        }
    }
}

#endif
