/*
 * tablezip's compiled CPU kernels, loaded by embeddings/native.py:
 *   - tz_assemble_forward / tz_assemble_backward: the fused assemble of embeddings/assemble.py as
 *     one pass over the rows;
 *   - tz_compact_unit_bags: TBE's indices and offsets for bags of one id some of which were
 *     dropped (EmbeddingBagLookup._lookup_unit_drops);
 *   - tz_rows: the Hash / Hybrid / Pruned rows of a group of features' ids (compress/fused_ids.py's
 *     rows_kernel, on a CPU), one pass instead of a dozen torch ops; tz_digits: QR / KWay's
 *     partition rows (mixed-radix digits of the OOV-mapped ids);
 *   - tz_tbe_backward: a CPU TBE's backward and exact optimizer step, in place
 *     (embeddings/tbe_backward.py; used where fbgemm's CPU backward is slow: shared tables);
 *   - tz_fused_forward / tz_fused_backward: the fused lookup and training step of Full, QR / KWay,
 *     MultiHash, MixedDim and Pruned collections straight from the TBE's tables
 *     (compress/fused_cpu.py; the CPU twin of the Triton kernels).
 *
 * The assemble:
 *
 * Why C: on a CPU the assemble is a few dozen memory-bound ops per step (a copy, product, sum or
 * small matrix product per feature, forward and backward), each a separate pass over [B, D]
 * column views with its own dispatch. Here each row's slots are read once, every feature's vector
 * is computed while they are in L1, and the row is written once. The plan (which slots make which
 * feature, and how) is the same program the Python path runs, encoded as int64s by
 * embeddings/native.py.
 *
 * Exactness: identity, add, mult, concat and mean run the same IEEE float operations in the same
 * order as the torch ops of the Python path (built with -ffp-contract=off, no fast-math), so they
 * are bitwise equal to it. Projections (MixedDim) sum their products in another order than BLAS:
 * equal up to rounding.
 *
 * Program, per op: kind, nslots, out_col, mean (0/1), feature, then per slot: col, width, weight
 * (index into the weights array, -1 for none). Kinds: 0 identity, 1 mult, 2 add, 3 concat,
 * 4 project.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

enum { K_IDENTITY = 0, K_MULT = 1, K_ADD = 2, K_CONCAT = 3, K_PROJECT = 4 };
#define OP_HEADER 5
#define SLOT_FIELDS 3

typedef struct {
    const float *x;         /* TBE's output rows (forward input; backward: the saved input) */
    int64_t x_stride;
    float *out;             /* forward: the output; backward: TBE's gradient (may be x itself) */
    int64_t out_stride;
    const float *g;         /* backward: the output's gradient, any strides */
    int64_t g_stride0, g_stride1;
    int64_t dim;
    const int64_t *prog;
    int64_t nops;
    const int64_t *op_start; /* offset of each op in prog */
    const float *const *weights;   /* [width, dim] each, contiguous */
    float *grad_weights;           /* backward: per thread, total_weight_elems floats each */
    const int64_t *weight_offset;  /* offset of each weight's gradient in a thread's block */
    const int64_t *wanted;         /* backward: whether each weight's gradient is wanted */
    int64_t total_weight_elems;
    const float *div;       /* [features, div_stride] divisors (mean pooling), or NULL */
    int64_t div_stride;
    int64_t max_cols;       /* widest op: sum of its slots' widths */
    int64_t row_begin, row_end;
    int thread;
    int status;
} job_t;

/* Vectors (GCC/Clang vector extension), loaded and stored through memcpy (no alignment assumed):
 * vf as wide as the build's target allows (built with -march=native: 8 floats with AVX, else 4; 16
 * with AVX-512 measured 3.5x slower than 8 for MixedDim's projections on an EPYC), v4 one SSE / NEON register on any x86-64 or arm64. A vector wider than the target's
 * registers goes through the stack (measured 15x slower), hence the width from the target.
 * Elementwise +, *, / on them are the IEEE ops of the scalar code, lane by lane: the same results
 * as torch's. The helpers take D as a constant (each kernel is inlined into one copy per common D)
 * and use vf when D is a multiple of its width, else v4 when D is a multiple of 4, else scalar
 * loops. Without vectors gcc unrolls the constant-D loops into scalar code: ~136 instructions per
 * op and row, 1.1 ms for QR's forward at B=4096 (0.38 ms with v4). */
#if defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
typedef float vf __attribute__((vector_size(VW * sizeof(float))));
typedef float v4 __attribute__((vector_size(16)));
#define INL static inline __attribute__((always_inline))
INL vf ldw(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
INL void stw(float *p, vf v) { memcpy(p, &v, sizeof v); }
/* A vector of s in every lane: a literal, which the compiler makes one broadcast (a loop over the
 * lanes compiled to 8 lane inserts per splat, in MixedDim's projection loops). */
#if VW == 8
INL vf splat(float s) { return (vf){s, s, s, s, s, s, s, s}; }
#else
INL vf splat(float s) { return (vf){s, s, s, s}; }
#endif
INL v4 ld(const float *p) { v4 v; memcpy(&v, p, sizeof v); return v; }
INL void st(float *p, v4 v) { memcpy(p, &v, sizeof v); }
INL void vcopy(float *dst, const float *a, const int64_t D) { memcpy(dst, a, (size_t)D * sizeof(float)); }
/* A copy of n floats (n small, not a constant): vector moves, no call into memcpy. */
INL void vcopy_small(float *dst, const float *src, const int64_t n) {
    int64_t c = 0;
    for (; c + VW <= n; c += VW) stw(dst + c, ldw(src + c));
    for (; c + 4 <= n; c += 4) st(dst + c, ld(src + c));
    for (; c < n; c++) dst[c] = src[c];
}
/* One elementwise loop body at the widest width D allows. */
#define ELEMENTWISE(D, WIDE, NARROW, SCALAR)                                        \
    if ((D) % VW == 0) { for (int64_t d = 0; d < (D); d += VW) { WIDE; } }           \
    else if ((D) % 4 == 0) { for (int64_t d = 0; d < (D); d += 4) { NARROW; } }      \
    else { for (int64_t d = 0; d < (D); d++) { SCALAR; } }
INL void vmul(float *dst, const float *a, const float *b, const int64_t D) {
    ELEMENTWISE(D, stw(dst + d, ldw(a + d) * ldw(b + d)), st(dst + d, ld(a + d) * ld(b + d)), dst[d] = a[d] * b[d])
}
INL void vadd(float *dst, const float *a, const float *b, const int64_t D) {
    ELEMENTWISE(D, stw(dst + d, ldw(a + d) + ldw(b + d)), st(dst + d, ld(a + d) + ld(b + d)), dst[d] = a[d] + b[d])
}
INL void vdiv(float *dst, const float *a, const float s, const int64_t D) {
    const vf sw = splat(s);
    const v4 s4 = {s, s, s, s};
    ELEMENTWISE(D, stw(dst + d, ldw(a + d) / sw), st(dst + d, ld(a + d) / s4), dst[d] = a[d] / s)
}
INL void vfill(float *dst, const float s, const int64_t D) {
    const vf sw = splat(s);
    const v4 s4 = {s, s, s, s};
    ELEMENTWISE(D, stw(dst + d, sw), st(dst + d, s4), dst[d] = s)
}
/* acc += s * w (a product, then a sum: no fused multiply-add, so MixedDim's projections are
 * torch's matrix products bit for bit where those sum in the same order: the server's row reader
 * checks that against the collection's lookup, tests/serving/test_parity.py) */
INL void vaxpy(float *acc, const float s, const float *w, const int64_t D) {
    const vf sw = splat(s);
    const v4 s4 = {s, s, s, s};
    ELEMENTWISE(D, stw(acc + d, ldw(acc + d) + sw * ldw(w + d)), st(acc + d, ld(acc + d) + s4 * ld(w + d)),
                acc[d] += s * w[d])
}
/* The lanes of a vf summed as a tree (halves, then quarters, ...): 3 dependent adds for 8 lanes
 * instead of 8 in a chain. */
INL float vsum_tree(vf sum) {
    float t[VW];
    memcpy(t, &sum, sizeof t);
    for (int w = VW / 2; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) t[i] += t[i + w];
    return t[0];
}
INL float vdot(const float *a, const float *b, const int64_t D) {
    if (D % VW == 0) {
        vf sum = ldw(a) * ldw(b);
        for (int64_t d = VW; d < D; d += VW) sum = sum + ldw(a + d) * ldw(b + d);
        return vsum_tree(sum);
    }
    if (D % 4 == 0) {
        v4 sum = ld(a) * ld(b);
        for (int64_t d = 4; d < D; d += 4) sum = sum + ld(a + d) * ld(b + d);
        return (sum[0] + sum[2]) + (sum[1] + sum[3]);
    }
    float sum = 0.0f;
    for (int64_t d = 0; d < D; d++) sum += a[d] * b[d];
    return sum;
}

/* Register-held forms of MixedDim's small products (w <= 32 rows of D), for D a multiple of the
 * vector width up to REG_D: each keeps its D-wide operand in registers, where the plain helpers
 * go through memory (the compiler cannot keep acc in registers across vaxpy calls, as acc may
 * alias the rows), and each sums in the plain helper's order, so the results are the same bits. */
#define REG_D 128
#define REG_OK(D) ((D) % VW == 0 && (D) <= REG_D)

/* acc += x[0] * rows[0] + x[1] * rows[1] + ... (rows: [w, D]), in that order: vaxpy per row. */
INL void vproject(float *acc, const float *x, const float *rows, const int64_t w, const int64_t D) {
    if (!REG_OK(D)) {
        for (int64_t c = 0; c < w; c++) vaxpy(acc, x[c], rows + c * D, D);
        return;
    }
    vf a[REG_D / VW];
    for (int64_t i = 0; i < D / VW; i++) a[i] = ldw(acc + i * VW);
    for (int64_t c = 0; c < w; c++) {
        const vf s = splat(x[c]);
        for (int64_t i = 0; i < D / VW; i++) a[i] = a[i] + s * ldw(rows + c * D + i * VW);
    }
    for (int64_t i = 0; i < D / VW; i++) stw(acc + i * VW, a[i]);
}

/* out[c] = vdot(rows[c], g) for c < w: four dots at once, each its own chain (one dot's chain of
 * dependent adds, about 35 cycles at D=64, was MixedDim's largest backward cost). */
INL void vdots(float *out, const float *rows, const float *g, const int64_t w, const int64_t D) {
    int64_t c = 0;
#if VW == 8 && (defined(__clang__) || __GNUC__ >= 12) /* __builtin_shufflevector */
    /* Eight dots at once, their lanes summed together by shuffles (the same tree per dot as
     * vsum_tree's: lane i + lane i+4, then + the pair 2 apart, then the last pair): 14 vector
     * ops for the eight sums instead of about 6 per dot. */
    if (D % VW == 0) {
        for (; c + 8 <= w; c += 8) {
            const float *r = rows + c * D;
            vf s[8];
            const vf g0 = ldw(g);
            for (int j = 0; j < 8; j++) s[j] = ldw(r + j * D) * g0;
            for (int64_t d = VW; d < D; d += VW) {
                const vf gd = ldw(g + d);
                for (int j = 0; j < 8; j++) s[j] = s[j] + ldw(r + j * D + d) * gd;
            }
            vf u[4], v[2];
            for (int j = 0; j < 4; j++)
                u[j] = __builtin_shufflevector(s[2 * j], s[2 * j + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
                       __builtin_shufflevector(s[2 * j], s[2 * j + 1], 4, 5, 6, 7, 12, 13, 14, 15);
            for (int j = 0; j < 2; j++)
                v[j] = __builtin_shufflevector(u[2 * j], u[2 * j + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
                       __builtin_shufflevector(u[2 * j], u[2 * j + 1], 2, 3, 6, 7, 10, 11, 14, 15);
            stw(out + c, __builtin_shufflevector(v[0], v[1], 0, 2, 4, 6, 8, 10, 12, 14) +
                             __builtin_shufflevector(v[0], v[1], 1, 3, 5, 7, 9, 11, 13, 15));
        }
    }
#endif
    if (D % VW == 0) {
        for (; c + 4 <= w; c += 4) {
            const float *r = rows + c * D;
            vf g0 = ldw(g);
            vf s0 = ldw(r) * g0, s1 = ldw(r + D) * g0, s2 = ldw(r + 2 * D) * g0, s3 = ldw(r + 3 * D) * g0;
            for (int64_t d = VW; d < D; d += VW) {
                const vf gd = ldw(g + d);
                s0 = s0 + ldw(r + d) * gd;
                s1 = s1 + ldw(r + D + d) * gd;
                s2 = s2 + ldw(r + 2 * D + d) * gd;
                s3 = s3 + ldw(r + 3 * D + d) * gd;
            }
            out[c] = vsum_tree(s0);
            out[c + 1] = vsum_tree(s1);
            out[c + 2] = vsum_tree(s2);
            out[c + 3] = vsum_tree(s3);
        }
    }
    for (; c < w; c++) out[c] = vdot(rows + c * D, g, D);
}

/* rows[c] += xs[t][c] * gs[t] for c < w, t < n, in t order for each row (the per-t vaxpy's sums):
 * each row is loaded and stored once for the n vectors. */
INL void vouter_add_tile(float *rows, const float *const *xs, const float *const *gs, const int n, const int64_t w,
                         const int64_t D) {
    if (!REG_OK(D)) {
        for (int t = 0; t < n; t++)
            for (int64_t c = 0; c < w; c++) vaxpy(rows + c * D, xs[t][c], gs[t], D);
        return;
    }
    for (int64_t c = 0; c < w; c++) {
        float *row = rows + c * D;
        vf a[REG_D / VW];
        for (int64_t i = 0; i < D / VW; i++) a[i] = ldw(row + i * VW);
        for (int t = 0; t < n; t++) {
            const vf s = splat(xs[t][c]);
            for (int64_t i = 0; i < D / VW; i++) a[i] = a[i] + s * ldw(gs[t] + i * VW);
        }
        for (int64_t i = 0; i < D / VW; i++) stw(row + i * VW, a[i]);
    }
}


static inline const int64_t *slot_of(const int64_t *op, int64_t j) { return op + OP_HEADER + SLOT_FIELDS * j; }
static inline int64_t s_col(const int64_t *op, int64_t j) { return slot_of(op, j)[0]; }

/* A "project" op of one row in plain loops: D-wide slots first (copy, then add), then each
 * product, accumulated in the output (for D not a multiple of the vector width, or over 128). */
static void project_scalar(const job_t *job, const int64_t *op, const float *x, float *dst, const int64_t D) {
    const int64_t n = op[1];
    int written = 0;
    for (int64_t j = 0; j < n; j++) {
        const int64_t *s = slot_of(op, j);
        if (s[2] >= 0) continue;
        if (written) vadd(dst, dst, x + s[0], D);
        else vcopy(dst, x + s[0], D);
        written = 1;
    }
    if (!written) memset(dst, 0, (size_t)D * sizeof(float));
    for (int64_t j = 0; j < n; j++) {
        const int64_t *s = slot_of(op, j);
        if (s[2] < 0) continue;
        const float *p = x + s[0], *w = job->weights[s[2]];
        for (int64_t k = 0; k < s[1]; k++) vaxpy(dst, p[k], w + k * D, D);
    }
}

/* One row, forward: every op's vector from the row's slots (one contiguous stretch of TBE's output,
 * read front to back: rows outermost, so the hardware prefetcher follows; op by op over a block of
 * rows strides through a page per row and measured 4x slower). */
INL void forward_row(const job_t *job, int64_t b, const int64_t D) {
    const float *x = job->x + b * job->x_stride;
    float *out = job->out + b * job->out_stride;
    for (int64_t i = 0; i < job->nops; i++) {
        const int64_t *op = job->prog + job->op_start[i];
        const int64_t kind = op[0], n = op[1];
        float *dst = out + op[2];
        if (kind == K_IDENTITY || ((kind == K_MULT || kind == K_ADD) && n == 1)) {
            vcopy(dst, x + s_col(op, 0), D);
        } else if (kind == K_MULT) {
            vmul(dst, x + s_col(op, 0), x + s_col(op, 1), D);
            for (int64_t j = 2; j < n; j++) vmul(dst, dst, x + s_col(op, j), D);
        } else if (kind == K_ADD) {
            vadd(dst, x + s_col(op, 0), x + s_col(op, 1), D);
            for (int64_t j = 2; j < n; j++) vadd(dst, dst, x + s_col(op, j), D);
        } else if (kind == K_CONCAT) {
            int64_t column = 0;
            for (int64_t j = 0; j < n; j++) {
                const int64_t *s = slot_of(op, j);
                memcpy(dst + column, x + s[0], (size_t)s[1] * sizeof(float));
                column += s[1];
            }
        } else if (D % VW == 0 && D <= 128) { /* project, the sum in registers (see project_scalar) */
            vf acc[D / VW > 0 ? D / VW : 1];
            int written = 0;
            for (int64_t j = 0; j < n; j++) {
                const int64_t *s = slot_of(op, j);
                if (s[2] >= 0) continue;
                const float *p = x + s[0];
                for (int64_t q = 0; q < D / VW; q++) acc[q] = written ? acc[q] + ldw(p + VW * q) : ldw(p + VW * q);
                written = 1;
            }
            if (!written)
                for (int64_t q = 0; q < D / VW; q++) acc[q] = splat(0.0f);
            for (int64_t j = 0; j < n; j++) {
                const int64_t *s = slot_of(op, j);
                if (s[2] < 0) continue;
                const float *p = x + s[0], *w = job->weights[s[2]];
                for (int64_t k = 0; k < s[1]; k++) {
                    const vf sv = splat(p[k]);
                    for (int64_t q = 0; q < D / VW; q++) acc[q] = acc[q] + sv * ldw(w + k * D + VW * q);
                }
            }
            for (int64_t q = 0; q < D / VW; q++) stw(dst + VW * q, acc[q]);
        } else {
            project_scalar(job, op, x, dst, D);
        }
        if (op[3]) vdiv(dst, dst, job->div[op[4] * job->div_stride + b], D);
    }
}

/* One row, backward: every slot's gradient into the row of TBE's gradient. An op's slots are read
 * into `buf` before any is written: the gradient may be written over TBE's output itself. */
INL void backward_row(const job_t *job, int64_t b, float *buf, float *gbuf, float *tmp, float *gw, const int64_t D) {
    const float *x = job->x ? job->x + b * job->x_stride : NULL;
    float *gx = job->out + b * job->out_stride;
    for (int64_t i = 0; i < job->nops; i++) {
        const int64_t *op = job->prog + job->op_start[i];
        const int64_t kind = op[0], n = op[1];
        const float *grow = job->g + b * job->g_stride0 + op[2] * job->g_stride1;
        const float *g = grow;
        if (job->g_stride1 == 0) { /* e.g. the expanded gradient of a sum: one value per row */
            vfill(gbuf, grow[0], D);
            g = gbuf;
        } else if (job->g_stride1 != 1) {
            for (int64_t d = 0; d < D; d++) gbuf[d] = grow[d * job->g_stride1];
            g = gbuf;
        }
        if (op[3]) { /* the autograd of pooled / divisor */
            vdiv(gbuf, g, job->div[op[4] * job->div_stride + b], D);
            g = gbuf;
        }
        if (kind == K_IDENTITY || kind == K_ADD || (kind == K_MULT && n == 1)) {
            for (int64_t j = 0; j < n; j++) vcopy(gx + s_col(op, j), g, D);
        } else if (kind == K_CONCAT) {
            int64_t column = 0;
            for (int64_t j = 0; j < n; j++) {
                const int64_t *s = slot_of(op, j);
                memcpy(gx + s[0], g + column, (size_t)s[1] * sizeof(float));
                column += s[1];
            }
        } else if (kind == K_MULT && n == 2 && D % VW == 0 && D <= 128) {
            /* QR: both parts loaded into registers before either gradient is stored (they may be
             * the same memory), no copy through buf. p0 gets g * p1, p1 gets g * p0. */
            vf p0[D / VW > 0 ? D / VW : 1], p1[D / VW > 0 ? D / VW : 1];
            const float *a = x + s_col(op, 0), *c = x + s_col(op, 1);
            for (int64_t q = 0; q < D / VW; q++) {
                p0[q] = ldw(a + VW * q);
                p1[q] = ldw(c + VW * q);
            }
            float *g0 = gx + s_col(op, 0), *g1 = gx + s_col(op, 1);
            for (int64_t q = 0; q < D / VW; q++) {
                const vf gq = ldw(g + VW * q);
                stw(g0 + VW * q, gq * p1[q]);
                stw(g1 + VW * q, gq * p0[q]);
            }
        } else if (kind == K_MULT) {
            for (int64_t j = 0; j < n; j++) vcopy(buf + j * D, x + s_col(op, j), D);
            /* As autograd through ((p0 * p1) * p2) * ...: prefixes[j] = p0 * ... * pj (j < n - 1),
             * in tmp; walking back, slot j gets running * prefixes[j - 1] and running becomes
             * running * pj; slot 0 gets the final running (n = 2: g * p0 and g * p1). */
            vcopy(tmp, buf, D);
            for (int64_t j = 1; j < n - 1; j++) vmul(tmp + j * D, tmp + (j - 1) * D, buf + j * D, D);
            if (g != gbuf) { vcopy(gbuf, g, D); g = gbuf; }
            for (int64_t j = n - 1; j > 0; j--) {
                vmul(gx + s_col(op, j), gbuf, tmp + (j - 1) * D, D);
                vmul(gbuf, gbuf, buf + j * D, D);
            }
            vcopy(gx + s_col(op, 0), gbuf, D);
        } else { /* project */
            int64_t column = 0;
            for (int64_t j = 0; j < n; j++) { /* the projected slots, read first */
                const int64_t *s = slot_of(op, j);
                if (s[2] >= 0) memcpy(buf + column, x + s[0], (size_t)s[1] * sizeof(float));
                column += s[1];
            }
            column = 0;
            for (int64_t j = 0; j < n; j++) {
                const int64_t *s = slot_of(op, j);
                const int64_t width = s[1];
                if (s[2] < 0) {
                    vcopy(gx + s[0], g, D);
                } else {
                    const float *w = job->weights[s[2]], *p = buf + column;
                    if (job->wanted[s[2]]) {
                        float *acc = gw + job->weight_offset[s[2]];
                        for (int64_t k = 0; k < width; k++) vaxpy(acc + k * D, p[k], g, D);
                    }
                    for (int64_t k = 0; k < width; k++) gx[s[0] + k] = vdot(g, w + k * D, D);
                }
                column += width;
            }
        }
    }
}

#define PER_D(CALL)                                                                                 \
    switch (D) {                                                                                    \
    case 8: { const int64_t DC = 8; CALL; } break;                                                  \
    case 16: { const int64_t DC = 16; CALL; } break;                                                \
    case 32: { const int64_t DC = 32; CALL; } break;                                                \
    case 64: { const int64_t DC = 64; CALL; } break;                                                \
    case 128: { const int64_t DC = 128; CALL; } break;                                              \
    default: { const int64_t DC = D; CALL; }                                                        \
    }

static void *run_forward(void *arg) {
    job_t *job = (job_t *)arg;
    const int64_t D = job->dim;
    PER_D(for (int64_t b = job->row_begin; b < job->row_end; b++) forward_row(job, b, DC))
    return NULL;
}

static void *run_backward(void *arg) {
    job_t *job = (job_t *)arg;
    const int64_t D = job->dim;
    /* buf: an op's slots (max_cols floats, at least n * D for mult); tmp: mult's prefixes. */
    const int64_t room = job->max_cols > D ? job->max_cols : D;
    float *buf = (float *)malloc((size_t)room * sizeof(float));
    float *tmp = (float *)malloc((size_t)room * sizeof(float));
    float *gbuf = (float *)malloc((size_t)D * sizeof(float));
    if (!buf || !tmp || !gbuf) {
        job->status = 1;
    } else {
        float *gw = job->grad_weights ? job->grad_weights + (int64_t)job->thread * job->total_weight_elems : NULL;
        PER_D(for (int64_t b = job->row_begin; b < job->row_end; b++) backward_row(job, b, buf, gbuf, tmp, gw, DC))
    }
    free(buf);
    free(tmp);
    free(gbuf);
    return NULL;
}

static int run_jobs(job_t *base, int64_t rows, int threads, void *(*fn)(void *)) {
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    if (rows < (int64_t)threads * 256) threads = rows >= 512 ? (int)(rows / 256) : 1;
    job_t jobs[64];
    pthread_t ids[64];
    int started[64] = {0};
    const int64_t per = (rows + threads - 1) / threads;
    for (int t = 0; t < threads; t++) {
        jobs[t] = *base;
        jobs[t].thread = t;
        jobs[t].status = 0;
        jobs[t].row_begin = t * per < rows ? t * per : rows;
        jobs[t].row_end = (t + 1) * per < rows ? (t + 1) * per : rows;
    }
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, fn, &jobs[t]) == 0;
    fn(&jobs[0]);
    int status = jobs[0].status;
    for (int t = 1; t < threads; t++) {
        if (started[t]) {
            pthread_join(ids[t], NULL);
        } else {
            fn(&jobs[t]); /* could not start a thread: its rows on this one */
        }
        status |= jobs[t].status;
    }
    return status ? -1 : threads;
}

static int64_t *op_offsets(const int64_t *prog, int64_t nops) {
    int64_t *start = (int64_t *)malloc((size_t)(nops > 0 ? nops : 1) * sizeof(int64_t));
    if (!start) return NULL;
    int64_t at = 0;
    for (int64_t i = 0; i < nops; i++) {
        start[i] = at;
        at += OP_HEADER + SLOT_FIELDS * prog[at + 1];
    }
    return start;
}

int64_t tz_native_version(void) { return 9; }

/* Returns the number of threads used, or -1 if memory ran out. */
int tz_assemble_forward(const float *x, int64_t x_stride, float *out, int64_t out_stride, int64_t rows, int64_t dim,
                        const int64_t *prog, int64_t nops, const float *const *weights, const float *div,
                        int64_t div_stride, int threads) {
    int64_t *start = op_offsets(prog, nops);
    if (!start) return -1;
    job_t job;
    memset(&job, 0, sizeof job);
    job.x = x; job.x_stride = x_stride; job.out = out; job.out_stride = out_stride; job.dim = dim;
    job.prog = prog; job.nops = nops; job.op_start = start; job.weights = weights;
    job.div = div; job.div_stride = div_stride;
    int used = run_jobs(&job, rows, threads, run_forward);
    free(start);
    return used;
}

/* grad_weights: zeroed scratch of threads * total_weight_elems floats; on return its first block
 * holds the sum over threads (each weight's gradient at weight_offset[w]). */
int tz_assemble_backward(const float *x, int64_t x_stride, float *gx, int64_t gx_stride, const float *g,
                         int64_t g_stride0, int64_t g_stride1, int64_t rows, int64_t dim, const int64_t *prog,
                         int64_t nops, int64_t max_cols, const float *const *weights, float *grad_weights,
                         const int64_t *weight_offset, const int64_t *wanted, int64_t total_weight_elems,
                         const float *div, int64_t div_stride, int threads) {
    int64_t *start = op_offsets(prog, nops);
    if (!start) return -1;
    job_t job;
    memset(&job, 0, sizeof job);
    job.x = x; job.x_stride = x_stride; job.out = gx; job.out_stride = gx_stride; job.g = g;
    job.g_stride0 = g_stride0; job.g_stride1 = g_stride1; job.dim = dim; job.prog = prog; job.nops = nops;
    job.op_start = start; job.weights = weights; job.grad_weights = grad_weights;
    job.weight_offset = weight_offset; job.wanted = wanted; job.total_weight_elems = total_weight_elems;
    job.div = div; job.div_stride = div_stride; job.max_cols = max_cols;
    int used = run_jobs(&job, rows, threads, run_backward);
    free(start);
    if (used > 1 && grad_weights) {
        for (int t = 1; t < used; t++) {
            const float *part = grad_weights + (int64_t)t * total_weight_elems;
            for (int64_t e = 0; e < total_weight_elems; e++) grad_weights[e] += part[e];
        }
    }
    return used;
}

/* Bags of one id, some dropped (id < 0) except in the runs [keep_runs[2r], keep_runs[2r + 1]) of
 * positions that keep every id (there a negative id goes on to fbgemm's own check): writes the kept
 * ids to `indices` and bag i's end, the number of kept ids up to and including it, to
 * offsets[i + 1] (offsets[0] = 0). Returns the number kept. What a compare, a masked_select and a
 * cumsum compute in three passes (and the masked_select's size sync), in one. */
int64_t tz_compact_unit_bags(const int64_t *ids, int64_t n, const int64_t *keep_runs, int64_t nruns,
                             int64_t *indices, int64_t *offsets) {
    int64_t kept = 0, run = 0;
    offsets[0] = 0;
    for (int64_t i = 0; i < n; i++) {
        while (run < nruns && keep_runs[2 * run + 1] <= i) run++;
        const int64_t id = ids[i];
        const int keep = id >= 0 || (run < nruns && keep_runs[2 * run] <= i);
        indices[kept] = id; /* written either way, counted only when kept: no branch */
        kept += keep;
        offsets[i + 1] = kept;
    }
    return kept;
}

/* splitmix64's finaliser of id ^ mixed seed on uint64, its top 63 bits modulo rows: the Hash
 * maths of compress/hashing.py (and fused_ids' rows_kernel), shared by every C pass that hashes. */
INL int64_t hashed_row(const int64_t id, const int64_t mixed_seed, const uint64_t rows, const uint64_t mix1,
                       const uint64_t mix2) {
    uint64_t z = (uint64_t)(id ^ mixed_seed);
    z = (z ^ (z >> 30)) * mix1;
    z = (z ^ (z >> 27)) * mix2;
    z = z ^ (z >> 31);
    return (int64_t)((z >> 1) % rows);
}

/* The rows of a group of ids, feature by feature (`counts[f]` ids each, read from feature_ids[f]:
 * the features' own tensors, not joined first; written to out in feature order), exactly as
 * compress/fused_ids.py's rows_kernel and the torch paths compute them (integer maths: equal bit
 * for bit). consts: a [4, nconst] table of per-feature values, nconst = 1 when every feature
 * shares them (see the kernel): HASH (rows, mixed seed), HYBRID (cold rows, mixed seed, hot count,
 * remap size), PRUNED (-, -, keep, num_embeddings). remap_offsets[f]: element offset of feature
 * f's int32 remap from `remap` (when has_remap). Why C: the torch path is ~10 elementwise passes
 * over every id (splitmix64 is 7 of them), each with its dispatch and a fresh int64 buffer. */
void tz_rows(const int64_t *const *feature_ids, int64_t *out, const int64_t *counts, int64_t nfeatures,
             const int64_t *consts, int64_t nconst, const int32_t *remap, const int64_t *remap_offsets, int64_t mode,
             int64_t has_remap, int64_t dflt, uint64_t mix1, uint64_t mix2) {
    int64_t at = 0;
    for (int64_t f = 0; f < nfeatures; f++) {
        const int64_t *src = feature_ids[f]; /* feature f's own ids: src[i - at] for i in [at, end) */
        const int64_t k = nconst == 1 ? 0 : f;
        const int64_t a = consts[k], b = consts[nconst + k], c = consts[2 * nconst + k], d = consts[3 * nconst + k];
        const int32_t *map = has_remap ? remap + remap_offsets[f] : NULL;
        const int64_t end = at + counts[f];
        if (mode == 2) { /* PRUNED: OOV map to [0, d], then the remap or the kept prefix */
            for (int64_t i = at; i < end; i++) {
                const int64_t id = src[i - at];
                const int64_t oov = (id >= 0 && id < d) ? id : d;
                int64_t row;
                if (map) {
                    row = (int64_t)map[oov];
                    if (dflt && row < 0) row = c;
                } else {
                    row = oov < c ? oov : (dflt ? c : -1);
                }
                out[i] = row;
            }
        } else {
            const uint64_t rows = (uint64_t)a;
            for (int64_t i = at; i < end; i++) {
                const int64_t id = src[i - at];
                const int64_t hashed = hashed_row(id, b, rows, mix1, mix2);
                if (mode == 0) {
                    out[i] = hashed;
                } else { /* HYBRID: hot ids read their exact row, the others hot + hash */
                    const int64_t cold = hashed + c;
                    if (map) {
                        const int64_t hot = (id >= 0 && id < d) ? (int64_t)map[id] : -1;
                        out[i] = hot >= 0 ? hot : cold;
                    } else {
                        out[i] = (id >= 0 && id < c) ? id : cold;
                    }
                }
            }
        }
        at = end;
    }
}

/* QR / KWay's rows: the mixed-radix digits of each OOV-mapped id (ids outside [0, sizes[f]) become
 * sizes[f]), feature by feature, with feature f's radices parts[f * k .. f * k + k - 1]: digit j
 * (j > 0) is q % parts[j] of q = id // (parts[j + 1] * ... * parts[k - 1]), digit 0 the rest of the
 * quotient (compress/compositional.py's transform_batch, the same integers). out: k rows of n. */
void tz_digits(const int64_t *const *feature_ids, int64_t *out, int64_t n, const int64_t *counts, int64_t nfeatures,
               const int64_t *sizes, const int64_t *parts, int64_t k) {
    int64_t at = 0;
    for (int64_t f = 0; f < nfeatures; f++) {
        const int64_t *src = feature_ids[f];
        const int64_t size = sizes[f], *p = parts + f * k, end = at + counts[f];
        for (int64_t i = at; i < end; i++) {
            const int64_t id = src[i - at];
            int64_t q = (id >= 0 && id < size) ? id : size;
            for (int64_t j = k - 1; j > 0; j--) {
                const int64_t higher = q / p[j];
                out[j * n + i] = q - higher * p[j];
                q = higher;
            }
            out[i] = q;
        }
        at = end;
    }
}

/* A CPU TBE's backward and its exact optimizer step, in place: every touched row's gradient (the sum
 * over the bags that read it of the pooled gradient, over all features that read its table) is
 * accumulated, then the row and its optimizer state are updated once, with fbgemm's formulas
 * (optimizer 0 rowwise Adagrad: m += sum(g * g) / D, w -= lr / (sqrt(m) + eps) * g; 1 Adagrad: per
 * element m += g * g, w -= lr * g / (sqrt(m) + eps); 2 SGD: w -= lr * g). Why: fbgemm's CPU backward
 * runs a table read by several features (unified embedding's shared table) through a scalar,
 * single-threaded loop; its vectorised kernels are for unshared tables only.
 * feat: per feature (row base in the linear row space, rows, weights offset, D, output column,
 * state offset). sample_weights: one per id (TBE's per-sample weights), or NULL. slot: one int32 per linear row, -1 between calls (restored on return); touched,
 * acc: room for one entry / one max_d-float row per id. Rows are updated in first-touch order; a
 * row's gradient sums its ids in feature order, then bag order. Returns the number of rows updated,
 * or -1 - f for an id of feature f outside its table (nothing is updated then; f = nfeatures: out
 * of memory). */
/* One id's gradient row into its row's accumulator (first touch: a copy). D a compile-time
 * constant where it is a common width (unrolled, vectorised without alias checks). */
INL void tbe_accumulate(float *restrict a, const float *restrict g, const int first, const int64_t D) {
    if (first)
        for (int64_t d = 0; d < D; d++) a[d] = g[d];
    else
        for (int64_t d = 0; d < D; d++) a[d] += g[d];
}

/* The same with a per-sample weight: the id's row was pooled as weight * row, so it gets weight * g. */
INL void tbe_accumulate_weighted(float *restrict a, const float *restrict g, const float weight, const int first,
                                 const int64_t D) {
    if (first)
        for (int64_t d = 0; d < D; d++) a[d] = g[d] * weight;
    else
        for (int64_t d = 0; d < D; d++) a[d] += g[d] * weight;
}

/* A row's optimizer state in fbgemm's layout (state at base): rowwise Adagrad one float per row,
 * Adagrad W per row, SGD none (NULL). */
INL float *fu_state_row(float *state, const int64_t base, const int64_t row, const int64_t W, const int64_t optimizer) {
    return optimizer == 0 ? state + base + row : optimizer == 1 ? state + base + row * W : NULL;
}

/* fbgemm's update of one row (W floats at w, its state at m) with the row's summed gradient g:
 * tz_tbe_backward's and tz_fused_backward's optimizer step (formulas: see tz_tbe_backward). */
INL void fu_update(float *w, float *m, const float *g, const int64_t W, const int64_t optimizer, const float lr,
                   const float eps) {
    if (optimizer == 0) {
        /* g's sum of squares in vectors (a chain of W dependent adds in order, ~200 cycles per row
         * at W=64, was the largest cost of a step's row updates): not fbgemm's summation order, so
         * the state matches the TBE path's within rounding (the tests' allclose), not bit for bit. */
        *m += vdot(g, g, W) / (float)W;
        const float step = lr / (sqrtf(*m) + eps);
        for (int64_t d = 0; d < W; d++) w[d] -= step * g[d];
    } else if (optimizer == 1) {
        for (int64_t d = 0; d < W; d++) {
            m[d] += g[d] * g[d];
            w[d] -= lr * g[d] / (sqrtf(m[d]) + eps);
        }
    } else {
        for (int64_t d = 0; d < W; d++) w[d] -= lr * g[d];
    }
}

int64_t tz_tbe_backward(const float *grad, int64_t grad_stride, int64_t grad_col_stride, const int64_t *indices,
                        const int64_t *offsets, const float *sample_weights, int64_t nfeatures, int64_t batch,
                        const int64_t *feat, float *weights, float *state, int32_t *slot, int64_t *touched,
                        float *acc, int64_t max_d, int64_t optimizer, float lr, float eps) {
    int64_t n = 0;
    /* A gradient whose columns are not adjacent (the expanded gradient of a sum: strides 0, 0) is
     * read through gbuf, a row's slice at a time: no [B, W] copy of it. */
    float *gbuf = grad_col_stride == 1 ? NULL : (float *)malloc((size_t)(max_d > 0 ? max_d : 1) * sizeof(float));
    if (grad_col_stride != 1 && !gbuf) return -1 - nfeatures;
    for (int64_t f = 0; f < nfeatures; f++) {
        const int64_t *q = feat + 6 * f;
        const int64_t base = q[0], rows = q[1], D = q[3], col = q[4];
        const int64_t *bag = offsets + f * batch;
        for (int64_t b = 0; b < batch; b++) {
            const float *g = grad + b * grad_stride + col * grad_col_stride;
            if (gbuf) {
                if (bag[b] == bag[b + 1]) continue;
                for (int64_t d = 0; d < D; d++) gbuf[d] = g[d * grad_col_stride];
                g = gbuf;
            } else {
                /* The gradient is read a column block per feature, a row apart: ask for the rows ahead. */
                __builtin_prefetch(g + 8 * grad_stride);
            }
            for (int64_t p = bag[b]; p < bag[b + 1]; p++) {
                const int64_t row = indices[p];
                if (row < 0 || row >= rows) {
                    for (int64_t s = 0; s < n; s++) slot[touched[2 * s]] = -1;
                    free(gbuf);
                    return -1 - f;
                }
                int32_t s = slot[base + row];
                const int first = s < 0;
                if (first) {
                    s = (int32_t)n++;
                    slot[base + row] = s;
                    touched[2 * s] = base + row;
                    touched[2 * s + 1] = f;
                }
                float *a = acc + (int64_t)s * max_d;
                if (sample_weights) {
                    tbe_accumulate_weighted(a, g, sample_weights[p], first, D);
                    continue;
                }
                switch (D) {
                case 8: tbe_accumulate(a, g, first, 8); break;
                case 16: tbe_accumulate(a, g, first, 16); break;
                case 32: tbe_accumulate(a, g, first, 32); break;
                case 64: tbe_accumulate(a, g, first, 64); break;
                default: tbe_accumulate(a, g, first, D);
                }
            }
        }
    }
    for (int64_t s = 0; s < n; s++) {
        const int64_t lin = touched[2 * s], f = touched[2 * s + 1];
        const int64_t *q = feat + 6 * f;
        const int64_t row = lin - q[0], D = q[3];
        float *m = fu_state_row(state, q[5], row, D, optimizer);
        fu_update(weights + q[2] + row * D, m, acc + s * max_d, D, optimizer, lr, eps);
        slot[lin] = -1;
    }
    free(gbuf);
    return n;
}

/* ---------------------------------------------------------------------------------------------
 * The fused lookup and training step on a CPU (compress/fused_cpu.py): the plans of
 * compress/fused_lookup.py / fused_train.py (Full, QR / KWay, MultiHash, MixedDim, Pruned as
 * D-wide blocks), run by C instead of Triton. Why: the TBE path of QR / KWay writes every partition's
 * pooled rows ([B, 39 x D] floats at 26 features), which the assemble then reads back and multiplies;
 * at B=4096, D=64 that output is 41 MB, fresh pages each call (~10k page faults, most of QR's 28 ms
 * forward against Full's 6.8 ms). Here each bag's rows are read from the tables in place, combined
 * and pooled in registers and written once into the [B, F x D] output; the backward forms each row's
 * gradient from the same rows and updates the touched rows once, as tz_tbe_backward does.
 *
 * Program: one record per feature, at rec_start[i]:
 *   parts (kind 0): kind, feature, n, mean, op, K, width, then K x (stride or probe seed, radix,
 *                   table element offset, first linear row, table index);
 *   hybrid (kind 2): kind, feature, -, mean, remap element offset (-1: none), remap length, hot rows,
 *                   cold rows, mixed seed, table element offset, first linear row, table index;
 *   mixed (kind 1): kind, feature, n, mean, remap element offset (-1: none), NB, then NB x (first
 *                   rank, rows, table element offset, width, projected (0: the row is D wide),
 *                   projection element offset (may be negative), first linear row, table index,
 *                   projection-gradient offset).
 * ops: 0 mult, 1 add, 2 concat, 3 multihash (fused_lookup.OPS), 4 hashcat (hashed rows concatenated:
 * Unified's chunks; fused_lookup.HashedParts). Table and projection offsets count
 * floats from `weights`; remap offsets count int32s from `remaps`. */
enum { FU_MULT = 0, FU_ADD = 1, FU_CONCAT = 2, FU_MULTIHASH = 3, FU_HASHCAT = 4 };
/* Ops whose partition rows are hashes of the raw id (no OOV map), and ops that concatenate. */
#define FU_HASHED(op) ((op) == FU_MULTIHASH || (op) == FU_HASHCAT)
#define FU_CONCATS(op) ((op) == FU_CONCAT || (op) == FU_HASHCAT)
#define PARTS_HEADER 7
#define PART_FIELDS 5
#define MIXED_HEADER 6
#define BLOCK_FIELDS 9
#define MAX_PARTS 16 /* partitions per parts record (fused_cpu.MAX_PARTITIONS) */
#define FU_AHEAD 8 /* bags (or rows) a prefetch runs ahead */

typedef struct {
    const int64_t *ids, *offsets, *prog, *rec_start;
    int64_t batch, nrec, dim, out_stride;
    float *out;
    const float *weights;
    const int32_t *remaps;
    int32_t *ranks;        /* per id: its MixedDim rank (room for every id; kept for the backward) */
    uint64_t mix1, mix2;
    int64_t max_width;
    int64_t bag_begin, bag_end;
    int stream;            /* outputs written with streaming stores, a tile of bags at a time */
    int status;
} fused_job_t;

/* Row of partition (multihash: probe) j of an OOV-mapped id: fused_lookup's partition_row. */
INL int64_t fu_digit(const int64_t id, const int64_t *part, const int64_t j, const int64_t op, const uint64_t mix1,
                     const uint64_t mix2) {
    if (FU_HASHED(op)) {
        return hashed_row(id, part[0], (uint64_t)part[1], mix1, mix2);
    }
    const int64_t q = id / part[0];
    return j > 0 ? q % part[1] : q;
}

/* Row of an id in a hybrid record's table (compress/hybrid.py): its hot row (the remap's value
 * where it is >= 0, or the id itself below `hot` without a remap), else hot + its hashed cold row.
 * A row past the table (a corrupted remap) is returned as it is, for the caller to refuse. */
INL int64_t fu_hybrid_row(const int64_t *rec, const int64_t id, const int32_t *remaps, const uint64_t mix1,
                          const uint64_t mix2) {
    const int64_t hot = rec[6];
    int64_t row = -1;
    if (rec[4] >= 0) {
        if (id >= 0 && id < rec[5]) row = (int64_t)remaps[rec[4] + id];
    } else if (id >= 0 && id < hot) {
        row = id;
    }
    if (row >= 0) return row;
    return hashed_row(id, rec[8], (uint64_t)rec[7], mix1, mix2) + hot;
}

/* Rank of an id in a mixed record (fused_lookup's mixed_ranks): OOV map, then the remap. */
INL int64_t fu_rank(const int64_t *rec, const int64_t id, const int32_t *remaps) {
    const int64_t n = rec[2];
    const int64_t oov = (id >= 0 && id < n) ? id : n;
    return rec[4] >= 0 ? (int64_t)remaps[rec[4] + oov] : oov;
}

/* A remap value no layout writes (ranks are in [0, n], Pruned's dropped ids -1): a corrupted
 * remap, refused rather than read as "dropped". */
INL int fu_bad_rank(const int64_t *rec, const int64_t rank) { return rank < -1 || rank > rec[2]; }

/* A row of W floats asked for from memory (its first 64 floats: a line per 16). */
INL void fu_prefetch_rows(const float *r, const int64_t W) {
    for (int64_t c = 0; c < W && c < 64; c += 16) __builtin_prefetch(r + c);
}

/* The rows of ids [lo, hi) of a parts record, K per id (rp[(p - lo) * K + j]: partition j's row),
 * each asked for from memory as it is found. Found for a chunk of bags before any is summed: a
 * tight loop of independent hashes and divisions, whose row reads are in flight together (found
 * one id at a time between the sums, each row's miss stalled the sum: Hash's forward at B=4096, D=16
 * took 1.2-1.4x fbgemm's, which prefetches its rows ahead). */
INL void fu_parts_rows(const fused_job_t *job, const int64_t *rec, const int64_t lo, const int64_t hi,
                       const float **rp) {
    const int64_t n = rec[2], op = rec[4], K = rec[5], W = rec[6];
    const int64_t *part = rec + PARTS_HEADER;
    for (int64_t p = lo; p < hi; p++) {
        int64_t id = job->ids[p];
        if (!FU_HASHED(op)) id = (id >= 0 && id < n) ? id : n;
        for (int64_t j = 0; j < K; j++) {
            const int64_t *pj = part + PART_FIELDS * j;
            const float *r = job->weights + pj[2] + fu_digit(id, pj, j, op, job->mix1, job->mix2) * W;
            fu_prefetch_rows(r, W);
            rp[(p - lo) * K + j] = r;
        }
    }
}

/* A parts record's bag b, from its rows (rp: fu_parts_rows' of the bag's first id). */
INL void fu_parts_forward(const fused_job_t *job, const int64_t *rec, const int64_t b, const float *const *rp,
                          float *acc, const int64_t D) {
    const int64_t f = rec[1], op = rec[4], K = rec[5], W = rec[6];
    const int64_t lo = job->offsets[f * job->batch + b], hi = job->offsets[f * job->batch + b + 1];
    vfill(acc, 0.0f, D);
    for (int64_t p = lo; p < hi; p++, rp += K) {
        if (FU_CONCATS(op)) {
            for (int64_t j = 0; j < K; j++) vadd(acc + j * W, acc + j * W, rp[j], W);
            continue;
        }
        if (K == 1) {
            vadd(acc, acc, rp[0], D);
            continue;
        }
        /* vector of the id: parts combined left to right (CompositionalLayout.combine), then added */
        float v[D];
        if (op == FU_MULT) vmul(v, rp[0], rp[1], D); else vadd(v, rp[0], rp[1], D);
        for (int64_t j = 2; j < K; j++) {
            if (op == FU_MULT) vmul(v, v, rp[j], D); else vadd(v, v, rp[j], D);
        }
        vadd(acc, acc, v, D);
    }
    if (rec[3] && hi - lo > 1) vdiv(acc, acc, (float)(hi - lo), D);
}

/* pooled: room for NB x max_width floats (each projected block's bag sum, projected once per bag,
 * as the TBE path pools per block before its projection). */
INL void fu_mixed_forward(fused_job_t *job, const int64_t *rec, const int64_t b, float *acc, float *pooled,
                          const int64_t D) {
    const int64_t f = rec[1], NB = rec[5], MW = job->max_width;
    const int64_t lo = job->offsets[f * job->batch + b], hi = job->offsets[f * job->batch + b + 1];
    unsigned used = 0; /* projected blocks hit in this bag (NB <= 32, checked by the caller) */
    const float *sum[32]; /* each hit block's bag sum: its row in place until a second id hits it */
    vfill(acc, 0.0f, D);
    for (int64_t p = lo; p < hi; p++) {
        const int64_t rank = job->ranks[p]; /* gathered by fu_gather_ranks */
        for (int64_t k = 0; k < NB; k++) {
            const int64_t *blk = rec + MIXED_HEADER + BLOCK_FIELDS * k;
            const int64_t local = rank - blk[0];
            if (local < 0 || local >= blk[1]) continue;
            const int64_t w = blk[3];
            const float *row = job->weights + blk[2] + local * w;
            if (!blk[4]) {
                vadd(acc, acc, row, D);
            } else {
                if (!(used & (1u << k))) {
                    used |= 1u << k;
                    sum[k] = row;
                } else {
                    float *pk = pooled + k * MW;
                    if (sum[k] != pk) {
                        vcopy_small(pk, sum[k], w);
                        sum[k] = pk;
                    }
                    for (int64_t c = 0; c < w; c++) pk[c] += row[c];
                }
            }
        }
    }
    for (int64_t k = 0; used && k < NB; k++) {
        if (!(used & (1u << k))) continue;
        const int64_t *blk = rec + MIXED_HEADER + BLOCK_FIELDS * k;
        vproject(acc, sum[k], job->weights + blk[5] /* P_k^T: [w, D] */, blk[3], D);
    }
    if (rec[3] && hi - lo > 1) vdiv(acc, acc, (float)(hi - lo), D);
}

/* The ranks of a mixed record's ids in the thread's bags, before any row is read: a tight loop of
 * independent gathers keeps many remap cache misses in flight (interleaved with each bag's rows and
 * projection, MixedDim's forward measured 1.2x the TBE path's, whose row pass is such a loop).
 * Returns 0, or 2 for a remap value no layout writes. */
static int fu_gather_ranks(fused_job_t *job, const int64_t *rec) {
    const int64_t f = rec[1];
    const int64_t lo = job->offsets[f * job->batch + job->bag_begin], hi = job->offsets[f * job->batch + job->bag_end];
    int bad = 0;
    for (int64_t p = lo; p < hi; p++) {
        const int64_t rank = fu_rank(rec, job->ids[p], job->remaps);
        bad |= fu_bad_rank(rec, rank);
        job->ranks[p] = (int32_t)rank;
    }
    return bad ? 2 : 0;
}

/* The rows of ids [lo, hi) of a hybrid record (rp[p - lo]), each prefetched as it is found (as
 * fu_parts_rows). Returns 0, or 2 for a row past the table (a corrupted remap). */
INL int fu_hybrid_rows(const fused_job_t *job, const int64_t *rec, const int64_t lo, const int64_t hi,
                       const float **rp) {
    const int64_t rows = rec[6] + rec[7], D = job->dim;
    for (int64_t p = lo; p < hi; p++) {
        const int64_t row = fu_hybrid_row(rec, job->ids[p], job->remaps, job->mix1, job->mix2);
        if (row >= rows) return 2;
        rp[p - lo] = job->weights + rec[9] + row * D;
        fu_prefetch_rows(rp[p - lo], D);
    }
    return 0;
}

/* A hybrid record's bag b from its rows (rp: fu_hybrid_rows' of the bag's first id), summed. */
INL void fu_hybrid_forward(const fused_job_t *job, const int64_t *rec, const int64_t b, const float *const *rp,
                           float *acc, const int64_t D) {
    const int64_t f = rec[1];
    const int64_t lo = job->offsets[f * job->batch + b], hi = job->offsets[f * job->batch + b + 1];
    vfill(acc, 0.0f, D);
    for (int64_t p = lo; p < hi; p++) vadd(acc, acc, rp[p - lo], D);
    if (rec[3] && hi - lo > 1) vdiv(acc, acc, (float)(hi - lo), D);
}

/* The output columns of bag b (out: the feature's first column) asked for, to be written: the
 * kernel writes a column block a row apart, which the hardware prefetchers do not follow, so each
 * block's first store waited for its line (Hash's forward at B=4096, D=64: 0.85x the time with
 * this, at B=32768, D=16 0.84x). */
INL void fu_prefetch_out(const fused_job_t *job, const float *out, const int64_t b) {
    const float *p = out + b * job->out_stride;
    for (int64_t c = 0; c < job->dim; c += 16) __builtin_prefetch(p + c, 1);
}

/* A mixed record's rows, asked for FU_AHEAD bags before they are read, where its blocks' tables
 * hold at least FU_PREFETCH_TABLE_BYTES (each bag's block row is first read by its projection,
 * which then waited for it: at B=4096, D=64, 26 Criteo-sample features, MixedDim's forward took
 * 0.58-0.66x the time with this). Every table prefetched, MixedDim's at D=16 (a few kept rows
 * each) took 1.09-1.22x: small tables are in cache anyway, hence the size test. */
#define FU_PREFETCH_TABLE_BYTES (32 << 10)
INL int64_t fu_mixed_bytes(const int64_t *rec) {
    int64_t bytes = 0;
    for (int64_t k = 0; k < rec[5]; k++) {
        const int64_t *blk = rec + MIXED_HEADER + BLOCK_FIELDS * k;
        bytes += blk[1] * blk[3] * (int64_t)sizeof(float);
    }
    return bytes;
}
/* The block row of bag b's first id of a mixed record (its rank gathered), and with slot its
 * backward accumulator slot, asked for from memory: the forward's and the backward's prefetch. */
INL void fu_prefetch_mixed(const int64_t *rec, const int64_t *offsets, const int64_t batch, const int32_t *ranks,
                           const float *weights, const int32_t *slot, const int64_t b) {
    const int64_t q = offsets[rec[1] * batch + b];
    if (q >= offsets[rec[1] * batch + b + 1]) return;
    const int64_t rank = ranks[q];
    for (int64_t k = 0; k < rec[5]; k++) {
        const int64_t *blk = rec + MIXED_HEADER + BLOCK_FIELDS * k;
        const int64_t local = rank - blk[0];
        if (local < 0 || local >= blk[1]) continue;
        fu_prefetch_rows(weights + blk[2] + local * blk[3], blk[3]);
        if (slot) __builtin_prefetch(slot + blk[6] + local);
    }
}

/* Streaming (non-temporal) stores for a large output: its bag vectors go to memory without first
 * reading each line into the cache (an ordinary store to a line not in cache reads it first, then
 * writes it back on eviction), and without evicting the tables' rows. Which outputs stream is
 * fused_cpu.stream_bytes' choice (tz_fused_forward's stream_bytes): ones far larger than what their
 * consumer could find in cache, and smaller ones whose every bag row is one whole cache line. At
 * B=4096, D=64, 26 Criteo-sample features (27 MB), Hash's forward took 0.55-0.58x the time
 * (benchmarks/NOTES.md); x86-64 with AVX only (elsewhere ordinary stores, the same values). */
#if defined(__AVX__)
#define FU_CAN_STREAM 1
/* A bag of n ids of a parts record (rows rp[p * K + j]; op, K parts W wide, W % 8 == 0), or n
 * rows of a hybrid record or of a mixed record without projections (K = 1, op FU_ADD), summed in
 * registers, divided by divisor where it is above 1 (a mean bag's ids), and streamed to dst
 * (32-byte aligned).
 * In fu_parts_forward's order (zero; each id's parts combined left to right, then added), so the
 * same bits; concatenated parts are a W-wide slice each. */
INL void fu_stream_sums(float *dst, const float *const *rp, const int64_t n, const int64_t op, const int64_t K,
                        const int64_t W, const int64_t divisor) {
    const int64_t slices = FU_CONCATS(op) ? K : 1, combined = FU_CONCATS(op) ? 1 : K;
    for (int64_t j = 0; j < slices; j++)
        for (int64_t d = 0; d < W; d += 8) {
            __m256 s = _mm256_setzero_ps();
            for (int64_t p = 0; p < n; p++) {
                const float *const *r = rp + p * K + j;
                __m256 v = _mm256_loadu_ps(r[0] + d);
                for (int64_t q = 1; q < combined; q++) {
                    const __m256 x = _mm256_loadu_ps(r[q] + d);
                    v = op == FU_MULT ? _mm256_mul_ps(v, x) : _mm256_add_ps(v, x);
                }
                s = _mm256_add_ps(s, v);
            }
            if (divisor > 1) s = _mm256_div_ps(s, _mm256_set1_ps((float)divisor));
            _mm256_stream_ps(dst + j * W + d, s);
        }
}
/* D floats (D % 8 == 0) streamed from src to dst (32-byte aligned). */
INL void fu_stream_copy(float *dst, const float *src, const int64_t D) {
    for (int64_t d = 0; d < D; d += 8) _mm256_stream_ps(dst + d, _mm256_loadu_ps(src + d));
}
INL void fu_stream_fence(void) { _mm_sfence(); }
#else
#define FU_CAN_STREAM 0
/* Never called without AVX: tz_fused_forward's stream is 0 there, so no caller takes this path. */
INL void fu_stream_sums(float *dst, const float *const *rp, const int64_t n, const int64_t op, const int64_t K,
                        const int64_t W, const int64_t divisor) { (void)dst; (void)rp; (void)n; (void)op; (void)K; (void)W; (void)divisor; }
INL void fu_stream_copy(float *dst, const float *src, const int64_t D) { vcopy(dst, src, D); }
INL void fu_stream_fence(void) {}
#endif
/* Bags per tile while streaming: every record's bags of a tile before the next tile, so the
 * streamed lines of a tile (256 rows x F x D floats) lie within a few MB (0.78-0.83x the time of
 * streaming all of a record's bags at once, at the workload above; 128-1024 measured alike). */
#define FU_STREAM_TILE 256

/* Bags of a parts or hybrid record are summed a chunk at a time, after fu_parts_rows /
 * fu_hybrid_rows found the chunk's rows: up to FU_CHUNK_IDS ids (a longer bag is a chunk of its
 * own). */
#define FU_CHUNK_IDS 32

/* Room for need row pointers in the thread's row buffer (*rows, *cap pointers), grown for a long
 * bag. Returns 0, or 1 when memory ran out. */
INL int fu_rows_room(const float ***rows, int64_t *cap, const int64_t need) {
    if (need <= *cap) return 0;
    const float **grown = (const float **)realloc((void *)*rows, (size_t)need * sizeof(float *));
    if (!grown) return 1;
    *rows = grown;
    *cap = need;
    return 0;
}

/* Bags [bag_begin, bag_end) of a parts or hybrid record, chunk by chunk; *rows / *cap: the
 * thread's row buffer (grown for a long bag). Returns 0, 1 (out of memory) or 2 (a hybrid row past
 * its table). */
static int fu_chunked_bags(fused_job_t *job, const int64_t *rec, const float ***rows, int64_t *cap, float *scratch) {
    const int64_t D = job->dim, f = rec[1], K = rec[0] == 0 ? rec[5] : 1;
    const int64_t *off = job->offsets + f * job->batch;
    float *out = job->out + f * D;
    /* Streamed from registers where the vectors divide the rows' width (a parts record's W, a
     * hybrid record's D); otherwise from a scratch row. */
    const int64_t op = rec[0] == 0 ? rec[4] : FU_ADD, W = rec[0] == 0 ? rec[6] : D;
    const int sums = job->stream && W % 8 == 0;
    for (int64_t b = job->bag_begin; b < job->bag_end;) {
        const int64_t lo = off[b];
        int64_t e = b + 1;
        while (e < job->bag_end && off[e + 1] - lo <= FU_CHUNK_IDS) e++;
        if (fu_rows_room(rows, cap, (off[e] - lo) * K)) return 1;
        if (rec[0] == 0) fu_parts_rows(job, rec, lo, off[e], *rows);
        else if (fu_hybrid_rows(job, rec, lo, off[e], *rows)) return 2;
        for (; b < e; b++) {
            const float *const *rp = *rows + (off[b] - lo) * K;
            float *dst = out + b * job->out_stride;
            if (sums) {
                const int64_t n = off[b + 1] - off[b];
                fu_stream_sums(dst, rp, n, op, K, W, rec[3] ? n : 0);
                continue;
            }
            float *acc = job->stream ? scratch : dst;
            if (!job->stream && b + FU_AHEAD < job->bag_end) fu_prefetch_out(job, out, b + FU_AHEAD);
            if (rec[0] == 0) PER_D(fu_parts_forward(job, rec, b, rp, acc, DC))
            else PER_D(fu_hybrid_forward(job, rec, b, rp, acc, DC))
            if (job->stream) fu_stream_copy(dst, scratch, D);
        }
    }
    return 0;
}

/* Whether any block of a mixed record is projected (MixedDim's narrow blocks; Pruned has none). */
INL int fu_mixed_projects(const int64_t *rec) {
    for (int64_t k = 0; k < rec[5]; k++)
        if (rec[MIXED_HEADER + BLOCK_FIELDS * k + 4]) return 1;
    return 0;
}

/* A mixed record without projections, streamed: each bag's rows (its ids' hits, in id then block
 * order: fu_mixed_forward's order of adds, so the same bits) summed in registers (the scratch row
 * was 0.72x of the ordinary stores for Pruned at B=4096 D=64, the register sums 0.45-0.59x for the
 * parts records). *rows / *cap: the thread's row buffer, grown for a long bag; big: the record's
 * rows are prefetched (FU_PREFETCH_TABLE_BYTES). Returns 0 or 1 (out of memory). */
static int fu_stream_unprojected(fused_job_t *job, const int64_t *rec, const float ***rows, int64_t *cap,
                                 const int big) {
    const int64_t D = job->dim, f = rec[1], NB = rec[5];
    const int64_t *off = job->offsets + f * job->batch;
    float *out = job->out + f * D;
    for (int64_t b = job->bag_begin; b < job->bag_end; b++) {
        if (big && b + FU_AHEAD < job->bag_end)
            fu_prefetch_mixed(rec, job->offsets, job->batch, job->ranks, job->weights, NULL, b + FU_AHEAD);
        const int64_t lo = off[b], hi = off[b + 1];
        if (fu_rows_room(rows, cap, (hi - lo) * NB)) return 1;
        int64_t n = 0;
        for (int64_t p = lo; p < hi; p++) {
            const int64_t rank = job->ranks[p];
            for (int64_t k = 0; k < NB; k++) {
                const int64_t *blk = rec + MIXED_HEADER + BLOCK_FIELDS * k;
                const int64_t local = rank - blk[0];
                if (local >= 0 && local < blk[1]) (*rows)[n++] = job->weights + blk[2] + local * blk[3];
            }
        }
        fu_stream_sums(out + b * job->out_stride, *rows, n, FU_ADD, 1, D, rec[3] ? hi - lo : 0);
    }
    return 0;
}

/* The records over bags [job->bag_begin, job->bag_end). pooled: fu_mixed_forward's; scratch: a
 * bag's vector (D floats) before it is streamed. */
static void fu_forward_bags(fused_job_t *job, const float ***rows, int64_t *cap, float *pooled, float *scratch) {
    const int64_t D = job->dim;
    /* Feature-major within the bags: one feature's tables stay in cache across its bags. */
    for (int64_t i = 0; i < job->nrec && !job->status; i++) {
        const int64_t *rec = job->prog + job->rec_start[i];
        float *out = job->out + rec[1] * D;
        if (rec[0] != 1) {
            job->status = fu_chunked_bags(job, rec, rows, cap, scratch);
            continue;
        }
        if ((job->status = fu_gather_ranks(job, rec))) break;
        const int big = fu_mixed_bytes(rec) >= FU_PREFETCH_TABLE_BYTES;
        if (job->stream && !fu_mixed_projects(rec)) { /* (streaming implies D % 8 == 0) */
            job->status = fu_stream_unprojected(job, rec, rows, cap, big);
            continue;
        }
        for (int64_t b = job->bag_begin; b < job->bag_end; b++) {
            if (b + FU_AHEAD < job->bag_end) {
                if (!job->stream) fu_prefetch_out(job, out, b + FU_AHEAD);
                if (big) fu_prefetch_mixed(rec, job->offsets, job->batch, job->ranks, job->weights, NULL, b + FU_AHEAD);
            }
            float *dst = out + b * job->out_stride;
            PER_D(fu_mixed_forward(job, rec, b, job->stream ? scratch : dst, pooled, DC))
            if (job->stream) fu_stream_copy(dst, scratch, D);
        }
    }
}

static void *run_fused_forward(void *arg) {
    fused_job_t *job = (fused_job_t *)arg;
    float *pooled = (float *)malloc((size_t)(32 * job->max_width + 1) * sizeof(float));
    float *scratch = (float *)malloc((size_t)(job->dim + 1) * sizeof(float));
    int64_t cap = FU_CHUNK_IDS * MAX_PARTS;
    const float **rows = (const float **)malloc((size_t)cap * sizeof(float *));
    if (pooled && scratch && rows) {
        const int64_t begin = job->bag_begin, end = job->bag_end;
        const int64_t tile = job->stream ? FU_STREAM_TILE : end - begin;
        for (int64_t t = begin; t < end && !job->status; t += tile) {
            job->bag_begin = t;
            job->bag_end = end - t > tile ? t + tile : end;
            fu_forward_bags(job, &rows, &cap, pooled, scratch);
        }
        job->bag_begin = begin;
        job->bag_end = end;
        if (job->stream) fu_stream_fence(); /* the streamed stores visible before the thread ends */
    } else {
        job->status = 1;
    }
    free(pooled);
    free(scratch);
    free((void *)rows);
    return NULL;
}

/* The pooled [batch, F x dim] output of the program's features (other columns untouched).
 * ranks: one int32 per id, where the mixed records' ranks are written (NULL only without mixed
 * records); the backward reads them instead of gathering the remaps again (random reads into
 * tables of millions of ints: the largest cost of MixedDim's step when gathered twice). 
 * stream_bytes: an output of at least this many bytes is written with streaming stores (see
 * FU_CAN_STREAM; -1: never). Returns the threads used (plus FU_STREAMED where the output was
 * streamed), -1 (out of memory) or -2 (a corrupted remap: a MixedDim / Pruned rank outside
 * [-1, n], or a Hybrid row past its table). */
#define FU_STREAMED 256
int tz_fused_forward(const int64_t *ids, const int64_t *offsets, int64_t batch, float *out, int64_t out_stride,
                     int64_t dim, const float *weights, const int32_t *remaps, int32_t *ranks, const int64_t *prog,
                     const int64_t *rec_start, int64_t nrec, int64_t max_width, uint64_t mix1, uint64_t mix2,
                     int threads, int64_t stream_bytes) {
    /* Streaming stores need 32-byte aligned vectors: every bag's D floats at an aligned address. */
    const int stream = FU_CAN_STREAM && stream_bytes >= 0 && batch * out_stride * (int64_t)sizeof(float) >= stream_bytes
                       && dim % 8 == 0 && out_stride % 8 == 0 && ((uintptr_t)out & 31) == 0;
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    if (batch < (int64_t)threads * 64) threads = 1;
    fused_job_t jobs[64];
    pthread_t tid[64];
    int started[64] = {0};
    const int64_t per = (batch + threads - 1) / threads;
    for (int t = 0; t < threads; t++) {
        fused_job_t *j = &jobs[t];
        memset(j, 0, sizeof *j);
        j->ids = ids; j->offsets = offsets; j->prog = prog; j->rec_start = rec_start; j->batch = batch;
        j->nrec = nrec; j->dim = dim; j->out_stride = out_stride; j->out = out; j->weights = weights;
        j->remaps = remaps; j->ranks = ranks; j->mix1 = mix1; j->mix2 = mix2; j->max_width = max_width;
        j->stream = stream;
        j->bag_begin = t * per < batch ? t * per : batch;
        j->bag_end = (t + 1) * per < batch ? (t + 1) * per : batch;
    }
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&tid[t], NULL, run_fused_forward, &jobs[t]) == 0;
    run_fused_forward(&jobs[0]);
    int status = jobs[0].status;
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(tid[t], NULL); else run_fused_forward(&jobs[t]);
        status |= jobs[t].status;
    }
    return status & 2 ? -2 : status ? -1 : threads + (stream ? FU_STREAMED : 0);
}

typedef struct {
    int32_t *slot;     /* per linear row: its accumulator, -1 when untouched this step */
    int64_t *touched;  /* per accumulator: linear row, table index */
    float *acc;        /* per accumulator: max_width floats */
    int64_t n, cap, max_width;
} fu_rows_t;

/* The accumulator of a row, NULL when full. *first: whether this is the row's first touch in the
 * step (its accumulator is then garbage: the caller writes it rather than adds to it). */
INL float *fu_row(fu_rows_t *rs, const int64_t lin, const int64_t table, int *first) {
    int32_t s = rs->slot[lin];
    *first = s < 0;
    if (s < 0) {
        if (rs->n >= rs->cap) return NULL;
        s = (int32_t)rs->n++;
        rs->slot[lin] = s;
        rs->touched[2 * s] = lin;
        rs->touched[2 * s + 1] = table;
    }
    return rs->acc + (int64_t)s * rs->max_width;
}

/* a = x on a row's first touch, else a += x. */
INL void fu_add(float *a, const float *x, const int first, const int64_t W) {
    if (first) vcopy(a, x, W); else vadd(a, a, x, W);
}

/* Feature f's gradient in bag b: the output gradient's row slice where it is contiguous and the
 * bag is summed (the row a few bags on asked for early: a column block per feature, a row apart),
 * else a copy in gb, divided by the bag's length for mean pooling. */
INL const float *fu_bag_grad(const float *g, const int64_t g_stride0, const int64_t g_stride1, const int64_t f,
                             const int64_t b, const int64_t len, const int64_t mean, float *gb, const int64_t D) {
    const float *src = g + b * g_stride0 + f * D * g_stride1;
    if (g_stride1 == 1 && !(mean && len > 1)) {
        __builtin_prefetch(src + 8 * g_stride0);
        return src;
    }
    if (g_stride1 == 0) vfill(gb, src[0], D); /* a broadcast row (the gradient of a sum) */
    else for (int64_t d = 0; d < D; d++) gb[d] = src[d * g_stride1];
    if (mean && len > 1) vdiv(gb, gb, (float)len, D);
    return gb;
}

/* A hybrid record's bags: each id's row gets the bag's gradient. */
INL int64_t fu_hybrid_backward(const int64_t *rec, const int64_t *ids, const int64_t *offsets, const int64_t batch,
                               const float *g, const int64_t g_stride0, const int64_t g_stride1, const int32_t *remaps,
                               fu_rows_t *rs, float *gb, const uint64_t mix1, const uint64_t mix2, const int64_t D) {
    const int64_t f = rec[1], mean = rec[3], rows = rec[6] + rec[7];
    for (int64_t b = 0; b < batch; b++) {
        const int64_t lo = offsets[f * batch + b], hi = offsets[f * batch + b + 1];
        if (lo == hi) continue;
        const float *gv = fu_bag_grad(g, g_stride0, g_stride1, f, b, hi - lo, mean, gb, D);
        for (int64_t p = lo; p < hi; p++) {
            const int64_t row = fu_hybrid_row(rec, ids[p], remaps, mix1, mix2);
            if (row >= rows) return -2;
            int first;
            float *a = fu_row(rs, rec[10] + row, rec[11], &first);
            if (!a) return -1;
            fu_add(a, gv, first, D);
        }
    }
    return 0;
}

/* A mixed record's bags (MixedDim, Pruned): each id's block row gets the bag's gradient, through
 * P_k^T for a projected block (computed once per bag and block), and the projections' gradients
 * get pooled_k^T g per bag. Those are added PG_TILE bags at a time (each gradient row loaded and
 * stored once per tile, not once per bag: per bag, the loads and stores of the [w, D] gradient were
 * the largest cost of MixedDim's backward), in bag order, so the sums are the per-bag ones.
 * A tile holds pointers: to the bag's row in place where one id hit the block (most bags), else to
 * its sum in pend_x; to the bag's gradient in place, else to a copy in pend_g.
 * proj_rows: room floats per block; pend_x [32, PG_TILE, room]; pend_g [32, PG_TILE, D]. */
#define PG_TILE 4
typedef struct {
    const float *x[32][PG_TILE], *g[32][PG_TILE];
    int n[32];
} fu_tiles_t;

INL int64_t fu_mixed_backward(const int64_t *rec, const int64_t *ids, const int64_t *offsets, const int64_t batch,
                              const float *g, const int64_t g_stride0, const int64_t g_stride1, const float *weights,
                              const int32_t *remaps, const int32_t *ranks, fu_rows_t *rs, float *gb,
                              float *proj_rows, float *pend_x, float *pend_g, fu_tiles_t *tl, const int64_t room,
                              float *proj_grad, const int64_t D) {
    const int64_t f = rec[1], mean = rec[3], NB = rec[5];
    for (int64_t k = 0; k < NB; k++) tl->n[k] = 0;
    for (int64_t b = 0; b < batch; b++) {
        const int64_t lo = offsets[f * batch + b], hi = offsets[f * batch + b + 1];
        /* The slot and row of a bag FU_AHEAD on (random reads into tables of up to millions of
         * rows: the slot's miss was the largest cost left). */
        if (ranks && b + FU_AHEAD < batch) fu_prefetch_mixed(rec, offsets, batch, ranks, weights, rs->slot, b + FU_AHEAD);
        if (lo == hi) continue;
        const float *gv = fu_bag_grad(g, g_stride0, g_stride1, f, b, hi - lo, mean, gb, D);
        unsigned used = 0;
        for (int64_t p = lo; p < hi; p++) {
            const int64_t rank = ranks ? (int64_t)ranks[p] : fu_rank(rec, ids[p], remaps);
            if (fu_bad_rank(rec, rank)) return -2;
            for (int64_t k = 0; k < NB; k++) {
                const int64_t *blk = rec + MIXED_HEADER + BLOCK_FIELDS * k;
                const int64_t local = rank - blk[0];
                if (local < 0 || local >= blk[1]) continue;
                const int64_t w = blk[3];
                int first;
                float *a = fu_row(rs, blk[6] + local, blk[7], &first);
                if (!a) return -1;
                if (!blk[4]) {
                    fu_add(a, gv, first, D);
                    continue;
                }
                const float *pt = weights + blk[5]; /* P_k^T [w, D]: the row's gradient is P_k^T g */
                float *rg = proj_rows + k * room;
                const float *row = weights + blk[2] + local * w;
                const int t = tl->n[k];
                if (!(used & (1u << k))) {
                    used |= 1u << k;
                    vdots(rg, pt, gv, w, D);
                    tl->x[k][t] = row;
                } else {
                    float *pk = pend_x + (k * PG_TILE + t) * room;
                    if (tl->x[k][t] != pk) {
                        vcopy_small(pk, tl->x[k][t], w);
                        tl->x[k][t] = pk;
                    }
                    for (int64_t c = 0; c < w; c++) pk[c] += row[c];
                }
                fu_add(a, rg, first, w);
            }
        }
        /* dL/dP_k^T = pooled_k^T g, summed over bags: this bag joins its blocks' tiles */
        for (int64_t k = 0; used && proj_grad && k < NB; k++) {
            if (!(used & (1u << k))) continue;
            const int t = tl->n[k];
            if (gv == gb) { /* gb is rewritten by the next bag */
                float *copy = pend_g + (k * PG_TILE + t) * D;
                vcopy_small(copy, gv, D);
                tl->g[k][t] = copy;
            } else {
                tl->g[k][t] = gv;
            }
            if (++tl->n[k] == PG_TILE) {
                const int64_t *blk = rec + MIXED_HEADER + BLOCK_FIELDS * k;
                vouter_add_tile(proj_grad + blk[8], tl->x[k], tl->g[k], PG_TILE, blk[3], D);
                tl->n[k] = 0;
            }
        }
    }
    for (int64_t k = 0; proj_grad && k < NB; k++) {
        if (!tl->n[k]) continue;
        const int64_t *blk = rec + MIXED_HEADER + BLOCK_FIELDS * k;
        vouter_add_tile(proj_grad + blk[8], tl->x[k], tl->g[k], tl->n[k], blk[3], D);
    }
    return 0;
}

/* One parts record's bags (QR / KWay / MultiHash / Hash / Unified / Full): each id's partition rows
 * get their gradient. gb: room for D floats (a copy of the bag's gradient where it is strided or
 * averaged); part_grad: room for W. D a compile-time constant where it is a common width. */
INL int64_t fu_parts_backward(const int64_t *rec, const int64_t *ids, const int64_t *offsets, const int64_t batch,
                              const float *g, const int64_t g_stride0, const int64_t g_stride1, const float *weights,
                              fu_rows_t *rs, float *gb, float *part_grad, const uint64_t mix1, const uint64_t mix2,
                              const int64_t D) {
    const int64_t f = rec[1], n = rec[2], mean = rec[3], op = rec[4], K = rec[5];
    const int64_t W = FU_CONCATS(op) ? rec[6] : D;
    const int64_t *part = rec + PARTS_HEADER;
    for (int64_t b = 0; b < batch; b++) {
        const int64_t lo = offsets[f * batch + b], hi = offsets[f * batch + b + 1];
        if (lo == hi) continue;
        const float *gv = fu_bag_grad(g, g_stride0, g_stride1, f, b, hi - lo, mean, gb, D);
        for (int64_t p = lo; p < hi; p++) {
            int64_t id = ids[p];
            if (!FU_HASHED(op)) id = (id >= 0 && id < n) ? id : n;
            int64_t digit[MAX_PARTS];
            const float *r[MAX_PARTS];
            for (int64_t j = 0; j < K; j++) {
                const int64_t *pj = part + PART_FIELDS * j;
                digit[j] = fu_digit(id, pj, j, op, mix1, mix2);
                if (digit[j] < 0 || digit[j] >= pj[1]) return -2;
                r[j] = weights + pj[2] + digit[j] * W;
            }
            for (int64_t j = 0; j < K; j++) {
                const int64_t *pj = part + PART_FIELDS * j;
                int first;
                float *a = fu_row(rs, pj[3] + digit[j], pj[4], &first);
                if (!a) return -1;
                if (FU_CONCATS(op)) {
                    fu_add(a, gv + j * W, first, W);
                } else if (op == FU_MULT && K > 1) {
                    /* the gradient times the other parts, in their order */
                    const float *x = gv;
                    for (int64_t o = 0; o < K; o++) {
                        if (o == j) continue;
                        vmul(part_grad, x, r[o], W);
                        x = part_grad;
                    }
                    fu_add(a, part_grad, first, W);
                } else {
                    fu_add(a, gv, first, W);
                }
            }
        }
    }
    return 0;
}

/* The backward of the program's features and the optimizer step of every row they touched, in place.
 * ranks: the forward's MixedDim ranks (NULL: gathered again).
 * g: the output's gradient (any strides). tables: [T, 4] (weights offset, width, first linear row,
 * state offset). proj_grad: the projections' gradients (zeroed; offsets from the records), or NULL.
 * Rows are read before any is updated. Returns the rows updated, -1 (out of memory) or -2 (a row
 * outside its table: nothing updated). */
int64_t tz_fused_backward(const int64_t *ids, const int64_t *offsets, int64_t batch, const float *g, int64_t g_stride0,
                          int64_t g_stride1, int64_t dim, float *weights, float *state, const int32_t *remaps,
                          const int32_t *ranks,
                          const int64_t *prog, const int64_t *rec_start, int64_t nrec, const int64_t *tables,
                          int32_t *slot, int64_t *touched, float *acc, int64_t cap, int64_t max_width,
                          float *proj_grad, int64_t optimizer, float lr, float eps, uint64_t mix1, uint64_t mix2) {
    const int64_t D = dim;
    fu_rows_t rs = {slot, touched, acc, 0, cap, max_width};
    const int64_t room = D > max_width ? D : max_width;
    /* gb: the bag's gradient (D); part_grad (room); per MixedDim block (at most 32): its rows'
     * gradient P_k^T g (room), and a tile of pooled rows (PG_TILE x room) and their bags' gradients
     * (PG_TILE x D). */
    float *gb = (float *)malloc((size_t)(D + room + 32 * room + 32 * PG_TILE * (room + D)) * sizeof(float));
    fu_tiles_t tiles;
    if (!gb) return -1;
    float *part_grad = gb + D, *proj_rows = part_grad + room, *pend_x = proj_rows + 32 * room;
    float *pend_g = pend_x + 32 * PG_TILE * room;
    int64_t status = 0;
    for (int64_t i = 0; i < nrec && !status; i++) {
        const int64_t *rec = prog + rec_start[i];
        if (rec[0] == 0) {
            PER_D(status = fu_parts_backward(rec, ids, offsets, batch, g, g_stride0, g_stride1, weights, &rs, gb,
                                             part_grad, mix1, mix2, DC))
            continue;
        }
        if (rec[0] == 2) {
            PER_D(status = fu_hybrid_backward(rec, ids, offsets, batch, g, g_stride0, g_stride1, remaps, &rs, gb, mix1,
                                              mix2, DC))
            continue;
        }
        PER_D(status = fu_mixed_backward(rec, ids, offsets, batch, g, g_stride0, g_stride1, weights, remaps, ranks,
                                         &rs, gb, proj_rows, pend_x, pend_g, &tiles, room, proj_grad, DC))
    }
    free(gb);
    if (status) {
        for (int64_t s = 0; s < rs.n; s++) slot[touched[2 * s]] = -1;
        return status;
    }
    for (int64_t s = 0; s < rs.n; s++) {
        if (s + FU_AHEAD < rs.n) { /* a row FU_AHEAD on: its weights, state and slot asked for early */
            const int64_t lin2 = touched[2 * (s + FU_AHEAD)];
            const int64_t *t2 = tables + 4 * touched[2 * (s + FU_AHEAD) + 1];
            const int64_t row2 = lin2 - t2[2];
            const float *m2 = fu_state_row(state, t2[3], row2, t2[1], optimizer);
            __builtin_prefetch(weights + t2[0] + row2 * t2[1], 1);
            if (m2) __builtin_prefetch(m2, 1);
            __builtin_prefetch(slot + lin2, 1);
        }
        const int64_t lin = touched[2 * s];
        const int64_t *t = tables + 4 * touched[2 * s + 1];
        const int64_t W = t[1], row = lin - t[2];
        float *m = fu_state_row(state, t[3], row, W, optimizer);
        fu_update(weights + t[0] + row * W, m, acc + s * max_width, W, optimizer, lr, eps);
        slot[lin] = -1;
    }
    return rs.n;
}
