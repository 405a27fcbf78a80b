// Fused fp32 CPU kernels for the engine's decode step.
//
// Each replaces a chain of small PyTorch ops. On a small CPU every op dispatch costs 10-30 us in
// a real step (cold caches between ops), which at batch 32 costs more than the arithmetic.
// Elementwise kernels split rows over PyTorch's intra-op threads only when there are enough
// (prefill); a decode step's rows are too few to pay for waking a thread. Attention always
// splits: reading the K/V cache is what it costs, and two cores stream it faster than one.
//
// Rounding: rotary_ is bit-identical to the reference formula (built with -ffp-contract=off, so
// no fused multiply-add); rms_norm and silu_mul round each step as the reference does but sum in
// a different order; decode attention is a different (but fp32-accumulated) summation order,
// like any attention kernel.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, name, " must be a float32 CPU tensor");
}

float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = acc + Vec::loadu(a + i) * Vec::loadu(b + i);
  float sum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// Rows per parallel task: enough elements that a task outweighs waking a thread.
int64_t rows_per_task(int64_t row_elements) { return std::max<int64_t>(1, (1 << 16) / row_elements); }

// out[i] = weight * (x[i] * rsqrt(mean(x[i]^2) + eps)) for each row i of x [N, H].
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_f32(x, "rms_norm: x");
  check_f32(weight, "rms_norm: weight");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rms_norm: x must be [N, H] with contiguous rows");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), "rms_norm: weight must be [H]");
  const int64_t n = x.size(0), h = x.size(1);
  auto out = torch::empty({n, h}, x.options());
  const float* w = weight.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t stride = x.stride(0);
  at::parallel_for(0, n, rows_per_task(h), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* row = xp + i * stride;
      const float r = 1.f / std::sqrt(dot(row, row, h) / static_cast<float>(h) + static_cast<float>(eps));
      at::vec::map2([r](Vec a, Vec b) { return b * (a * Vec(r)); }, op + i * h, row, w, h);
    }
  });
  return out;
}

// silu(gate) * up for gate_up [N, 2I] (gate first): [N, I]. silu(x) = x / (1 + exp(-x)), as
// PyTorch's vectorized kernel computes it.
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  check_f32(gate_up, "silu_mul: gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "silu_mul: gate_up must be [N, 2I] with contiguous rows");
  const int64_t n = gate_up.size(0), half = gate_up.size(1) / 2;
  auto out = torch::empty({n, half}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t stride = gate_up.stride(0);
  at::parallel_for(0, n, rows_per_task(half), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* g = gp + i * stride;
      at::vec::map2([](Vec a, Vec b) { return (a / (Vec(1.f) + a.neg().exp())) * b; }, op + i * half, g,
                    g + half, half);
    }
  });
  return out;
}

// In place: x * cos + cat(x2, x1) * sin for x [N, heads, D] (any strides with contiguous D),
// cos/sin [N, D] contiguous, sin with its first half negated (see rope.py).
void rotary_(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin) {
  check_f32(x, "rotary_: x");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "rotary_: x must be [N, heads, D] with contiguous D");
  const int64_t n = x.size(0), heads = x.size(1), d = x.size(2), half = d / 2;
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == n * d && sin.numel() == n * d,
              "rotary_: cos and sin must be contiguous [N, D]");
  float* xp = x.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  at::parallel_for(0, n, rows_per_task(heads * d), [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(d);
    for (int64_t t = begin; t < end; ++t) {
      const float *c = cp + t * d, *s = sp + t * d;
      for (int64_t h = 0; h < heads; ++h) {
        float* v = xp + t * x.stride(0) + h * x.stride(1);
        for (int64_t j = 0; j < d; ++j) tmp[j] = v[j] * c[j] + v[(j + half) % d] * s[j];
        std::copy(tmp.begin(), tmp.end(), v);
      }
    }
  });
}

// scores[i] = q . K[:, i] for i < span, K^T rows of stride `cap`: sums of D vectors that run
// along positions, 32 positions (four registers) at a time.
void attention_scores(const float* q, const float* kt, int64_t cap, int64_t d, int64_t span, float* scores) {
  constexpr int64_t W = Vec::size();
  int64_t i = 0;
  for (; i + 4 * W <= span; i += 4 * W) {
    Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
    for (int64_t e = 0; e < d; ++e) {
      const float* row = kt + e * cap + i;
      const Vec qe(q[e]);
      a0 = a0 + Vec::loadu(row) * qe;
      a1 = a1 + Vec::loadu(row + W) * qe;
      a2 = a2 + Vec::loadu(row + 2 * W) * qe;
      a3 = a3 + Vec::loadu(row + 3 * W) * qe;
    }
    a0.store(scores + i);
    a1.store(scores + i + W);
    a2.store(scores + i + 2 * W);
    a3.store(scores + i + 3 * W);
  }
  for (; i + W <= span; i += W) {
    Vec a(0.f);
    for (int64_t e = 0; e < d; ++e) a = a + Vec::loadu(kt + e * cap + i) * Vec(q[e]);
    a.store(scores + i);
  }
  for (; i < span; ++i) {
    float a = 0.f;
    for (int64_t e = 0; e < d; ++e) a += kt[e * cap + i] * q[e];
    scores[i] = a;
  }
}

// Decode attention over the dense decode cache, appending this step's K/V first.
//   q [B, H, D], k/v [B, kvH, D] (contiguous D); keys_t [rows, kvH, D, capacity] (transposed)
//   and values [rows, kvH, capacity, D], both contiguous; lengths [B] int64: sequence b's
//   context including this token, whose K/V go to position lengths[b] - 1 of row b. Keys older
//   than `window` are skipped (0: no window). Returns [B, H, D]; query head h reads KV head
//   h / (H / kvH), as in the reference.
// Transposed keys make q . K a sum of D vectors running along positions (no horizontal sums),
// and the output a sum of probability-weighted value rows.
torch::Tensor dense_decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                     torch::Tensor keys_t, torch::Tensor values, const torch::Tensor& lengths,
                                     int64_t window, double scale) {
  for (const torch::Tensor* t : {&q, &k, &v, static_cast<const torch::Tensor*>(&keys_t),
                                 static_cast<const torch::Tensor*>(&values)})
    check_f32(*t, "dense_decode_attention: q, k, v, keys_t and values");
  TORCH_CHECK(keys_t.is_contiguous() && values.is_contiguous() && keys_t.dim() == 4 && values.dim() == 4,
              "dense_decode_attention: keys_t and values must be contiguous 4-d tensors");
  TORCH_CHECK(lengths.scalar_type() == torch::kInt64 && lengths.is_contiguous(), "lengths must be int64");
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
  auto out = torch::zeros({b, heads, d}, q.options());
  for (int64_t s = 0; s < b; ++s)
    TORCH_CHECK(len[s] >= 1 && len[s] <= cap, "dense_decode_attention: length ", len[s], " outside [1, ", cap, "]");
  float* const kt_base = keys_t.data_ptr<float>();
  float* const v_base = values.data_ptr<float>();
  float* const out_base = out.data_ptr<float>();
  const float *const q_base = q.data_ptr<float>(), *const k_base = k.data_ptr<float>(), *const vn_base = v.data_ptr<float>();
  // One task per (sequence, KV head); reading K/V is what costs, so both cores stream it.
  at::parallel_for(0, b * kvh, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> probs;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / kvh, g = task % kvh, n = len[s];
      const int64_t first = window > 0 ? std::max<int64_t>(0, n - window) : 0, span = n - first;
      probs.resize(span);
      float* kt = kt_base + task * d * cap;  // [D, cap]; task = s * kvh + g
      float* vc = v_base + task * cap * d;   // [cap, D]
      const float* kn = k_base + s * k.stride(0) + g * k.stride(1);
      for (int64_t j = 0; j < d; ++j) kt[j * cap + n - 1] = kn[j];
      std::copy_n(vn_base + s * v.stride(0) + g * v.stride(1), d, vc + (n - 1) * d);
      for (int64_t j = 0; j < groups; ++j) {
        const int64_t h = g * groups + j;
        const float* qh = q_base + s * q.stride(0) + h * q.stride(1);
        float* p = probs.data();
        attention_scores(qh, kt + first, cap, d, span, p);
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < span; ++i) top = std::max(top, p[i]);
        top *= sc;
        at::vec::map([sc, top](Vec x) { return (x * Vec(sc) - Vec(top)).exp(); }, p, p, span);
        float total = 0.f;
        for (int64_t i = 0; i < span; ++i) total += p[i];
        float* o = out_base + (s * heads + h) * d;
        const float* vrow = vc + first * d;
        for (int64_t i = 0; i < span; ++i, vrow += d) {
          const float w = p[i] / total;
          int64_t e = 0;
          for (; e + Vec::size() <= d; e += Vec::size())
            (Vec::loadu(o + e) + Vec::loadu(vrow + e) * Vec(w)).store(o + e);
          for (; e < d; ++e) o[e] += vrow[e] * w;
        }
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of each row (fp32)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [N, 2I] (fp32)");
  m.def("rotary_", &rotary_, "rotary embedding in place (fp32)");
  m.def("dense_decode_attention", &dense_decode_attention, "decode attention over the dense cache (fp32)");
}
