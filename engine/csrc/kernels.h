// Fused fp32 CPU kernels for the engine (engine/kernels.py builds and loads them).
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
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

#include <optional>
#include <vector>

namespace disagg {

using Vec = at::vec::Vectorized<float>;

inline void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
}

// gemm.cpp
bool has_packed_gemm();
at::Tensor pack_weight(const at::Tensor& w);
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t k, int64_t n,
                         const std::optional<at::Tensor>& residual);

// elementwise.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& gate_up);
void rotary_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin);
void write_kv(at::Tensor cache, const at::Tensor& slots, const std::vector<at::Tensor>& keys,
              const std::vector<at::Tensor>& values);

// attention.cpp
at::Tensor dense_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor keys_t,
                                  at::Tensor values, const at::Tensor& lengths, int64_t window, double scale);

// decoder.cpp
// Every layer of a dense decode step in one call: the same kernels, in the same order, as the
// model's Python forward with CompiledCpuKernels (so the same bits), without the ~15 Python and
// dispatcher round trips per layer in between.
class DenseDecoder {
 public:
  // layers[l]: input_norm [H], qkv (packed), qkv_bias or empty, o (packed), o_bias or empty,
  // post_norm [H], gate_up (packed), gate_up_bias or empty, down (packed), down_bias or empty.
  DenseDecoder(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps,
               int64_t window, std::vector<std::vector<at::Tensor>> layers)
      : hidden_(hidden), heads_(heads), kvh_(kv_heads), d_(head_dim), inter_(intermediate), eps_(eps),
        window_(window), layers_(std::move(layers)) {
    for (const auto& w : layers_) TORCH_CHECK(w.size() == 10, "DenseDecoder: 10 tensors per layer");
  }

  // x [B, hidden] hidden states of the step's tokens (updated in place and returned); cos/sin
  // [B, 1, D]; keys_t/values the dense cache [layers, rows, kvH, D | capacity, capacity | D];
  // lengths [B]; pool and slots: where the step's K/V also go.
  at::Tensor forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor keys_t,
                     at::Tensor values, const at::Tensor& lengths, at::Tensor pool, const at::Tensor& slots) const;

 private:
  // residual += in @ W (+ b), as Projection.forward: the GEMM accumulates unless there is a bias.
  void project_into(at::Tensor& residual, const at::Tensor& in, const at::Tensor& weight, const at::Tensor& bias,
                    int64_t k) const;

  int64_t hidden_, heads_, kvh_, d_, inter_;
  double eps_;
  int64_t window_;
  std::vector<std::vector<at::Tensor>> layers_;
};

}  // namespace disagg
