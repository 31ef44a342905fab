// CUDA implementation. One thread per query (forward, dq) or per key (dk/dv): the query row and the output
// accumulator live in registers (float32), key/value rows are read with 16-byte vector loads. A block covers a
// 2-D tile of neighbouring cells, so the rows of overlapping windows are served from L1/L2 rather than HBM.
// Softmax is online (running max and sum), in float32; nothing of size N x window is written to memory.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "local_attention.h"

namespace cogview2_local_attention {

namespace {

constexpr int kTileRows = 8;
constexpr int kTileCols = 16;
constexpr int kThreads = kTileRows * kTileCols;
constexpr int kGlobalThreads = 256;

template <typename scalar_t>
struct Rows {
  const scalar_t* qs;  // query pre-multiplied by the scale in its own dtype (the official order)
  const scalar_t* k[2];
  const scalar_t* v[2];
  const scalar_t* gk;
  const scalar_t* gv;
  const bool* mask;
};

template <typename scalar_t>
constexpr int kVec = 16 / sizeof(scalar_t);

// The elements of one 16-byte vector. Filled from / written to a uint4 with memcpy, not by casting a uint4 pointer
// to a scalar pointer (undefined behaviour); nvcc turns the copies into register moves.
template <typename scalar_t>
struct Vec {
  scalar_t e[kVec<scalar_t>];
};

template <typename scalar_t>
__device__ __forceinline__ Vec<scalar_t> load_vec(const scalar_t* __restrict__ row, int i) {
  static_assert(sizeof(Vec<scalar_t>) == sizeof(uint4), "a vector is 16 bytes");
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row) + i);  // rows are 16-byte aligned (prepared())
  Vec<scalar_t> v;
  memcpy(&v, &raw, sizeof(raw));
  return v;
}

template <typename scalar_t>
__device__ __forceinline__ void store_vec(scalar_t* __restrict__ row, int i, const Vec<scalar_t>& v) {
  uint4 raw;
  memcpy(&raw, &v, sizeof(raw));
  reinterpret_cast<uint4*>(row)[i] = raw;
}

// dst[0..D) = float(row[0..D)).
template <typename scalar_t, int D>
__device__ __forceinline__ void load_row(const scalar_t* __restrict__ row, float (&dst)[D]) {
#pragma unroll
  for (int i = 0; i < D / kVec<scalar_t>; ++i) {
    const Vec<scalar_t> v = load_vec(row, i);
    const scalar_t* e = v.e;
#pragma unroll
    for (int j = 0; j < kVec<scalar_t>; ++j) dst[i * kVec<scalar_t> + j] = static_cast<float>(e[j]);
  }
}

template <typename scalar_t, int D>
__device__ __forceinline__ float dot_row(const float (&a)[D], const scalar_t* __restrict__ row) {
  float s0 = 0.f, s1 = 0.f;
#pragma unroll
  for (int i = 0; i < D / kVec<scalar_t>; ++i) {
    const Vec<scalar_t> v = load_vec(row, i);
    const scalar_t* e = v.e;
#pragma unroll
    for (int j = 0; j < kVec<scalar_t>; j += 2) {
      s0 = fmaf(a[i * kVec<scalar_t> + j], static_cast<float>(e[j]), s0);
      s1 = fmaf(a[i * kVec<scalar_t> + j + 1], static_cast<float>(e[j + 1]), s1);
    }
  }
  return s0 + s1;
}

template <typename scalar_t, int D>
__device__ __forceinline__ float dot_rows(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b) {
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < D / kVec<scalar_t>; ++i) {
    const Vec<scalar_t> va = load_vec(a, i), vb = load_vec(b, i);
    const scalar_t* ea = va.e;
    const scalar_t* eb = vb.e;
#pragma unroll
    for (int j = 0; j < kVec<scalar_t>; ++j) s = fmaf(static_cast<float>(ea[j]), static_cast<float>(eb[j]), s);
  }
  return s;
}

// acc[0..D) += w * float(row[0..D)).
template <typename scalar_t, int D>
__device__ __forceinline__ void axpy_row(float (&acc)[D], float w, const scalar_t* __restrict__ row) {
#pragma unroll
  for (int i = 0; i < D / kVec<scalar_t>; ++i) {
    const Vec<scalar_t> v = load_vec(row, i);
    const scalar_t* e = v.e;
#pragma unroll
    for (int j = 0; j < kVec<scalar_t>; ++j) acc[i * kVec<scalar_t> + j] = fmaf(w, static_cast<float>(e[j]),
                                                                             acc[i * kVec<scalar_t> + j]);
  }
}

template <typename scalar_t, int D>
__device__ __forceinline__ void store_row(scalar_t* __restrict__ row, const float (&src)[D], float factor) {
#pragma unroll
  for (int i = 0; i < D / kVec<scalar_t>; ++i) {
    Vec<scalar_t> v;
#pragma unroll
    for (int j = 0; j < kVec<scalar_t>; ++j) v.e[j] = static_cast<scalar_t>(src[i * kVec<scalar_t> + j] * factor);
    store_vec(row, i, v);
  }
}

__device__ __forceinline__ int64_t key_row(const WindowSet& ws, const Problem& P, int b, int h, int j) {
  return ((static_cast<int64_t>(ws.batch == 1 ? 0 : b) * P.heads + h) * ws.num_keys() + j) * P.dim;
}

__device__ __forceinline__ int64_t global_row(const Problem& P, int b, int h, int t) {
  return ((static_cast<int64_t>(P.global_batch == 1 ? 0 : b) * P.heads + h) * P.num_global + t) * P.dim;
}

__device__ __forceinline__ bool global_is_real(const Problem& P, const bool* mask, int b, int t) {
  return mask == nullptr || mask[static_cast<int64_t>(P.mask_batch == 1 ? 0 : b) * P.num_global + t];
}

// Calls f(key_row, value_row) for every key of query (b, h, y, x), in the order of the CPU implementation.
// The sets are visited with constant indices so that the Problem stays in parameter space (no local copy).
template <typename scalar_t, typename F>
__device__ __forceinline__ void for_each_key(const Problem& P, const Rows<scalar_t>& in, int b, int h, int y, int x,
                                             F&& f) {
  auto visit_set = [&](const WindowSet& ws, const scalar_t* k, const scalar_t* v) {
#pragma unroll 1
    for (int p = 0; p < ws.slots; ++p) {
      const int j = ws.key_of(y, x, p);
      if (j >= 0) {
        const int64_t r = key_row(ws, P, b, h, j);
        f(k + r, v + r);
      }
    }
  };
  visit_set(P.sets[0], in.k[0], in.v[0]);
  if (P.num_sets > 1) visit_set(P.sets[1], in.k[1], in.v[1]);
#pragma unroll 1
  for (int t = 0; t < P.num_global; ++t) {
    if (global_is_real(P, in.mask, b, t)) {
      const int64_t r = global_row(P, b, h, t);
      f(in.gk + r, in.gv + r);
    }
  }
}

// Query cell of this thread: blockIdx.x = 2-D tile of the query grid, blockIdx.y = batch * heads.
__device__ __forceinline__ bool tile_cell(int rows, int cols, int& y, int& x) {
  const int tiles_x = (cols + kTileCols - 1) / kTileCols;
  y = (blockIdx.x / tiles_x) * kTileRows + threadIdx.x / kTileCols;
  x = (blockIdx.x % tiles_x) * kTileCols + threadIdx.x % kTileCols;
  return y < rows && x < cols;
}

template <typename scalar_t, int D>
__global__ void __launch_bounds__(kThreads) forward_kernel(const Problem P, const Rows<scalar_t> in,
                                                           scalar_t* __restrict__ out, float* __restrict__ lse) {
  int y, x;
  if (!tile_cell(P.qrows, P.qcols, y, x)) return;
  const int bh = blockIdx.y, b = bh / P.heads, h = bh % P.heads;
  const int64_t i = static_cast<int64_t>(bh) * P.queries + y * P.qcols + x;
  float q[D], acc[D];
  load_row<scalar_t, D>(in.qs + i * D, q);
#pragma unroll
  for (int d = 0; d < D; ++d) acc[d] = 0.f;
  float m = -INFINITY, l = 0.f;
  for_each_key(P, in, b, h, y, x, [&](const scalar_t* kr, const scalar_t* vr) {
    const float s = dot_row<scalar_t, D>(q, kr);
    if (s > m) {  // new running max: rescale what was accumulated so far
      const float c = expf(m - s);
      l *= c;
#pragma unroll
      for (int d = 0; d < D; ++d) acc[d] *= c;
      m = s;
    }
    const float e = expf(s - m);
    l += e;
    axpy_row<scalar_t, D>(acc, e, vr);
  });
  store_row<scalar_t, D>(out + i * D, acc, 1.f / l);
  lse[i] = m + logf(l);
}

template <typename scalar_t, int D>
__global__ void __launch_bounds__(kThreads)
    backward_dq_kernel(const Problem P, const Rows<scalar_t> in, const scalar_t* __restrict__ dout,
                       const float* __restrict__ lse, const float* __restrict__ delta, scalar_t* __restrict__ dq) {
  int y, x;
  if (!tile_cell(P.qrows, P.qcols, y, x)) return;
  const int bh = blockIdx.y, b = bh / P.heads, h = bh % P.heads;
  const int64_t i = static_cast<int64_t>(bh) * P.queries + y * P.qcols + x;
  float q[D], acc[D];
  load_row<scalar_t, D>(in.qs + i * D, q);
#pragma unroll
  for (int d = 0; d < D; ++d) acc[d] = 0.f;
  const float lse_i = lse[i], delta_i = delta[i];
  const scalar_t* do_i = dout + i * D;
  for_each_key(P, in, b, h, y, x, [&](const scalar_t* kr, const scalar_t* vr) {
    const float p = expf(dot_row<scalar_t, D>(q, kr) - lse_i);
    const float ds = p * (dot_rows<scalar_t, D>(do_i, vr) - delta_i);
    axpy_row<scalar_t, D>(acc, ds, kr);
  });
  store_row<scalar_t, D>(dq + i * D, acc, P.scale);
}

// dk, dv of one windowed set: one thread per key cell gathers the queries whose window holds it (no atomics).
// blockIdx.x = 2-D tile of the key grid, blockIdx.y = key batch * heads.
template <typename scalar_t, int D>
__global__ void __launch_bounds__(kThreads)
    backward_dkv_kernel(const Problem P, const WindowSet ws, const scalar_t* __restrict__ qs,
                        const scalar_t* __restrict__ keys, const scalar_t* __restrict__ values,
                        const scalar_t* __restrict__ dout, const float* __restrict__ lse,
                        const float* __restrict__ delta, scalar_t* __restrict__ dk, scalar_t* __restrict__ dv) {
  int ky, kx;
  if (!tile_cell(ws.rows, ws.cols, ky, kx)) return;
  const int bkh = blockIdx.y, bk = bkh / P.heads, h = bkh % P.heads;
  const int j = ky * ws.cols + kx;
  const int64_t r = (static_cast<int64_t>(bkh) * ws.num_keys() + j) * D;
  const scalar_t* kr = keys + r;
  const scalar_t* vr = values + r;
  float dk_acc[D], dv_acc[D];  // the key row itself is re-read from L1 (keeps the accumulators spill-free)
#pragma unroll
  for (int d = 0; d < D; ++d) dk_acc[d] = dv_acc[d] = 0.f;
  const int b_begin = ws.batch == 1 ? 0 : bk, b_end = ws.batch == 1 ? P.batch : bk + 1;
#pragma unroll 1
  for (int p = 0; p < ws.slots; ++p) {
    const int cy = ky - (p / ws.kw - ws.rh), cx = kx - (p % ws.kw - ws.rw);
    if (cy < 0 || cy >= ws.rows || cx < 0 || cx >= ws.cols) continue;
#pragma unroll 1
    for (int y = cy * ws.ah; y < (cy + 1) * ws.ah; ++y) {
#pragma unroll 1
      for (int x = cx * ws.aw; x < (cx + 1) * ws.aw; ++x) {
#pragma unroll 1
        for (int b = b_begin; b < b_end; ++b) {
          const int64_t i = (static_cast<int64_t>(b) * P.heads + h) * P.queries + y * P.qcols + x;
          const scalar_t* q_i = qs + i * D;
          const scalar_t* do_i = dout + i * D;
          const float prob = expf(dot_rows<scalar_t, D>(kr, q_i) - lse[i]);
          const float ds = prob * (dot_rows<scalar_t, D>(do_i, vr) - delta[i]);
          axpy_row<scalar_t, D>(dv_acc, prob, do_i);
          axpy_row<scalar_t, D>(dk_acc, ds, q_i);
        }
      }
    }
  }
  store_row<scalar_t, D>(dk + r, dk_acc, 1.f);
  store_row<scalar_t, D>(dv + r, dv_acc, 1.f);
}

// Global keys: one block per key (blockIdx.x = t, blockIdx.y = global batch * heads); the threads stride over
// the queries and reduce with warp shuffles, then one atomicAdd per warp and element into float32 buffers.
template <typename scalar_t, int D>
__global__ void __launch_bounds__(kGlobalThreads)
    backward_global_kernel(const Problem P, const Rows<scalar_t> in, const scalar_t* __restrict__ dout,
                           const float* __restrict__ lse, const float* __restrict__ delta, float* __restrict__ dgk,
                           float* __restrict__ dgv) {
  const int t = blockIdx.x, bgh = blockIdx.y, bg = bgh / P.heads, h = bgh % P.heads;
  const int64_t r = (static_cast<int64_t>(bgh) * P.num_global + t) * D;
  float dk_acc[D], dv_acc[D];
#pragma unroll
  for (int d = 0; d < D; ++d) dk_acc[d] = dv_acc[d] = 0.f;
  const int b_begin = P.global_batch == 1 ? 0 : bg, b_end = P.global_batch == 1 ? P.batch : bg + 1;
  const int64_t pairs = static_cast<int64_t>(b_end - b_begin) * P.queries;
#pragma unroll 1
  for (int64_t e = threadIdx.x; e < pairs; e += blockDim.x) {
    const int b = b_begin + static_cast<int>(e / P.queries), n = static_cast<int>(e % P.queries);
    if (!global_is_real(P, in.mask, b, t)) continue;
    const int64_t i = (static_cast<int64_t>(b) * P.heads + h) * P.queries + n;
    const scalar_t* q_i = in.qs + i * D;
    const scalar_t* do_i = dout + i * D;
    const float prob = expf(dot_rows<scalar_t, D>(in.gk + r, q_i) - lse[i]);
    const float ds = prob * (dot_rows<scalar_t, D>(do_i, in.gv + r) - delta[i]);
    axpy_row<scalar_t, D>(dv_acc, prob, do_i);
    axpy_row<scalar_t, D>(dk_acc, ds, q_i);
  }
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    float a = dk_acc[d], c = dv_acc[d];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      a += __shfl_xor_sync(0xffffffffu, a, offset);
      c += __shfl_xor_sync(0xffffffffu, c, offset);
    }
    if (lane == 0) {
      atomicAdd(dgk + r + d, a);
      atomicAdd(dgv + r + d, c);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------------------------

bool aligned16(const at::Tensor& t) { return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0; }

// Contiguous and 16-byte aligned (the vector loads need it; a contiguous view at an odd offset is copied).
at::Tensor prepared(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return aligned16(c) ? c : c.clone();
}

std::optional<at::Tensor> prepared(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(prepared(*t)) : std::nullopt;
}

// Head dim 64 only (CogView2's). At 128 every kernel spilled registers (dk/dv and global: 2.5-3.5 KB of local
// memory per thread in ptxas -v), so 128 is left out until it is tuned; `supports()` sends it to another backend.
void check_cuda(const at::Tensor& q, const Problem& P) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor");
  TORCH_CHECK(P.dim == 64, "the CUDA kernel supports head dim 64, got ", P.dim);
  TORCH_CHECK(static_cast<int64_t>(P.batch) * P.heads <= 65535, "batch * heads must be <= 65535");
}

template <typename scalar_t>
Rows<scalar_t> rows_of(const at::Tensor& qs, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& ck, const std::optional<at::Tensor>& cv,
                       const std::optional<at::Tensor>& gk, const std::optional<at::Tensor>& gv,
                       const std::optional<at::Tensor>& mask) {
  Rows<scalar_t> in{};
  in.qs = qs.data_ptr<scalar_t>();
  in.k[0] = k.data_ptr<scalar_t>();
  in.v[0] = v.data_ptr<scalar_t>();
  in.k[1] = ck.has_value() ? ck->data_ptr<scalar_t>() : nullptr;
  in.v[1] = cv.has_value() ? cv->data_ptr<scalar_t>() : nullptr;
  in.gk = gk.has_value() ? gk->data_ptr<scalar_t>() : nullptr;
  in.gv = gv.has_value() ? gv->data_ptr<scalar_t>() : nullptr;
  in.mask = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  return in;
}

int tiles(int rows, int cols) {
  return ((rows + kTileRows - 1) / kTileRows) * ((cols + kTileCols - 1) / kTileCols);
}

template <typename F>
void dispatch(at::ScalarType dtype, int dim, F&& f) {
  auto by_dim = [&](auto tag) {
    using scalar_t = decltype(tag);
    switch (dim) {
      case 64: f(scalar_t{}, std::integral_constant<int, 64>{}); break;
      default: TORCH_CHECK(false, "unsupported head dim ", dim);
    }
  };
  switch (dtype) {
    case at::kFloat: by_dim(float{}); break;
    case at::kHalf: by_dim(c10::Half{}); break;
    case at::kBFloat16: by_dim(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "the CUDA kernel supports float32, float16 and bfloat16");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const std::optional<at::Tensor>& cross_k,
                                                const std::optional<at::Tensor>& cross_v,
                                                const std::optional<at::Tensor>& global_k,
                                                const std::optional<at::Tensor>& global_v,
                                                const std::optional<at::Tensor>& global_mask,
                                                at::IntArrayRef geometry, double scale) {
  const Problem P = make_problem(q, k, v, cross_k, cross_v, global_k, global_v, global_mask, geometry, scale);
  check_cuda(q, P);
  if (P.batch == 0 || P.heads == 0) {  // a grid with a zero dimension is an invalid launch: nothing to compute
    return {at::empty_like(q), at::empty({P.batch, P.heads, P.queries}, q.options().dtype(at::kFloat))};
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qs = prepared(q * scale);  // rounded to the input dtype, like the reference
  const at::Tensor kc = prepared(k), vc = prepared(v);
  const auto ck = prepared(cross_k), cv = prepared(cross_v), gk = prepared(global_k), gv = prepared(global_v);
  at::Tensor out = at::empty_like(qs);
  at::Tensor lse = at::empty({P.batch, P.heads, P.queries}, q.options().dtype(at::kFloat));
  const dim3 grid(tiles(P.qrows, P.qcols), P.batch * P.heads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(q.scalar_type(), P.dim, [&](auto tag, auto dim) {
    using scalar_t = decltype(tag);
    constexpr int D = decltype(dim)::value;
    const Rows<scalar_t> in = rows_of<scalar_t>(qs, kc, vc, ck, cv, gk, gv, global_mask);
    forward_kernel<scalar_t, D><<<grid, kThreads, 0, stream>>>(P, in, out.data_ptr<scalar_t>(),
                                                                lse.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

Grads backward_cuda(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& cross_k, const std::optional<at::Tensor>& cross_v,
                    const std::optional<at::Tensor>& global_k, const std::optional<at::Tensor>& global_v,
                    const std::optional<at::Tensor>& global_mask, const at::Tensor& out, const at::Tensor& lse,
                    at::IntArrayRef geometry, double scale) {
  const Problem P = make_problem(q, k, v, cross_k, cross_v, global_k, global_v, global_mask, geometry, scale);
  check_cuda(q, P);
  check_backward_inputs(P, q, grad_out, out, lse);  // also: grad_out, out and lse are CUDA tensors like q
  if (P.batch == 0 || P.heads == 0) {
    auto empty = [&](const std::optional<at::Tensor>& t) {
      return t.has_value() ? at::zeros_like(*t) : at::empty({0}, q.options());
    };
    return {at::zeros_like(q), at::zeros_like(k), at::zeros_like(v), empty(cross_k), empty(cross_v),
            empty(global_k), empty(global_v)};
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qs = prepared(q * scale);
  const at::Tensor dout = prepared(grad_out.to(q.scalar_type()));
  const at::Tensor delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();  // rowsum(dO * O)
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor kc = prepared(k), vc = prepared(v);
  const auto ck = prepared(cross_k), cv = prepared(cross_v), gk = prepared(global_k), gv = prepared(global_v);
  at::Tensor dq = at::empty_like(qs);
  at::Tensor dk = at::empty_like(kc), dv = at::empty_like(vc);
  at::Tensor dck = ck.has_value() ? at::empty_like(*ck) : at::empty({0}, q.options());
  at::Tensor dcv = cv.has_value() ? at::empty_like(*cv) : at::empty({0}, q.options());
  at::Tensor dgk32, dgv32;
  if (gk.has_value()) {
    dgk32 = at::zeros(gk->sizes(), q.options().dtype(at::kFloat));
    dgv32 = at::zeros(gk->sizes(), q.options().dtype(at::kFloat));
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(q.scalar_type(), P.dim, [&](auto tag, auto dim) {
    using scalar_t = decltype(tag);
    constexpr int D = decltype(dim)::value;
    const Rows<scalar_t> in = rows_of<scalar_t>(qs, kc, vc, ck, cv, gk, gv, global_mask);
    const scalar_t* do_p = dout.data_ptr<scalar_t>();
    const float* lse_p = lse_c.data_ptr<float>();
    const float* delta_p = delta.data_ptr<float>();
    backward_dq_kernel<scalar_t, D><<<dim3(tiles(P.qrows, P.qcols), P.batch * P.heads), kThreads, 0, stream>>>(
        P, in, do_p, lse_p, delta_p, dq.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (int s = 0; s < P.num_sets; ++s) {
      const WindowSet& ws = P.sets[s];
      at::Tensor& dks = s == 0 ? dk : dck;
      at::Tensor& dvs = s == 0 ? dv : dcv;
      backward_dkv_kernel<scalar_t, D><<<dim3(tiles(ws.rows, ws.cols), ws.batch * P.heads), kThreads, 0, stream>>>(
          P, ws, in.qs, in.k[s], in.v[s], do_p, lse_p, delta_p, dks.data_ptr<scalar_t>(), dvs.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (P.num_global > 0) {
      backward_global_kernel<scalar_t, D><<<dim3(P.num_global, P.global_batch * P.heads), kGlobalThreads, 0,
                                            stream>>>(P, in, do_p, lse_p, delta_p, dgk32.data_ptr<float>(),
                                                      dgv32.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  at::Tensor dgk = P.num_global > 0 ? dgk32.to(q.scalar_type()) : at::empty({0}, q.options());
  at::Tensor dgv = P.num_global > 0 ? dgv32.to(q.scalar_type()) : at::empty({0}, q.options());
  return {dq, dk, dv, dck, dcv, dgk, dgv};
}

}  // namespace cogview2_local_attention
