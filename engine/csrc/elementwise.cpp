// Row-wise kernels: RMSNorm, SwiGLU activation, rotary embedding, and the pool's K/V write.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>

#include <algorithm>
#include <cmath>

namespace disagg {
namespace {

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

}  // namespace

// out[i] = weight * (x[i] * rsqrt(mean(x[i]^2) + eps)) for each row i of x [N, H].
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_f32(x, "rms_norm: x");
  check_f32(weight, "rms_norm: weight");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rms_norm: x must be [N, H] with contiguous rows");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), "rms_norm: weight must be [H]");
  const int64_t n = x.size(0), h = x.size(1);
  auto out = at::empty({n, h}, x.options());
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
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_f32(gate_up, "silu_mul: gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "silu_mul: gate_up must be [N, 2I] with contiguous rows");
  const int64_t n = gate_up.size(0), half = gate_up.size(1) / 2;
  auto out = at::empty({n, half}, gate_up.options());
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
void rotary_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin) {
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

// The step's K/V of consecutive layers into the pool: cache [layers, 2, blocks, block_size, kvH,
// D] contiguous, keys[l] and values[l] [N, kvH, D] with contiguous (kvH, D), slots [N] int64.
void write_kv(at::Tensor cache, const at::Tensor& slots, const std::vector<at::Tensor>& keys,
              const std::vector<at::Tensor>& values) {
  check_f32(cache, "write_kv: cache");
  TORCH_CHECK(cache.dim() == 6 && cache.is_contiguous(), "write_kv: cache must be the contiguous pool layout");
  const int64_t layers = cache.size(0), slots_per_layer = cache.size(2) * cache.size(3);
  const int64_t row = cache.size(4) * cache.size(5), n = slots.numel();
  TORCH_CHECK(static_cast<int64_t>(keys.size()) == layers && static_cast<int64_t>(values.size()) == layers,
              "write_kv: one K and one V per layer of the cache");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous(), "write_kv: slots must be int64");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < slots_per_layer, "write_kv: slot ", slot[t], " outside the pool");
  float* base = cache.data_ptr<float>();
  for (int64_t l = 0; l < layers; ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      const at::Tensor& src = kv == 0 ? keys[l] : values[l];
      check_f32(src, "write_kv: keys and values");
      TORCH_CHECK(src.dim() == 3 && src.size(0) == n && src.size(1) * src.size(2) == row && src.stride(2) == 1 &&
                      src.stride(1) == src.size(2),
                  "write_kv: K/V must be [N, kvH, D] with contiguous heads");
      float* dst = base + (l * 2 + kv) * slots_per_layer * row;
      for (int64_t t = 0; t < n; ++t) std::copy_n(src.data_ptr<float>() + t * src.stride(0), row, dst + slot[t] * row);
    }
  }
}

}  // namespace disagg
