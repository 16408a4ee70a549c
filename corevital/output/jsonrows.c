/* Records for the JSON trace (jsonrows.py): record i is
 *     lits[0] entry(0, i) lits[1] entry(1, i) ... entry(k-1, i) lits[k]
 * and entry(c, i) is either
 *   - widths[c] == 0: the byte range starts[c][i] .. ends[c][i] of bufs[c] (a JSON string from a
 *     vocabulary's column, a separator), or
 *   - widths[c] > 0: the next widths[c] numbers of stream streams[c], "x,y,z", read where that
 *     stream's cursor stands in bufs[c], an (n, k) array as orjson wrote it: "[[1.5,null],[2,3]]".
 * The numbers are orjson's text (shortest float32, NaN as null), so this only copies bytes, in
 * one pass over each buffer: no Python object, no offset array per value. Most pieces are
 * short: they are moved 16 bytes at a time (SSE2 finds where a number ends) wherever the bytes
 * around them can be read and written, else byte by byte. Each literal must be readable 32
 * bytes past its end (the caller pads them). Returns the number of bytes written to out, whose
 * size is out_size; record_ends (if not NULL) receives each record's end offset in out. */
#include <stdint.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

static const unsigned char DELIMITER[256] = {[','] = 1, ['['] = 1, [']'] = 1};

/* len bytes from s to o; 16 at a time while o's and s's next 16 bytes exist */
static inline char *copy(char *o, const char *out_end, const char *s, const char *s_end, int64_t len) {
    if (len <= 32 && o + 32 <= out_end && s + 32 <= s_end) {
        memcpy(o, s, 16);
        if (len > 16) memcpy(o + 16, s + 16, 16);
        return o + len;
    }
    memcpy(o, s, len);
    return o + len;
}

/* the number starting at b[p] to o; returns its end (the delimiter after it) */
static inline int64_t number(char **o, const char *out_end, const unsigned char *b, int64_t p, int64_t len) {
#ifdef __SSE2__
    while (p + 16 <= len && *o + 16 <= out_end) {
        __m128i v = _mm_loadu_si128((const __m128i *)(b + p));
        int mask = _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8(',')),
                                                               _mm_cmpeq_epi8(v, _mm_set1_epi8('['))),
                                                  _mm_cmpeq_epi8(v, _mm_set1_epi8(']'))));
        _mm_storeu_si128((__m128i *)*o, v);
        if (mask) {
            int n = __builtin_ctz(mask);
            *o += n;
            return p + n;
        }
        *o += 16;
        p += 16;
    }
#endif
    while (!DELIMITER[b[p]]) *(*o)++ = (char)b[p++];
    return p;
}

int64_t interleave(int64_t n, int64_t k, const char *const *lits, const int64_t *lit_lens,
                   const char *const *bufs, const int64_t *buf_lens, const int64_t *const *starts,
                   const int64_t *const *ends, const int64_t *widths, const int64_t *streams, int64_t *cursors,
                   char *out, int64_t out_size, int64_t *record_ends) {
    char *o = out;
    const char *out_end = out + out_size;
    for (int64_t i = 0; i < n; i++) {
        for (int64_t c = 0; c < k; c++) {
            o = copy(o, out_end, lits[c], lits[c] + lit_lens[c] + 32, lit_lens[c]);
            if (widths[c] == 0) {
                o = copy(o, out_end, bufs[c] + starts[c][i], bufs[c] + buf_lens[c], ends[c][i] - starts[c][i]);
                continue;
            }
            const unsigned char *b = (const unsigned char *)bufs[c];
            int64_t p = cursors[streams[c]];
            while (DELIMITER[b[p]]) p++;  /* "[[", "],[" or "," before the next number */
            for (int64_t w = 0; w < widths[c]; w++) {
                if (w) *o++ = b[p++];  /* the "," between the take's numbers */
                p = number(&o, out_end, b, p, buf_lens[c]);
            }
            cursors[streams[c]] = p;
        }
        o = copy(o, out_end, lits[k], lits[k] + lit_lens[k] + 32, lit_lens[k]);
        if (record_ends) record_ends[i] = o - out;
    }
    return o - out;
}
