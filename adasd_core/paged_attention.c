/* Paged attention on the CPU (adasd_core/paged_attention.py builds and calls this).
 *
 * One work item is (a run of at most ROWS consecutive query rows of one sequence, one KV head): the
 * item reads each key and value once for its rows and their G = H / H_kv query heads. Each row's
 * arithmetic is the same whatever else the item holds (chunks and groups of keys come from the key
 * position and the block size alone, every sum runs in a fixed order), so a row gives the same bits
 * in any batch. GCC / clang vector extensions: 16 lanes, lowered to what the target has.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 8      /* query rows sharing one read of K / V */
#define CHUNK 16    /* keys scored before one softmax update (fewer at a block's end) */
#define W 16        /* lanes */
#define MAX_GD 1024 /* G * D of one row's accumulators */
#define MAX_G 16    /* query heads per KV head */

typedef float vec __attribute__((vector_size(4 * W)));
typedef int32_t veci __attribute__((vector_size(4 * W)));

static inline vec ld(const float *p) {
    vec x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline void st(float *p, vec x) { memcpy(p, &x, sizeof x); }

static inline vec blend(veci mask, vec a, vec b) { return (vec)(((veci)a & mask) | ((veci)b & ~mask)); }

/* exp(x) for x <= 0 (Cephes' expf polynomial), 0 below -87 and for -inf */
static inline vec exp_nonpositive(vec x) {
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    veci under = x < -87.0f;
    x = blend(under, x - x + -87.0f, x);
    vec n = (x * 1.44269504088896341f + magic) - magic;
    vec r = x - n * 0.693359375f - n * -2.12194440e-4f;
    vec p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    veci bits = (__builtin_convertvector(n, veci) + 127) << 23;
    return (vec)((veci)(p * (vec)bits) & ~under);
}

/* lane k of the result: the sum of a[k]'s lanes, in a fixed tree */
static inline vec sum16(const vec a[W]) {
    vec t[8], u[4], w[2];
    for (int i = 0; i < 8; i++)
        t[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
               __builtin_shufflevector(a[2 * i], a[2 * i + 1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    for (int i = 0; i < 4; i++)
        u[i] = __builtin_shufflevector(t[2 * i], t[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
               __builtin_shufflevector(t[2 * i], t[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    for (int i = 0; i < 2; i++)
        w[i] = __builtin_shufflevector(u[2 * i], u[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
               __builtin_shufflevector(u[2 * i], u[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    return __builtin_shufflevector(w[0], w[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(w[0], w[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}

/* the sum of the lanes (a fixed tree) */
static inline float hsum16(vec v) {
    v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return v[0];
}

static inline vec vmax(vec a, vec b) { return blend(a > b, a, b); }

/* the largest lane (a fixed tree) */
static inline float hmax16(vec v) {
    v = vmax(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
    v = vmax(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
    v = vmax(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
    v = vmax(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
    return v[0];
}

/* Rows r0..r1-1 (one sequence) over KV head g; D is a constant where inlined by the dispatch below. */
static inline __attribute__((always_inline)) void
attend_item(const float *q, const float *kh, const float *vh, const int32_t *table, const int32_t *q_pos,
            float *out, int r0, int r1, int g, int H, int G, int D, int bs, int64_t k_sb, int64_t v_sb,
            float scale) {
    float qs[ROWS][MAX_GD], acc[ROWS][MAX_GD], m[ROWS][MAX_G], l[ROWS][MAX_G];
    float s[MAX_G][CHUNK];
    const vec lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    int R = r1 - r0, end = 0;
    for (int r = 0; r < R; r++) {
        const float *qr = q + ((int64_t)(r0 + r) * H + g * G) * D;
        for (int i = 0; i < G * D; i++) qs[r][i] = qr[i] * scale;
        memset(acc[r], 0, sizeof(float) * G * D);
        for (int h = 0; h < G; h++) m[r][h] = -1.0f / 0.0f, l[r][h] = 0.0f;
        if (q_pos[r0 + r] + 1 > end) end = q_pos[r0 + r] + 1;
    }
    for (int p0 = 0; p0 < end;) {
        int off = p0 % bs, len = bs - off < CHUNK ? bs - off : CHUNK;
        int64_t blk = table[p0 / bs];
        const float *kc = kh + blk * k_sb + (int64_t)off * D, *vc = vh + blk * v_sb + (int64_t)off * D;
        /* the next chunk's keys and values, fetched while this one is scored (a block is a page: the
         * hardware prefetcher stops at its end) */
        const float *nk = NULL, *nv = NULL;
        int n_next = 0;
        if (p0 + len < end) {
            int64_t nxt = table[(p0 + len) / bs];
            int o2 = (p0 + len) % bs;
            nk = kh + nxt * k_sb + (int64_t)o2 * D, nv = vh + nxt * v_sb + (int64_t)o2 * D;
            n_next = bs - o2 < CHUNK ? bs - o2 : CHUNK;
        }
        /* the first row with keys here prefetches the keys, the second (or the first alone) the values:
         * spread out, they wait less for free line-fill buffers */
        int seen = 0;
        for (int r = 0; r < R; r++) {
            int n = q_pos[r0 + r] + 1 - p0; /* this row's keys in the chunk */
            if (n <= 0) continue;
            if (n > len) n = len;
            int fetch_k = nk && seen == 0, fetch_v = nk && (seen == 1 || (seen == 0 && r == R - 1));
            seen++;
            const float *qr = qs[r];
            for (int j0 = 0; j0 < n; j0 += W) {
                vec part[MAX_G][W];
                for (int k = 0; k < W; k++) {
                    const float *kj = kc + (int64_t)(j0 + k) * D;
                    if (fetch_k && j0 + k < n_next)
                        for (int i = 0; i < D; i += 16) __builtin_prefetch(nk + (int64_t)(j0 + k) * D + i); /* a line */
                    for (int h = 0; h < G; h++) part[h][k] = (vec){0};
                    if (j0 + k >= n) continue;
                    for (int i = 0; i < D; i += W) {
                        vec kv = ld(kj + i);
                        for (int h = 0; h < G; h++) part[h][k] += ld(qr + h * D + i) * kv;
                    }
                }
                veci live = lane < (float)(n - j0); /* keys past the row's end score -inf */
                for (int h = 0; h < G; h++) st(s[h] + j0, blend(live, sum16(part[h]), lane - 1.0f / 0.0f));
            }
            for (int h = 0; h < G; h++) {
                vec mv = ld(s[h]);
                for (int j0 = W; j0 < n; j0 += W) mv = vmax(mv, ld(s[h] + j0));
                float mx = hmax16(mv);
                mx = mx > m[r][h] ? mx : m[r][h];
                float corr = exp_nonpositive((vec){0} + (m[r][h] - mx))[0];
                m[r][h] = mx;
                vec total = {0};
                for (int j0 = 0; j0 < n; j0 += W) {
                    vec p = exp_nonpositive(ld(s[h] + j0) - mx);
                    st(s[h] + j0, p);
                    total += p;
                }
                l[r][h] = l[r][h] * corr + hsum16(total);
                float *a = acc[r] + h * D;
                for (int d0 = 0; d0 < D; d0 += 8 * W) { /* up to 8 registers of accumulators */
                    int nd = D - d0 < 8 * W ? D - d0 : 8 * W;
                    vec t[8];
                    for (int i = 0; i < nd; i += W) t[i / W] = ld(a + d0 + i) * corr;
                    for (int j = 0; j < n; j++) {
                        if (fetch_v && h == 0 && d0 == 0 && j < n_next)
                            for (int i = 0; i < D; i += 16) __builtin_prefetch(nv + (int64_t)j * D + i);
                        const float *vj = vc + (int64_t)j * D + d0;
                        for (int i = 0; i < nd; i += W) t[i / W] += s[h][j] * ld(vj + i);
                    }
                    for (int i = 0; i < nd; i += W) st(a + d0 + i, t[i / W]);
                }
            }
        }
        p0 += len;
    }
    for (int r = 0; r < R; r++)
        for (int h = 0; h < G; h++) {
            float *o = out + ((int64_t)(r0 + r) * H + g * G + h) * D, inv = 1.0f / l[r][h];
            for (int d = 0; d < D; d++) o[d] = acc[r][h * D + d] * inv;
        }
}

/* q, out [T, H, D]; K, V: head stride *_sh, block stride *_sb, [bs, D] contiguous within a block.
 * Returns 0; -1: a block id, sequence or position out of range; -2: shapes past the limits; -3: no memory
 * (nothing computed then). */
int paged_attention(const float *q, const float *k, const float *v, const int32_t *tables, const int32_t *q_seq,
                    const int32_t *q_pos, float *out, int T, int H, int Hkv, int D, int B, int nb_max, int NB,
                    int bs, int64_t k_sh, int64_t k_sb, int64_t v_sh, int64_t v_sb, float scale, int threads) {
    int G = H / Hkv;
    if (G * D > MAX_GD || G > MAX_G || D % W) return -2;
    for (int i = 0; i < B * nb_max; i++)
        if (tables[i] < 0 || tables[i] >= NB) return -1;
    for (int t = 0; t < T; t++)
        if (q_seq[t] < 0 || q_seq[t] >= B || q_pos[t] < 0 || q_pos[t] >= nb_max * bs) return -1;
    /* runs of at most ROWS rows of one sequence */
    int n_runs = 0;
    int *starts = malloc(sizeof(int) * (T + 1));
    if (!starts) return -3;
    for (int t = 0; t < T; t++)
        if (t == 0 || q_seq[t] != q_seq[t - 1] || t - starts[n_runs - 1] == ROWS) starts[n_runs++] = t;
    starts[n_runs] = T;
    int items = n_runs * Hkv; /* KV head major: a thread's next item is likely the same K / V */
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && items > 1)
    for (int i = 0; i < items; i++) {
        int g = i / n_runs, run = i % n_runs, r0 = starts[run], r1 = starts[run + 1];
        const int32_t *table = tables + (int64_t)q_seq[r0] * nb_max;
        const float *kh = k + g * k_sh, *vh = v + g * v_sh;
        if (D == 64 && G == 3)
            attend_item(q, kh, vh, table, q_pos, out, r0, r1, g, H, 3, 64, bs, k_sb, v_sb, scale);
        else if (D == 64)
            attend_item(q, kh, vh, table, q_pos, out, r0, r1, g, H, G, 64, bs, k_sb, v_sb, scale);
        else if (D == 128)
            attend_item(q, kh, vh, table, q_pos, out, r0, r1, g, H, G, 128, bs, k_sb, v_sb, scale);
        else
            attend_item(q, kh, vh, table, q_pos, out, r0, r1, g, H, G, D, bs, k_sb, v_sb, scale);
    }
    free(starts);
    return 0;
}

/* One layer's attention from its fused projection: fused [T, (H + 2 H_kv) D] holds each row's q, k and v
 * heads. Rotary (x cos + roll(x, D / 2) sin, cos and sin [T, D] at each row's position) goes on q and k,
 * k and v are written at the row's block and offset, then the rows attend as paged_attention does, q
 * from qbuf [T, H, D]. One call for what would be a dozen tensor ops. Returns as paged_attention. */
int rope_write_attend(const float *fused, const float *cos, const float *sin, float *k, float *v,
                      const int32_t *tables, const int32_t *q_seq, const int32_t *q_pos, float *qbuf, float *out,
                      int T, int H, int Hkv, int D, int B, int nb_max, int NB, int bs, int64_t k_sh, int64_t k_sb,
                      int64_t v_sh, int64_t v_sb, float scale, int threads) {
    int half = D / 2, width = (H + 2 * Hkv) * D;
    if (D % W || D > 4096) return -2;
    for (int t = 0; t < T; t++) {
        if (q_seq[t] < 0 || q_seq[t] >= B || q_pos[t] < 0 || q_pos[t] >= nb_max * bs) return -1;
        int32_t blk = tables[(int64_t)q_seq[t] * nb_max + q_pos[t] / bs];
        if (blk < 0 || blk >= NB) return -1;
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && T * (H + Hkv) > 64)
    for (int i = 0; i < T * (H + 2 * Hkv); i++) {
        int t = i / (H + 2 * Hkv), h = i % (H + 2 * Hkv);
        const float *x = fused + (int64_t)t * width + (int64_t)h * D, *c = cos + (int64_t)t * D, *s = sin + (int64_t)t * D;
        int off = q_pos[t] % bs;
        int64_t blk = tables[(int64_t)q_seq[t] * nb_max + q_pos[t] / bs];
        float *dst;
        if (h < H) dst = qbuf + ((int64_t)t * H + h) * D;
        else if (h < H + Hkv) dst = k + (h - H) * k_sh + blk * k_sb + (int64_t)off * D;
        else {
            memcpy(v + (h - H - Hkv) * v_sh + blk * v_sb + (int64_t)off * D, x, sizeof(float) * D);
            continue;
        }
        for (int d = 0; d < D; d++) dst[d] = x[d] * c[d] + x[d < half ? d + half : d - half] * s[d];
    }
    return paged_attention(qbuf, k, v, tables, q_seq, q_pos, out, T, H, Hkv, D, B, nb_max, NB, bs, k_sh, k_sb, v_sh,
                           v_sb, scale, threads);
}

/* The lean forward's small per-row ops, each one call instead of several tensor ops: x, y, out [T, C]. */

static inline float row_inv_rms(const float *x, int C, float eps) {
    vec acc = {0};
    int i = 0;
    for (; i + W <= C; i += W) {
        vec a = ld(x + i);
        acc += a * a;
    }
    float ss = hsum16(acc);
    for (; i < C; i++) ss += x[i] * x[i];
    return 1.0f / sqrtf(ss / (float)C + eps);
}

/* out = x / rms(x) * w */
void rms_norm_rows(const float *x, const float *w, float *out, int T, int C, float eps) {
    for (int t = 0; t < T; t++) {
        const float *xr = x + (int64_t)t * C;
        float inv = row_inv_rms(xr, C, eps), *o = out + (int64_t)t * C;
        for (int i = 0; i < C; i++) o[i] = xr[i] * inv * w[i];
    }
}

/* xo = x + y (the residual stream), out = rms_norm(xo) * w */
void add_rms_norm(const float *x, const float *y, const float *w, float *xo, float *out, int T, int C, float eps) {
    for (int t = 0; t < T; t++) {
        const float *xr = x + (int64_t)t * C, *yr = y + (int64_t)t * C;
        float *s = xo + (int64_t)t * C, *o = out + (int64_t)t * C;
        for (int i = 0; i < C; i++) s[i] = xr[i] + yr[i];
        float inv = row_inv_rms(s, C, eps);
        for (int i = 0; i < C; i++) o[i] = s[i] * inv * w[i];
    }
}

/* gate_up [T, 2 F] (gate, then up) -> out [T, F] = silu(gate) * up */
void silu_mul(const float *gu, float *out, int T, int F) {
    for (int t = 0; t < T; t++) {
        const float *g = gu + (int64_t)t * 2 * F, *u = g + F;
        float *o = out + (int64_t)t * F;
        for (int i = 0; i < F; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* log(x) for normal x > 0 (Cephes' logf polynomial, as exp_nonpositive above) */
static inline vec log_positive(vec x) {
    veci bits = (veci)x;
    vec e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, vec);
    vec m = (vec)((bits & 0x807fffff) | 0x3f000000); /* x = m 2^e, m in [0.5, 1) */
    veci low = m < 0.707106781186547524f;
    e = blend(low, e - 1.0f, e);
    m = blend(low, m + m - 1.0f, m - 1.0f);
    vec z = m * m;
    vec y = m * 7.0376836292e-2f - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z + e * -2.12194440e-4f - 0.5f * z;
    return m + y + e * 0.693359375f;
}

/* one lane group's running sums: 16 values of x log x, the group of 256 folded into a double */
#define XLOGX_STEP(x, part, s, i)                                                                                      \
    do {                                                                                                               \
        vec x_ = vmax(x, (vec){0} + 1e-30f);                                                                           \
        part += x_ * log_positive(x_);                                                                                 \
        if (((i) / W) % 16 == 15) {                                                                                    \
            s += hsum16(part);                                                                                         \
            part = (vec){0};                                                                                           \
        }                                                                                                              \
    } while (0)

static inline float xlogx_tail(float x) {
    x = x > 1e-30f ? x : 1e-30f;
    return x * logf(x);
}

/* out[r] = -sum_v p log p over row r of p [R, V], each p clamped below at 1e-30 (a model's tail is often
 * subnormal, and subnormal arithmetic runs many times slower); one pass per row, no temporaries, the
 * lanes summed in a fixed order, so a row's entropy is the same alone or in any batch. */
void row_entropy(const float *p, float *out, int R, int V, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && R >= 4)
    for (int r = 0; r < R; r++) {
        const float *pr = p + (int64_t)r * V;
        vec part = {0}; /* float sums of 256 values each, carried in double */
        double s = 0.0;
        int i = 0;
        for (; i + W <= V; i += W) XLOGX_STEP(ld(pr + i), part, s, i);
        s += hsum16(part);
        for (; i < V; i++) s += xlogx_tail(pr[i]);
        out[r] = (float)-s;
    }
}

/* out[i] = the Jensen-Shannon distance (base 2, sqrt of the divergence, in [0, 1]) between row prow[i] of
 * p [*, V] and row qrow[i] of q [*, V]: H(m) - (H(p) + H(q)) / 2 with m = (p + q) / 2, each entropy summed
 * as row_entropy sums it (same clamp, same order), in one pass over the two rows. hp, hq: the rows'
 * entropies where the caller has them (row_entropy's), else NULL. Returns 0, -1 for a row outside p's np or
 * q's nq rows (nothing written). */
int js_rows(const float *p, const int64_t *prow, int np, const float *q, const int64_t *qrow, int nq,
            const float *hp, const float *hq, float *out, int n, int V) {
    for (int r = 0; r < n; r++)
        if (prow[r] < 0 || prow[r] >= np || qrow[r] < 0 || qrow[r] >= nq) return -1;
    for (int r = 0; r < n; r++) {
        const float *pr = p + prow[r] * V, *qr = q + qrow[r] * V;
        vec pp = {0}, pq = {0}, pm = {0};
        double sp = 0.0, sq = 0.0, sm = 0.0;
        int i = 0;
        for (; i + W <= V; i += W) {
            vec a = ld(pr + i), b = ld(qr + i);
            if (!hp) XLOGX_STEP(a, pp, sp, i);
            if (!hq) XLOGX_STEP(b, pq, sq, i);
            XLOGX_STEP((a + b) * 0.5f, pm, sm, i);
        }
        sp += hsum16(pp);
        sq += hsum16(pq);
        sm += hsum16(pm);
        for (; i < V; i++) {
            if (!hp) sp += xlogx_tail(pr[i]);
            if (!hq) sq += xlogx_tail(qr[i]);
            sm += xlogx_tail((pr[i] + qr[i]) * 0.5f);
        }
        float ep = hp ? hp[r] : (float)-sp, eq = hq ? hq[r] : (float)-sq, em = (float)-sm;
        float d = (em - 0.5f * (ep + eq)) / 0.6931471805599453f;
        out[r] = sqrtf(d < 0.0f ? 0.0f : d > 1.0f ? 1.0f : d);
    }
    return 0;
}
#undef XLOGX_STEP

/* out[i] = the index of the largest value of row rows[i] of x [*, V], the first on ties (argmax's answer;
 * rows without NaN). Returns 0, -1 for a row outside x's nx rows (nothing written). */
int row_argmax(const float *x, int nx, const int64_t *rows, int64_t *out, int n, int V) {
    for (int r = 0; r < n; r++)
        if (rows[r] < 0 || rows[r] >= nx) return -1;
    for (int r = 0; r < n; r++) {
        const float *xr = x + rows[r] * V;
        int64_t best_i = 0;
        float best = xr[0];
        int i = 0;
        if (V >= W) {
            vec b = ld(xr);
            veci bi = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, idx = bi;
            for (i = W; i + W <= V; i += W) {
                vec v = ld(xr + i);
                idx += W;
                veci gt = v > b; /* strictly: each lane keeps its first maximum */
                b = blend(gt, v, b);
                bi = (veci)blend(gt, (vec)idx, (vec)bi);
            }
            best = b[0];
            best_i = bi[0];
            for (int l = 1; l < W; l++)
                if (b[l] > best || (b[l] == best && bi[l] < best_i)) {
                    best = b[l];
                    best_i = bi[l];
                }
        }
        for (; i < V; i++)
            if (xr[i] > best) {
                best = xr[i];
                best_i = i;
            }
        out[r] = best_i;
    }
    return 0;
}

/* In place, for i < n: row rows[i] of logits [*, V] gets -inf where bit t % 32 of masks[i, t / 32] is clear
 * (llguidance's layout). `fallback`: a row left with no finite logit becomes 0 on its allowed tokens (a
 * proposal uniform over them). */
void apply_bitmask_rows(float *logits, const int64_t *rows, const int32_t *masks, int n, int V, int fallback) {
    int Wd = (V + 31) / 32;
    for (int i = 0; i < n; i++) {
        float *r = logits + rows[i] * (int64_t)V;
        const uint32_t *m = (const uint32_t *)(masks + (int64_t)i * Wd);
        for (int w = 0; w < Wd; w++) {
            uint32_t bits = m[w];
            if (bits == 0xffffffffu) continue;
            int t0 = w * 32, t1 = t0 + 32 < V ? t0 + 32 : V;
            for (int t = t0; t < t1; t++)
                if (!(bits >> (t - t0) & 1u)) r[t] = -INFINITY;
        }
        if (!fallback) continue;
        int finite = 0;
        for (int t = 0; t < V && !finite; t++) finite = isfinite(r[t]);
        if (!finite)
            for (int t = 0; t < V; t++) r[t] = m[t / 32] >> (t % 32) & 1u ? 0.0f : -INFINITY;
    }
}

/* Weight-only 4-bit products (the self-draft's matrices): y [M, N] = x [M, K] W^T (+ bias [N]). W is stored in
 * blocks of 16 rows (the last padded with zero rows): for each group of 64 weights along K, 8 x 64 bytes, byte
 * 4 l + e of the cc-th holding row l's weight 8 cc + e in its low nibble and 8 cc + 4 + e in its high one; then
 * per block and group a bf16 scale and minimum for each of the 16 rows (sm [N / 16, K / 64, 2, 16]): w = code *
 * scale + min. So one vector of codes holds four consecutive weights of 16 rows, and a product's lanes are the
 * block's 16 outputs: with AVX-512 VNNI each group of a row of x is rounded to int8 (its own scale) and four of
 * its values, broadcast, meet the codes in one integer dot product (vpdpbusd), the group's sums are scaled once
 * per 16 outputs; elsewhere the codes become floats. Either way a row's sums run in the same order whatever M
 * is, so its output has the same bits alone or in any batch; a block's codes are decoded once for MT rows of x.
 * Returns 0, -2 if K % 64, -3 without memory. */
#define QG 64 /* weights per group */
#define NB 16 /* weight rows per block: one output per lane */
#define MT 4  /* rows of x per decoded block */
#ifndef PREFETCH
#define PREFETCH 1
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define INT4_VNNI 1
#include <immintrin.h>
#endif

static inline vec bf16x16(const uint16_t *p) {
    typedef uint16_t vh __attribute__((vector_size(2 * W)));
    typedef uint32_t vu __attribute__((vector_size(4 * W)));
    vh h;
    memcpy(&h, p, sizeof h);
    return (vec)(__builtin_convertvector(h, vu) << 16);
}

#ifdef INT4_VNNI
/* rows xq[0..R-1] (int8, stride K; scales xs, sums xsum [R, ng]) against one block; R a constant where
 * inlined, so the accumulators stay in registers */
static inline __attribute__((always_inline)) void
int4_block(const int8_t *xq, const float *xs, const float *xsum, const uint8_t *qb, const uint16_t *sb, float *y,
           int R, int K, int ng, int N, int nv, const float *b) {
    __m512 f[MT], lo[MT];
    for (int i = 0; i < R; i++) f[i] = lo[i] = _mm512_setzero_ps();
    const __m512i nib = _mm512_set1_epi8(15);
    for (int g = 0; g < ng; g++) {
        const uint8_t *qg = qb + (int64_t)g * (QG * NB / 2);
        __m512i acc[MT];
        for (int i = 0; i < R; i++) acc[i] = _mm512_setzero_si512();
        for (int cc = 0; cc < QG / 8; cc++) {
            __m512i p = _mm512_loadu_si512((const void *)(qg + cc * 64));
            __m512i c0 = _mm512_and_si512(p, nib), c1 = _mm512_and_si512(_mm512_srli_epi16(p, 4), nib);
            for (int i = 0; i < R; i++) {
                const int8_t *xg = xq + (int64_t)i * K + g * QG + cc * 8;
                int32_t x0, x1;
                memcpy(&x0, xg, 4);
                memcpy(&x1, xg + 4, 4);
                acc[i] = _mm512_dpbusd_epi32(acc[i], c0, _mm512_set1_epi32(x0));
                acc[i] = _mm512_dpbusd_epi32(acc[i], c1, _mm512_set1_epi32(x1));
            }
        }
        __m512 s = (__m512)bf16x16(sb + g * 2 * NB), mn = (__m512)bf16x16(sb + g * 2 * NB + NB);
        for (int i = 0; i < R; i++) {
            f[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i]), _mm512_mul_ps(s, _mm512_set1_ps(xs[(int64_t)i * ng + g])),
                                   f[i]);
            lo[i] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xsum[(int64_t)i * ng + g]), lo[i]);
        }
    }
    __mmask16 live = (__mmask16)((1u << nv) - 1);
    __m512 bias = b ? _mm512_maskz_loadu_ps(live, b) : _mm512_setzero_ps();
    for (int i = 0; i < R; i++)
        _mm512_mask_storeu_ps(y + (int64_t)i * N, live, _mm512_add_ps(_mm512_add_ps(f[i], lo[i]), bias));
}
#else
/* lane r of the result: the sum of lanes 4 r' .. 4 r' + 3 of a[r / 4], r' = r % 4 (each row's four products) */
static inline vec quad_sums(const vec a[4]) {
    vec t[4];
    for (int j = 0; j < 4; j++) {
        vec b = a[j] + __builtin_shufflevector(a[j], a[j], 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
        t[j] = b + __builtin_shufflevector(b, b, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    }
    typedef float vec8 __attribute__((vector_size(32)));
    vec8 lo = __builtin_shufflevector(t[0], t[1], 0, 4, 8, 12, 16, 20, 24, 28);
    vec8 hi = __builtin_shufflevector(t[2], t[3], 0, 4, 8, 12, 16, 20, 24, 28);
    return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

static inline __attribute__((always_inline)) void
int4_block(const float *x, const float *xs, const float *xsum, const uint8_t *qb, const uint16_t *sb, float *y,
           int R, int K, int ng, int N, int nv, const float *b) {
    (void)xs;
    vec f[MT], lo[MT];
    for (int i = 0; i < R; i++) f[i] = lo[i] = (vec){0};
    for (int g = 0; g < ng; g++) {
        const uint8_t *qg = qb + (int64_t)g * (QG * NB / 2);
        vec acc[MT][4];
        for (int i = 0; i < R; i++)
            for (int j = 0; j < 4; j++) acc[i][j] = (vec){0};
        for (int cc = 0; cc < QG / 8; cc++) {
            /* the 64 bytes' low and high nibbles as floats (a loop the compiler vectorises) */
            float c0[64] __attribute__((aligned(64))), c1[64] __attribute__((aligned(64)));
            const uint8_t *p = qg + cc * 64;
            for (int t = 0; t < 64; t++) {
                c0[t] = (float)(p[t] & 15);
                c1[t] = (float)(p[t] >> 4);
            }
            vec w0[4], w1[4];
            for (int j = 0; j < 4; j++) {
                w0[j] = ld(c0 + 16 * j);
                w1[j] = ld(c1 + 16 * j);
            }
            for (int i = 0; i < R; i++) {
                const float *xg = x + (int64_t)i * K + g * QG + cc * 8;
                vec x0 = {xg[0], xg[1], xg[2], xg[3], xg[0], xg[1], xg[2], xg[3],
                          xg[0], xg[1], xg[2], xg[3], xg[0], xg[1], xg[2], xg[3]};
                vec x1 = {xg[4], xg[5], xg[6], xg[7], xg[4], xg[5], xg[6], xg[7],
                          xg[4], xg[5], xg[6], xg[7], xg[4], xg[5], xg[6], xg[7]};
                for (int j = 0; j < 4; j++) acc[i][j] += w0[j] * x0 + w1[j] * x1;
            }
        }
        vec s = bf16x16(sb + g * 2 * NB), mn = bf16x16(sb + g * 2 * NB + NB);
        for (int i = 0; i < R; i++) {
            f[i] += quad_sums(acc[i]) * s;
            lo[i] += mn * xsum[(int64_t)i * ng + g];
        }
    }
    for (int i = 0; i < R; i++)
        for (int l = 0; l < nv; l++) y[(int64_t)i * N + l] = f[i][l] + lo[i][l] + (b ? b[l] : 0.0f);
}
#endif

int int4_matmul(const float *x, const uint8_t *q, const uint16_t *sm, const float *bias, float *y, int M, int N,
                int K, int threads) {
    if (K % QG) return -2;
    int ng = K / QG;
    /* each row's sum over each group (the minimum's term), and with VNNI its int8 codes and their scales */
    float *xsum = malloc(sizeof(float) * (size_t)M * ng * 2), *xs = xsum + (size_t)M * ng;
    if (!xsum) return -3;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < ng; g++) {
            const float *xg = x + (int64_t)m * K + g * QG;
            xsum[(int64_t)m * ng + g] = hsum16(ld(xg) + ld(xg + 16) + (ld(xg + 32) + ld(xg + 48)));
        }
#ifdef INT4_VNNI
    int8_t *xq = malloc((size_t)M * K);
    if (!xq) {
        free(xsum);
        return -3;
    }
    for (int m = 0; m < M; m++)
        for (int g = 0; g < ng; g++) {
            const float *xg = x + (int64_t)m * K + g * QG;
            float amax = 0.0f;
            for (int i = 0; i < QG; i++) amax = fmaxf(amax, fabsf(xg[i]));
            float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            xs[(int64_t)m * ng + g] = scale;
            for (int i = 0; i < QG; i++) xq[(int64_t)m * K + g * QG + i] = (int8_t)lrintf(xg[i] * inv);
        }
#define XROWS(m0) (xq + (int64_t)(m0) * K)
#else
#define XROWS(m0) (x + (int64_t)(m0) * K)
#endif
    int blocks = (N + NB - 1) / NB;
    int64_t block_bytes = (int64_t)NB * (K / 2);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && blocks >= 4)
    for (int blk = 0; blk < blocks; blk++) {
        int n = blk * NB, nv = N - n < NB ? N - n : NB;
        const uint8_t *qb = q + blk * block_bytes;
        const uint16_t *sb = sm + (int64_t)blk * ng * 2 * NB;
        const float *b = bias ? bias + n : NULL;
        /* a block PREFETCH blocks on, into L2: more reads in flight than the hardware's streams keep */
        if (PREFETCH && blk + PREFETCH < blocks)
            for (int64_t off = 0; off < block_bytes; off += 64) __builtin_prefetch(qb + PREFETCH * block_bytes + off, 0, 2);
        for (int m0 = 0; m0 < M; m0 += MT) {
            const float *s0 = xs + (int64_t)m0 * ng, *sum0 = xsum + (int64_t)m0 * ng;
            float *ym = y + (int64_t)m0 * N + n;
#define XTILE(R)                                                                \
    case R: int4_block(XROWS(m0), s0, sum0, qb, sb, ym, R, K, ng, N, nv, b); break;
            switch (M - m0 < MT ? M - m0 : MT) {
                XTILE(1)
                XTILE(2)
                XTILE(3)
            default: int4_block(XROWS(m0), s0, sum0, qb, sb, ym, MT, K, ng, N, nv, b); break;
#undef XTILE
            }
        }
    }
#undef XROWS
#ifdef INT4_VNNI
    free(xq);
#endif
    free(xsum);
    return 0;
}

/* Float32 products at the few rows of a decode or verify step: y [M, N] = x [M, K] W^T (+ bias [N]), W the
 * weight as stored ([N, K], rows contiguous, no repacking). A tile of FN weight rows is streamed together and
 * meets up to FT rows of x at a time while in L1; every output is one row of x against one row of W,
 * accumulated in 16 lanes over K in order and summed in a fixed tree, so its bits do not depend on M, on the
 * tile shape or on which tile it fell in: a row's output is the same alone or in any batch. The weights are
 * read once per call. The more rows a pass takes, the fewer times a tile is read again from L1 and the more
 * of the arithmetic hides under the weight stream: 4 x 6 tiles up to 12 rows, 3 x 8 above (24 accumulators
 * either way, within AVX-512's 32 registers). Returns 0, -2 if K % 16. */
#define F32_MAX_FN 4
#define F32_MAX_FT 8

#ifndef F32_PREFETCH
#define F32_PREFETCH 2 /* tiles ahead */
#endif

static inline __attribute__((always_inline)) void
f32_tile(const float *x, const float *w, float *y, int R, int NJ, int K, int N, const float *b, const float *next,
         int FN) {
    vec acc[F32_MAX_FT][F32_MAX_FN];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < NJ; j++) acc[i][j] = (vec){0};
    for (int k = 0; k < K; k += W) {
        if (next) /* a later tile's rows, a line each per step: more reads in flight than the streams keep */
            for (int j = 0; j < FN; j++) __builtin_prefetch(next + (int64_t)j * K + k, 0, 2);
        vec wv[F32_MAX_FN];
        for (int j = 0; j < NJ; j++) wv[j] = ld(w + (int64_t)j * K + k);
        for (int i = 0; i < R; i++) {
            vec xv = ld(x + (int64_t)i * K + k);
            for (int j = 0; j < NJ; j++) acc[i][j] += xv * wv[j];
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < NJ; j++) y[(int64_t)i * N + j] = hsum16(acc[i][j]) + (b ? b[j] : 0.0f);
}

/* one tile shape's pass over the weights, FN and FT literal (a function's parameters would reach the
 * OpenMP region as variables, and its tiles would not unroll) */
#define F32_CASE(R, FN) \
    case R: f32_tile(xm, wt, ym, R, FN, K, N, b, pf, FN); break;
#define F32_TILES(NAME, FN, FT)                                                                                  \
    static void NAME(const float *x, const float *w, const float *bias, float *y, int M, int N, int K, int threads) { \
        int tiles = (N + FN - 1) / FN;                                                                           \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if (threads > 1 && tiles >= 8)")         \
        for (int t = 0; t < tiles; t++) {                                                                        \
            int n = t * FN, nj = N - n < FN ? N - n : FN;                                                        \
            const float *wt = w + (int64_t)n * K, *b = bias ? bias + n : NULL;                                   \
            const float *next =                                                                                  \
                F32_PREFETCH && t + F32_PREFETCH < tiles - 1 ? wt + (int64_t)F32_PREFETCH * FN * K : NULL;        \
            for (int m0 = 0; m0 < M; m0 += FT) {                                                                 \
                int r = M - m0 < FT ? M - m0 : FT;                                                               \
                const float *xm = x + (int64_t)m0 * K, *pf = m0 == 0 ? next : NULL;                              \
                float *ym = y + (int64_t)m0 * N + n;                                                             \
                if (nj < FN) {                                                                                   \
                    f32_tile(xm, wt, ym, r, nj, K, N, b, NULL, FN);                                              \
                    continue;                                                                                    \
                }                                                                                                \
                switch (r) { /* a literal row count per case: each unrolls (r <= FT <= F32_MAX_FT) */            \
                    F32_CASE(1, FN) F32_CASE(2, FN) F32_CASE(3, FN) F32_CASE(4, FN)                              \
                    F32_CASE(5, FN) F32_CASE(6, FN) F32_CASE(7, FN)                                              \
                default: f32_tile(xm, wt, ym, FT, FN, K, N, b, pf, FN); break;                                   \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
    }

F32_TILES(f32_tiles_4x6, 4, 6)
F32_TILES(f32_tiles_3x8, 3, 8)
#undef F32_TILES
#undef F32_CASE

int f32_matmul(const float *x, const float *w, const float *bias, float *y, int M, int N, int K, int threads) {
    if (K % W) return -2;
    if (M > 12)
        f32_tiles_3x8(x, w, bias, y, M, N, K, threads);
    else
        f32_tiles_4x6(x, w, bias, y, M, N, K, threads);
    return 0;
}

/* A whole decode or verify step's layers in one call (the lean forward's fused path, lean.py): per layer
 * h -> qkv -> rotary, K/V writes and attention -> o -> residual add and norm -> gate_up -> SiLU x up ->
 * down -> residual add and the next layer's norm, each stage the same function the per-op path calls,
 * so the result has the same bits; only the Python between the stages is gone. A product is an f32
 * weight (kind 0: f32_matmul) or an int4_pack'ed one (kind 1: int4_matmul). x [T, C] holds the
 * embeddings and comes back as the last layer's output; `keep` [L + 1] says which layers' inputs (L: the
 * output) to copy into kept [T, n_keep * C] and where (-1: none). Scratch: stack_scratch floats. */
typedef struct {
    const void *w;      /* f32 weight [N, K], or int4 codes */
    const uint16_t *sm; /* int4 scales and minimums */
    const float *b;     /* bias or NULL */
    int32_t kind, n, k, pad;
} lean_linear;

int64_t stack_scratch(int T, int C, int H, int Hkv, int D, int F) {
    return (int64_t)T * ((H + 2 * Hkv) * D + 2 * H * D + C + 3 * F + C);
}

static int stack_product(const lean_linear *l, const float *x, float *y, int M, int threads) {
    if (l->kind == 0) return f32_matmul(x, (const float *)l->w, l->b, y, M, l->n, l->k, threads);
    return int4_matmul(x, (const uint8_t *)l->w, l->sm, l->b, y, M, l->n, l->k, threads);
}

static void keep_rows(const float *x, float *kept, int slot, int n_keep, int T, int C) {
    for (int t = 0; t < T; t++) memcpy(kept + ((int64_t)t * n_keep + slot) * C, x + (int64_t)t * C, sizeof(float) * C);
}

int lean_stack(float *x, float *scratch, int L, const lean_linear *lin, const float *const *ln1,
               const float *const *ln2, float *const *kp, float *const *vp, const float *cos, const float *sin,
               const int32_t *tables, const int32_t *q_seq, const int32_t *q_pos, const int32_t *keep, float *kept,
               int n_keep, int T, int C, int H, int Hkv, int D, int F, int B, int nb_max, int nblocks, int bs,
               int64_t k_sh, int64_t k_sb, int64_t v_sh, int64_t v_sb, float scale, float eps, int threads) {
    float *fused = scratch, *qbuf = fused + (int64_t)T * (H + 2 * Hkv) * D, *attn = qbuf + (int64_t)T * H * D;
    float *o = attn + (int64_t)T * H * D, *gu = o + (int64_t)T * C, *act = gu + (int64_t)T * 2 * F;
    float *h = act + (int64_t)T * F;
    int rc;
    rms_norm_rows(x, ln1[0], h, T, C, eps);
    for (int i = 0; i < L; i++) {
        const lean_linear *l = lin + 4 * i;
        if (keep[i] >= 0) keep_rows(x, kept, keep[i], n_keep, T, C);
        if ((rc = stack_product(l, h, fused, T, threads))) return rc;
        rc = rope_write_attend(fused, cos, sin, kp[i], vp[i], tables, q_seq, q_pos, qbuf, attn, T, H, Hkv, D, B,
                               nb_max, nblocks, bs, k_sh, k_sb, v_sh, v_sb, scale, threads);
        if (rc) return rc;
        if ((rc = stack_product(l + 1, attn, o, T, threads))) return rc;
        add_rms_norm(x, o, ln2[i], x, h, T, C, eps);
        if ((rc = stack_product(l + 2, h, gu, T, threads))) return rc;
        silu_mul(gu, act, T, F);
        if ((rc = stack_product(l + 3, act, o, T, threads))) return rc;
        if (i + 1 < L) add_rms_norm(x, o, ln1[i + 1], x, h, T, C, eps);
        else
            for (int64_t j = 0; j < (int64_t)T * C; j++) x[j] += o[j];
    }
    if (keep[L] >= 0) keep_rows(x, kept, keep[L], n_keep, T, C);
    return 0;
}
