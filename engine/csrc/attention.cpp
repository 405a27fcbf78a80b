// Decode attention over the dense decode cache.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>

#include <algorithm>
#include <limits>

namespace disagg {
namespace {

// scores[j][i] = q_j . K[:, i] for the G query heads j sharing one KV head (q_j at q + j * qs)
// and positions i < span, K^T rows of stride `cap`: sums of D vectors running along positions,
// so no horizontal sums; each K^T load serves all G heads, and P position vectors per head keep
// G * P accumulators (8) in flight.
template <int G>
void attention_scores(const float* q, int64_t qs, const float* kt, int64_t cap, int64_t d, int64_t span,
                      float* scores) {
  constexpr int64_t W = Vec::size(), P = G >= 8 ? 1 : 8 / G;
  int64_t i = 0;
  for (; i + P * W <= span; i += P * W) {
    Vec acc[G][P];
    for (auto& row : acc)
      for (auto& a : row) a = Vec(0.f);
    for (int64_t e = 0; e < d; ++e) {
      const float* krow = kt + e * cap + i;
      Vec key[P];
      for (int64_t p = 0; p < P; ++p) key[p] = Vec::loadu(krow + p * W);
      for (int j = 0; j < G; ++j) {
        const Vec qe(q[j * qs + e]);
        for (int64_t p = 0; p < P; ++p) acc[j][p] = at::vec::fmadd(key[p], qe, acc[j][p]);
      }
    }
    for (int j = 0; j < G; ++j)
      for (int64_t p = 0; p < P; ++p) acc[j][p].store(scores + j * span + i + p * W);
  }
  for (; i < span; i += W) {
    const int64_t count = std::min<int64_t>(W, span - i);
    Vec acc[G];
    for (auto& a : acc) a = Vec(0.f);
    for (int64_t e = 0; e < d; ++e) {
      const Vec key = Vec::loadu(kt + e * cap + i, count);
      for (int j = 0; j < G; ++j) acc[j] = at::vec::fmadd(key, Vec(q[j * qs + e]), acc[j]);
    }
    for (int j = 0; j < G; ++j) acc[j].store(scores + j * span + i, count);
  }
}

// Softmax of each head's scores (times `scale`) in place, then out_j = sum_i p_j[i] * V[i]:
// each value row is read once for all G heads.
template <int G>
void attend(const float* q, int64_t qs, const float* kt, const float* vc, int64_t cap, int64_t d, int64_t span,
            float scale, float* scores, float* out, int64_t os) {
  attention_scores<G>(q, qs, kt, cap, d, span, scores);
  for (int j = 0; j < G; ++j) {
    float* p = scores + j * span;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < span; ++i) top = std::max(top, p[i]);
    top *= scale;
    at::vec::map([scale, top](Vec x) { return (x * Vec(scale) - Vec(top)).exp(); }, p, p, span);
    float total = 0.f;
    for (int64_t i = 0; i < span; ++i) total += p[i];
    const Vec inv(1.f / total);
    at::vec::map([inv](Vec x) { return x * inv; }, p, p, span);
    std::fill_n(out + j * os, d, 0.f);
  }
  for (int64_t i = 0; i < span; ++i) {
    const float* vrow = vc + i * d;
    int64_t e = 0;
    for (; e + Vec::size() <= d; e += Vec::size()) {
      const Vec val = Vec::loadu(vrow + e);
      for (int j = 0; j < G; ++j) {
        float* o = out + j * os + e;
        at::vec::fmadd(val, Vec(scores[j * span + i]), Vec::loadu(o)).store(o);
      }
    }
    for (; e < d; ++e)
      for (int j = 0; j < G; ++j) out[j * os + e] += vrow[e] * scores[j * span + i];
  }
}

// The G query heads of one KV head, in chunks the templates cover.
void attend_group(const float* q, int64_t qs, int64_t groups, const float* kt, const float* vc, int64_t cap,
                  int64_t d, int64_t span, float scale, float* scores, float* out, int64_t os) {
  for (int64_t j = 0; j < groups;) {
    const int64_t left = groups - j;
    const float* qj = q + j * qs;
    float* oj = out + j * os;
    if (left >= 8) {
      attend<8>(qj, qs, kt, vc, cap, d, span, scale, scores, oj, os);
      j += 8;
    } else if (left >= 4) {
      attend<4>(qj, qs, kt, vc, cap, d, span, scale, scores, oj, os);
      j += 4;
    } else if (left >= 2) {
      attend<2>(qj, qs, kt, vc, cap, d, span, scale, scores, oj, os);
      j += 2;
    } else {
      attend<1>(qj, qs, kt, vc, cap, d, span, scale, scores, oj, os);
      j += 1;
    }
  }
}

}  // namespace

// Decode attention over the dense decode cache, appending this step's K/V first.
//   q [B, H, D], k/v [B, kvH, D] (contiguous D); keys_t [rows, kvH, D, capacity] (transposed)
//   and values [rows, kvH, capacity, D], both contiguous; lengths [B] int64: sequence b's
//   context including this token, whose K/V go to position lengths[b] - 1 of row b. Keys older
//   than `window` are skipped (0: no window). Returns [B, H, D]; query head h reads KV head
//   h / (H / kvH), as in the reference.
// Transposed keys make q . K a sum of D vectors running along positions (no horizontal sums),
// and the output a sum of probability-weighted value rows.
at::Tensor dense_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     at::Tensor keys_t, at::Tensor values, const at::Tensor& lengths,
                                     int64_t window, double scale) {
  for (const at::Tensor* t : {&q, &k, &v, static_cast<const at::Tensor*>(&keys_t),
                                 static_cast<const at::Tensor*>(&values)})
    check_f32(*t, "dense_decode_attention: q, k, v, keys_t and values");
  TORCH_CHECK(keys_t.is_contiguous() && values.is_contiguous() && keys_t.dim() == 4 && values.dim() == 4,
              "dense_decode_attention: keys_t and values must be contiguous 4-d tensors");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.is_contiguous(), "lengths must be int64");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1 &&
              v.stride(2) == 1, "q, k, v must be [B, heads, D] with contiguous D");
  const int64_t b = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t kvh = keys_t.size(1), cap = keys_t.size(3);
  TORCH_CHECK(keys_t.size(2) == d && values.size(1) == kvh && values.size(2) == cap && values.size(3) == d &&
              k.size(1) == kvh && v.size(1) == kvh && heads % kvh == 0 && b <= keys_t.size(0) &&
              b <= values.size(0) && lengths.numel() == b,
              "dense_decode_attention: shapes do not match");
  const int64_t groups = heads / kvh;
  const int64_t* len = lengths.data_ptr<int64_t>();
  const float sc = static_cast<float>(scale);
  auto out = at::empty({b, heads, d}, q.options());  // attend() writes every element
  for (int64_t s = 0; s < b; ++s)
    TORCH_CHECK(len[s] >= 1 && len[s] <= cap, "dense_decode_attention: length ", len[s], " outside [1, ", cap, "]");
  float* const kt_base = keys_t.data_ptr<float>();
  float* const v_base = values.data_ptr<float>();
  float* const out_base = out.data_ptr<float>();
  const float *const q_base = q.data_ptr<float>(), *const k_base = k.data_ptr<float>(), *const vn_base = v.data_ptr<float>();
  // One task per (sequence, KV head); reading K/V is what costs, so both cores stream it.
  at::parallel_for(0, b * kvh, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / kvh, g = task % kvh, n = len[s];
      const int64_t first = window > 0 ? std::max<int64_t>(0, n - window) : 0, span = n - first;
      scores.resize(std::min<int64_t>(groups, 8) * span);
      float* kt = kt_base + task * d * cap;  // [D, cap]; task = s * kvh + g
      float* vc = v_base + task * cap * d;   // [cap, D]
      const float* kn = k_base + s * k.stride(0) + g * k.stride(1);
      for (int64_t j = 0; j < d; ++j) kt[j * cap + n - 1] = kn[j];
      std::copy_n(vn_base + s * v.stride(0) + g * v.stride(1), d, vc + (n - 1) * d);
      // Query heads g * groups .. (g + 1) * groups - 1 read this KV head, as in the reference.
      const int64_t h = g * groups;
      attend_group(q_base + s * q.stride(0) + h * q.stride(1), q.stride(1), groups, kt + first, vc + first * d, cap,
                   d, span, sc, scores.data(), out_base + (s * heads + h) * d, d);
    }
  });
  return out;
}

}  // namespace disagg
