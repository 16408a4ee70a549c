/* Fused statistics for capture on the CPU: one pass for the max, one for exp and the sums.
 *
 * torch computes the same statistics in 6-7 passes over memory (amax, subtract, softmax,
 * max of p, p * s, sum); here each row (attention) or each vocabulary slice of a row
 * (logits) is read while it sits in cache. A decode step's attention (attention_decode) and a
 * layer's hidden-state summaries (hidden_summary) are one call each: on small layers the
 * dozens of torch ops they replace cost more than their arithmetic. Compiled at first use
 * by corevital/fused.py with the system C compiler and OpenMP; loaded after torch, the
 * library shares torch's OpenMP runtime (libgomp.so.1), so its parallel loops run on
 * torch's threads rather than competing with them. Pure math, no allocation. Each row is summed in one fixed order by
 * one thread, so results do not depend on the thread count.
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

/* One row's attention statistics, and the weights on three kinds of key: the sequence's first
 * real key (the sink), the key just before the query's own, and the prompt's keys. */
typedef struct {
    float entropy, max_p, sink, prev, prompt, own;
} RowStats;

/* Softmax statistics of one row of scaled scores x[0..k): keys j >= n (ahead of a causal
 * query) and keys with visible[j] == 0 (visible may be NULL) get weight exactly 0, as do
 * keys already masked with a very negative score. A row that sees no key at all (a padding
 * query, dropped later) gets uniform weights: finite, like the torch ops'. `first`: the sink's
 * column (-1 or >= n: not among the keys it sees, weight 0); `prev`: the previous key's column
 * (< 0: none, NaN); `own`: the query's own key column (< 0 or >= n: none, NaN); the prompt's
 * keys are columns 0..prompt_keys-1. With `weights`, x is
 * overwritten by the softmax weights; else by exp(x - max), unnormalised. Short rows cost
 * per pass more than per key, so there are few passes: max; exp and its sums; the prompt's
 * part (a loop of its own: folded into the exp loop, it stops GCC vectorising that well);
 * with `weights`, the division. */
static RowStats row_softmax(float *x, int64_t n, int64_t k, const uint8_t *visible, int64_t first, int64_t prev,
                            int64_t own, int64_t prompt_keys, int weights) {
    float m = -FLT_MAX;
    if (visible) {
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < n; j++) {
            float v = visible[j] ? x[j] : -FLT_MAX;
            x[j] = v;
            m = v > m ? v : m;
        }
    } else {
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < n; j++) m = x[j] > m ? x[j] : m;
    }
    int64_t p_end = prompt_keys < n ? prompt_keys : n;
    float z = 0.0f, a = 0.0f, prompt = 0.0f;
#pragma omp simd reduction(+ : z, a)
    for (int64_t j = 0; j < n; j++) {
        float d = x[j] - m;
        float e = exp_shifted(d);
        x[j] = e;
        z += e;
        a += e * (d < LOW ? LOW : d);
    }
#pragma omp simd reduction(+ : prompt)
    for (int64_t j = 0; j < p_end; j++) prompt += x[j];
    float inv = 1.0f / z;
    RowStats r = {logf(z) - a * inv,
                  inv,
                  first >= 0 && first < n ? x[first] * inv : 0.0f,
                  prev >= 0 ? x[prev] * inv : NAN,
                  prompt * inv,
                  own >= 0 && own < n ? x[own] * inv : NAN};
    if (weights) {
#pragma omp simd
        for (int64_t j = 0; j < n; j++) x[j] *= inv;
        if (n < k) memset(x + n, 0, (size_t)(k - n) * sizeof(float));
    }
    return r;
}

/* Over the heads of one query: mean and min of the entropy, max of the largest weight, and
 * the mean weights on the sink, the previous key and the prompt -> out[0..6). With per_head,
 * also each head's own values, field-major: out[6 + f * heads + h] for the fields f = entropy,
 * sink, previous key, prompt, own key. */
static void head_summary(const RowStats *rows, int64_t heads, int per_head, float *out) {
    float ent = 0.0f, ent_min = INFINITY, max_p = -INFINITY, sink = 0.0f, prev = 0.0f, prompt = 0.0f;
    for (int64_t h = 0; h < heads; h++) {
        ent += rows[h].entropy;
        ent_min = rows[h].entropy < ent_min ? rows[h].entropy : ent_min;
        max_p = rows[h].max_p > max_p ? rows[h].max_p : max_p;
        sink += rows[h].sink;
        prev += rows[h].prev;
        prompt += rows[h].prompt;
    }
    out[0] = ent / heads;
    out[1] = ent_min;
    out[2] = max_p;
    out[3] = sink / heads;
    out[4] = prev / heads;
    out[5] = prompt / heads;
    if (per_head)
        for (int64_t h = 0; h < heads; h++) {
            out[6 + h] = rows[h].entropy;
            out[6 + heads + h] = rows[h].sink;
            out[6 + 2 * heads + h] = rows[h].prev;
            out[6 + 3 * heads + h] = rows[h].prompt;
            out[6 + 4 * heads + h] = rows[h].own;
        }
}

/* The width of one query's output: 6, or 6 + 5 x heads with per_head. */
static inline int64_t out_width(int64_t heads, int per_head) { return per_head ? 6 + 5 * heads : 6; }

/* Scaled scores (lead, heads, q, k), row-major, overwritten by the softmax weights -> per
 * query (lead, q, w), w = out_width: [mean and min over heads of the entropy (nats), largest weight over
 * heads and keys, mean over heads of the weight on the sink, on the previous key, on the
 * prompt], then with per_head head_summary's per-head values. Query i sits at key column q_offset + i; when causal it sees keys up to there.
 * mask (may be NULL): bytes, 1 = may attend; the row of lead index l and query i starts at
 * mask + (l % batch) * mask_lead + i * mask_row. first_key[l % batch]: the sink's column.
 * The lead index's batch row is l % batch: leads are (..., batch), e.g. (layers, batch). */
void attention_summary(float *s, int64_t lead, int64_t heads, int64_t q, int64_t k, int64_t causal, int64_t q_offset,
                       const uint8_t *mask, int64_t mask_lead, int64_t mask_row, int64_t batch,
                       const int64_t *first_key, int64_t prompt_keys, int64_t per_head, float *out) {
    int64_t w = out_width(heads, per_head);
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t l = 0; l < lead; l++)
        for (int64_t i = 0; i < q; i++) {
            RowStats rows[heads];
            int64_t n = causal && q_offset + i + 1 < k ? q_offset + i + 1 : k;
            const uint8_t *visible = mask ? mask + (l % batch) * mask_lead + i * mask_row : NULL;
            for (int64_t h = 0; h < heads; h++)
                rows[h] = row_softmax(s + ((l * heads + h) * q + i) * k, n, k, visible, first_key[l % batch],
                                      q_offset + i - 1, q_offset + i, prompt_keys, 1);
            head_summary(rows, heads, per_head, out + (l * q + i) * w);
        }
}

typedef float v8f __attribute__((vector_size(32)));

/* The dot product of two float rows of n: 8 lanes at a time (one AVX register, or two SSE
 * ones) with a single sum of lanes at the end, then the rest one by one. */
static inline float dot(const float *a, const float *b, int64_t n) {
    v8f acc = {0};
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
        v8f x, y;
        memcpy(&x, a + c, sizeof x);
        memcpy(&y, b + c, sizeof y);
        acc += x * y;
    }
    float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; c < n; c++) sum += a[c] * b[c];
    return sum;
}

/* One query row's scores against keys (k, d) row-major: x[j] = qs . key j for the n keys
 * it sees (-FLT_MAX where visible[j] == 0; visible may be NULL), and -FLT_MAX (weight 0)
 * for j in n..padded, so that row_softmax runs over whole vectors. */
static void score_row(float *x, const float *qs, const float *keys, int64_t d, int64_t n, int64_t padded,
                      const uint8_t *visible) {
    for (int64_t j = 0; j < n; j++) x[j] = visible && !visible[j] ? -FLT_MAX : dot(qs, keys + j * d, d);
    for (int64_t j = n; j < padded; j++) x[j] = -FLT_MAX;
}

/* One decode step's attention statistics for every layer at once, read in place from each
 * layer's query (batch, heads, 1, d) and keys (batch, kv_heads, k, d), contiguous float32
 * (queries[l], keys[l]: addresses) -> out (batch, layers, w) as attention_summary's for the
 * query at key column k - 1. Query head h reads key head h / (heads / kv_heads); scales[l]
 * is the layer's score scaling, applied to the query first (as attention_scores does).
 * mask (may be NULL): (batch, k) bytes, row stride mask_row. work: scratch of threads x heads
 * x k floats, k rounded up to a multiple of 16, 64-byte aligned. */
void attention_decode(int64_t layers, const int64_t *queries, const int64_t *keys, const float *scales, int64_t batch,
                      int64_t heads, int64_t kv_heads, int64_t k, int64_t d, const uint8_t *mask, int64_t mask_row,
                      const int64_t *first_key, int64_t prompt_keys, int64_t per_head, float *work, float *out) {
    int64_t groups = heads / kv_heads, kp = (k + 15) & ~(int64_t)15;  /* rows padded to whole vectors */
    int64_t w = out_width(heads, per_head);
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t l = 0; l < layers; l++)
        for (int64_t b = 0; b < batch; b++) {
            float *x = work + (int64_t)omp_get_thread_num() * heads * kp;
            const float *query = (const float *)queries[l] + b * heads * d;
            const float *key = (const float *)keys[l] + b * kv_heads * k * d;
            const uint8_t *visible = mask ? mask + b * mask_row : NULL;
            RowStats rows[heads];
            float qs[heads * d];  /* the scaled queries */
            for (int64_t c = 0; c < heads * d; c++) qs[c] = query[c] * scales[l];
            for (int64_t h = 0; h < heads; h++) {
                const float *qh = qs + h * d, *kh = key + (h / groups) * k * d;
                float *xh = x + h * kp;
                score_row(xh, qh, kh, d, k, kp, visible);
                rows[h] = row_softmax(xh, kp, kp, NULL, first_key[b], k - 2, k - 1, prompt_keys, 0);
            }
            head_summary(rows, heads, per_head, out + (b * layers + l) * w);
        }
}

/* Hidden-state summaries of `layers` consecutive blocks, read in place: states[0] is the first
 * block's input and states[l + 1] block l's output, each (rows, hidden) contiguous float32
 * (addresses) -> out (rows, layers, 13): mean, std (ddof 0, two passes), L2 norm, max |x|, the
 * 8 products with the sketch directions dirs (hidden, 8), and the cosine with the block's
 * input. One pass over each row for the sums and products, one for the deviations. */
void hidden_summary(int64_t layers, const int64_t *states, int64_t rows, int64_t hidden, const float *dirs, float *out) {
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t l = 0; l < layers; l++)
        for (int64_t r = 0; r < rows; r++) {
            const float *x = (const float *)states[l + 1] + r * hidden, *in = (const float *)states[l] + r * hidden;
            float sum = 0.0f, sq = 0.0f, top = 0.0f, cross = 0.0f, sq_in = 0.0f, sketch[8] = {0};
#pragma omp simd reduction(+ : sum, sq, cross, sq_in) reduction(max : top)
            for (int64_t c = 0; c < hidden; c++) {
                sum += x[c];
                sq += x[c] * x[c];
                cross += x[c] * in[c];
                sq_in += in[c] * in[c];
                float a = fabsf(x[c]);
                top = a > top ? a : top;
            }
            for (int64_t c = 0; c < hidden; c++)
#pragma omp simd
                for (int i = 0; i < 8; i++) sketch[i] += x[c] * dirs[c * 8 + i];
            float mean = sum / hidden, dev = 0.0f;
#pragma omp simd reduction(+ : dev)
            for (int64_t c = 0; c < hidden; c++) dev += (x[c] - mean) * (x[c] - mean);
            float norm = sqrtf(sq), *o = out + (r * layers + l) * 13;
            o[0] = mean;
            o[1] = sqrtf(dev / hidden);
            o[2] = norm;
            o[3] = sq != sq ? NAN : top;  /* some x is NaN exactly when the sum of squares is: NaN wins, as in torch's amax */
            for (int i = 0; i < 8; i++) o[4 + i] = sketch[i];
            o[12] = cross / (norm * sqrtf(sq_in));
        }
}

/* The threads a parallel loop here may use: attention_decode's scratch is sized by it. */
int64_t max_threads(void) { return omp_get_max_threads(); }

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
