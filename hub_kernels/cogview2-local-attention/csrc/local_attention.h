// Fused 2D local attention with CogView2 semantics: one softmax over a local window, an optional
// cross-resolution window and optional global keys. Shared by the CPU and CUDA implementations.
#pragma once

#include <torch/all.h>

#include <optional>
#include <tuple>

namespace cogview2_local_attention {

#if defined(__CUDACC__)
#define LA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LA_HOST_DEVICE inline
#endif

// One windowed key set: keys on a rows x cols grid; the query grid is (rows * ah) x (cols * aw).
struct WindowSet {
  int rows = 0, cols = 0;  // key grid
  int ah = 1, aw = 1;      // query cells per key cell
  int rh = 0, rw = 0;      // window radius (odd window kH = 2 rh + 1, kW = 2 rw + 1)
  int kw = 1;              // window width
  int slots = 0;           // window slots in raster order: kH * kW, or kH * kW / 2 + 1 when causal
  int batch = 1;           // key batch: 1 (broadcast over the queries) or the query batch

  // Key cell seen by query cell (y, x) through slot p, or -1 when it lies outside the key grid (dropped).
  LA_HOST_DEVICE int key_of(int y, int x, int p) const {
    const int ky = y / ah + p / kw - rh;
    const int kx = x / aw + p % kw - rw;
    return (ky >= 0 && ky < rows && kx >= 0 && kx < cols) ? ky * cols + kx : -1;
  }
  LA_HOST_DEVICE int num_keys() const { return rows * cols; }
};

struct Problem {
  int batch = 0, heads = 0, queries = 0, dim = 0;
  int qrows = 0, qcols = 0;
  WindowSet sets[2];
  int num_sets = 0;
  int num_global = 0;
  int global_batch = 1;
  int mask_batch = 0;  // 0: no padding mask, else 1 or the query batch
  float scale = 1.f;

  int max_keys() const {
    int n = num_global;
    for (int s = 0; s < num_sets; ++s) n += sets[s].slots;
    return n;
  }
};

// geometry = [q_rows, q_cols, k_rows, k_cols, kH, kW, causal, c_rows, c_cols, c_kH, c_kW] (c_* = 0: no cross set).
Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& cross_k, const std::optional<at::Tensor>& cross_v,
                     const std::optional<at::Tensor>& global_k, const std::optional<at::Tensor>& global_v,
                     const std::optional<at::Tensor>& global_mask, at::IntArrayRef geometry, double scale);

// Backward inputs beyond the forward ones: grad_out and out shaped like q, lse float32 [batch, heads, tokens],
// all on q's device (so a CUDA call never reads host memory and vice versa).
void check_backward_inputs(const Problem& P, const at::Tensor& q, const at::Tensor& grad_out, const at::Tensor& out,
                           const at::Tensor& lse);

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const std::optional<at::Tensor>& cross_k,
                                               const std::optional<at::Tensor>& cross_v,
                                               const std::optional<at::Tensor>& global_k,
                                               const std::optional<at::Tensor>& global_v,
                                               const std::optional<at::Tensor>& global_mask,
                                               at::IntArrayRef geometry, double scale);

Grads backward_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& cross_k, const std::optional<at::Tensor>& cross_v,
                   const std::optional<at::Tensor>& global_k, const std::optional<at::Tensor>& global_v,
                   const std::optional<at::Tensor>& global_mask, const at::Tensor& out, const at::Tensor& lse,
                   at::IntArrayRef geometry, double scale);

#if defined(CUDA_KERNEL)
std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const std::optional<at::Tensor>& cross_k,
                                                const std::optional<at::Tensor>& cross_v,
                                                const std::optional<at::Tensor>& global_k,
                                                const std::optional<at::Tensor>& global_v,
                                                const std::optional<at::Tensor>& global_mask,
                                                at::IntArrayRef geometry, double scale);

Grads backward_cuda(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& cross_k, const std::optional<at::Tensor>& cross_v,
                    const std::optional<at::Tensor>& global_k, const std::optional<at::Tensor>& global_v,
                    const std::optional<at::Tensor>& global_mask, const at::Tensor& out, const at::Tensor& lse,
                    at::IntArrayRef geometry, double scale);
#endif

}  // namespace cogview2_local_attention
