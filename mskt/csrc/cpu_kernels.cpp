// CPU kernels for training and evaluation in float32: multi-head attention with key padding and
// dropout on the weights; dropout and relu-dropout whose masks are never stored; LayerNorm; and,
// built from them, C++ autograd nodes, down to a transformer layer's two sublayers (at the end).
//
// Attention. Why: at this model's head width (d_head = 6 or 12) attention is bound by passes over
// (B*h, T, S) tensors, not by arithmetic. Eager PyTorch writes and reads scores, weights, a
// dropout mask and their gradients as whole tensors; torch's fused CPU kernel has no dropout and
// is slow at such narrow heads. Here each query row is finished in a small buffer: scores,
// softmax, dropout and the weighted sum of values, with nothing of size (T, S) kept. Backward
// recomputes the row's weights from the saved log-sum-exp (as flash attention does) and
// regenerates the dropout mask from the same counter-based hash, so the mask is never stored.
//
// Layouts: q (B, T, d) and kv (B, S, 2d) as the projections give them, heads side by side; each
// task copies its head's keys and values transposed, (D, Sp) with S padded to a multiple of 16, so
// that every inner loop runs over contiguous keys in whole vectors. key_bias (B, S): 0 at real keys and a large negative number at
// padded ones. Row bh * T + t is query t of head bh = b * heads + head.
// The dropout mask: key (seed, row = bh * T + t, key j) is kept when its 32-bit hash is at least
// round(p * 2^32); kept weights are scaled by the exact inverse keep rate.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr uint32_t kGolden = 0x9E3779B9u;

// A 32-bit integer mixer with full avalanche (Wellons' "lowbias32"); vectorises.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

inline uint32_t row_key(int64_t seed, int64_t row) {
  uint32_t lo = static_cast<uint32_t>(seed), hi = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  uint32_t r_lo = static_cast<uint32_t>(row), r_hi = static_cast<uint32_t>(static_cast<uint64_t>(row) >> 32);
  return mix32(lo ^ mix32(r_lo + mix32(hi ^ mix32(r_hi + kGolden))));
}

inline uint32_t key_hash(uint32_t key, int64_t j) {
  return mix32(key + static_cast<uint32_t>(j) * kGolden);
}

// exp(x) for x <= 0 (scores minus their row maximum), as plain arithmetic so loops over it
// vectorise: x = n ln2 + r, a degree-6 polynomial for exp(r) (Cephes' expf, ~1 ulp), times 2^n.
// Below -87 (a padded key: its bias is -1e30) the result is exactly 0.
inline float exp_nonpositive(float x) {
  const float clamped = x < -87.0f ? -87.0f : x;
  const float n = std::floor(clamped * 1.44269504088896341f + 0.5f);
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float y = poly * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return x < -87.0f ? 0.0f : y * two_n;
}

struct Dropout {
  uint32_t threshold;  // drop when hash < threshold
  float keep_scale;    // 1 / keep rate
  bool active;
  explicit Dropout(double p)
      : threshold(static_cast<uint32_t>(std::llround(p * 4294967296.0))),
        keep_scale(static_cast<float>(4294967296.0 / (4294967296.0 - std::llround(p * 4294967296.0)))),
        active(p > 0.0) {}
};

// The j-th dropout factor of a row: 0, or 1 / keep rate (1 without dropout). Arguments are
// plain values, not a Dropout, so that loops calling it vectorise.
inline float dropout_factor(uint32_t key, int64_t j, uint32_t threshold, float keep_scale) {
  return key_hash(key, j) >= threshold ? keep_scale : 0.0f;
}

// Each row's loops run once over the keys, with the head's D channels in registers: kD is D
// when it is one of the widths compiled for (every loop over d unrolls and the j loops
// vectorise), or 0 for any other width, read at run time.
template <int kD>
struct Width {
  static constexpr int64_t get(int64_t) { return kD; }
};
template <>
struct Width<0> {
  static int64_t get(int64_t d) { return d; }
};

// One query row forward: out (D) and the row's log-sum-exp. w is a buffer of S floats.
template <int kD>
inline float forward_row(const float* __restrict q, const float* __restrict kT, const float* __restrict vT,
                         const float* __restrict bias, float scale, int64_t D_runtime, int64_t S, const Dropout& drop,
                         uint32_t key, float* __restrict w, float* __restrict out) {
  const int64_t D = Width<kD>::get(D_runtime);
  float qs[kD > 0 ? kD : 64];
  for (int64_t d = 0; d < D; ++d) qs[d] = q[d] * scale;
  float m = -3.0e38f;
  for (int64_t j = 0; j < S; ++j) {
    float s = bias[j];
#pragma GCC unroll 32
    for (int64_t d = 0; d < D; ++d) s += qs[d] * kT[d * S + j];
    w[j] = s;
    m = s > m ? s : m;
  }
  float total = 0.0f;
  if (drop.active) {
    const uint32_t threshold = drop.threshold;
    const float keep_scale = drop.keep_scale;
    for (int64_t j = 0; j < S; ++j) {
      const float e = exp_nonpositive(w[j] - m);
      total += e;
      w[j] = e * dropout_factor(key, j, threshold, keep_scale);
    }
  } else {
    for (int64_t j = 0; j < S; ++j) {
      w[j] = exp_nonpositive(w[j] - m);
      total += w[j];
    }
  }
  float acc[kD > 0 ? kD : 64] = {};
  for (int64_t j = 0; j < S; ++j) {
    const float wj = w[j];
#pragma GCC unroll 32
    for (int64_t d = 0; d < D; ++d) acc[d] += wj * vT[d * S + j];
  }
  const float inv = 1.0f / total;
  for (int64_t d = 0; d < D; ++d) out[d] = acc[d] * inv;
  return m + std::log(total);
}

// Rows of one (batch, head) whose backward shares a pass over the key and value gradients.
constexpr int kRowBlock = 4;

// Backward of up to kRowBlock consecutive query rows of one (batch, head): writes their grad_q
// rows and adds into grad_kT and grad_vT (D, S) in one read-modify-write pass for all of them.
// With P_j the weights and z_j the dropout factors, out = sum_j P_j z_j v_j, so the softmax
// backward's row term sum_j P_j z_j (grad_out . v_j) is grad_out . out.
// g, q, out and grad_q are rows `stride` floats apart; grad_s and kept are buffers of kRowBlock * S floats.
template <int kD, bool kDropout>
inline void backward_rows(int64_t rows, int64_t row0, int64_t stride, const float* __restrict g, const float* __restrict q,
                          const float* __restrict kT, const float* __restrict vT, const float* __restrict bias,
                          const float* __restrict out, const float* __restrict lse, float scale, int64_t D_runtime,
                          int64_t S, const Dropout& drop, int64_t seed, float* __restrict grad_s, float* __restrict kept,
                          float* __restrict grad_q, float* __restrict grad_kT, float* __restrict grad_vT) {
  const int64_t D = Width<kD>::get(D_runtime);
  constexpr int64_t kMaxD = kD > 0 ? kD : 64;
  float qs[kRowBlock][kMaxD] = {}, gd[kRowBlock][kMaxD] = {};  // rows past `rows` stay 0: they add nothing
  // Without dropout every factor is 1: threshold 0 keeps every key, at scale 1.
  const uint32_t threshold = drop.active ? drop.threshold : 0u;
  const float keep_scale = drop.active ? drop.keep_scale : 1.0f;
  for (int64_t r = 0; r < rows; ++r) {
    const float* g_r = g + r * stride;
    const float* q_r = q + r * stride;
    float g_dot_out = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      qs[r][d] = q_r[d] * scale;
      gd[r][d] = g_r[d];
      g_dot_out += g_r[d] * out[r * stride + d];
    }
    const float row_lse = lse[r];
    const uint32_t key = kDropout ? row_key(seed, row0 + r) : 0u;
    float* __restrict gs_r = grad_s + r * S;
    float* __restrict kept_r = kept + r * S;
    for (int64_t j = 0; j < S; ++j) {
      float s = bias[j], gv = 0.0f;
#pragma GCC unroll 32
      for (int64_t d = 0; d < D; ++d) {
        s += qs[r][d] * kT[d * S + j];
        gv += gd[r][d] * vT[d * S + j];
      }
      const float p = exp_nonpositive(s - row_lse);
      const float z = kDropout ? dropout_factor(key, j, threshold, keep_scale) : 1.0f;  // no hash without dropout
      kept_r[j] = p * z;
      gs_r[j] = p * (z * gv - g_dot_out);
    }
    float acc[kMaxD] = {};
    for (int64_t j = 0; j < S; ++j) {
      const float ds = gs_r[j];
#pragma GCC unroll 32
      for (int64_t d = 0; d < D; ++d) acc[d] += ds * kT[d * S + j];
    }
    for (int64_t d = 0; d < D; ++d) grad_q[r * stride + d] = acc[d] * scale;
  }
  for (int64_t r = rows; r < kRowBlock; ++r) {
    std::memset(grad_s + r * S, 0, S * sizeof(float));
    std::memset(kept + r * S, 0, S * sizeof(float));
  }
  const float *gs0 = grad_s, *gs1 = grad_s + S, *gs2 = grad_s + 2 * S, *gs3 = grad_s + 3 * S;
  const float *k0 = kept, *k1 = kept + S, *k2 = kept + 2 * S, *k3 = kept + 3 * S;
  static_assert(kRowBlock == 4, "the pass below names its four rows");
  for (int64_t d = 0; d < D; ++d) {
    const float a0 = qs[0][d], a1 = qs[1][d], a2 = qs[2][d], a3 = qs[3][d];
    const float b0 = gd[0][d], b1 = gd[1][d], b2 = gd[2][d], b3 = gd[3][d];
    float* __restrict gk = grad_kT + d * S;
    float* __restrict gv = grad_vT + d * S;
    for (int64_t j = 0; j < S; ++j) gk[j] += a0 * gs0[j] + a1 * gs1[j] + a2 * gs2[j] + a3 * gs3[j];
    for (int64_t j = 0; j < S; ++j) gv[j] += b0 * k0[j] + b1 * k1[j] + b2 * k2[j] + b3 * k3[j];
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& key_bias, int64_t heads) {
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 3 && key_bias.dim() == 2, "fused attention: q (B, T, d), kv (B, S, 2d) and key_bias (B, S) expected, got ",
              q.sizes(), ", ", kv.sizes(), ", ", key_bias.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat && kv.scalar_type() == at::kFloat && key_bias.scalar_type() == at::kFloat,
              "fused attention: float32 tensors expected");
  TORCH_CHECK(q.is_contiguous() && kv.is_contiguous() && key_bias.is_contiguous(), "fused attention: contiguous tensors expected");
  TORCH_CHECK(kv.size(0) == q.size(0) && kv.size(2) == 2 * q.size(2) && key_bias.size(0) == q.size(0) && key_bias.size(1) == kv.size(1),
              "fused attention: q ", q.sizes(), ", kv ", kv.sizes(), " and key_bias ", key_bias.sizes(), " do not match");
  TORCH_CHECK(heads > 0 && q.size(2) % heads == 0, "fused attention: width ", q.size(2), " is not a multiple of ", heads, " heads");
}

// Calls body(width) with width a std::integral_constant<int, D> for the head widths this file
// compiles specialised loops for (those of this project's configs), else of 0 (any width <= 64).
template <typename Body>
void dispatch_width(int64_t D, Body body) {
  TORCH_CHECK(D >= 1 && D <= 64, "fused attention: head width ", D, " not in 1..64");
  switch (D) {
    case 6: return body(std::integral_constant<int, 6>());
    case 8: return body(std::integral_constant<int, 8>());
    case 10: return body(std::integral_constant<int, 10>());
    case 12: return body(std::integral_constant<int, 12>());
    case 16: return body(std::integral_constant<int, 16>());
    case 20: return body(std::integral_constant<int, 20>());
    default: return body(std::integral_constant<int, 0>());
  }
}

// Keys per row are padded to a multiple of this (16 floats: one AVX-512 register), so that every
// loop over keys runs whole vectors, without a scalar tail. Padded keys get the bias -1e30: their
// weight is exactly 0, as a padded step's is.
constexpr int64_t kKeyPad = 16;

inline int64_t padded_keys(int64_t S) { return (S + kKeyPad - 1) / kKeyPad * kKeyPad; }

// Head `head`'s keys or values (part 0 or 1 of kv's last dim), transposed: dst (D, Sp), its
// columns S..Sp zero.
inline void gather_head(const float* kv_b, int64_t part, int64_t head, int64_t d_model, int64_t D, int64_t S, int64_t Sp, float* dst) {
  const float* src = kv_b + part * d_model + head * D;
  for (int64_t j = 0; j < S; ++j)
    for (int64_t d = 0; d < D; ++d) dst[d * Sp + j] = src[j * 2 * d_model + d];
  for (int64_t d = 0; d < D; ++d) std::fill(dst + d * Sp + S, dst + (d + 1) * Sp, 0.0f);
}

// The keys' bias, padded: dst (Sp), -1e30 past the S real columns.
inline void pad_bias(const float* bias, int64_t S, int64_t Sp, float* dst) {
  std::copy(bias, bias + S, dst);
  std::fill(dst + S, dst + Sp, -1.0e30f);
}

// The inverse of gather_head: the first S columns of src (D, Sp) into head `head`'s columns of
// part `part` of kv_b.
inline void scatter_head(const float* src, int64_t part, int64_t head, int64_t d_model, int64_t D, int64_t S, int64_t Sp, float* kv_b) {
  float* dst = kv_b + part * d_model + head * D;
  for (int64_t j = 0; j < S; ++j)
    for (int64_t d = 0; d < D; ++d) dst[j * 2 * d_model + d] = src[d * Sp + j];
}

// A buffer of n floats aligned to a cache line (64 bytes), for the per-task key, value and row buffers.
struct AlignedBuffer {
  float* ptr;
  explicit AlignedBuffer(int64_t n) : ptr(static_cast<float*>(std::aligned_alloc(64, std::max<int64_t>(64, (n * 4 + 63) / 64 * 64)))) {
    TORCH_CHECK(ptr != nullptr, "fused attention: out of memory for a buffer of ", n, " floats");
  }
  ~AlignedBuffer() { std::free(ptr); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  float* data() const { return ptr; }
};

}  // namespace

// Attention of q (B, T, d) over kv (B, S, 2d) (keys in the first d channels, values in the
// last), heads of width d / heads, each head's channels side by side, as the projections give
// them: no transposes before or after. Returns (out (B, T, d), lse (B * heads, T)).
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& key_bias, int64_t heads,
                                double scale, double p, int64_t seed) {
  check_inputs(q, kv, key_bias, heads);
  const int64_t B = q.size(0), T = q.size(1), d_model = q.size(2), S = kv.size(1), D = d_model / heads, Sp = padded_keys(S);
  auto out = at::empty_like(q);
  auto lse = at::empty({B * heads, T}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kvp = kv.data_ptr<float>();
  const float* bp = key_bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const Dropout drop(p);
  const float fscale = static_cast<float>(scale);
  dispatch_width(D, [&](auto width) {
    constexpr int kD = decltype(width)::value;
    at::parallel_for(0, B * heads, 1, [&](int64_t begin, int64_t end) {
      AlignedBuffer w(Sp), kT(D * Sp), vT(D * Sp), bias(Sp);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / heads, head = bh % heads;
        gather_head(kvp + b * S * 2 * d_model, 0, head, d_model, D, S, Sp, kT.data());
        gather_head(kvp + b * S * 2 * d_model, 1, head, d_model, D, S, Sp, vT.data());
        pad_bias(bp + b * S, S, Sp, bias.data());
        for (int64_t t = 0; t < T; ++t) {
          const int64_t at = (b * T + t) * d_model + head * D;
          lp[bh * T + t] = forward_row<kD>(qp + at, kT.data(), vT.data(), bias.data(), fscale, D, Sp, drop, drop.active ? row_key(seed, bh * T + t) : 0u,
                                           w.data(), op + at);
        }
      }
    });
  });
  return {out, lse};
}

// Returns (grad_q (B, T, d), grad_kv (B, S, 2d)).
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& kv, const at::Tensor& key_bias,
                                 const at::Tensor& out, const at::Tensor& lse, int64_t heads, double scale, double p, int64_t seed) {
  check_inputs(q, kv, key_bias, heads);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() && grad_out.is_contiguous() && out.is_contiguous() &&
                  lse.is_contiguous(), "fused attention backward: grad_out and out must be contiguous (B, T, d)");
  const int64_t B = q.size(0), T = q.size(1), d_model = q.size(2), S = kv.size(1), D = d_model / heads, Sp = padded_keys(S);
  auto grad_q = at::empty_like(q);
  auto grad_kv = at::empty_like(kv);
  const float* gp = grad_out.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const float* kvp = kv.data_ptr<float>();
  const float* bp = key_bias.data_ptr<float>();
  const float* op = out.data_ptr<float>();
  const float* lp = lse.data_ptr<float>();
  float* gqp = grad_q.data_ptr<float>();
  float* gkvp = grad_kv.data_ptr<float>();
  const Dropout drop(p);
  const float fscale = static_cast<float>(scale);
  dispatch_width(D, [&](auto width) {
    constexpr int kD = decltype(width)::value;
    // One (batch, head) per task: its rows all add into the same key and value gradients.
    at::parallel_for(0, B * heads, 1, [&](int64_t begin, int64_t end) {
      AlignedBuffer grad_s(kRowBlock * Sp), kept(kRowBlock * Sp), kT(D * Sp), vT(D * Sp), grad_kT(D * Sp), grad_vT(D * Sp), bias(Sp);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / heads, head = bh % heads;
        gather_head(kvp + b * S * 2 * d_model, 0, head, d_model, D, S, Sp, kT.data());
        gather_head(kvp + b * S * 2 * d_model, 1, head, d_model, D, S, Sp, vT.data());
        pad_bias(bp + b * S, S, Sp, bias.data());
        std::fill(grad_kT.data(), grad_kT.data() + D * Sp, 0.0f);
        std::fill(grad_vT.data(), grad_vT.data() + D * Sp, 0.0f);
        for (int64_t t = 0; t < T; t += kRowBlock) {
          const int64_t at = (b * T + t) * d_model + head * D, rows = std::min<int64_t>(kRowBlock, T - t);
          const auto rows_backward = drop.active ? backward_rows<kD, true> : backward_rows<kD, false>;
          rows_backward(rows, bh * T + t, d_model, gp + at, qp + at, kT.data(), vT.data(), bias.data(), op + at, lp + bh * T + t,
                        fscale, D, Sp, drop, seed, grad_s.data(), kept.data(), gqp + at, grad_kT.data(), grad_vT.data());
        }
        scatter_head(grad_kT.data(), 0, head, d_model, D, S, Sp, gkvp + b * S * 2 * d_model);
        scatter_head(grad_vT.data(), 1, head, d_model, D, S, Sp, gkvp + b * S * 2 * d_model);
      }
    });
  });
  return {grad_q, grad_kv};
}

namespace {

// activation(x) times the dropout factors of `seed`, plus `residual` when given (a tensor of x's
// shape), for any contiguous float32 tensor: element i takes the factor of (row i / 1024, key
// i % 1024), as `dropout_factors` lays them out. Without dropout no hash is computed.
template <typename Activation>
at::Tensor hashed_dropout(const at::Tensor& x, const at::Tensor* residual, double p, int64_t seed, Activation activation) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "fused dropout: a contiguous float32 tensor expected");
  TORCH_CHECK(residual == nullptr || (residual->sizes() == x.sizes() && residual->is_contiguous() && residual->scalar_type() == at::kFloat),
              "fused dropout: the residual must be a contiguous float32 tensor of the input's shape");
  auto out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* rp = residual != nullptr ? residual->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t n = x.numel(), chunk = 1024;
  const Dropout drop(p);
  at::parallel_for(0, (n + chunk - 1) / chunk, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t start = c * chunk, len = std::min(chunk, n - start);
      const float* __restrict xc = xp + start;
      float* __restrict oc = op + start;
      if (drop.active) {
        const uint32_t key = row_key(seed, c), threshold = drop.threshold;
        const float keep_scale = drop.keep_scale;
        for (int64_t j = 0; j < len; ++j) oc[j] = activation(xc[j]) * dropout_factor(key, j, threshold, keep_scale);
      } else {
        for (int64_t j = 0; j < len; ++j) oc[j] = activation(xc[j]);
      }
      if (rp != nullptr) {
        const float* __restrict rc = rp + start;
        for (int64_t j = 0; j < len; ++j) oc[j] += rc[j];
      }
    }
  });
  return out;
}

}  // namespace

// Dropout: x times the factors of `seed`. Its backward is the same call on the gradient, so no
// mask is ever stored.
at::Tensor dropout(const at::Tensor& x, double p, int64_t seed) {
  return hashed_dropout(x, nullptr, p, seed, [](float v) { return v; });
}

// residual + dropout(x): a residual connection in one pass. Its gradient is the output's for the
// residual and dropout(grad) for x.
at::Tensor dropout_residual(const at::Tensor& x, const at::Tensor& residual, double p, int64_t seed) {
  return hashed_dropout(x, &residual, p, seed, [](float v) { return v; });
}

// relu, then dropout: max(x, 0) times the factors of `seed`. Its backward needs no factors: where
// the output is not 0 the factor was 1 / keep rate and x was positive.
at::Tensor relu_dropout(const at::Tensor& x, double p, int64_t seed) {
  return hashed_dropout(x, nullptr, p, seed, [](float v) { return v > 0.0f ? v : 0.0f; });
}

at::Tensor relu_dropout_backward(const at::Tensor& grad, const at::Tensor& out, double p) {
  TORCH_CHECK(grad.sizes() == out.sizes() && grad.is_contiguous() && out.is_contiguous(), "fused relu-dropout backward: contiguous grad and out of one shape expected");
  auto result = at::empty_like(grad);
  const float* __restrict gp = grad.data_ptr<float>();
  const float* __restrict op = out.data_ptr<float>();
  float* __restrict rp = result.data_ptr<float>();
  const Dropout drop(p);
  const float keep_scale = drop.active ? drop.keep_scale : 1.0f;
  const int64_t n = grad.numel(), chunk = 1024;
  at::parallel_for(0, (n + chunk - 1) / chunk, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t start = c * chunk, len = std::min(chunk, n - start);
      const float* __restrict gc = gp + start;
      const float* __restrict oc = op + start;
      float* __restrict rc = rp + start;
      for (int64_t j = 0; j < len; ++j) rc[j] = gc[j] * keep_scale * static_cast<float>(oc[j] > 0.0f);  // out >= 0
    }
  });
  return result;
}

// The rows of partial (blocks, W) summed in block order, (W): the last step of every fixed-order
// reduction here (per-block partial sums, then the blocks in order: the same on any thread count).
at::Tensor sum_blocks(const at::Tensor& partial) {
  const int64_t blocks = partial.size(0), W = partial.size(1);
  auto total = at::zeros({W}, partial.options());
  const float* pp = partial.data_ptr<float>();
  float* tp = total.data_ptr<float>();
  for (int64_t k = 0; k < blocks; ++k)
    for (int64_t w = 0; w < W; ++w) tp[w] += pp[k * W + w];
  return total;
}

// Column sums of g (N, C): a linear layer's bias gradient. Summed per block of 64 rows, then the
// blocks in order (the same on any number of threads); torch's sum over dim 0 is ~10x slower at
// this model's shapes (N ~ 1200, C = 30 to 240).
at::Tensor column_sums(const at::Tensor& g) {
  TORCH_CHECK(g.dim() == 2 && g.is_contiguous() && g.scalar_type() == at::kFloat, "column sums: a contiguous float32 (N, C) tensor expected");
  const int64_t N = g.size(0), C = g.size(1), block = 64, blocks = (N + block - 1) / block;
  auto partial = at::zeros({blocks, C}, g.options());
  const float* gp = g.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      float* __restrict sums = pp + k * C;
      for (int64_t n = k * block; n < std::min(N, (k + 1) * block); ++n) {
        const float* __restrict row = gp + n * C;
        for (int64_t c = 0; c < C; ++c) sums[c] += row[c];
      }
    }
  });
  return sum_blocks(partial);
}

// In place on a (N, C): a = max(a + bias, 0) times the dropout factor of (row n, column c), the
// factors `dropout_factors(N, 1, C, p, seed)` gives. The feed-forward sublayer's first linear
// writes a without its bias (a plain mm), and this one pass over the (N, 4d) hidden tensor adds it:
// at this model's sizes each pass over a fresh (N, 4d) tensor costs as much as the matrix product.
void bias_relu_dropout_(at::Tensor& a, const at::Tensor& bias, double p, int64_t seed) {
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous() && a.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == a.size(1),
              "fused bias-relu-dropout: a contiguous float32 (N, C) tensor and a bias of C values expected");
  const int64_t N = a.size(0), C = a.size(1);
  float* ap = a.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  const Dropout drop(p);
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      float* __restrict row = ap + n * C;
      const float* __restrict b = bp;
      if (drop.active) {
        const uint32_t key = row_key(seed, n), threshold = drop.threshold;
        const float keep_scale = drop.keep_scale;
        for (int64_t c = 0; c < C; ++c) {
          const float v = row[c] + b[c];
          row[c] = (v > 0.0f ? v : 0.0f) * dropout_factor(key, c, threshold, keep_scale);
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const float v = row[c] + b[c];
          row[c] = v > 0.0f ? v : 0.0f;
        }
      }
    }
  });
}

// In place on grad (N, C): the gradient of bias_relu_dropout_ from its output `out`, where out is
// not 0 the input was positive and kept, so grad *= keep_scale there and 0 elsewhere. Returns the
// bias gradient, the column sums of the result, summed per block of 64 rows and then the blocks in
// order: the same on any number of threads.
at::Tensor relu_dropout_backward_(at::Tensor& grad, const at::Tensor& out, double p) {
  TORCH_CHECK(grad.dim() == 2 && grad.sizes() == out.sizes() && grad.is_contiguous() && out.is_contiguous(),
              "fused relu-dropout backward: contiguous (N, C) grad and out expected");
  const int64_t N = grad.size(0), C = grad.size(1), block = 64, blocks = (N + block - 1) / block;
  auto partial = at::zeros({blocks, C}, grad.options());
  float* gp = grad.data_ptr<float>();
  const float* op = out.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  const Dropout drop(p);
  const float keep_scale = drop.active ? drop.keep_scale : 1.0f;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      float* __restrict sums = pp + k * C;
      for (int64_t n = k * block; n < std::min(N, (k + 1) * block); ++n) {
        float* __restrict g = gp + n * C;
        const float* __restrict o = op + n * C;
        for (int64_t c = 0; c < C; ++c) {
          g[c] = g[c] * keep_scale * static_cast<float>(o[c] > 0.0f);
          sums[c] += g[c];
        }
      }
    }
  });
  return sum_blocks(partial);
}

// LayerNorm over the last dim of x viewed as (N, C): torch's CPU kernel is slow at this model's
// widths (30 to 120 channels). Returns (y, mean, rstd); rstd = 1 / sqrt(var + eps), biased var.
std::vector<at::Tensor> layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && weight.is_contiguous() && bias.is_contiguous(),
              "fused layer norm: contiguous float32 tensors expected");
  const int64_t C = x.size(-1), N = x.numel() / C;
  TORCH_CHECK(weight.numel() == C && bias.numel() == C, "fused layer norm: weight and bias of ", C, " channels expected");
  auto y = at::empty_like(x);
  auto mean = at::empty({N}, x.options());
  auto rstd = at::empty({N}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>(), *bp = bias.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, N, 64, [=](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* __restrict xr = xp + n * C;
      float* __restrict yr = yp + n * C;
      float sum = 0.0f;
      for (int64_t c = 0; c < C; ++c) sum += xr[c];
      const float mu = sum / C;
      float sq = 0.0f;
      for (int64_t c = 0; c < C; ++c) sq += (xr[c] - mu) * (xr[c] - mu);
      const float r = 1.0f / std::sqrt(sq / C + feps);
      for (int64_t c = 0; c < C; ++c) yr[c] = (xr[c] - mu) * r * wp[c] + bp[c];
      mp[n] = mu;
      rp[n] = r;
    }
  });
  return {y, mean, rstd};
}

// Returns (grad_x, grad_weight, grad_bias). The weight and bias gradients are summed per block of
// 64 rows, then the blocks in order: the same result for any number of threads. Small blocks keep
// both threads busy at this model's ~1200-row batches.
std::vector<at::Tensor> layer_norm_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                            const at::Tensor& mean, const at::Tensor& rstd) {
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.is_contiguous() && x.is_contiguous(), "fused layer norm backward: contiguous grad and x of one shape expected");
  const int64_t C = x.size(-1), N = x.numel() / C, block = 64, blocks = (N + block - 1) / block;
  auto grad_x = at::empty_like(x);
  auto partial = at::zeros({blocks, 2, C}, x.options());
  const float *gp = grad.data_ptr<float>(), *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  const float *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  float *gxp = grad_x.data_ptr<float>(), *pp = partial.data_ptr<float>();
  const float inv_C = 1.0f / static_cast<float>(C);
  at::parallel_for(0, blocks, 1, [=](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      float* __restrict dw = pp + k * 2 * C;
      float* __restrict db = dw + C;
      for (int64_t n = k * block; n < std::min(N, (k + 1) * block); ++n) {
        const float* __restrict xr = xp + n * C;
        const float* __restrict gr = gp + n * C;
        const float* __restrict w = wp;
        const float mu = mp[n], r = rp[n];
        float sum_gw = 0.0f, sum_gw_xhat = 0.0f;
        for (int64_t c = 0; c < C; ++c) {
          const float xhat = (xr[c] - mu) * r, gw = gr[c] * w[c];
          sum_gw += gw;
          sum_gw_xhat += gw * xhat;
          dw[c] += gr[c] * xhat;
          db[c] += gr[c];
        }
        const float a = sum_gw * inv_C, b = sum_gw_xhat * inv_C;
        float* __restrict gx = gxp + n * C;
        for (int64_t c = 0; c < C; ++c) gx[c] = r * (gr[c] * w[c] - a - (xr[c] - mu) * r * b);
      }
    }
  });
  auto sums = sum_blocks(partial.view({blocks, 2 * C})).view({2, C});
  return {grad_x, sums[0], sums[1]};
}

// The dropout factors (0 or 1 / keep rate) the kernels apply, (BH, T, S): for tests.
at::Tensor dropout_factors(int64_t BH, int64_t T, int64_t S, double p, int64_t seed) {
  auto factors = at::empty({BH, T, S}, at::kFloat);
  float* fp = factors.data_ptr<float>();
  const Dropout drop(p);
  for (int64_t row = 0; row < BH * T; ++row) {
    const uint32_t key = row_key(seed, row);
    for (int64_t j = 0; j < S; ++j) fp[row * S + j] = drop.active ? dropout_factor(key, j, drop.threshold, drop.keep_scale) : 1.0f;
  }
  return factors;
}

// ---------------------------------------------------------------------------------------------
// Autograd functions over the kernels above, in C++: a Python autograd.Function costs ~20 us of
// interpreter work per call forward and backward, as much as the kernel itself at this model's
// sizes, and a training step makes ~350 such calls. Each draws its dropout seed the way
// `int(torch.empty((), dtype=torch.int64).random_())` does, from torch's default generator, so
// a seeded run repeats.

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

int64_t draw_seed() { return at::empty({}, at::kLong).random_().item<int64_t>(); }

struct AttentionFunction : public torch::autograd::Function<AttentionFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& kv, const at::Tensor& key_bias, int64_t heads,
                            double scale, double p) {
    const int64_t seed = p > 0.0 ? draw_seed() : 0;
    auto q_c = q.contiguous(), kv_c = kv.contiguous();
    auto result = ::forward(q_c, kv_c, key_bias, heads, scale, p, seed);
    ctx->save_for_backward({q_c, kv_c, key_bias, result[0], result[1]});
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["p"] = p;
    ctx->saved_data["seed"] = seed;
    return result[0];
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto g = ::backward(grads[0].contiguous(), saved[0], saved[1], saved[2], saved[3], saved[4], ctx->saved_data["heads"].toInt(),
                        ctx->saved_data["scale"].toDouble(), ctx->saved_data["p"].toDouble(), ctx->saved_data["seed"].toInt());
    return {g[0], g[1], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct DropoutFunction : public torch::autograd::Function<DropoutFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double p) {
    const int64_t seed = draw_seed();
    ctx->saved_data["p"] = p;
    ctx->saved_data["seed"] = seed;
    return ::dropout(x.contiguous(), p, seed);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {::dropout(grads[0].contiguous(), ctx->saved_data["p"].toDouble(), ctx->saved_data["seed"].toInt()), at::Tensor()};
  }
};

struct ReluDropoutFunction : public torch::autograd::Function<ReluDropoutFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double p) {
    auto out = ::relu_dropout(x.contiguous(), p, draw_seed());
    ctx->save_for_backward({out});
    ctx->saved_data["p"] = p;
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    return {::relu_dropout_backward(grads[0].contiguous(), saved[0], ctx->saved_data["p"].toDouble()), at::Tensor()};
  }
};

struct LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
    auto x_c = x.contiguous(), w_c = weight.contiguous();
    auto result = ::layer_norm(x_c, w_c, bias.contiguous(), eps);
    ctx->save_for_backward({x_c, w_c, result[1], result[2]});
    return result[0];
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto g = ::layer_norm_backward(grads[0].contiguous(), saved[0], saved[1], saved[2], saved[3]);
    return {g[0], g[1], g[2], at::Tensor()};
  }
};

// A pre-LayerNorm feed-forward sublayer with its residual, as one autograd node:
// y = x + dropout(W2 relu_dropout(W1 LN(x) + b1) + b2). Autograd's version of these steps is ~10
// nodes and ~25 operations per layer, each costing microseconds of bookkeeping, and more passes
// over fresh (N, 4d) memory (measured with the attention sublayer's node: a 5-layer cross-modal
// stack's forward and backward, 23.8 ms as torch operations, 21.8 ms as the two nodes). Saved: x,
// LN(x), its mean and rstd, and the relu-dropout output, which is all the backward reads. p = 0
// draws no seed and hashes nothing.
struct FeedForwardFunction : public torch::autograd::Function<FeedForwardFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                            const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, double eps,
                            double p_relu, double p_res) {
    const int64_t d = x.size(-1);
    auto x2 = x.contiguous().view({-1, d});  // (N, d)
    auto norm_w = norm_weight.contiguous();
    auto ln = ::layer_norm(x2, norm_w, norm_bias.contiguous(), eps);  // h (N, d), mean (N), rstd (N)
    const int64_t seed_relu = p_relu > 0.0 ? draw_seed() : 0;
    auto hidden = ln[0].mm(w1.t());  // (N, 4d), its bias added by the next pass
    bias_relu_dropout_(hidden, b1.contiguous(), p_relu, seed_relu);
    const int64_t seed_res = p_res > 0.0 ? draw_seed() : 0;
    auto y = ::dropout_residual(at::addmm(b2, hidden, w2.t()), x2, p_res, seed_res);  // (N, d)
    ctx->save_for_backward({x2, norm_w, ln[0], ln[1], ln[2], hidden, w1, w2});
    ctx->saved_data["p_relu"] = p_relu;
    ctx->saved_data["p_res"] = p_res;
    ctx->saved_data["seed_res"] = seed_res;
    return y.view(x.sizes());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const auto &x2 = s[0], &norm_w = s[1], &h = s[2], &mean = s[3], &rstd = s[4], &hidden = s[5], &w1 = s[6], &w2 = s[7];
    auto grad_y = grads[0].contiguous().view({-1, x2.size(1)});  // (N, d)
    auto grad_f = ::dropout(grad_y, ctx->saved_data["p_res"].toDouble(), ctx->saved_data["seed_res"].toInt());  // (N, d)
    auto grad_hidden = grad_f.mm(w2);  // (N, 4d)
    auto grad_b1 = relu_dropout_backward_(grad_hidden, hidden, ctx->saved_data["p_relu"].toDouble());  // in place; (4d)
    auto grad_norm = ::layer_norm_backward(grad_hidden.mm(w1), x2, norm_w, mean, rstd);  // grad_x, grad_weight, grad_bias
    auto grad_x = grad_norm[0].add_(grad_y).view(grads[0].sizes());  // the residual's share
    return {grad_x,       grad_norm[1], grad_norm[2], grad_hidden.t().mm(h), grad_b1, grad_f.t().mm(hidden), column_sums(grad_f),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// A pre-LayerNorm attention sublayer with its residual, as one autograd node:
// y = x + dropout(Wo attention(Wq LN_x(x) + bq, Wkv LN_s(source) + bkv) + bo), the keys and values
// from the source (cross-modal) or, with no source, from LN_x(x) itself. last_only: queries and
// residual of the last step only, (B, 1, d) out (keys and values still from every step).
struct AttentionBlockFunction : public torch::autograd::Function<AttentionBlockFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& source, const at::Tensor& key_bias,
                            const at::Tensor& norm_x_weight, const at::Tensor& norm_x_bias, const at::Tensor& norm_s_weight,
                            const at::Tensor& norm_s_bias, const at::Tensor& wq, const at::Tensor& bq, const at::Tensor& wkv,
                            const at::Tensor& bkv, const at::Tensor& wo, const at::Tensor& bo, int64_t heads, double eps, double p_attn,
                            double p_res, bool last_only) {
    const bool cross = source.numel() > 0;  // an empty source: self-attention
    const int64_t B = x.size(0), T = x.size(1), d = x.size(2), Tq = last_only ? 1 : T;
    auto x_c = x.contiguous();
    auto norm_x_w = norm_x_weight.contiguous();
    auto ln_x = ::layer_norm(x_c.view({B * T, d}), norm_x_w, norm_x_bias.contiguous(), eps);  // (B*T, d), mean, rstd
    at::Tensor source_c, norm_s_w, ln_s_mean, ln_s_rstd, h_s = ln_x[0];
    if (cross) {
      source_c = source.contiguous();
      norm_s_w = norm_s_weight.contiguous();
      auto ln_s = ::layer_norm(source_c.view({-1, d}), norm_s_w, norm_s_bias.contiguous(), eps);  // (B*S, d)
      h_s = ln_s[0], ln_s_mean = ln_s[1], ln_s_rstd = ln_s[2];
    }
    const int64_t S = h_s.size(0) / B;
    auto h_q = last_only ? ln_x[0].view({B, T, d}).select(1, T - 1).contiguous() : ln_x[0];  // (B*Tq, d)
    auto q = at::addmm(bq, h_q, wq.t()).view({B, Tq, d});
    auto kv = at::addmm(bkv, h_s, wkv.t()).view({B, S, 2 * d});
    const double scale = 1.0 / std::sqrt(static_cast<double>(d / heads));
    const int64_t seed_attn = p_attn > 0.0 ? draw_seed() : 0;
    auto attended = ::forward(q, kv, key_bias.contiguous(), heads, scale, p_attn, seed_attn);  // out (B, Tq, d), lse
    auto a = at::addmm(bo, attended[0].view({B * Tq, d}), wo.t());  // (B*Tq, d)
    auto residual = last_only ? x_c.select(1, T - 1).contiguous() : x_c.view({B * T, d});
    const int64_t seed_res = p_res > 0.0 ? draw_seed() : 0;
    auto y = ::dropout_residual(a, residual, p_res, seed_res).view({B, Tq, d});
    ctx->save_for_backward({x_c, norm_x_w, ln_x[0], ln_x[1], ln_x[2], source_c, norm_s_w, h_s, ln_s_mean, ln_s_rstd, h_q, q, kv,
                            key_bias.contiguous(), attended[0], attended[1], wq, wkv, wo});
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["p_attn"] = p_attn;
    ctx->saved_data["seed_attn"] = seed_attn;
    ctx->saved_data["p_res"] = p_res;
    ctx->saved_data["seed_res"] = seed_res;
    ctx->saved_data["last_only"] = last_only;
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const auto &x_c = s[0], &norm_x_w = s[1], &h_x = s[2], &x_mean = s[3], &x_rstd = s[4], &source_c = s[5], &norm_s_w = s[6];
    const auto &h_s = s[7], &s_mean = s[8], &s_rstd = s[9], &h_q = s[10], &q = s[11], &kv = s[12], &key_bias = s[13], &out = s[14];
    const auto &lse = s[15], &wq = s[16], &wkv = s[17], &wo = s[18];
    const bool cross = source_c.defined(), last_only = ctx->saved_data["last_only"].toBool();
    const int64_t B = x_c.size(0), T = x_c.size(1), d = x_c.size(2), Tq = last_only ? 1 : T;
    auto grad_y = grads[0].contiguous().view({B * Tq, d});
    auto grad_a = ::dropout(grad_y, ctx->saved_data["p_res"].toDouble(), ctx->saved_data["seed_res"].toInt());  // (B*Tq, d)
    auto out2 = out.view({B * Tq, d});
    auto grad_out = grad_a.mm(wo).view({B, Tq, d});
    auto grad_qkv = ::backward(grad_out, q, kv, key_bias, out, lse, ctx->saved_data["heads"].toInt(), ctx->saved_data["scale"].toDouble(),
                               ctx->saved_data["p_attn"].toDouble(), ctx->saved_data["seed_attn"].toInt());
    auto grad_q = grad_qkv[0].view({B * Tq, d}), grad_kv = grad_qkv[1].view({-1, 2 * d});
    auto grad_h_q = grad_q.mm(wq);    // (B*Tq, d)
    auto grad_h_s = grad_kv.mm(wkv);  // (B*S, d)
    at::Tensor grad_h_x, grad_source, grad_norm_s_w, grad_norm_s_b;
    if (cross) {
      auto g = ::layer_norm_backward(grad_h_s, source_c.view({-1, d}), norm_s_w, s_mean, s_rstd);
      grad_source = g[0].view(source_c.sizes()), grad_norm_s_w = g[1], grad_norm_s_b = g[2];
      grad_h_x = last_only ? at::zeros({B * T, d}, grad_q.options()) : grad_h_q;
    } else {
      grad_h_x = grad_h_s;  // keys and values came from LN_x(x) too
    }
    if (last_only) {
      grad_h_x.view({B, T, d}).select(1, T - 1).add_(grad_h_q.view({B, d}));
    } else if (!cross) {
      grad_h_x = grad_h_x.add(grad_h_q);
    }
    auto g_x = ::layer_norm_backward(grad_h_x.contiguous(), x_c.view({B * T, d}), norm_x_w, x_mean, x_rstd);
    auto grad_x = g_x[0].view({B, T, d});
    if (last_only) {
      grad_x.select(1, T - 1).add_(grad_y);  // the residual's share, on the last step
    } else {
      grad_x.add_(grad_y.view({B, T, d}));
    }
    return {grad_x,
            grad_source,
            at::Tensor(),
            g_x[1],
            g_x[2],
            grad_norm_s_w,
            grad_norm_s_b,
            grad_q.t().mm(h_q),
            column_sums(grad_q),
            grad_kv.t().mm(h_s),
            column_sums(grad_kv),
            grad_a.t().mm(out2),
            column_sums(grad_a),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

// softmax(q k^T * scale + key_bias) with dropout p on the weights, times v, differentiable in q and kv.
at::Tensor attention(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& key_bias, int64_t heads, double scale, double p) {
  return AttentionFunction::apply(q, kv, key_bias, heads, scale, p);
}

// x + dropout(Wo attention(...) + bo), differentiable in x, the source and every weight; a source
// and its norm's weights of None make it self-attention.
at::Tensor attention_block(const at::Tensor& x, const std::optional<at::Tensor>& source, const at::Tensor& key_bias,
                           const at::Tensor& norm_x_weight, const at::Tensor& norm_x_bias, const std::optional<at::Tensor>& norm_s_weight,
                           const std::optional<at::Tensor>& norm_s_bias, const at::Tensor& wq, const at::Tensor& bq, const at::Tensor& wkv,
                           const at::Tensor& bkv, const at::Tensor& wo, const at::Tensor& bo, int64_t heads, double eps, double p_attn,
                           double p_res, bool last_only) {
  // Autograd's inputs must be defined tensors: an empty one stands for "no source".
  const auto none = x.new_empty({0});
  return AttentionBlockFunction::apply(x, source.value_or(none), key_bias, norm_x_weight, norm_x_bias, norm_s_weight.value_or(none),
                                       norm_s_bias.value_or(none), wq, bq, wkv, bkv, wo, bo, heads, eps, p_attn, p_res, last_only);
}

// x + dropout(W2 relu_dropout(W1 LN(x) + b1) + b2), differentiable in x and every weight.
at::Tensor feed_forward(const at::Tensor& x, const at::Tensor& norm_weight, const at::Tensor& norm_bias, const at::Tensor& w1,
                        const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, double eps, double p_relu, double p_res) {
  return FeedForwardFunction::apply(x, norm_weight, norm_bias, w1, b1, w2, b2, eps, p_relu, p_res);
}

at::Tensor dropout_autograd(const at::Tensor& x, double p) { return DropoutFunction::apply(x, p); }

at::Tensor relu_dropout_autograd(const at::Tensor& x, double p) { return ReluDropoutFunction::apply(x, p); }

at::Tensor layer_norm_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  return LayerNormFunction::apply(x, weight, bias, eps);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // No kernel touches a Python object: other Python threads (a data loader, a notebook's UI) run
  // while one computes.
  const auto release_gil = py::call_guard<py::gil_scoped_release>();
  m.def("forward", &forward, "fused attention forward (out, lse)", release_gil);
  m.def("backward", &backward, "fused attention backward (grad_q, grad_kv)", release_gil);
  m.def("dropout", &dropout, "x times the dropout factors of a seed (forward and backward)", release_gil);
  m.def("attention_block", &attention_block, "differentiable pre-LayerNorm attention sublayer with its residual", release_gil);
  m.def("column_sums", &column_sums, "column sums of an (N, C) tensor, in a fixed order", release_gil);
  m.def("feed_forward", &feed_forward, "differentiable pre-LayerNorm feed-forward sublayer with its residual", release_gil);
  m.def("relu_dropout", &relu_dropout, "max(x, 0) times the dropout factors of a seed", release_gil);
  m.def("relu_dropout_backward", &relu_dropout_backward, "the gradient of relu_dropout from its output", release_gil);
  m.def("layer_norm", &layer_norm, "layer norm over the last dim (y, mean, rstd)", release_gil);
  m.def("layer_norm_backward", &layer_norm_backward, "layer norm backward (grad_x, grad_weight, grad_bias)", release_gil);
  m.def("dropout_factors", &dropout_factors, "the dropout factors of a seed, (BH, T, S)", release_gil);
  m.def("attention", &attention, "differentiable fused attention (seed drawn from torch's generator when p > 0)", release_gil);
  m.def("dropout_autograd", &dropout_autograd, "differentiable dropout (seed drawn from torch's generator)", release_gil);
  m.def("relu_dropout_autograd", &relu_dropout_autograd, "differentiable relu then dropout (seed drawn from torch's generator)", release_gil);
  m.def("layer_norm_autograd", &layer_norm_autograd, "differentiable layer norm over the last dim", release_gil);
}
