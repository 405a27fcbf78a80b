// DenseDecoder: every layer of a dense decode step in one call.
#include "kernels.h"

#include <cmath>

namespace disagg {
namespace {

bool present(const at::Tensor& bias) { return bias.defined() && bias.numel() > 0; }

at::Tensor with_bias(at::Tensor out, const at::Tensor& bias) { return present(bias) ? out.add_(bias) : out; }

}  // namespace

at::Tensor DenseDecoder::forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor keys_t,
                                 at::Tensor values, const at::Tensor& lengths, at::Tensor pool,
                                 const at::Tensor& slots) const {
  const int64_t b = x.size(0), qk = (heads_ + kvh_) * d_, qkv_width = qk + kvh_ * d_;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d_));
  for (size_t l = 0; l < layers_.size(); ++l) {
    const auto& w = layers_[l];
    const int64_t li = static_cast<int64_t>(l);
    auto qkv = with_bias(packed_linear(rms_norm(x, w[0], eps_), w[1], hidden_, qkv_width, std::nullopt), w[2]);
    auto rotated = qkv.narrow(1, 0, qk).view({b, heads_ + kvh_, d_});
    rotary_(rotated, cos, sin);
    auto q = rotated.narrow(1, 0, heads_), k = rotated.narrow(1, heads_, kvh_);
    auto v = qkv.narrow(1, qk, kvh_ * d_).view({b, kvh_, d_});
    write_kv(pool.narrow(0, li, 1), slots, {k}, {v});
    auto attn = dense_decode_attention(q, k, v, keys_t.select(0, li), values.select(0, li), lengths, window_, scale);
    project_into(x, attn.view({b, heads_ * d_}), w[3], w[4], heads_ * d_);
    auto gate_up = with_bias(packed_linear(rms_norm(x, w[5], eps_), w[6], hidden_, 2 * inter_, std::nullopt), w[7]);
    project_into(x, silu_mul(gate_up), w[8], w[9], inter_);
  }
  return x;
}

void DenseDecoder::project_into(at::Tensor& residual, const at::Tensor& in, const at::Tensor& weight,
                                const at::Tensor& bias, int64_t k) const {
  if (present(bias)) {
    residual.add_(packed_linear(in, weight, k, hidden_, std::nullopt).add_(bias));
  } else {
    packed_linear(in, weight, k, hidden_, residual);
  }
}

}  // namespace disagg
