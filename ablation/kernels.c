/* Sparse CPU kernels of the SAE trainer (ablation/kernels.py compiles and guards them). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* Exact top-k of one row (n values, k <= n) into bv, bi: indices ascending; cv: 2 n + 32,
   ci: n + 16 scratch.
   t, a value <= the k-th largest, is the smallest of k group maxima (k disjoint groups); only
   values >= t are candidates. With AVX-512, the groups are the 16 lanes (when k <= 16 and n is a
   multiple of 16) and candidates are compressed in registers; the result is the same either way. */
static void topk_row(const float *row, int64_t n, int64_t k, float *bv, int64_t *bi, float *cv, int64_t *ci) {
    int64_t cnt = 0, m = 0; float t = INFINITY;
#ifdef __AVX512F__
    if (k <= 16 && n % 16 == 0) {
        __m512 mx = _mm512_loadu_ps(row);
        for (int64_t j = 16; j < n; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(row + j));
        float lanes[16]; _mm512_storeu_ps(lanes, mx);
        for (int c = 0; c < 16; c++) t = fminf(t, lanes[c]);  /* 16 >= k groups: still <= k-th */
        __m512 tv = _mm512_set1_ps(t); __m512i j16 = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        for (int64_t j = 0; j < n; j += 16) {  /* register compress, then a full store (fast on every AVX-512 CPU) */
            __m512 v = _mm512_loadu_ps(row + j);
            __mmask16 mk = _mm512_cmp_ps_mask(v, tv, _CMP_GE_OQ);
            if (!mk) continue;
            __m512i cj = _mm512_maskz_compress_epi32(mk, _mm512_add_epi32(j16, _mm512_set1_epi32((int)j)));
            _mm512_storeu_ps(cv + cnt, _mm512_maskz_compress_ps(mk, v));
            _mm512_storeu_si512(ci + cnt, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(cj)));
            _mm512_storeu_si512(ci + cnt + 8, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(cj, 1)));
            cnt += __builtin_popcount(mk);
        }
    } else
#endif
    {
        int64_t len = n / k;
        for (int64_t c = 0; c < k; c++) {  /* k contiguous blocks */
            float b = row[c * len];
            for (int64_t j = c * len + 1; j < (c + 1) * len; j++) b = fmaxf(b, row[j]);
            t = fminf(t, b);
        }
        for (int64_t j = 0; j < n; j++) { cv[cnt] = row[j]; ci[cnt] = j; cnt += (row[j] >= t); }
    }
    /* the k-th largest candidate by quickselect on a copy; then the candidates above it, and
       those equal to it by index until k are taken, come out in index order */
    float *sel = cv + n + 16; int64_t lo = 0, hi = cnt - 1, target = k - 1;
    memcpy(sel, cv, sizeof(float) * cnt);
    while (lo < hi) {
        float pivot = sel[lo + (hi - lo) / 2]; int64_t i = lo, j = hi;
        while (i <= j) {
            while (sel[i] > pivot) i++;
            while (sel[j] < pivot) j--;
            if (i <= j) { float tmp = sel[i]; sel[i] = sel[j]; sel[j] = tmp; i++; j--; }
        }
        if (target <= j) hi = j; else if (target >= i) lo = i; else break;
    }
    float kth = cnt >= k ? sel[target] : NAN;
    int64_t above = 0;
    for (int64_t c = 0; c < cnt; c++) above += cv[c] > kth;
    for (int64_t c = 0, eq = k - above; c < cnt && m < k; c++) {
        int take = cv[c] > kth || (cv[c] == kth && eq > 0);
        if (take) { eq -= !(cv[c] > kth); bv[m] = cv[c]; bi[m] = ci[c]; m++; }
    }
    for (; m < k; m++) { bv[m] = NAN; bi[m] = m; }  /* only with NaN input: stay in bounds */
}

/* Exact top-k of every row of x (rows x n, float32): values (float32) and indices, ascending. */
void topk_rows(const float *x, int64_t rows, int64_t n, int64_t k, float *vals, int64_t *idx, int nt) {
    #pragma omp parallel num_threads(nt)
    {
        float *cv = malloc(sizeof(float) * (2 * n + 32)); int64_t *ci = malloc(sizeof(int64_t) * (n + 16));
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) topk_row(x + r * n, n, k, vals + r * k, idx + r * k, cv, ci);
        free(cv); free(ci);
    }
}

/* The same for bfloat16 x (the upper 16 bits of a float32): values come back as float32. */
void topk_rows_bf16(const uint16_t *x, int64_t rows, int64_t n, int64_t k, float *vals, int64_t *idx, int nt) {
    #pragma omp parallel num_threads(nt)
    {
        float *cv = malloc(sizeof(float) * (2 * n + 32)), *row = malloc(sizeof(float) * n);
        int64_t *ci = malloc(sizeof(int64_t) * (n + 16));
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const uint16_t *src = x + r * n;
            for (int64_t j = 0; j < n; j++) { uint32_t u = (uint32_t)src[j] << 16; memcpy(row + j, &u, 4); }
            topk_row(row, n, k, vals + r * k, idx + r * k, cv, ci);
        }
        free(cv); free(row); free(ci);
    }
}

/* out[r, s] = <a[r], table[idx[r, s]]> */
void gather_dot(const int64_t *idx, const float *a, const float *table, int64_t rows, int64_t k,
                int64_t d, float *out, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t s = 0; s < k; s++) {
            const float *t = table + idx[r * k + s] * d, *ar = a + r * d; float acc = 0.f;
            #pragma omp simd reduction(+:acc)
            for (int64_t j = 0; j < d; j++) acc += ar[j] * t[j];
            out[r * k + s] = acc;
        }
    }
}

/* out1[i] = sum over (r, s) with idx[r, s] = i of w1[r, s] * a1[r]; the same for (w2, a2, out2).
   A counting sort by i first, so every output row is summed by one thread, in (r, s) order. */
void scatter_sum2(const int64_t *idx, int64_t rows, int64_t k, int64_t n_out, int64_t d,
                  const float *w1, const float *a1, float *out1,
                  const float *w2, const float *a2, float *out2, int nt) {
    int64_t nnz = rows * k;
    int64_t *start = calloc(n_out + 1, sizeof(int64_t)), *fill = malloc(sizeof(int64_t) * (n_out + 1));
    int64_t *order = malloc(sizeof(int64_t) * (nnz + 1));
    for (int64_t e = 0; e < nnz; e++) start[idx[e] + 1]++;
    for (int64_t i = 0; i < n_out; i++) start[i + 1] += start[i];
    memcpy(fill, start, sizeof(int64_t) * (n_out + 1));
    for (int64_t e = 0; e < nnz; e++) order[fill[idx[e]]++] = e;
    #pragma omp parallel for schedule(dynamic, 16) num_threads(nt)
    for (int64_t i = 0; i < n_out; i++) {
        float *o1 = out1 + i * d, *o2 = out2 + i * d;
        memset(o1, 0, sizeof(float) * d); memset(o2, 0, sizeof(float) * d);
        for (int64_t q = start[i]; q < start[i + 1]; q++) {
            int64_t e = order[q], r = e / k;
            const float *x1 = a1 + r * d, *x2 = a2 + r * d; float y1 = w1[e], y2 = w2[e];
            for (int64_t j = 0; j < d; j++) o1[j] += y1 * x1[j];
            for (int64_t j = 0; j < d; j++) o2[j] += y2 * x2[j];
        }
    }
    free(start); free(fill); free(order);
}
