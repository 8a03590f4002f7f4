#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
/* mLSTM inference kernels (float32, contiguous, no allocation; OpenMP over rows or heads when built
   with it, each output computed by one thread in the same order whatever the thread count). The
   Python side and the references they are tested against: rizzearch/ops/mlstm/__init__.py
   (mlstm_step_f32) and rizzearch/ops/mlstm/native.py (the xLSTM-7B layer pieces, decode and
   prefill). */

/* ---- elementwise functions written so that a loop over them vectorises (no calls, no branches) */

/* exp(x): x = n ln2 + r, |r| <= ln2 / 2 (Cody-Waite, ln2 split in a short high part and the rest),
   exp(r) by its Taylor series to r^7 (truncation < 6e-9 relative), 2^n from the exponent bits.
   x is clamped to [-87, 88]: exp(-87) = 1.6e-38 stands in for an underflow to 0. */
static inline float vexp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln2): 1.5 * 2^23 */
  float r = x - n * 0.693145751953125f;                            /* exact: the high part has 16 bits */
  r = r - n * 1.42860682030941723e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float s;
  memcpy(&s, &bits, sizeof s);
  return p * s;
}

static inline float vsigmoid(float x) { return 1.0f / (1.0f + vexp(-x)); }

/* log1p(y) for y in [0, 1]: 2 atanh(s) with s = y / (2 + y) in [0, 1/3], its odd series to s^15
   (truncation < 2e-9 relative); no cancellation for small y (log1p(y) ~ y). */
static inline float vlog1p(float y) {
  float s = y / (2.0f + y), z = s * s;
  float p = 1.0f / 15.0f;
  p = p * z + 1.0f / 13.0f;
  p = p * z + 1.0f / 11.0f;
  p = p * z + 1.0f / 9.0f;
  p = p * z + 1.0f / 7.0f;
  p = p * z + 1.0f / 5.0f;
  p = p * z + 1.0f / 3.0f;
  p = p * z + 1.0f;
  return 2.0f * s * p;
}

/* logsigmoid(f) = min(f, 0) - log1p(exp(-|f|)): the forget gate in log space, no overflow */
static inline float vlogsigmoid(float f) { return (f < 0.0f ? f : 0.0f) - vlog1p(vexp(-fabsf(f))); }

/* tanh(x) = x P(x^2) / Q(x^2) on [-9, 9] (beyond, tanh is 1 within 3e-8: x is clamped), P and Q of
   degree 4 fitted here to a relative error below 3.6e-7 in float32 arithmetic (tested): one
   division and nine multiply-adds. */
static inline float vtanh(float x) {
  x = x < -9.0f ? -9.0f : (x > 9.0f ? 9.0f : x);
  float z = x * x;
  float p = (((1.335913157873847e-08f * z + 2.0612382286344655e-05f) * z + 0.0034957919269800186f) * z + 0.13381198048591614f) * z + 1.0f;
  float q = (((7.778409667480446e-07f * z + 0.0003285965940449387f) * z + 0.025877760723233223f) * z + 0.4671451449394226f) * z + 1.0f;
  return x * p / q;
}

/* 16-wide float vectors (vf, vload, vstore) and their lane sum (vsum: a fixed order, the same bits for
   the same input) from the header the decode kernels share; the vector-ABI note GCC gives without
   AVX-512 does not apply to these static helpers. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#include "wl_dots.h"

/* sum of x[0:n] in 16 lanes, then the lanes */
static inline float asum(const float* restrict x, int64_t n) {
  vf acc = {0};
  float s = 0.0f;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) acc += vload(x + j);
  for (; j < n; ++j) s += x[j];
  return vsum(acc) + s;
}

static inline float vdot(const float* restrict x, const float* restrict y, int64_t n) {
  vf acc = {0};
  float s = 0.0f;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) acc += vload(x + j) * vload(y + j);
  for (; j < n; ++j) s += x[j] * y[j];
  return vsum(acc) + s;
}

/* ---- the mLSTM step (paper eqs. 19-21, stabilised) */

/* one stabilised mLSTM step of one head: C (D, E), n (D), scalar m; writes h (E), C_out, n_out and
   returns the new m. The key is scaled by `scale` (1/sqrt(D)). Inputs and outputs never overlap. */
static float step_head(int64_t D, int64_t E, float scale, const float* restrict qb, const float* restrict kb,
                       const float* restrict vb, float i, float f, const float* restrict Cb, const float* restrict nb,
                       float m, float* restrict hb, float* restrict Co, float* restrict no) {
  float a = vlogsigmoid(f) + m; /* -inf for the empty state */
  float mn = a > i ? a : i;
  float fp = expf(a - mn), ip = expf(i - mn) * scale;
  for (int64_t r = 0; r < D; ++r) no[r] = fp * nb[r] + ip * kb[r];
  float den = vdot(qb, no, D);
  for (int64_t e = 0; e < E; ++e) hb[e] = 0.0f;
  for (int64_t r = 0; r < D; ++r) {
    float kk = kb[r] * ip, qr = qb[r];
    const float* restrict Cr = Cb + r * E;
    float* restrict Cor = Co + r * E;
    for (int64_t e = 0; e < E; ++e) {
      float c = fp * Cr[e] + kk * vb[e];
      Cor[e] = c;
      hb[e] += qr * c;
    }
  }
  float lo = expf(-mn), ad = fabsf(den), norm = ad > lo ? ad : lo, rn = 1.0f / norm;
  for (int64_t e = 0; e < E; ++e) hb[e] *= rn;
  return mn;
}

/* BH independent heads, q/k (BH, D), v (BH, E), gates (BH), state C (BH, D, E), n (BH, D), m (BH) */
void mlstm_step_f32(int64_t BH, int64_t D, int64_t E, float scale,
                    const float* q, const float* k, const float* v, const float* ig, const float* fg,
                    const float* C, const float* n, const float* m,
                    float* h, float* C_out, float* n_out, float* m_out) {
  for (int64_t b = 0; b < BH; ++b)
    m_out[b] = step_head(D, E, scale, q + b * D, k + b * D, v + b * E, ig[b], fg[b], C + b * D * E, n + b * D, m[b],
                         h + b * E, C_out + b * D * E, n_out + b * D);
}

/* ---- the xLSTM-7B layer pieces: row-wise (N rows), each row by one thread */

/* one row of RMSNorm: out (D) = x / sqrt(mean(x^2) + eps) * w (+ bias; bias may be NULL) */
static void rms_row(int64_t D, float eps, const float* restrict xb, const float* restrict w, const float* restrict bias,
                    float* restrict ob) {
  float r = 1.0f / sqrtf(vdot(xb, xb, D) / (float)D + eps);
  if (bias)
    for (int64_t j = 0; j < D; ++j) ob[j] = xb[j] * r * w[j] + bias[j];
  else
    for (int64_t j = 0; j < D; ++j) ob[j] = xb[j] * r * w[j];
}

/* RMSNorm of N rows of width D (rms_row) */
void xl_rms_norm(int64_t N, int64_t D, float eps, const float* x, const float* w, const float* bias, float* out,
                 int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t b = 0; b < N; ++b) rms_row(D, eps, x + b * D, w, bias, out + b * D);
}

/* RMSNorm of N rows (out, as xl_rms_norm) and the gate pre-activations of the normed rows: gates (N, G)
   = out Wg^T (G, D) (+ bg), each row's computed while the row is in cache (wl_dots.h's products, four
   gate rows at a time; MKL's GEMM is slow for the 2 NH = 8 outputs) */
void xl_rms_norm_gates(int64_t N, int64_t D, int64_t G, float eps, const float* x, const float* w, const float* bias,
                       const float* Wg, const float* bg, float* out, float* gates, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t b = 0; b < N; ++b) {
    rms_row(D, eps, x + b * D, w, bias, out + b * D);
    dots_f32(Wg, NULL, (int)D, out + b * D, 1, 0, (int)G, gates + b * G, (int)G);
    for (int64_t g = 0; bg && g < G; ++g) gates[b * G + g] += bg[g];
  }
}

/* SwiGLU of N rows: gu (N, 2F) = [gate | up] -> out (N, F) = silu(gate) * up */
void xl_swiglu(int64_t N, int64_t F, const float* gu, float* out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t b = 0; b < N; ++b) {
    const float *restrict g = gu + b * 2 * F, *restrict u = g + F;
    float* restrict ob = out + b * F;
    for (int64_t j = 0; j < F; ++j) ob[j] = g[j] * vsigmoid(g[j]) * u[j];
  }
}

/* x = cap tanh(x / cap) in place, N rows of width D */
void xl_soft_cap(int64_t N, int64_t D, float cap, float* x, int threads) {
  float rc = 1.0f / cap;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t b = 0; b < N; ++b) {
    float* restrict xb = x + b * D;
    for (int64_t j = 0; j < D; ++j) xb[j] = cap * vtanh(xb[j] * rc);
  }
}

static float cap_of(float x, float cap) { return cap > 0.0f ? cap * tanhf(x / cap) : x; }

/* sigmoid(o) * (LayerNorm(h) * w (+ b)) in place on one head's h (E): the per-head norm and the
   output gate of the xLSTM-7B layer */
static void head_norm_gate(int64_t E, float eps, float* restrict h, const float* restrict w, const float* restrict b,
                           const float* restrict o) {
  float mean = asum(h, E) / (float)E, var = 0.0f;
  vf acc = {0};
  int64_t e = 0;
  for (; e + 16 <= E; e += 16) {
    vf d = vload(h + e) - mean;
    acc += d * d;
  }
  for (; e < E; ++e) var += (h[e] - mean) * (h[e] - mean);
  var += vsum(acc);
  float r = 1.0f / sqrtf(var / (float)E + eps);
  if (b)
    for (e = 0; e < E; ++e) h[e] = ((h[e] - mean) * r * w[e] + b[e]) * vsigmoid(o[e]);
  else
    for (e = 0; e < E; ++e) h[e] = (h[e] - mean) * r * w[e] * vsigmoid(o[e]);
}

/* ---- the chunkwise form for sequences (paper eqs. 19-21 summed over a chunk of LC tokens)

   Within a chunk with the state (C, n, m0) before it, gates i_u, log f_u, b_u = sum_{s<=u} log f_s
   and the running stabiliser m_u = max(m_{u-1} + log f_u, i_u) (the step's m), token u reads
     H_u = a_u q_u^T C + sum_{j<=u} W_uj (q_u . k_j) v_j,   den_u = a_u q_u . n + sum_{j<=u} W_uj q_u . k_j
   with a_u = exp(b_u + m0 - m_u), W_uj = exp(b_u - b_j + i_j - m_u), h_u = H_u / max(|den_u|, exp(-m_u)),
   and the state after it is C' = a_L C + sum_j W_Lj k_j v_j^T (n alike), L the chunk's last token.
   The state is rounded once a chunk instead of once a token, and every product is a small matrix
   product with 16-wide rows: H = [a Q | W o QK^T] [C ; V], C' = a_L C + (K^T diag(W_L)) V. Rows are
   padded to multiples of 16 (zeros), so the loops have fixed widths and vectorise; the left
   factors are stored transposed (16 tokens a row), so their 16 multipliers are consecutive. */

#define LC 16 /* tokens a chunk */

static int64_t pad16(int64_t x) { return (x + 15) / 16 * 16; }

/* floats of scratch one (row, head) needs: [C ; V] (Dk + LC, De), Q^T (Dk, LC), K (LC, Dk), A^T
   (Dk + LC, LC), H (LC, De), n (Dk); Dk, De: Dqk, Dv padded to multiples of 16 */
int64_t xl_mlstm_scratch(int64_t Dqk, int64_t Dv) {
  int64_t Dk = pad16(Dqk), De = pad16(Dv);
  return (Dk + LC) * De + 2 * LC * Dk + LC * (Dk + LC) + LC * De + Dk;
}

/* Y (LC, De) = A X, A given transposed (AT (K, LC)), X (K, De): LC x 16 blocks of Y in registers;
   the 16 multipliers of a step are consecutive (AT's row), so one base address serves them all */
static void mm_lc(int64_t K, int64_t De, const float* restrict AT, const float* restrict X, float* restrict Y) {
  for (int64_t eb = 0; eb < De; eb += 16) {
    vf acc[LC] = {0};
    for (int64_t kk = 0; kk < K; ++kk) {
      vf x = vload(X + kk * De + eb);
      const float* restrict ak = AT + kk * LC;
      for (int u = 0; u < LC; ++u) acc[u] += ak[u] * x;
    }
    for (int u = 0; u < LC; ++u) vstore(Y + u * De + eb, acc[u]);
  }
}

/* C (Dk, De) = a C + G V with G given transposed (GT (LC, Dk)), V (LC, De): the state update of
   one chunk, 16 x 16 blocks */
static void update_lc(int64_t Dk, int64_t De, float a, const float* restrict GT, const float* restrict V, float* restrict C) {
  for (int64_t rb = 0; rb < Dk; rb += 16)
    for (int64_t eb = 0; eb < De; eb += 16) {
      vf acc[16];
      for (int rr = 0; rr < 16; ++rr) acc[rr] = a * vload(C + (rb + rr) * De + eb);
      for (int j = 0; j < LC; ++j) {
        vf x = vload(V + j * De + eb);
        const float* restrict g = GT + j * Dk + rb;
        for (int rr = 0; rr < 16; ++rr) acc[rr] += g[rr] * x;
      }
      for (int rr = 0; rr < 16; ++rr) vstore(C + (rb + rr) * De + eb, acc[rr]);
    }
}

/* the chunk's gates: a_u, W^T (WT[j][u] = W_uj; zero for j > u and past U), the m_u; returns the last m */
static double chunk_gates(int U, const double* gi, const double* gf, double m0, float* a, float* WT, double* mu) {
  float lf[LC], arg[LC];
  for (int u = 0; u < LC; ++u) lf[u] = vlogsigmoid(u < U ? (float)gf[u] : 0.0f); /* 16 at once */
  double b[LC], m = m0;
  for (int u = 0; u < U; ++u) {
    b[u] = (u ? b[u - 1] : 0.0) + lf[u];
    double x = m + lf[u]; /* -inf for the empty state */
    m = mu[u] = x > gi[u] ? x : gi[u];
    arg[u] = (float)(b[u] + m0 - m);
  }
  for (int u = 0; u < LC; ++u) a[u] = u < U && arg[u] > -87.0f ? vexp(arg[u]) : 0.0f;
  for (int j = 0; j < LC; ++j) {
    for (int u = 0; u < LC; ++u) arg[u] = u < U && j <= u ? (float)(b[u] - b[j] + gi[j] - mu[u]) : -100.0f;
    for (int u = 0; u < LC; ++u) WT[j * LC + u] = u < U && j <= u ? vexp(arg[u]) : 0.0f;
  }
  return m;
}

/* U <= LC tokens of one head: gathers q, k (scaled), v into the scratch, computes every h_u into
   h[u] (divided by its normaliser) and updates the state (C, n in the scratch). Vectors run over the
   chunk's 16 tokens (u) wherever they can: no lane sums. */
static double chunk_head(int U, int64_t Dqk, int64_t Dv, float scale, const float* const* q, const float* const* k,
                         const float* const* v, const double* gi, const double* gf, double m0, float* sc, float* const* h) {
  int64_t Dk = pad16(Dqk), De = pad16(Dv);
  float *C = sc, *V = C + Dk * De, *QT = V + LC * De, *K = QT + Dk * LC, *AT = K + LC * Dk, *H = AT + LC * (Dk + LC);
  float *n = H + LC * De, a[LC] = {0.0f}, WT[LC * LC], den[LC];
  double mu[LC];
  if (U < LC || Dqk < Dk || Dv < De) /* V, Q^T and K have padding: zeros */
    memset(V, 0, sizeof(float) * (LC * De + 2 * LC * Dk));
  for (int u = 0; u < U; ++u) {
    for (int64_t r = 0; r < Dqk; ++r) K[u * Dk + r] = k[u][r] * scale;
    memcpy(V + u * De, v[u], sizeof(float) * Dv);
  }
  for (int64_t r = 0; r < Dqk; ++r)
    for (int u = 0; u < U; ++u) QT[r * LC + u] = q[u][r];
  double m = chunk_gates(U, gi, gf, m0, a, WT, mu);
  vf av = vload(a), qn = {0}, dv = {0};
  for (int64_t r = 0; r < Dk; ++r) { /* A^T rows 0..Dk: a_u q_u[r]; q_u . n over u */
    vf qr = vload(QT + r * LC);
    vstore(AT + r * LC, av * qr);
    qn += n[r] * qr;
  }
  for (int j = 0; j < LC; ++j) { /* A^T rows Dk + j: W_uj (q_u . k_j) over u */
    vf sj = {0};
    for (int64_t r = 0; r < Dk; ++r) sj += K[j * Dk + r] * vload(QT + r * LC);
    sj *= vload(WT + j * LC);
    vstore(AT + (Dk + j) * LC, sj);
    dv += sj;
  }
  vstore(den, dv + av * qn);
  mm_lc(Dk + LC, De, AT, C, H); /* [C ; V] are contiguous: H = A [C ; V] */
  float aL = a[U - 1], *GT = AT; /* A is no longer needed: G^T = diag(W_L) K */
  vf wl = {0};
  for (int j = 0; j < LC; ++j) wl[j] = WT[j * LC + U - 1];
  for (int64_t r = 0; r < Dk; ++r) n[r] *= aL;
  for (int j = 0; j < LC; ++j)
    for (int64_t r = 0; r < Dk; ++r) GT[j * Dk + r] = wl[j] * K[j * Dk + r], n[r] += GT[j * Dk + r];
  update_lc(Dk, De, aL, GT, V, C);
  for (int u = 0; u < U; ++u) {
    float lo = -mu[u] < 88.0 ? vexp((float)-mu[u]) : INFINITY, ad = fabsf(den[u]), rn = 1.0f / (ad > lo ? ad : lo);
    for (int64_t e = 0; e < Dv; ++e) h[u][e] = H[u * De + e] * rn;
  }
  return m;
}

/* The xLSTM-7B mLSTM layer after its projections, B rows of T tokens, NH heads:
   proj (B, T, 2 NH Dqk + 2 NH Dv) = [q | k | v | o], gates (B, T, 2 NH) = [i | f] pre-activations
   (soft-capped here by gate_cap, 0: no cap); mask (B, T) or NULL: where 0 the input gate is closed
   (pad_i) and the forget gate opened (pad_f) after the cap, so the state is carried; state C (B, NH,
   Dqk, Dv), n (B, NH, Dqk), m (B, NH) -> the state after the last token, and out (B, T, NH Dv) =
   sigmoid(o) * (per-head LayerNorm(h) * w (+ b)). T = 1 steps the fp32 state (decoding); T > 1 runs
   the chunkwise form in `scratch` (B NH xl_mlstm_scratch(Dqk, Dv) floats; unused when T = 1). The
   input state is never modified. One thread per (row, head). */
void xl_mlstm_layer(int64_t B, int64_t T, int64_t NH, int64_t Dqk, int64_t Dv, float gate_cap, float eps,
                    float pad_i, float pad_f, const float* proj, const float* gates, const uint8_t* mask,
                    const float* C, const float* n, const float* m, const float* w, const float* bias,
                    float* C_out, float* n_out, float* m_out, float* scratch, float* out, int threads) {
  int64_t P = 2 * NH * Dqk + 2 * NH * Dv, S = Dqk * Dv, Dk = pad16(Dqk), De = pad16(Dv), SC = xl_mlstm_scratch(Dqk, Dv);
  float scale = 1.0f / sqrtf((float)Dqk);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t bh = 0; bh < B * NH; ++bh) {
    int64_t b = bh / NH, hh = bh % NH;
    double mm = m[bh];
    float *sc = T > 1 ? scratch + bh * SC : NULL, *Cs = sc, *ns = sc ? sc + SC - Dk : NULL;
    for (int64_t r = 0; sc && r < Dk; ++r) { /* the state into the padded scratch */
      for (int64_t e = 0; e < De; ++e) Cs[r * De + e] = r < Dqk && e < Dv ? C[bh * S + r * Dv + e] : 0.0f;
      ns[r] = r < Dqk ? n[bh * Dqk + r] : 0.0f;
    }
    for (int64_t t0 = 0; t0 < T; t0 += (sc ? LC : 1)) {
      int U = sc ? (T - t0 < LC ? (int)(T - t0) : LC) : 1;
      const float *q[LC], *k[LC], *v[LC], *o[LC];
      float* h[LC];
      double gi[LC], gf[LC];
      for (int u = 0; u < U; ++u) {
        int64_t row = b * T + t0 + u;
        const float* pr = proj + row * P;
        q[u] = pr + hh * Dqk, k[u] = pr + (NH + hh) * Dqk, v[u] = pr + 2 * NH * Dqk + hh * Dv, o[u] = v[u] + NH * Dv;
        gi[u] = cap_of(gates[row * 2 * NH + hh], gate_cap), gf[u] = cap_of(gates[row * 2 * NH + NH + hh], gate_cap);
        if (mask && !mask[row]) gi[u] = pad_i, gf[u] = pad_f;
        h[u] = out + (row * NH + hh) * Dv;
      }
      if (sc)
        mm = chunk_head(U, Dqk, Dv, scale, q, k, v, gi, gf, mm, sc, h);
      else /* decoding: one step on the fp32 state */
        mm = step_head(Dqk, Dv, scale, q[0], k[0], v[0], (float)gi[0], (float)gf[0], C + bh * S, n + bh * Dqk, (float)mm,
                       h[0], C_out + bh * S, n_out + bh * Dqk);
      for (int u = 0; u < U; ++u) head_norm_gate(Dv, eps, h[u], w + hh * Dv, bias ? bias + hh * Dv : NULL, o[u]);
    }
    for (int64_t r = 0; T != 1 && r < Dqk; ++r) {
      for (int64_t e = 0; e < Dv; ++e) C_out[bh * S + r * Dv + e] = sc ? Cs[r * De + e] : C[bh * S + r * Dv + e];
      n_out[bh * Dqk + r] = sc ? ns[r] : n[bh * Dqk + r];
    }
    m_out[bh] = (float)mm;
  }
}
