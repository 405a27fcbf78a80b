// MKL's packed GEMM: projections over weights packed once.
#include "kernels.h"

// MKL's packed GEMM, exported by PyTorch's CPU library where it links MKL (x86 wheels). Weak:
// elsewhere they are null and has_packed_gemm() says so.
extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace disagg {
namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kPacked = 151, kBMatrix = 162;

}  // namespace

bool has_packed_gemm() {
  return cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr;
}

// A weight [K, N] (row-major, x @ W) in MKL's packed layout. Without packing, every GEMM call
// re-packs the weight (MKL's copy routines were ~12% of a decode step's CPU time); the packed
// layout serves any number of rows M. The buffer is opaque: only packed_linear reads it.
at::Tensor pack_weight(const at::Tensor& w) {
  check_f32(w, "pack_weight: w");
  TORCH_CHECK(has_packed_gemm(), "pack_weight: this PyTorch build does not export MKL's packed GEMM");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "pack_weight: w must be a contiguous [K, N] matrix");
  const int k = static_cast<int>(w.size(0)), n = static_cast<int>(w.size(1));
  // m only guides MKL's choice of kernel; the packed matrix is valid for any m.
  const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, 32, n, k);
  auto packed = at::empty({static_cast<int64_t>(bytes / sizeof(float)) + 1}, w.options());
  cblas_sgemm_pack(kRowMajor, kBMatrix, kNoTrans, 32, n, k, 1.f, w.data_ptr<float>(), n, packed.data_ptr<float>());
  return packed;
}

// x [M, K] @ W [K, N] with W from pack_weight; with `residual` [M, N]: residual += x @ W in
// place (beta = 1, rounding as addmm does), returning it.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t k, int64_t n,
                            const std::optional<at::Tensor>& residual) {
  check_f32(x, "packed_linear: x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && x.stride(1) == 1, "packed_linear: x must be [M, ", k,
              "] with contiguous rows");
  const int64_t m = x.size(0);
  at::Tensor out;
  if (residual.has_value()) {
    check_f32(*residual, "packed_linear: residual");
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == m && residual->size(1) == n,
                "packed_linear: residual must be [M, N]");
    TORCH_CHECK(residual->is_contiguous(), "packed_linear: residual must be contiguous");
    out = *residual;  // accumulated into in place: beta = 1
  } else {
    out = at::empty({m, n}, x.options());
  }
  if (m == 0) return out;
  cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
                      x.data_ptr<float>(), static_cast<int>(x.stride(0)), packed.data_ptr<float>(),
                      static_cast<int>(n), residual.has_value() ? 1.f : 0.f, out.data_ptr<float>(),
                      static_cast<int>(n));
  return out;
}

}  // namespace disagg
