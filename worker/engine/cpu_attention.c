/* Decode-step attention on CPU that reads each key and value once, at the memory's speed.
 *
 * Built and loaded by cpu_attention.py (see there for when it is used). One query position per row;
 * for each (row, key/value head) pair, the head's `groups` query heads attend over the row's prefix
 * columns (its variant's, shared by rows) and then its own columns, in one pass of an online softmax:
 * blocks of W keys, scores for the block as one vector per query (the W dot products reduced
 * together), the block's exponentials, then the values weighted into the accumulators. Each key and
 * value is loaded once for all the head's queries. A block whose mask hides all its columns is not
 * read (a younger row's left padding). float32 throughout; head_dim a multiple of 16.
 *
 * Portable C with GCC's vector extensions: the compiler maps a W-float vector onto AVX-512, AVX2 or
 * SSE, whatever -march allows. W (floats per vector and keys per block) is 16 by default, one AVX-512
 * register; built with -DW=8 a vector is one AVX2 register: without AVX-512 a 16-float vector is two
 * registers, its shuffles cross them, and the queries' partial scores no longer fit in registers
 * (on an AVX2-only AMD EPYC a step's attention grew 1.4x from 100 to 500 tokens with W 16).
 * Threads: OpenMP, linked to the runtime torch itself uses, so that
 * torch.set_num_threads applies and no second pool of threads competes with torch's.
 *
 * The common shapes (head_dim 64 or 128, 1-4 query heads per key/value head) are compiled with both
 * known, so that the compiler keeps each query's accumulators in registers and unrolls the loops
 * over the queries; other shapes take the same code with both at run time. Where the memory is fast
 * enough for the arithmetic to be what limits (an AMD EPYC's 2 cores reading 48 GB/s), that took a
 * step's attention at 1,000 tokens from 57 ms to 41 ms (2026-11-30).
 */

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef W
#define W 16          /* floats per vector, keys per block: 16 or 8 */
#endif
#if W != 16 && W != 8
#error "W must be 16 or 8"
#endif
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

#define MAX_GROUPS 16 /* query heads per key/value head */
#define MAX_DIM 256   /* head_dim */
/* Keys and values are fetched this many columns ahead of their use (0: not at all). A (row, head)
 * pair's columns are contiguous, but some hardware prefetchers stop at each 4 KiB page (16 keys of 64
 * floats): on a Xeon (Cooper Lake) the kernel read at 1.1x the time of a plain sum over the same
 * memory on one core with it, at 1.7x without; on an AMD EPYC it was the other way round (one core:
 * 69 ms with, 47 ms without, a sum 42 ms; 2026-11-30). So cpu_attention.py builds both and keeps
 * the faster on the machine it builds on. */
#ifndef AHEAD
#define AHEAD 16
#endif

static inline vf load(const float *p) { vf x; memcpy(&x, p, sizeof x); return x; }
static inline void store(float *p, vf x) { memcpy(p, &x, sizeof x); }
static inline vf splat(float f) { return (vf){0} + f; }

#if W == 16
/* out[t] = sum of a[t]'s 16 lanes, for t < 16: 15 shuffle pairs instead of 16 horizontal sums. */
static inline vf reduce_block(const vf a[W]) {
    const vi lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const vi hi8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const vi lo4 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    const vi hi4 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    const vi lo2 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
    const vi hi2 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
    const vi lo1 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const vi hi1 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    vf b[8], c[4], d[2];
    for (int i = 0; i < 8; i++)
        b[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], lo8) + __builtin_shuffle(a[2 * i], a[2 * i + 1], hi8);
    for (int i = 0; i < 4; i++)
        c[i] = __builtin_shuffle(b[2 * i], b[2 * i + 1], lo4) + __builtin_shuffle(b[2 * i], b[2 * i + 1], hi4);
    for (int i = 0; i < 2; i++)
        d[i] = __builtin_shuffle(c[2 * i], c[2 * i + 1], lo2) + __builtin_shuffle(c[2 * i], c[2 * i + 1], hi2);
    return __builtin_shuffle(d[0], d[1], lo1) + __builtin_shuffle(d[0], d[1], hi1);
}
#else
/* out[t] = sum of a[t]'s 8 lanes, for t < 8: the same tree, one level shorter. */
static inline vf reduce_block(const vf a[W]) {
    const vi lo4 = {0, 1, 2, 3, 8, 9, 10, 11};
    const vi hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
    const vi lo2 = {0, 1, 4, 5, 8, 9, 12, 13};
    const vi hi2 = {2, 3, 6, 7, 10, 11, 14, 15};
    const vi lo1 = {0, 2, 4, 6, 8, 10, 12, 14};
    const vi hi1 = {1, 3, 5, 7, 9, 11, 13, 15};
    vf b[4], c[2];
    for (int i = 0; i < 4; i++)
        b[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], lo4) + __builtin_shuffle(a[2 * i], a[2 * i + 1], hi4);
    for (int i = 0; i < 2; i++)
        c[i] = __builtin_shuffle(b[2 * i], b[2 * i + 1], lo2) + __builtin_shuffle(b[2 * i], b[2 * i + 1], hi2);
    return __builtin_shuffle(c[0], c[1], lo1) + __builtin_shuffle(c[0], c[1], hi1);
}
#endif

static inline vf vmax(vf a, vf b) { return (vf)(((vi)a & (a > b)) | ((vi)b & ~(a > b))); }

/* The largest and the sum of a vector's W lanes, as a tree of shuffles (not W - 1 scalar steps). */
#if W == 16
#define SWAP8 (vi){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}
#define SWAP4 (vi){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11}
#define SWAP2 (vi){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13}
#define SWAP1 (vi){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}
#else
#define SWAP4 (vi){4, 5, 6, 7, 0, 1, 2, 3}
#define SWAP2 (vi){2, 3, 0, 1, 6, 7, 4, 5}
#define SWAP1 (vi){1, 0, 3, 2, 5, 4, 7, 6}
#endif

static inline float lanes_max(vf x) {
#if W == 16
    x = vmax(x, __builtin_shuffle(x, SWAP8));
#endif
    x = vmax(x, __builtin_shuffle(x, SWAP4));
    x = vmax(x, __builtin_shuffle(x, SWAP2));
    x = vmax(x, __builtin_shuffle(x, SWAP1));
    return x[0];
}

static inline float lanes_sum(vf x) {
#if W == 16
    x = x + __builtin_shuffle(x, SWAP8);
#endif
    x = x + __builtin_shuffle(x, SWAP4);
    x = x + __builtin_shuffle(x, SWAP2);
    x = x + __builtin_shuffle(x, SWAP1);
    return x[0];
}

static inline vf select(vi c, vf a, vf b) { return (vf)(((vi)a & c) | ((vi)b & ~c)); }

/* exp(x) lane by lane, within about 1 ulp for x in [-86, 88.7], 0 below it (-inf included): there it
 * is under 5e-38, nothing beside the softmax's largest term, exp(0) = 1. Cody-Waite reduction and a
 * degree-6 polynomial (the form of Cephes' expf). */
static inline vf vexp(vf x) {
    const vf hi = splat(88.7f), lo = splat(-86.0f);
    const vi keep = x >= lo;
    x = select(x < hi, x, hi);
    x = select(x > lo, x, lo);
    const vf y = x * 1.44269504088896341f + 0.5f;
    vi k = __builtin_convertvector(y, vi); /* toward zero: one too large where y < 0 and not whole */
    k = k + (__builtin_convertvector(k, vf) > y); /* true is -1: k = floor(y) */
    const vf kf = __builtin_convertvector(k, vf);
    const vf r = x - kf * 0.693359375f + kf * 2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return (vf)(((vi)p + (k << 23)) & keep);
}

typedef struct {
    float m[MAX_GROUPS];               /* running maximum of each query's scores */
    float l[MAX_GROUPS];               /* running sum of exp(score - m) */
    float acc[MAX_GROUPS][MAX_DIM];    /* running sum of exp(score - m) * value */
} state_t;

/* One segment of columns (the prefix, or the own columns) for one (row, kv head) pair. `q` holds the
 * scaled queries [groups][dim]; keys and values are `columns` rows of `dim` floats `stride` apart;
 * `mask` (additive, one per column) or NULL. */
static inline __attribute__((always_inline)) void segment(
        state_t *s, const float *q, int groups, int dim, const float *keys, const float *values,
        int64_t key_stride, int64_t value_stride, int64_t columns, const float *mask) {
    const int chunks = dim / W;
    vf part[MAX_GROUPS][W];
    float p[MAX_GROUPS][W];
    for (int64_t start = 0; start < columns; start += W) {
        const int n = columns - start < W ? (int)(columns - start) : W;
        vf add = splat(0.0f);
        if (mask) {
            float m[W];
            for (int t = 0; t < W; t++) m[t] = t < n ? mask[start + t] : -INFINITY;
            add = load(m);
            if (lanes_max(add) == -INFINITY) continue; /* every column hidden: not read */
        } else if (n < W) {
            float m[W];
            for (int t = 0; t < W; t++) m[t] = t < n ? 0.0f : -INFINITY;
            add = load(m);
        }
        for (int t = 0; t < W; t++) {
            if (t < n) {
                const float *k = keys + (start + t) * key_stride;
                if (AHEAD > 0 && start + t + AHEAD < columns)
                    for (int i = 0; i < dim; i += 16) __builtin_prefetch(k + AHEAD * key_stride + i, 0, 3);
                for (int j = 0; j < groups; j++) {
                    vf dot = load(q + j * dim) * load(k);
                    for (int c = 1; c < chunks; c++) dot += load(q + j * dim + c * W) * load(k + c * W);
                    part[j][t] = dot;
                }
            } else {
                for (int j = 0; j < groups; j++) part[j][t] = splat(0.0f);
            }
        }
        for (int j = 0; j < groups; j++) {
            vf score = reduce_block(part[j]) + add;
            float top = lanes_max(score);
            if (top == -INFINITY) { memset(p[j], 0, sizeof p[j]); continue; }
            float m = s->m[j] > top ? s->m[j] : top;
            /* the maximum unchanged (most blocks): exp(0) = 1 exactly, without the call */
            float alpha = s->m[j] >= top ? 1.0f : s->m[j] == -INFINITY ? 0.0f : expf(s->m[j] - m);
            vf e = vexp(score - m);
            store(p[j], e);
            s->l[j] = s->l[j] * alpha + lanes_sum(e);
            s->m[j] = m;
            if (alpha != 1.0f)
                for (int c = 0; c < chunks; c++) store(s->acc[j] + c * W, load(s->acc[j] + c * W) * alpha);
        }
        for (int t = 0; t < n; t++) {
            const float *v = values + (start + t) * value_stride;
            if (AHEAD > 0 && start + t + AHEAD < columns)
                for (int i = 0; i < dim; i += 16) __builtin_prefetch(v + AHEAD * value_stride + i, 0, 3);
            for (int c = 0; c < chunks; c++) {
                vf vc = load(v + c * W);
                for (int j = 0; j < groups; j++)
                    store(s->acc[j] + c * W, load(s->acc[j] + c * W) + p[j][t] * vc);
            }
        }
    }
}

static inline __attribute__((always_inline)) void pair(
        int64_t task, int kv_heads, int groups, int dim, const float *query, float scale,
        const float *keys, const float *values, const int64_t *ks, const int64_t *vs, int64_t own,
        const float *mask, int64_t mask_row_stride,
        const float *pkeys, const float *pvalues, const int64_t *pks, const int64_t *pvs, int64_t plen,
        const int32_t *variant, float *out) {
    const int64_t row = task / kv_heads, head = task % kv_heads;
    state_t s;
    float q[MAX_GROUPS * MAX_DIM];
    const float *qin = query + (row * kv_heads + head) * groups * dim;
    for (int i = 0; i < groups * dim; i++) q[i] = qin[i] * scale;
    for (int j = 0; j < groups; j++) {
        s.m[j] = -INFINITY;
        s.l[j] = 0.0f;
        memset(s.acc[j], 0, dim * sizeof(float));
    }
    if (plen > 0) {
        const int64_t v = variant[row];
        segment(&s, q, groups, dim, pkeys + v * pks[0] + head * pks[1], pvalues + v * pvs[0] + head * pvs[1],
                pks[2], pvs[2], plen, NULL);
    }
    segment(&s, q, groups, dim, keys + row * ks[0] + head * ks[1], values + row * vs[0] + head * vs[1],
            ks[2], vs[2], own, mask ? mask + row * mask_row_stride : NULL);
    float *o = out + (row * kv_heads + head) * groups * dim;
    for (int j = 0; j < groups; j++) {
        const float inv = s.l[j] > 0.0f ? 1.0f / s.l[j] : 0.0f;
        for (int c = 0; c < dim; c++) o[j * dim + c] = s.acc[j][c] * inv;
    }
}

/* Attention of one query per row. query [rows][kv_heads][groups][dim] contiguous; out likewise.
 * keys, values: the own columns, element (row, head, column, i) at row*s[0] + head*s[1] + column*s[2] + i.
 * mask: additive [rows][own] with rows mask_row_stride apart (0: one row for all), or NULL.
 * pkeys, pvalues: the prefix [variants][kv_heads][plen][dim] with strides as keys; variant[row] picks
 * a row's (plen 0: no prefix, variant unused). threads: OpenMP threads to use. Returns 0, or -1 for
 * shapes it does not take. */
int lc_decode_attention(int64_t rows, int kv_heads, int groups, int dim, const float *query, float scale,
                        const float *keys, const float *values, const int64_t *ks, const int64_t *vs,
                        int64_t own, const float *mask, int64_t mask_row_stride,
                        const float *pkeys, const float *pvalues, const int64_t *pks, const int64_t *pvs,
                        int64_t plen, const int32_t *variant, float *out, int threads) {
    if (dim % W != 0 || dim > MAX_DIM || groups < 1 || groups > MAX_GROUPS || kv_heads < 1) return -1;
    const int64_t tasks = rows * kv_heads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads > 0 ? threads : 1)
    for (int64_t task = 0; task < tasks; task++) {
#define PAIR(G, D) pair(task, kv_heads, G, D, query, scale, keys, values, ks, vs, own, mask, mask_row_stride, \
                        pkeys, pvalues, pks, pvs, plen, variant, out)
        if (dim == 64 && groups == 1) PAIR(1, 64);
        else if (dim == 64 && groups == 2) PAIR(2, 64);
        else if (dim == 64 && groups == 3) PAIR(3, 64);
        else if (dim == 64 && groups == 4) PAIR(4, 64);
        else if (dim == 128 && groups == 1) PAIR(1, 128);
        else if (dim == 128 && groups == 2) PAIR(2, 128);
        else if (dim == 128 && groups == 3) PAIR(3, 128);
        else if (dim == 128 && groups == 4) PAIR(4, 128);
        else PAIR(groups, dim);
#undef PAIR
    }
    return 0;
}
