#include <math.h>
#include <stddef.h>
#include <stdint.h>
/* mLSTM decode kernels (float32, contiguous, no allocation). The Python side and the references
   they are tested against: rizzearch/ops/mlstm/__init__.py (mlstm_step_f32) and
   rizzearch/ops/mlstm/native.py (the xLSTM-7B decode-step pieces). */

/* one stabilised mLSTM step of one head: C (D, E), n (D), scalar m; writes h (E), C_out, n_out and
   returns the new m. The key is scaled by `scale` (1/sqrt(D)). */
static float step_head(int64_t D, int64_t E, float scale, const float* qb, const float* kb, const float* vb,
                       float i, float f, const float* Cb, const float* nb, float m, float* hb, float* Co, float* no) {
  float logf = f >= 0.0f ? -log1pf(expf(-f)) : f - log1pf(expf(f));  /* logsigmoid */
  float a = logf + m;                                                  /* -inf for the empty state */
  float mn = a > i ? a : i;
  float fp = expf(a - mn), ip = expf(i - mn) * scale, den = 0.0f;
  for (int64_t e = 0; e < E; ++e) hb[e] = 0.0f;
  for (int64_t r = 0; r < D; ++r) {
    float kk = kb[r] * ip, qr = qb[r];
    float nn = fp * nb[r] + kk;
    no[r] = nn;
    den += qr * nn;
    const float* Cr = Cb + r * E;
    float* Cor = Co + r * E;
    for (int64_t e = 0; e < E; ++e) {
      float c = fp * Cr[e] + kk * vb[e];
      Cor[e] = c;
      hb[e] += qr * c;
    }
  }
  float lo = expf(-mn), ad = fabsf(den), norm = ad > lo ? ad : lo;
  for (int64_t e = 0; e < E; ++e) hb[e] /= norm;
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

/* RMSNorm of B rows of width D: out = x / sqrt(mean(x^2) + eps) * w (+ bias; bias may be NULL) */
void xl_rms_norm(int64_t B, int64_t D, float eps, const float* x, const float* w, const float* bias, float* out) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * D;
    float* ob = out + b * D;
    float ss = 0.0f;
    for (int64_t j = 0; j < D; ++j) ss += xb[j] * xb[j];
    float r = 1.0f / sqrtf(ss / (float)D + eps);
    for (int64_t j = 0; j < D; ++j) ob[j] = xb[j] * r * w[j] + (bias ? bias[j] : 0.0f);
  }
}

static float cap_of(float x, float cap) { return cap > 0.0f ? cap * tanhf(x / cap) : x; }

/* The xLSTM-7B mLSTM layer after its projections, one token, B rows, NH heads:
   proj (B, 2 NH Dqk + 2 NH Dv) = [q | k | v | o], gates (B, 2 NH) = [i | f] pre-activations
   (soft-capped here by gate_cap, 0: no cap); state C (B, NH, Dqk, Dv), n (B, NH, Dqk), m (B, NH)
   -> new state, and out (B, NH Dv) = sigmoid(o) * (per-head LayerNorm(h) * w (+ b)). */
void xl_mlstm_layer_step(int64_t B, int64_t NH, int64_t Dqk, int64_t Dv, float gate_cap, float eps,
                         const float* proj, const float* gates, const float* C, const float* n, const float* m,
                         const float* w, const float* bias, float* C_out, float* n_out, float* m_out, float* out) {
  int64_t P = 2 * NH * Dqk + 2 * NH * Dv;
  float scale = 1.0f / sqrtf((float)Dqk);
  for (int64_t b = 0; b < B; ++b) {
    const float *q = proj + b * P, *k = q + NH * Dqk, *v = k + NH * Dqk, *o = v + NH * Dv, *g = gates + b * 2 * NH;
    for (int64_t hd = 0; hd < NH; ++hd) {
      int64_t bh = b * NH + hd;
      float* hb = out + bh * Dv;
      m_out[bh] = step_head(Dqk, Dv, scale, q + hd * Dqk, k + hd * Dqk, v + hd * Dv, cap_of(g[hd], gate_cap),
                            cap_of(g[NH + hd], gate_cap), C + bh * Dqk * Dv, n + bh * Dqk, m[bh], hb,
                            C_out + bh * Dqk * Dv, n_out + bh * Dqk);
      float mean = 0.0f, var = 0.0f;
      for (int64_t e = 0; e < Dv; ++e) mean += hb[e];
      mean /= (float)Dv;
      for (int64_t e = 0; e < Dv; ++e) var += (hb[e] - mean) * (hb[e] - mean);
      float r = 1.0f / sqrtf(var / (float)Dv + eps);
      const float *wh = w + hd * Dv, *bh_ = bias ? bias + hd * Dv : NULL, *oh = o + hd * Dv;
      for (int64_t e = 0; e < Dv; ++e) {
        float y = (hb[e] - mean) * r * wh[e] + (bh_ ? bh_[e] : 0.0f);
        hb[e] = y / (1.0f + expf(-oh[e]));
      }
    }
  }
}

/* SwiGLU of B rows: gu (B, 2F) = [gate | up] -> out (B, F) = silu(gate) * up */
void xl_swiglu(int64_t B, int64_t F, const float* gu, float* out) {
  for (int64_t b = 0; b < B; ++b) {
    const float *g = gu + b * 2 * F, *u = g + F;
    float* ob = out + b * F;
    for (int64_t j = 0; j < F; ++j) ob[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
  }
}
