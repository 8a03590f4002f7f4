#include <math.h>
#include <stdint.h>
/* one stabilised mLSTM step for BH independent heads (float32, contiguous); the Python side and
   the reference it is tested against are in rizzearch/ops/mlstm.py */
void mlstm_step_f32(int64_t BH, int64_t D, int64_t E, float scale,
                    const float* q, const float* k, const float* v, const float* ig, const float* fg,
                    const float* C, const float* n, const float* m,
                    float* h, float* C_out, float* n_out, float* m_out) {
  for (int64_t b = 0; b < BH; ++b) {
    const float *qb = q + b * D, *kb = k + b * D, *vb = v + b * E, *Cb = C + b * D * E, *nb = n + b * D;
    float *hb = h + b * E, *Co = C_out + b * D * E, *no = n_out + b * D;
    float f = fg[b], i = ig[b];
    float logf = f >= 0.0f ? -log1pf(expf(-f)) : f - log1pf(expf(f));  /* logsigmoid */
    float a = logf + m[b];                                               /* -inf for the empty state */
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
    m_out[b] = mn;
  }
}
