// The log-space merge of a local attention output with a recurrent-state readout, in CUDA.
//
// Twin: retentivekv_vllm.core.merge.merge_with_states with one state (numerators and
// denominators already summed over states with their gains). Per row (token, query head):
//   o_S = num / den, lse_S = log den;  o = (e^{lse_L} o_L + e^{lse_S} o_S) / (e^{lse_L} + e^{lse_S})
// evaluated with the larger lse factored out; rows with den <= 0 return o_L unchanged.
// One thread block per row, threads over the value dims: the weights are computed once per row
// and every element is read and written once, so the merge runs at memory speed without the
// second tile of a Triton program per row.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cmath>

namespace {

template <typename scalar_t>
__global__ void merge_with_state_kernel(
    const scalar_t* __restrict__ out_local,  // [rows, dv]
    const float* __restrict__ lse_local,     // [rows]
    const float* __restrict__ numerator,     // [rows, dv]
    const float* __restrict__ denominator,   // [rows]
    scalar_t* __restrict__ out,              // [rows, dv]
    const int64_t head_dim_v) {
  const int64_t row = blockIdx.x;
  const float den = denominator[row];
  const bool has_state = den > 0.0f;
  float weight_local = 1.0f;
  float weight_state = 0.0f;
  if (has_state) {
    const float lse_state = logf(den);
    // lse_state is finite, so top is too; lse_local = -inf gives weight_local = 0.
    const float top = fmaxf(lse_local[row], lse_state);
    const float local = expf(lse_local[row] - top);
    const float state = expf(lse_state - top);
    weight_local = local / (local + state);
    weight_state = state / ((local + state) * den);  // folds o_S = num / den in
  }
  const int64_t base = row * head_dim_v;
  for (int64_t i = threadIdx.x; i < head_dim_v; i += blockDim.x) {
    const scalar_t local = out_local[base + i];
    out[base + i] = has_state
        ? static_cast<scalar_t>(weight_local * static_cast<float>(local) + weight_state * numerator[base + i])
        : local;
  }
}

}  // namespace

torch::Tensor merge_with_state(
    torch::Tensor out_local, torch::Tensor lse_local, torch::Tensor numerator, torch::Tensor denominator) {
  TORCH_CHECK(out_local.is_cuda(), "merge_with_state: tensors must be on a CUDA device");
  TORCH_CHECK(lse_local.scalar_type() == at::kFloat && numerator.scalar_type() == at::kFloat &&
                  denominator.scalar_type() == at::kFloat,
              "merge_with_state: lse_local, numerator and denominator must be float32");
  TORCH_CHECK(numerator.sizes() == out_local.sizes(), "merge_with_state: numerator shape differs from out_local");
  const int64_t head_dim_v = out_local.size(-1);
  const int64_t rows = out_local.numel() / head_dim_v;
  TORCH_CHECK(lse_local.numel() == rows && denominator.numel() == rows,
              "merge_with_state: lse_local and denominator need one value per row of out_local");
  const c10::cuda::CUDAGuard device_guard(out_local.device());
  auto out_local_c = out_local.contiguous();
  auto lse_c = lse_local.contiguous();
  auto num_c = numerator.contiguous();
  auto den_c = denominator.contiguous();
  auto out = torch::empty_like(out_local_c);
  if (rows == 0) {
    return out;
  }
  const int threads = static_cast<int>(std::min<int64_t>(((head_dim_v + 31) / 32) * 32, 1024));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_local_c.scalar_type(), "merge_with_state", [&] {
    merge_with_state_kernel<scalar_t><<<rows, threads, 0, stream>>>(
        out_local_c.data_ptr<scalar_t>(), lse_c.data_ptr<float>(), num_c.data_ptr<float>(),
        den_c.data_ptr<float>(), out.data_ptr<scalar_t>(), head_dim_v);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("merge_with_state", &merge_with_state,
        "Log-space merge of local attention (out, lse) with a state readout (numerator, denominator)");
}
