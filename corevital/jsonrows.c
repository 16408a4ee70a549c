/* Gather-interleave for the JSON trace (jsonrows.py): record i is
 *     lits[0] entry(0, i) lits[1] entry(1, i) ... entry(k-1, i) lits[k]
 * where entry(c, i) is the byte range starts[c][i] .. ends[c][i] of bufs[c]. The entries are
 * numbers orjson already formatted (shortest float32 text, NaN as null) and JSON strings, so
 * this only copies bytes: the keys and braces of a trace's (step, layer) objects cost no
 * Python object per value. Returns the number of bytes written to out. */
#include <stdint.h>
#include <string.h>

int64_t interleave(int64_t n, int64_t k, const char *const *lits, const int64_t *lit_lens,
                   const char *const *bufs, const int64_t *const *starts, const int64_t *const *ends, char *out) {
    char *o = out;
    for (int64_t i = 0; i < n; i++) {
        for (int64_t c = 0; c < k; c++) {
            memcpy(o, lits[c], lit_lens[c]);
            o += lit_lens[c];
            int64_t len = ends[c][i] - starts[c][i];
            memcpy(o, bufs[c] + starts[c][i], len);
            o += len;
        }
        memcpy(o, lits[k], lit_lens[k]);
        o += lit_lens[k];
    }
    return o - out;
}
