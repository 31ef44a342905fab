// Op registration. The namespace is the unique extension name chosen by the build (kernel-builder or
// build_local.py), exposed to Python as `_ops.ops`.
#include <torch/library.h>

#include "registration.h"
#include "torch_binding.h"

TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, ops) {
  // geometry = [q_rows, q_cols, k_rows, k_cols, kH, kW, causal, c_rows, c_cols, c_kH, c_kW]; returns (out, lse).
  ops.def(
      "forward(Tensor q, Tensor k, Tensor v, Tensor? cross_k, Tensor? cross_v, Tensor? global_k, "
      "Tensor? global_v, Tensor? global_mask, int[] geometry, float scale) -> (Tensor, Tensor)");
  // Returns (dq, dk, dv, dcross_k, dcross_v, dglobal_k, dglobal_v); absent inputs get empty tensors.
  ops.def(
      "backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? cross_k, Tensor? cross_v, "
      "Tensor? global_k, Tensor? global_v, Tensor? global_mask, Tensor out, Tensor lse, int[] geometry, "
      "float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
#if defined(CPU_KERNEL) || defined(CUDA_KERNEL)
  ops.impl("forward", torch::kCPU, &cogview2_local_attention::forward_cpu);
  ops.impl("backward", torch::kCPU, &cogview2_local_attention::backward_cpu);
#endif
#if defined(CUDA_KERNEL)
  ops.impl("forward", torch::kCUDA, &cogview2_local_attention::forward_cuda);
  ops.impl("backward", torch::kCUDA, &cogview2_local_attention::backward_cuda);
#endif
}

REGISTER_EXTENSION(TORCH_EXTENSION_NAME)
