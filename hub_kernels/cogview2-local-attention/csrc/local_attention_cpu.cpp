// CPU implementation (ATen parallel_for over queries / keys). Inputs are converted to float32 once, so the
// inner loops are plain float loops for every input dtype; outputs are cast back to the input dtype.
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "local_attention.h"

namespace cogview2_local_attention {

namespace {

void check_keys(const at::Tensor& q, const at::Tensor& t, const char* name, int64_t tokens) {
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D [batch, heads, tokens, head_dim], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " must have the dtype of q");
  TORCH_CHECK(t.device() == q.device(), name, " must be on the device of q");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.size(0) == 1 || t.size(0) == q.size(0), name, " batch must be 1 or the query batch");
  TORCH_CHECK(t.size(1) == q.size(1) && t.size(3) == q.size(3), name, " heads/head_dim must match q");
  TORCH_CHECK(t.size(2) == tokens, name, " has ", t.size(2), " tokens, expected ", tokens);
}

WindowSet make_set(int qrows, int qcols, int rows, int cols, int kh, int kw, bool causal, int batch) {
  TORCH_CHECK(rows > 0 && cols > 0 && qrows % rows == 0 && qcols % cols == 0,
              "the query grid must be an integer multiple of the key grid");
  TORCH_CHECK(kh > 0 && kw > 0 && kh % 2 == 1 && kw % 2 == 1, "window sizes must be odd");
  WindowSet ws;
  ws.rows = rows;
  ws.cols = cols;
  ws.ah = qrows / rows;
  ws.aw = qcols / cols;
  ws.rh = kh / 2;
  ws.rw = kw / 2;
  ws.kw = kw;
  ws.slots = causal ? kh * kw / 2 + 1 : kh * kw;
  ws.batch = batch;
  return ws;
}

inline float dot(const float* a, const float* b, int d) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int i = 0;
  for (; i + 8 <= d; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float* y, float a, const float* x, int d) {
  for (int i = 0; i < d; ++i) y[i] += a * x[i];
}

// Float32 copies of the inputs and the row addressing shared by forward and backward.
struct Inputs {
  const Problem& P;
  const float* qs;  // scaled query, rounded to the input dtype first (the official order)
  const float* k[2] = {nullptr, nullptr};
  const float* v[2] = {nullptr, nullptr};
  const float* gk = nullptr;
  const float* gv = nullptr;
  const bool* mask = nullptr;

  int64_t row(const WindowSet& ws, int b, int h, int j) const {
    return ((static_cast<int64_t>(ws.batch == 1 ? 0 : b) * P.heads + h) * ws.num_keys() + j) * P.dim;
  }
  int64_t global_row(int b, int h, int t) const {
    return ((static_cast<int64_t>(P.global_batch == 1 ? 0 : b) * P.heads + h) * P.num_global + t) * P.dim;
  }
  bool global_is_real(int b, int t) const {
    return mask == nullptr || mask[static_cast<int64_t>(P.mask_batch == 1 ? 0 : b) * P.num_global + t];
  }

  // Calls f(key_row, value_row) for every key query (b, h, y, x) attends to, in a fixed order.
  template <typename F>
  void for_each_key(int b, int h, int y, int x, F&& f) const {
    for (int s = 0; s < P.num_sets; ++s) {
      const WindowSet& ws = P.sets[s];
      for (int p = 0; p < ws.slots; ++p) {
        const int j = ws.key_of(y, x, p);
        if (j >= 0) f(k[s] + row(ws, b, h, j), v[s] + row(ws, b, h, j));
      }
    }
    for (int t = 0; t < P.num_global; ++t) {
      if (global_is_real(b, t)) f(gk + global_row(b, h, t), gv + global_row(b, h, t));
    }
  }
};

// Calls f(query cell index) for every query cell whose window (set ws) contains key cell j.
template <typename F>
void for_each_query(const Problem& P, const WindowSet& ws, int j, F&& f) {
  const int ky = j / ws.cols, kx = j % ws.cols;
  for (int p = 0; p < ws.slots; ++p) {
    const int cy = ky - (p / ws.kw - ws.rh), cx = kx - (p % ws.kw - ws.rw);
    if (cy < 0 || cy >= ws.rows || cx < 0 || cx >= ws.cols) continue;
    for (int y = cy * ws.ah; y < (cy + 1) * ws.ah; ++y) {
      for (int x = cx * ws.aw; x < (cx + 1) * ws.aw; ++x) f(y * P.qcols + x);
    }
  }
}

at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

}  // namespace

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& cross_k, const std::optional<at::Tensor>& cross_v,
                     const std::optional<at::Tensor>& global_k, const std::optional<at::Tensor>& global_v,
                     const std::optional<at::Tensor>& global_mask, at::IntArrayRef geometry, double scale) {
  TORCH_CHECK(geometry.size() == 11, "geometry must have 11 entries, got ", geometry.size());
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous(), "q must be a contiguous 4-D tensor [batch, heads, tokens, dim]");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "q must be float32, float16 or bfloat16");
  Problem P;
  P.batch = q.size(0);
  P.heads = q.size(1);
  P.queries = q.size(2);
  P.dim = q.size(3);
  P.qrows = geometry[0];
  P.qcols = geometry[1];
  TORCH_CHECK(P.qrows * P.qcols == P.queries, "q has ", P.queries, " tokens, the grid ", P.qrows * P.qcols);
  P.scale = static_cast<float>(scale);
  check_keys(q, k, "k", geometry[2] * geometry[3]);
  check_keys(q, v, "v", geometry[2] * geometry[3]);
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape");
  P.sets[0] = make_set(P.qrows, P.qcols, geometry[2], geometry[3], geometry[4], geometry[5], geometry[6] != 0,
                       k.size(0));
  P.num_sets = 1;
  TORCH_CHECK(cross_k.has_value() == cross_v.has_value(), "pass both cross_k and cross_v or neither");
  TORCH_CHECK(cross_k.has_value() == (geometry[7] > 0), "cross geometry does not match cross_k");
  if (cross_k.has_value()) {
    check_keys(q, *cross_k, "cross_k", geometry[7] * geometry[8]);
    check_keys(q, *cross_v, "cross_v", geometry[7] * geometry[8]);
    TORCH_CHECK(cross_k->sizes() == cross_v->sizes(), "cross_k and cross_v must have the same shape");
    P.sets[1] = make_set(P.qrows, P.qcols, geometry[7], geometry[8], geometry[9], geometry[10], false,
                         cross_k->size(0));
    P.num_sets = 2;
  }
  TORCH_CHECK(global_k.has_value() == global_v.has_value(), "pass both global_k and global_v or neither");
  if (global_k.has_value()) {
    P.num_global = global_k->size(2);
    check_keys(q, *global_k, "global_k", P.num_global);
    check_keys(q, *global_v, "global_v", P.num_global);
    TORCH_CHECK(global_k->sizes() == global_v->sizes(), "global_k and global_v must have the same shape");
    P.global_batch = global_k->size(0);
    if (global_mask.has_value()) {
      const at::Tensor& m = *global_mask;
      TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(1) == P.num_global && m.is_contiguous(),
                  "global_mask must be a contiguous bool tensor [batch or 1, global tokens]");
      TORCH_CHECK(m.size(0) == 1 || m.size(0) == P.batch, "global_mask batch must be 1 or the query batch");
      TORCH_CHECK(m.device() == q.device(), "global_mask must be on the device of q");
      P.mask_batch = m.size(0);
    }
  } else {
    TORCH_CHECK(!global_mask.has_value(), "global_mask given without global keys");
  }
  return P;
}

void check_backward_inputs(const Problem& P, const at::Tensor& q, const at::Tensor& grad_out, const at::Tensor& out,
                           const at::Tensor& lse) {
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "grad_out and out must have the shape of q ",
              q.sizes(), ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == P.batch && lse.size(1) == P.heads && lse.size(2) == P.queries,
              "lse must have shape [", P.batch, ", ", P.heads, ", ", P.queries, "], got ", lse.sizes());
  TORCH_CHECK(grad_out.device() == q.device(), "grad_out is on ", grad_out.device(), " but q is on ", q.device());
  TORCH_CHECK(out.device() == q.device(), "out is on ", out.device(), " but q is on ", q.device());
  TORCH_CHECK(lse.device() == q.device(), "lse is on ", lse.device(), " but q is on ", q.device());
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const std::optional<at::Tensor>& cross_k,
                                               const std::optional<at::Tensor>& cross_v,
                                               const std::optional<at::Tensor>& global_k,
                                               const std::optional<at::Tensor>& global_v,
                                               const std::optional<at::Tensor>& global_mask,
                                               at::IntArrayRef geometry, double scale) {
  const Problem P = make_problem(q, k, v, cross_k, cross_v, global_k, global_v, global_mask, geometry, scale);
  const at::Tensor qs = as_float(q * scale);  // rounded to the input dtype by the multiplication
  std::vector<at::Tensor> keep = {as_float(k), as_float(v)};
  Inputs in{P, qs.data_ptr<float>()};
  in.k[0] = keep[0].data_ptr<float>();
  in.v[0] = keep[1].data_ptr<float>();
  if (P.num_sets > 1) {
    keep.push_back(as_float(*cross_k));
    keep.push_back(as_float(*cross_v));
    in.k[1] = keep[2].data_ptr<float>();
    in.v[1] = keep[3].data_ptr<float>();
  }
  if (P.num_global > 0) {
    keep.push_back(as_float(*global_k));
    keep.push_back(as_float(*global_v));
    in.gk = keep[keep.size() - 2].data_ptr<float>();
    in.gv = keep.back().data_ptr<float>();
    if (global_mask.has_value()) in.mask = global_mask->data_ptr<bool>();
  }
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({P.batch, P.heads, P.queries}, q.options().dtype(at::kFloat));
  float* out_p = out.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  const int D = P.dim, N = P.queries, H = P.heads, max_keys = P.max_keys();

  at::parallel_for(0, static_cast<int64_t>(P.batch) * H * N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> score(max_keys);
    std::vector<const float*> vrow(max_keys);
    for (int64_t i = begin; i < end; ++i) {
      const int n = i % N, h = (i / N) % H, b = i / (static_cast<int64_t>(N) * H);
      const float* qrow = in.qs + i * D;
      int count = 0;
      in.for_each_key(b, h, n / P.qcols, n % P.qcols, [&](const float* kr, const float* vr) {
        score[count] = dot(qrow, kr, D);
        vrow[count++] = vr;
      });
      float m = -std::numeric_limits<float>::infinity();
      for (int c = 0; c < count; ++c) m = std::max(m, score[c]);
      float* acc = out_p + i * D;
      std::fill(acc, acc + D, 0.f);
      float l = 0.f;
      for (int c = 0; c < count; ++c) {
        const float e = std::exp(score[c] - m);
        l += e;
        axpy(acc, e, vrow[c], D);
      }
      for (int d = 0; d < D; ++d) acc[d] /= l;
      lse_p[i] = m + std::log(l);
    }
  });
  return {out.to(q.scalar_type()), lse};
}

Grads backward_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& cross_k, const std::optional<at::Tensor>& cross_v,
                   const std::optional<at::Tensor>& global_k, const std::optional<at::Tensor>& global_v,
                   const std::optional<at::Tensor>& global_mask, const at::Tensor& out, const at::Tensor& lse,
                   at::IntArrayRef geometry, double scale) {
  const Problem P = make_problem(q, k, v, cross_k, cross_v, global_k, global_v, global_mask, geometry, scale);
  check_backward_inputs(P, q, grad_out, out, lse);
  const at::Tensor qs = as_float(q * scale);
  const at::Tensor dout = as_float(grad_out);
  const at::Tensor delta = (dout * out.to(at::kFloat)).sum(-1).contiguous();  // rowsum(dO * O)
  const at::Tensor lse_c = lse.contiguous();
  std::vector<at::Tensor> keep = {as_float(k), as_float(v)};
  Inputs in{P, qs.data_ptr<float>()};
  in.k[0] = keep[0].data_ptr<float>();
  in.v[0] = keep[1].data_ptr<float>();
  if (P.num_sets > 1) {
    keep.push_back(as_float(*cross_k));
    keep.push_back(as_float(*cross_v));
    in.k[1] = keep[2].data_ptr<float>();
    in.v[1] = keep[3].data_ptr<float>();
  }
  if (P.num_global > 0) {
    keep.push_back(as_float(*global_k));
    keep.push_back(as_float(*global_v));
    in.gk = keep[keep.size() - 2].data_ptr<float>();
    in.gv = keep.back().data_ptr<float>();
    if (global_mask.has_value()) in.mask = global_mask->data_ptr<bool>();
  }
  const float* do_p = dout.data_ptr<float>();
  const float* delta_p = delta.data_ptr<float>();
  const float* lse_p = lse_c.data_ptr<float>();
  const int D = P.dim, N = P.queries, H = P.heads;
  const float fscale = static_cast<float>(scale);

  // Gradient of one (query i, key) pair: returns p and dS = p * (dO.v - delta).
  auto pair = [&](int64_t i, const float* kr, const float* vr, float& p, float& ds) {
    p = std::exp(dot(in.qs + i * D, kr, D) - lse_p[i]);
    ds = p * (dot(do_p + i * D, vr, D) - delta_p[i]);
  };

  // dq: one task per query.
  at::Tensor dq = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  float* dq_p = dq.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(P.batch) * H * N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int n = i % N, h = (i / N) % H, b = i / (static_cast<int64_t>(N) * H);
      float* acc = dq_p + i * D;
      in.for_each_key(b, h, n / P.qcols, n % P.qcols, [&](const float* kr, const float* vr) {
        float p, ds;
        pair(i, kr, vr, p, ds);
        axpy(acc, ds * fscale, kr, D);
      });
    }
  });

  // dk, dv of a windowed set: one task per key cell, gathering the queries whose window holds it (no races).
  auto windowed_grads = [&](int s, const at::Tensor& key) {
    const WindowSet& ws = P.sets[s];
    at::Tensor dk = at::zeros(key.sizes(), key.options().dtype(at::kFloat));
    at::Tensor dv = at::zeros(key.sizes(), key.options().dtype(at::kFloat));
    float* dk_p = dk.data_ptr<float>();
    float* dv_p = dv.data_ptr<float>();
    at::parallel_for(0, static_cast<int64_t>(ws.batch) * H * ws.num_keys(), 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int j = r % ws.num_keys(), h = (r / ws.num_keys()) % H;
        const int bk = r / (static_cast<int64_t>(ws.num_keys()) * H);
        const float* kr = in.k[s] + r * D;
        const float* vr = in.v[s] + r * D;
        const int b_begin = ws.batch == 1 ? 0 : bk, b_end = ws.batch == 1 ? P.batch : bk + 1;
        for_each_query(P, ws, j, [&](int n) {
          for (int b = b_begin; b < b_end; ++b) {
            const int64_t i = (static_cast<int64_t>(b) * H + h) * N + n;
            float p, ds;
            pair(i, kr, vr, p, ds);
            axpy(dv_p + r * D, p, do_p + i * D, D);
            axpy(dk_p + r * D, ds, in.qs + i * D, D);
          }
        });
      }
    });
    return std::make_pair(dk.to(key.scalar_type()), dv.to(key.scalar_type()));
  };
  auto [dk, dv] = windowed_grads(0, k);
  at::Tensor dck = at::empty({0}, q.options()), dcv = at::empty({0}, q.options());
  if (P.num_sets > 1) std::tie(dck, dcv) = windowed_grads(1, *cross_k);

  // Global keys: one task per key, reducing over every query of the batches that share it.
  at::Tensor dgk = at::empty({0}, q.options()), dgv = at::empty({0}, q.options());
  if (P.num_global > 0) {
    at::Tensor gk32 = at::zeros(global_k->sizes(), q.options().dtype(at::kFloat));
    at::Tensor gv32 = at::zeros(global_k->sizes(), q.options().dtype(at::kFloat));
    float* dgk_p = gk32.data_ptr<float>();
    float* dgv_p = gv32.data_ptr<float>();
    at::parallel_for(0, static_cast<int64_t>(P.global_batch) * H * P.num_global, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int t = r % P.num_global, h = (r / P.num_global) % H;
        const int bg = r / (static_cast<int64_t>(P.num_global) * H);
        const int b_begin = P.global_batch == 1 ? 0 : bg, b_end = P.global_batch == 1 ? P.batch : bg + 1;
        for (int b = b_begin; b < b_end; ++b) {
          if (!in.global_is_real(b, t)) continue;
          for (int n = 0; n < N; ++n) {
            const int64_t i = (static_cast<int64_t>(b) * H + h) * N + n;
            float p, ds;
            pair(i, in.gk + r * D, in.gv + r * D, p, ds);
            axpy(dgv_p + r * D, p, do_p + i * D, D);
            axpy(dgk_p + r * D, ds, in.qs + i * D, D);
          }
        }
      }
    });
    dgk = gk32.to(q.scalar_type());
    dgv = gv32.to(q.scalar_type());
  }
  return {dq.to(q.scalar_type()), dk, dv, dck, dcv, dgk, dgv};
}

}  // namespace cogview2_local_attention
