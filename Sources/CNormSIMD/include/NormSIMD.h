// AVX2 + FMA versions of NormKit's hot Float loops, chosen at run time.
//
// Swift cannot compile one function for a CPU feature without a package-wide compiler flag (an
// unsafeFlags setting), so the wide loops live here, each marked with a per-function target
// attribute; the package builds for the x86-64 baseline and `nk_simd_level()` says whether this
// machine may call them. Every function mirrors a Swift loop of `Span` (Sources/NormKernels/
// SpanKernels.swift) and computes the same formula; FMA rounds once where the Swift loop rounds
// twice. On other architectures the header declares nothing.
#ifndef NORMKIT_NORMSIMD_H
#define NORMKIT_NORMSIMD_H

#if defined(__x86_64__)

/// 1 when the CPU has AVX2 and FMA, else 0.
int nk_simd_level(void);

/// nk_simd_level(), or 0 when the environment sets NORMKIT_SIMD=baseline (the portable loops,
/// which CI tests this way): the switch every caller of the functions below consults.
int nk_simd_enabled(void);

/// y = a·(x − s) + b over n elements; stream != 0 writes y with non-temporal stores.
void nk_affine(const float *x, float *y, long n, float s, float a, float b, int stream);

/// y = (r·(x − s) + t)·γ + β with γ, β per element (NULL: 1 and 0).
void nk_elementwise(const float *x, float *y, long n, float s, float r, float t,
                    const float *gamma, const float *beta, int stream);

/// Σ(x − s) and Σ(x − s)² over n elements: Float accumulators over blocks of 2048 elements,
/// added to Double totals per block.
void nk_shifted_sums(const float *x, long n, float s, double *sum, double *squares);

/// Σ dy and Σ dy·(x − s), blocked like nk_shifted_sums.
void nk_gradient_sums(const float *x, const float *dy, long n, float s, double *sum,
                      double *products);

/// With g = dy·γ: Σ g and Σ g·(x − s) (returned), and dy·(r·(x − s) + t) added to dgamma[i],
/// dy added to dbeta[i].
void nk_elementwise_gradient_sums(const float *x, const float *dy, long n, float s, float r,
                                  float t, const float *gamma, float *dgamma, float *dbeta,
                                  double *sum, double *products);

/// nk_elementwise_gradient_sums for `rows` (1 to 4) rows `stride` elements apart that share γ,
/// with per-row shift, rstd and term; per-row sums in sums[k], products[k], and the rows' dy·x̂
/// and dy added to dgamma and dbeta once per column (LayerNorm and RMSNorm backward).
void nk_rows_elementwise_gradient_sums(long rows, const float *x, const float *dy, long stride,
                                       long n, const float *s, const float *r, const float *t,
                                       const float *gamma, float *dgamma, float *dbeta,
                                       double *sums, double *products);

/// dx = a·dy·γ + b·(x − s) + c (γ per element, or NULL for 1).
void nk_gradient(const float *x, const float *dy, float *dx, long n, float s, float a, float b,
                 float c, const float *gamma, int stream);

/// y = ((x − s[i])·a[i] + b[i])·γ + β over one row of n columns.
void nk_column_row(const float *x, float *y, long n, const float *shift, const float *a,
                   const float *b, float gamma, float beta, int stream);

/// For `rows` consecutive rows of n columns: acc[i] += Σ(x − s[i]), sq[i] += Σ(x − s[i])².
void nk_column_sums(const float *x, long rows, long n, const float *shift, float *acc,
                    float *sq);

/// One row of a column gradient reduction: g = dy·γ; sums[i] += g; products[i] += g·(x − s[i]);
/// when rowSums != 0, *rowXhat = Σ dy·(r[i]·(x − s[i]) + t[i]) and *rowDy = Σ dy.
void nk_column_accumulate(const float *x, const float *dy, long n, const float *shift,
                          const float *rstd, const float *term, float gamma, float *sums,
                          float *products, int rowSums, float *rowXhat, float *rowDy);

/// dx = a[i]·(dy·γ) + b[i]·(x − s[i]) + c[i] over one row of n columns.
void nk_column_gradient_row(const float *x, const float *dy, float *dx, long n,
                            const float *shift, const float *a, const float *b, const float *c,
                            float gamma, int stream);

/// c = a·b for row-major a (m×k), b (k×n), c (m×n) that do not overlap; meant for the d × d
/// whitening algebra (d ≤ 32), where a BLAS call costs more than the arithmetic.
void nk_small_dgemm(long m, long n, long k, const double *a, const double *b, double *c);

/// C = A·B, or C += A·B when accumulate != 0, for row-major A (m×k, row stride lda), B (k×n,
/// ldb) and C (m×n, ldc) in Float, with k small (the d × d whitening matrix times d rows of
/// data): no packing, four rows of C by sixteen columns in registers for the whole of k.
void nk_small_sgemm(long m, long n, long k, const float *a, long lda, const float *b, long ldb,
                    float *c, long ldc, int accumulate);

#endif
#endif
