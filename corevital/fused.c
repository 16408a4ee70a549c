/* Fused softmax statistics for the CPU: one pass for the max, one for exp and the sums.
 *
 * torch computes the same statistics in 6-7 passes over memory (amax, subtract, softmax,
 * max of p, p * s, sum); here each row (attention) or each vocabulary slice of a row
 * (logits) is read while it sits in cache. Compiled at first use by corevital/fused.py
 * with the system C compiler and OpenMP; loaded after torch, the library shares torch's
 * OpenMP runtime (libgomp.so.1), so its parallel loops run on torch's threads rather than
 * competing with them. Pure math, no allocation.
 *
 * exp: Cephes' expf (range reduction by ln 2, degree-6 polynomial, about 1 ulp), written
 * so that the compiler vectorises it; arguments below -87 give exactly 0 (a hidden key or
 * a token far out in the tail: e^-87 = 1.6e-38), NaN stays NaN.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <float.h>
#include <omp.h>

#define TOPK 5
#define LOW -87.0f

#pragma omp declare simd
static inline float exp_shifted(float x) {
    float c = x < LOW ? LOW : x;
    float n = floorf(c * 1.44269504088896341f + 0.5f);
    float r = c - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } two_n = { .i = ((int32_t)n + 127) << 23 };
    return x < LOW ? 0.0f : p * two_n.f;
}

/* Attention rows of scores (rows, k), row-major, overwritten by the softmax
 * weights p (0 for keys the row may not see). Row r sees keys 0..len-1, len = k, or, when
 * causal, min(k, q_offset + r % c + 1): rows are (groups x c) query rows of one block
 * whose first query sits at key position q_offset. Writes the row's entropy (nats) and its
 * largest weight. Keys already masked with a very negative score get weight 0. */
void attention_rows(float *s, int64_t rows, int64_t k, int64_t causal, int64_t c, int64_t q_offset,
                    float *entropy, float *max_p) {
#pragma omp parallel for schedule(static, 8)
    for (int64_t r = 0; r < rows; r++) {
        float *x = s + r * k;
        int64_t n = k;
        if (causal) {
            n = q_offset + r % c + 1;
            n = n < k ? n : k;
        }
        float m = -FLT_MAX;
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < n; j++) m = x[j] > m ? x[j] : m;
        float z = 0.0f, a = 0.0f;
#pragma omp simd reduction(+ : z, a)
        for (int64_t j = 0; j < n; j++) {
            float d = x[j] - m;
            float e = exp_shifted(d);
            x[j] = e;
            z += e;
            a += e * (d < LOW ? LOW : d);
        }
        float inv = 1.0f / z;
#pragma omp simd
        for (int64_t j = 0; j < n; j++) x[j] *= inv;
        if (n < k) memset(x + n, 0, (size_t)(k - n) * sizeof(float));
        entropy[r] = logf(z) - a * inv;
        max_p[r] = inv;
    }
}

/* Insert value v (vocabulary id) into one row's descending top 5. */
static void top5_insert(float *tv, int64_t *ti, float v, int64_t id) {
    int i = TOPK - 1;
    while (i > 0 && v > tv[i - 1]) {
        tv[i] = tv[i - 1];
        ti[i] = ti[i - 1];
        i--;
    }
    tv[i] = v;
    ti[i] = id;
}

/* One vocabulary slice of row-major logits (n, w): columns are vocabulary ids v0..v0 + w - 1
 * of n positions. Updates each row's online softmax: the max m, Z = sum exp(s - m) and
 * A = sum exp(s - m) (s - m), both rescaled by exp(m_old - m_new) when m grows (the slice's
 * float sums are added into double totals, so 49k terms lose no more than one slice's do);
 * the top 5 values and ids, descending (the slice is scanned for them only if its max beats
 * the row's 5th value); and `picked`, the logit of the row's target id if it falls in this
 * slice (targets may be NULL). State starts at m = -FLT_MAX, Z = A = 0, top 5 -inf, id -1. */
void logits_rows(const float *s, int64_t n, int64_t w, int64_t v0, float *m, double *z, double *a, float *top_v,
                 int64_t *top_i, const int64_t *targets, float *picked) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const float *x = s + r * w;
        float mx = -FLT_MAX;
#pragma omp simd reduction(max : mx)
        for (int64_t j = 0; j < w; j++) mx = x[j] > mx ? x[j] : mx;
        if (mx > m[r]) {  /* the max grew: rescale Z and A to it */
            double shift = (double)m[r] - mx, scale = exp(shift);
            a[r] = scale * (a[r] + shift * z[r]);
            z[r] *= scale;
            m[r] = mx;
        }
        float *tv = top_v + r * TOPK;
        if (mx > tv[TOPK - 1])
            for (int64_t j = 0; j < w; j++)
                if (x[j] > tv[TOPK - 1]) top5_insert(tv, top_i + r * TOPK, x[j], v0 + j);
        float sz = 0.0f, sa = 0.0f, mr = m[r];
#pragma omp simd reduction(+ : sz, sa)
        for (int64_t j = 0; j < w; j++) {
            float d = x[j] - mr;
            float e = exp_shifted(d);
            sz += e;
            sa += e * (d < LOW ? LOW : d);
        }
        z[r] += sz;
        a[r] += sa;
        if (targets && targets[r] >= v0 && targets[r] < v0 + w) picked[r] = x[targets[r] - v0];
    }
}
