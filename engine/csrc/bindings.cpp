// Python bindings of the kernels (module name set by torch's extension builder). Every call
// releases the GIL while it computes, as PyTorch's own ops do: a serving process has other Python
// threads (request intake, KV transfer) that must not wait for a whole decode step.
#include <torch/extension.h>

#include "kernels.h"

using namespace disagg;

namespace {
using NoGil = pybind11::call_guard<pybind11::gil_scoped_release>;
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<DenseDecoder>(m, "DenseDecoder")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, int64_t,
                          std::vector<std::vector<torch::Tensor>>>())
      .def("forward", &DenseDecoder::forward, "every layer of a dense decode step", NoGil());
  m.def("has_packed_gemm", &has_packed_gemm, "whether MKL's packed GEMM is available", NoGil());
  m.def("pack_weight", &pack_weight, "a [K, N] weight in MKL's packed layout", NoGil());
  m.def("packed_linear", &packed_linear, "x @ packed weight (+ residual)", NoGil());
  m.def("write_kv", &write_kv, "one step's K/V of every layer into the pool (fp32)", NoGil());
  m.def("rms_norm", &rms_norm, "RMSNorm of each row (fp32)", NoGil());
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [N, 2I] (fp32)", NoGil());
  m.def("rotary_", &rotary_, "rotary embedding in place (fp32)", NoGil());
  m.def("dense_decode_attention", &dense_decode_attention, "decode attention over the dense cache (fp32)", NoGil());
}
