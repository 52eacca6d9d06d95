// The "cpu" backend: the two ELBO row primitives (contract: RowOps, elbokto_kernels/backends).
//
// row_lse   x [N, V] (fp32 / bf16 / fp16 / fp64, any strides), rows int64 [M] or None,
//           targets int64 [M], softcap, row_max float32 [M] or None
//           -> (lse float32 [M], target_logit float32 [M]); the largest z of each row into
//           row_max when given
// row_grad  ... lse float32 [M], scale float32 [M], out [N, V] with stride(1) == 1:
//           out[rows] = scale * (onehot(target) - exp(z - lse)) * dz/dx in out's dtype.
//
// Parallel over rows; each row is streamed once in blocks of kBlock columns that are converted
// to float32 in an L1-resident buffer, so arithmetic is float32 whatever the dtype and no
// [M, V] temporary exists. Offsets are int64: N * V passes 2^31 at LLaDA shapes.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

namespace {

using fVec = at::vec::Vectorized<float>;

// Columns per block: the float32 input block and gradient block (16 KiB together) stay in L1.
constexpr int64_t kBlock = 2048;
// A finite floor for the running max, so exp(m_old - m_new) never sees (-inf) - (-inf).
constexpr float kMaxFloor = -3.0e38f;
constexpr float kInf = std::numeric_limits<float>::infinity();

// The only dtype-specific code: reading a block as float32 and writing one back. They are picked
// once per call through function pointers, so the row loops are compiled once rather than for
// every (input, output) dtype pair, which keeps the first-use build short.
using LoadFn = const float* (*)(const char* src, int64_t stride, int64_t n, float* buf);
using StoreFn = void (*)(const float* src, int64_t n, char* dst);

// Reads n elements spaced `stride` elements apart as float32: returns `src` itself when it is
// already contiguous float32, else fills and returns `buf`.
template <typename T>
const float* load_block(const char* bytes, int64_t stride, int64_t n, float* buf) {
  const T* src = reinterpret_cast<const T*>(bytes);
  if (stride == 1) {
    if constexpr (std::is_same_v<T, float>) {
      return src;
    } else if constexpr (at::vec::is_reduced_floating_point_v<T>) {
      int64_t i = 0;
      for (; i + fVec::size() <= n; i += fVec::size()) {
        fVec v;
        at::vec::load_to_float(src + i, v);
        v.store(buf + i);
      }
      for (; i < n; ++i) buf[i] = static_cast<float>(src[i]);
      return buf;
    }
  }
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i * stride]);
  return buf;
}

template <typename T>
void store_block(const float* src, int64_t n, char* dst) {
  at::vec::convert(src, reinterpret_cast<T*>(dst), n);
}

LoadFn loader_for(const at::Tensor& t) {
  LoadFn fn = nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "elbo_cpu_load",
                                  [&] { fn = load_block<scalar_t>; });
  return fn;
}

StoreFn storer_for(const at::Tensor& t) {
  StoreFn fn = nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "elbo_cpu_store",
                                  [&] { fn = store_block<scalar_t>; });
  return fn;
}

// One row of x: base address, element stride and size, and its loader.
struct Row {
  const char* base;
  int64_t stride;
  int64_t itemsize;
  LoadFn load;

  const float* block(int64_t v0, int64_t n, float* buf) const {
    return load(base + v0 * stride * itemsize, stride, n, buf);
  }
  float at(int64_t v) const {
    float value;
    return *load(base + v * stride * itemsize, 1, 1, &value);
  }
};

// tanh(u) = 1 - 2 / (exp(2u) + 1): a third of the cost of Sleef's vector tanh, exact limits at
// +-inf (exp saturates, 2 / huge -> 0), and absolute error ~1e-7, which is what cap * tanh needs.
// exp_u20 need not return NaN for NaN, so a NaN is put back.
inline fVec fast_tanh(const fVec& u) {
  const fVec one(1.f), two(2.f);
  return fVec::blendv(one - two / ((u * two).exp_u20() + one), u, u.isnan());
}

struct Softcap {
  bool on;
  float cap;
  float inv;  // 1 / cap: a multiply per element instead of a divide.

  explicit Softcap(std::optional<double> s)
      : on(s.has_value()), cap(on ? static_cast<float>(*s) : 1.f), inv(1.f / cap) {}
  // z and dz/dx at one element, for the target column.
  std::pair<float, float> scalar(float x) const {
    if (!on) return {x, 1.f};
    const float th = std::tanh(x * inv);
    return {cap * th, 1.f - th * th};
  }
};

// z = cap * tanh(x / cap) for n elements into buf (x may be buf).
void softcap_block(const float* x, int64_t n, const Softcap& sc, float* buf) {
  const fVec cap(sc.cap), inv(sc.inv);
  for (int64_t i = 0; i < n; i += fVec::size()) {
    const int64_t k = std::min<int64_t>(fVec::size(), n - i);
    (fast_tanh(fVec::loadu(x + i, k) * inv) * cap).store(buf + i, k);
  }
}

// The first k lanes of z + i; the other lanes -inf so that they add exp(-inf) = 0.
inline fVec load_or_neg_inf(const float* z, int64_t i, int64_t n) {
  const int64_t k = std::min<int64_t>(fVec::size(), n - i);
  return k == fVec::size() ? fVec::loadu(z + i) : fVec::set(fVec(-kInf), fVec::loadu(z + i, k), k);
}

// NaN-propagating: a row holding a NaN gets a NaN max, hence a NaN lse (exp_u20 need not return
// NaN for NaN, so the sum cannot be relied on to carry it).
const auto vmax = [](const fVec& a, const fVec& b) { return at::vec::maximum(a, b); };
const auto vadd = [](const fVec& a, const fVec& b) { return a + b; };

// acc = step(acc, v) over the vectors of z[0, n), in four independent accumulators joined by
// merge: one accumulator would wait on the latency of step at every vector.
template <typename Step, typename Merge>
fVec fold(const float* z, int64_t n, const fVec& init, Step step, Merge merge) {
  constexpr int64_t W = fVec::size();
  fVec a0 = init, a1 = init, a2 = init, a3 = init;
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    a0 = step(a0, fVec::loadu(z + i));
    a1 = step(a1, fVec::loadu(z + i + W));
    a2 = step(a2, fVec::loadu(z + i + 2 * W));
    a3 = step(a3, fVec::loadu(z + i + 3 * W));
  }
  for (; i < n; i += W) a0 = step(a0, load_or_neg_inf(z, i, n));
  return merge(merge(a0, a1), merge(a2, a3));
}

// Online log-sum-exp of one row with a running max and sum per vector lane, merged at the end.
// Per block: the block max (one cheap pass over L1), one rescale of the running sum, then one exp
// per element. The block's sum is formed apart before it joins the running sum, so rounding grows
// with the block and row lengths in blocks rather than with V. Returns (row max, lse).
std::pair<float, float> row_lse_one(const Row& row, int64_t vocab, const Softcap& sc, float* buf) {
  fVec m(kMaxFloor), s(0.f);
  for (int64_t v0 = 0; v0 < vocab; v0 += kBlock) {
    const int64_t n = std::min(kBlock, vocab - v0);
    const float* z = row.block(v0, n, buf);
    if (sc.on) {
      softcap_block(z, n, sc, buf);
      z = buf;
    }
    const fVec m_new = fold(z, n, m, vmax, vmax);
    const auto add_exp = [&](const fVec& acc, const fVec& v) {
      return acc + (v - m_new).exp_u20();
    };
    const fVec block_sum = fold(z, n, fVec(0.f), add_exp, vadd);
    s = s * (m - m_new).exp_u20() + block_sum;
    m = m_new;
  }
  const float m_row = at::vec::vec_reduce_all<float>(vmax, m);
  // As torch.logsumexp: NaN for a row holding a NaN, +inf for one holding +inf.
  if (std::isnan(m_row) || m_row == kInf) return {m_row, m_row};
  const float s_row = at::vec::vec_reduce_all<float>(vadd, (m - fVec(m_row)).exp_u20() * s);
  return {m_row, m_row + std::log(s_row)};
}

// g = -scale * exp(z - lse) * dz/dx for n elements (the true-class term is added by the caller).
template <bool kSoftcap>
void grad_block(const float* x, int64_t n, float lse, float scale, const Softcap& sc, float* g) {
  const fVec vlse(lse), neg_scale(-scale), cap(sc.cap), inv(sc.inv), one(1.f);
  for (int64_t i = 0; i < n; i += fVec::size()) {
    const int64_t k = std::min<int64_t>(fVec::size(), n - i);
    const fVec xv = fVec::loadu(x + i, k);
    if constexpr (kSoftcap) {
      const fVec th = fast_tanh(xv * inv);
      ((th * cap - vlse).exp_u20() * neg_scale * (one - th * th)).store(g + i, k);
    } else {
      ((xv - vlse).exp_u20() * neg_scale).store(g + i, k);
    }
  }
}

struct RowIds {
  const int64_t* rows;  // nullptr: row i is x's row i.
  int64_t operator()(int64_t i) const { return rows ? rows[i] : i; }
};

// Checks shared by both primitives; returns the row-id map.
RowIds check_rows(const at::Tensor& x, const std::optional<at::Tensor>& rows,
                  const at::Tensor& targets, at::Tensor& rows_storage) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && at::isFloatingType(x.scalar_type()),
              "x must be a floating [N, V] CPU tensor, got ", x.scalar_type(), " ", x.sizes(),
              " on ", x.device());
  TORCH_CHECK(targets.dim() == 1 && targets.scalar_type() == at::kLong && targets.is_contiguous(),
              "targets must be contiguous int64 [M], got ", targets.scalar_type(), " ",
              targets.sizes());
  const int64_t num_rows = targets.size(0), n = x.size(0);
  if (!rows.has_value()) {
    TORCH_CHECK(num_rows == n, "without rows, targets must have one entry per row of x (", n,
                "), got ", num_rows);
    return {nullptr};
  }
  rows_storage = rows->contiguous();
  TORCH_CHECK(rows_storage.dim() == 1 && rows_storage.scalar_type() == at::kLong &&
                  rows_storage.size(0) == num_rows,
              "rows must be int64 [M = ", num_rows, "], got ", rows_storage.scalar_type(), " ",
              rows_storage.sizes());
  const int64_t* ids = rows_storage.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < num_rows; ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < n, "rows[", i, "] = ", ids[i], " is outside [0, ", n, ")");
  }
  return {ids};
}

void check_row_vector(const at::Tensor& t, const char* name, int64_t num_rows) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == num_rows && t.scalar_type() == at::kFloat &&
                  t.is_contiguous(),
              name, " must be contiguous float32 [M = ", num_rows, "], got ", t.scalar_type(), " ",
              t.sizes());
}

Row row_of(const at::Tensor& x, int64_t r, LoadFn load) {
  const int64_t itemsize = x.element_size();
  return {static_cast<const char*>(x.const_data_ptr()) + r * x.stride(0) * itemsize, x.stride(1),
          itemsize, load};
}

// Rows per task: enough columns that a task outweighs its scheduling.
int64_t grain(int64_t vocab) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(vocab, 1));
}

std::tuple<at::Tensor, at::Tensor> row_lse(const at::Tensor& x,
                                           const std::optional<at::Tensor>& rows,
                                           const at::Tensor& targets,
                                           std::optional<double> softcap,
                                           const std::optional<at::Tensor>& row_max) {
  at::Tensor rows_storage;
  const RowIds ids = check_rows(x, rows, targets, rows_storage);
  const int64_t num_rows = targets.size(0), vocab = x.size(1);
  if (row_max.has_value()) check_row_vector(*row_max, "row_max", num_rows);
  float* max_out = row_max.has_value() ? row_max->mutable_data_ptr<float>() : nullptr;
  const Softcap sc(softcap);
  const LoadFn load = loader_for(x);
  auto lse = at::empty({num_rows}, x.options().dtype(at::kFloat));
  auto target_logit = at::empty({num_rows}, x.options().dtype(at::kFloat));
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  float* lse_out = lse.mutable_data_ptr<float>();
  float* tl_out = target_logit.mutable_data_ptr<float>();
  at::parallel_for(0, num_rows, grain(vocab), [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kBlock];
    for (int64_t i = begin; i < end; ++i) {
      const Row row = row_of(x, ids(i), load);
      const auto [m_row, lse_row] = row_lse_one(row, vocab, sc, buf);
      lse_out[i] = lse_row;
      if (max_out) max_out[i] = m_row;
      // A target outside [0, V) lies in another vocabulary chunk: it contributes 0 here.
      const int64_t t = tgt[i];
      tl_out[i] = (t >= 0 && t < vocab) ? sc.scalar(row.at(t)).first : 0.f;
    }
  });
  return {lse, target_logit};
}

void row_grad(const at::Tensor& x, const std::optional<at::Tensor>& rows,
              const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& scale,
              std::optional<double> softcap, at::Tensor& out) {
  at::Tensor rows_storage;
  const RowIds ids = check_rows(x, rows, targets, rows_storage);
  const int64_t num_rows = targets.size(0), vocab = x.size(1);
  check_row_vector(lse, "lse", num_rows);
  check_row_vector(scale, "scale", num_rows);
  TORCH_CHECK(out.device().is_cpu() && out.sizes() == x.sizes() &&
                  at::isFloatingType(out.scalar_type()) && (out.stride(1) == 1 || vocab <= 1),
              "out must be a floating CPU tensor of x's shape ", x.sizes(),
              " with contiguous rows, got ", out.scalar_type(), " ", out.sizes(), " strides ",
              out.strides());
  const Softcap sc(softcap);
  const LoadFn load = loader_for(x);
  const StoreFn store = storer_for(out);
  const bool out_f32 = out.scalar_type() == at::kFloat;
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  const float* lse_in = lse.const_data_ptr<float>();
  const float* scale_in = scale.const_data_ptr<float>();
  char* out_base = static_cast<char*>(out.mutable_data_ptr());
  const int64_t out_item = out.element_size(), out_row_bytes = out.stride(0) * out_item;
  at::parallel_for(0, num_rows, grain(vocab), [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kBlock];
    alignas(64) float g_buf[kBlock];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = ids(i), t = tgt[i];
      const Row row = row_of(x, r, load);
      char* out_row = out_base + r * out_row_bytes;
      const bool inside = t >= 0 && t < vocab;
      // The true-class gradient scale * (1 - p) * dz/dx is computed in float32 and stored once
      // at the end, so (1 - p) keeps its digits in a half-precision out. x[t] is read first: out
      // may be x itself.
      float g_target = 0.f;
      if (inside) {
        const auto [z, dz] = sc.scalar(row.at(t));
        g_target = scale_in[i] * (1.f - std::exp(z - lse_in[i])) * dz;
      }
      for (int64_t v0 = 0; v0 < vocab; v0 += kBlock) {
        const int64_t n = std::min(kBlock, vocab - v0);
        const float* xb = row.block(v0, n, buf);
        // A float32 out takes the gradient directly. In place (out is x) each vector is read
        // before it is written.
        float* g = out_f32 ? reinterpret_cast<float*>(out_row) + v0 : g_buf;
        if (!std::isfinite(lse_in[i])) {
          // A NaN, +inf or all -inf row: std::exp gives NaN where the oracle has it (NaN - lse,
          // inf - inf, -inf + inf), which exp_u20 need not.
          for (int64_t j = 0; j < n; ++j) {
            const auto [z, dz] = sc.scalar(xb[j]);
            g[j] = -scale_in[i] * std::exp(z - lse_in[i]) * dz;
          }
        } else if (sc.on) {
          grad_block<true>(xb, n, lse_in[i], scale_in[i], sc, g);
        } else {
          grad_block<false>(xb, n, lse_in[i], scale_in[i], sc, g);
        }
        if (!out_f32) store(g, n, out_row + v0 * out_item);
      }
      if (inside) store(&g_target, 1, out_row + t * out_item);
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("row_lse", &row_lse, "(lse, target_logit) float32 [M] of rows of x; row maxima into row_max",
        py::arg("x"), py::arg("rows"), py::arg("targets"), py::arg("softcap"),
        py::arg("row_max"), py::call_guard<py::gil_scoped_release>());
  m.def("row_grad", &row_grad, "writes the logit gradient of rows of x into out",
        py::arg("x"), py::arg("rows"), py::arg("targets"), py::arg("lse"), py::arg("scale"),
        py::arg("softcap"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
}
