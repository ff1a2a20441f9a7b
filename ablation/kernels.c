/* Sparse CPU kernels of the SAE trainer (ablation/kernels.py compiles and guards them). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

/* Exact top-k of every row of x (rows x n, k <= n): values and column indices, indices ascending. */
void topk_rows(const float *x, int64_t rows, int64_t n, int64_t k, float *vals, int64_t *idx, int nt) {
    #pragma omp parallel num_threads(nt)
    {
        float *cv = malloc(sizeof(float) * (n + 1)); int64_t *ci = malloc(sizeof(int64_t) * (n + 1));
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const float *row = x + r * n;
            float *bv = vals + r * k; int64_t *bi = idx + r * k;
            int64_t len = n / k, cnt = 0, m = 0; float t = INFINITY;
            for (int64_t c = 0; c < k; c++) {  /* t: the smallest of k block maxima, <= the k-th largest */
                float b = row[c * len];
                for (int64_t j = c * len + 1; j < (c + 1) * len; j++) b = fmaxf(b, row[j]);
                t = fminf(t, b);
            }
            for (int64_t j = 0; j < n; j++) { cv[cnt] = row[j]; ci[cnt] = j; cnt += (row[j] >= t); }
            for (int64_t c = 0; c < cnt; c++) {  /* keep the k largest candidates, by value */
                float v = cv[c]; int64_t p;
                if (m < k) p = m++;
                else if (v > bv[k - 1]) p = k - 1;
                else continue;
                while (p > 0 && bv[p - 1] < v) { bv[p] = bv[p - 1]; bi[p] = bi[p - 1]; p--; }
                bv[p] = v; bi[p] = ci[c];
            }
            for (; m < k; m++) { bv[m] = NAN; bi[m] = m; }  /* only with NaN input: stay in bounds */
            for (int64_t a = 1; a < k; a++) {  /* then order them by index */
                float v = bv[a]; int64_t i = bi[a], p = a;
                while (p > 0 && bi[p - 1] > i) { bv[p] = bv[p - 1]; bi[p] = bi[p - 1]; p--; }
                bv[p] = v; bi[p] = i;
            }
        }
        free(cv); free(ci);
    }
}

/* out[r] = sum_s w[r, s] * table[idx[r, s]] */
void gather_sum(const int64_t *idx, const float *w, const float *table, int64_t rows, int64_t k,
                int64_t d, float *out, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t r = 0; r < rows; r++) {
        float *o = out + r * d;
        memset(o, 0, sizeof(float) * d);
        for (int64_t s = 0; s < k; s++) {
            const float *t = table + idx[r * k + s] * d; float ws = w[r * k + s];
            for (int64_t j = 0; j < d; j++) o[j] += ws * t[j];
        }
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

/* In place, every row: w <- relu(w) / (sum of relu(w) + 1e-8), the RA-SAE simplex projection. */
void simplex_rows(float *w, int64_t rows, int64_t n, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t r = 0; r < rows; r++) {
        float *row = w + r * n, s = 0.f;
        #pragma omp simd reduction(+:s)
        for (int64_t j = 0; j < n; j++) { row[j] = fmaxf(row[j], 0.f); s += row[j]; }
        s += 1e-8f;
        for (int64_t j = 0; j < n; j++) row[j] /= s;
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
