// CPU kernels for training and evaluation in float32: multi-head attention with key padding and
// dropout on the weights; dropout and relu-dropout whose masks are never stored; LayerNorm; and,
// built from them, whole transformer stacks (layers and final LayerNorm) and one C++ autograd node
// that runs a group of independent stacks, side by side on torch's threads when they balance (at the end).
//
// Attention. Why: at this model's head width (d_head = 6 or 12) attention is bound by passes over
// (B*h, T, S) tensors, not by arithmetic. Eager PyTorch writes and reads scores, weights, a
// dropout mask and their gradients as whole tensors; torch's fused CPU kernel has no dropout and
// is slow at such narrow heads. Here each query row is finished in a small buffer: scores,
// softmax, dropout and the weighted sum of values, with nothing of size (T, S) kept. Backward
// recomputes the row's weights from the saved log-sum-exp (as flash attention does) and
// regenerates the dropout mask from the same counter-based hash, so the mask is never stored.
// Rows go two at a time through the loops over keys, sharing each load of the keys and values.
//
// Layouts: q (B, T, d) and kv (B, S, 2d) as the projections give them, heads side by side; each
// task copies its head's keys and values transposed, (D, Sp) with S padded to a multiple of 16, so
// that every inner loop runs over contiguous keys in whole vectors. key_bias (B, S): 0 at real keys and a large negative number at
// padded ones. Row bh * T + t is query t of head bh = b * heads + head.
// The dropout masks are the model's (mskt/model/layers.py, "Dropout masks"), bit for bit: a tensor
// read as (B, R, C), element (b, r, c) kept when mix32(row_key(sample_key(call, samples[b]), r) +
// c * kGolden) >= round(p * 2^32), kept values scaled by the exact inverse keep rate. For the
// attention weights row r of sample b is head * T + t. The call key (seed, step, site) comes from
// Python; nothing here draws from a random generator.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
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

constexpr uint32_t kGolden2 = 0x85EBCA6Bu;

// A sample's key under a dropout call's 64-bit key: once per batch row, outside any loop over elements.
inline uint32_t sample_key(int64_t call, int64_t sample) {
  uint32_t lo = static_cast<uint32_t>(call), hi = static_cast<uint32_t>(static_cast<uint64_t>(call) >> 32);
  uint32_t s_lo = static_cast<uint32_t>(sample), s_hi = static_cast<uint32_t>(static_cast<uint64_t>(sample) >> 32);
  return mix32(lo ^ mix32(s_lo + mix32(hi ^ mix32(s_hi + kGolden))));
}

// Row r of a sample: one mix per row; the row's elements then cost one mix each (key_hash).
inline uint32_t row_key(uint32_t sample, int64_t r) {
  return mix32(sample + static_cast<uint32_t>(r) * kGolden2);
}

// The sample keys of a call: samples (B,) int64 on the CPU, the batch rows' sample indices.
std::vector<uint32_t> sample_keys(int64_t call, const at::Tensor& samples) {
  TORCH_CHECK(samples.dim() == 1 && samples.scalar_type() == at::kLong && samples.device().is_cpu(),
              "dropout: the samples must be a 1-D int64 CPU tensor, got ", samples.sizes());
  const auto s = samples.contiguous();
  const int64_t* sp = s.data_ptr<int64_t>();
  std::vector<uint32_t> keys(s.numel());
  for (int64_t b = 0; b < s.numel(); ++b) keys[b] = sample_key(call, sp[b]);
  return keys;
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

// kRows consecutive query rows of one (batch, head) forward, as forward_row does each: their
// score and weighted-sum loops share every load of the head's keys and values, which bound
// those loops at narrow heads (D loads per D multiply-adds for one row). Each row's arithmetic
// is forward_row's, in the same order. w is a buffer of kRows * S floats.
template <int kD, int kRows>
inline void forward_rows(const float* __restrict q, int64_t stride, const float* __restrict kT, const float* __restrict vT,
                         const float* __restrict bias, float scale, int64_t D_runtime, int64_t S, const Dropout& drop,
                         uint32_t skey, int64_t row0, float* __restrict w, float* __restrict out, float* __restrict lse) {
  const int64_t D = Width<kD>::get(D_runtime);
  constexpr int64_t kMaxD = kD > 0 ? kD : 64;
  float qs[kRows][kMaxD];
  float m[kRows];
  for (int r = 0; r < kRows; ++r) {
    for (int64_t d = 0; d < D; ++d) qs[r][d] = q[r * stride + d] * scale;
    m[r] = -3.0e38f;
  }
  for (int64_t j = 0; j < S; ++j) {
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      float s = bias[j];
#pragma GCC unroll 32
      for (int64_t d = 0; d < D; ++d) s += qs[r][d] * kT[d * S + j];
      w[r * S + j] = s;
      m[r] = s > m[r] ? s : m[r];
    }
  }
  float total[kRows];
  for (int r = 0; r < kRows; ++r) {
    float* __restrict w_r = w + r * S;
    float t = 0.0f;
    if (drop.active) {
      const uint32_t key = row_key(skey, row0 + r), threshold = drop.threshold;
      const float keep_scale = drop.keep_scale;
      for (int64_t j = 0; j < S; ++j) {
        const float e = exp_nonpositive(w_r[j] - m[r]);
        t += e;
        w_r[j] = e * dropout_factor(key, j, threshold, keep_scale);
      }
    } else {
      for (int64_t j = 0; j < S; ++j) {
        w_r[j] = exp_nonpositive(w_r[j] - m[r]);
        t += w_r[j];
      }
    }
    total[r] = t;
  }
  float acc[kRows][kMaxD] = {};
  for (int64_t j = 0; j < S; ++j) {
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const float wj = w[r * S + j];
#pragma GCC unroll 32
      for (int64_t d = 0; d < D; ++d) acc[r][d] += wj * vT[d * S + j];
    }
  }
  for (int r = 0; r < kRows; ++r) {
    const float inv = 1.0f / total[r];
    for (int64_t d = 0; d < D; ++d) out[r * stride + d] = acc[r][d] * inv;
    lse[r] = m[r] + std::log(total[r]);
  }
}

// Rows of one (batch, head) whose backward shares a pass over the key and value gradients.
constexpr int kRowBlock = 4;

// Query rows that share their loads of a head's keys and values (forward_rows, backward_scores).
// Measured at widths 6 and 12: four rows made width 6's backward 3.7x slower (its accumulators no
// longer fit in registers) and its forward no faster than two.
constexpr int kRowsSharingLoads = 2;

// Rows r0 .. r0 + kN - 1 of backward_rows' block: each row's weights (kept: P_j z_j) and score
// gradients (grad_s), and its grad_q row. The kN rows share every load of the head's keys and
// values, which bound these loops at narrow heads. Measured: results within 1.3e-6 of the
// one-row-at-a-time kernel this replaced (the compiler reassociates sums differently).
template <int kD, bool kDropout, int kN>
inline void backward_scores(int r0, int64_t row0, int64_t stride, const float (*qs)[kD > 0 ? kD : 64],
                            const float (*gd)[kD > 0 ? kD : 64], const float* __restrict out, const float* __restrict kT,
                            const float* __restrict vT, const float* __restrict bias, const float* __restrict lse, float scale,
                            int64_t D_runtime, int64_t S, uint32_t threshold, float keep_scale, uint32_t skey,
                            float* __restrict grad_s, float* __restrict kept, float* __restrict grad_q) {
  const int64_t D = Width<kD>::get(D_runtime);
  constexpr int64_t kMaxD = kD > 0 ? kD : 64;
  // Scores into kept and grad_out . v_j into grad_s, for the pass below to turn into weights and
  // score gradients: two loops, so that each holds only one row set of channels in registers.
  for (int64_t j = 0; j < S; ++j) {
#pragma GCC unroll 8
    for (int n = 0; n < kN; ++n) {
      float sc = bias[j];
#pragma GCC unroll 32
      for (int64_t d = 0; d < D; ++d) sc += qs[r0 + n][d] * kT[d * S + j];
      kept[(r0 + n) * S + j] = sc;
    }
  }
  for (int64_t j = 0; j < S; ++j) {
#pragma GCC unroll 8
    for (int n = 0; n < kN; ++n) {
      float gv = 0.0f;
#pragma GCC unroll 32
      for (int64_t d = 0; d < D; ++d) gv += gd[r0 + n][d] * vT[d * S + j];
      grad_s[(r0 + n) * S + j] = gv;
    }
  }
  for (int n = 0; n < kN; ++n) {
    const int r = r0 + n;
    float g_dot_out = 0.0f;
    for (int64_t d = 0; d < D; ++d) g_dot_out += gd[r][d] * out[r * stride + d];
    const float row_lse = lse[r];
    const uint32_t key = kDropout ? row_key(skey, row0 + r) : 0u;
    float* __restrict gs_r = grad_s + r * S;
    float* __restrict kept_r = kept + r * S;
    for (int64_t j = 0; j < S; ++j) {
      const float p = exp_nonpositive(kept_r[j] - row_lse);
      const float z = kDropout ? dropout_factor(key, j, threshold, keep_scale) : 1.0f;  // no hash without dropout
      kept_r[j] = p * z;
      gs_r[j] = p * (z * gs_r[j] - g_dot_out);
    }
  }
  float acc[kN][kMaxD] = {};
  for (int64_t j = 0; j < S; ++j) {
#pragma GCC unroll 8
    for (int n = 0; n < kN; ++n) {
      const float ds = grad_s[(r0 + n) * S + j];
#pragma GCC unroll 32
      for (int64_t d = 0; d < D; ++d) acc[n][d] += ds * kT[d * S + j];
    }
  }
  for (int n = 0; n < kN; ++n)
    for (int64_t d = 0; d < D; ++d) grad_q[(r0 + n) * stride + d] = acc[n][d] * scale;
}

// Backward of up to kRowBlock consecutive query rows of one (batch, head): writes their grad_q
// rows and adds into grad_kT and grad_vT (D, S) in one read-modify-write pass for all of them.
// With P_j the weights and z_j the dropout factors, out = sum_j P_j z_j v_j, so the softmax
// backward's row term sum_j P_j z_j (grad_out . v_j) is grad_out . out.
// g, q, out and grad_q are rows `stride` floats apart; grad_s and kept are buffers of kRowBlock * S floats.
template <int kD, bool kDropout>
inline void backward_rows(int64_t rows, int64_t row0, int64_t stride, const float* __restrict g, const float* __restrict q,
                          const float* __restrict kT, const float* __restrict vT, const float* __restrict bias,
                          const float* __restrict out, const float* __restrict lse, float scale, int64_t D_runtime,
                          int64_t S, const Dropout& drop, uint32_t skey, float* __restrict grad_s, float* __restrict kept,
                          float* __restrict grad_q, float* __restrict grad_kT, float* __restrict grad_vT) {
  const int64_t D = Width<kD>::get(D_runtime);
  constexpr int64_t kMaxD = kD > 0 ? kD : 64;
  float qs[kRowBlock][kMaxD] = {}, gd[kRowBlock][kMaxD] = {};  // rows past `rows` stay 0: they add nothing
  // Without dropout every factor is 1: threshold 0 keeps every key, at scale 1.
  const uint32_t threshold = drop.active ? drop.threshold : 0u;
  const float keep_scale = drop.active ? drop.keep_scale : 1.0f;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) {
      qs[r][d] = q[r * stride + d] * scale;
      gd[r][d] = g[r * stride + d];
    }
  int first = 0;
  for (; first + kRowsSharingLoads <= rows; first += kRowsSharingLoads)
    backward_scores<kD, kDropout, kRowsSharingLoads>(first, row0, stride, qs, gd, out, kT, vT, bias, lse, scale, D, S, threshold, keep_scale, skey,
                                     grad_s, kept, grad_q);
  if (first < rows)
    backward_scores<kD, kDropout, 1>(first, row0, stride, qs, gd, out, kT, vT, bias, lse, scale, D, S, threshold, keep_scale, skey,
                                     grad_s, kept, grad_q);
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
                                double scale, double p, int64_t call, const at::Tensor& samples) {
  check_inputs(q, kv, key_bias, heads);
  const auto skeys = p > 0.0 ? sample_keys(call, samples) : std::vector<uint32_t>(q.size(0), 0u);
  TORCH_CHECK(static_cast<int64_t>(skeys.size()) == q.size(0), "fused attention: ", q.size(0), " batch rows but ", skeys.size(), " samples");
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
      AlignedBuffer w(kRowsSharingLoads * Sp), kT(D * Sp), vT(D * Sp), bias(Sp);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / heads, head = bh % heads;
        gather_head(kvp + b * S * 2 * d_model, 0, head, d_model, D, S, Sp, kT.data());
        gather_head(kvp + b * S * 2 * d_model, 1, head, d_model, D, S, Sp, vT.data());
        pad_bias(bp + b * S, S, Sp, bias.data());
        int64_t t = 0;
        for (; t + kRowsSharingLoads <= T; t += kRowsSharingLoads) {
          const int64_t at = (b * T + t) * d_model + head * D;
          forward_rows<kD, kRowsSharingLoads>(qp + at, d_model, kT.data(), vT.data(), bias.data(), fscale, D, Sp, drop, skeys[b], head * T + t,
                                         w.data(), op + at, lp + bh * T + t);
        }
        for (; t < T; ++t) {
          const int64_t at = (b * T + t) * d_model + head * D;
          lp[bh * T + t] = forward_row<kD>(qp + at, kT.data(), vT.data(), bias.data(), fscale, D, Sp, drop, drop.active ? row_key(skeys[b], head * T + t) : 0u,
                                           w.data(), op + at);
        }
      }
    });
  });
  return {out, lse};
}

// Returns (grad_q (B, T, d), grad_kv (B, S, 2d)).
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& kv, const at::Tensor& key_bias,
                                 const at::Tensor& out, const at::Tensor& lse, int64_t heads, double scale, double p, int64_t call,
                                 const at::Tensor& samples) {
  check_inputs(q, kv, key_bias, heads);
  const auto skeys = p > 0.0 ? sample_keys(call, samples) : std::vector<uint32_t>(q.size(0), 0u);
  TORCH_CHECK(static_cast<int64_t>(skeys.size()) == q.size(0), "fused attention: ", q.size(0), " batch rows but ", skeys.size(), " samples");
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
          rows_backward(rows, head * T + t, d_model, gp + at, qp + at, kT.data(), vT.data(), bias.data(), op + at, lp + bh * T + t,
                        fscale, D, Sp, drop, skeys[b], grad_s.data(), kept.data(), gqp + at, grad_kT.data(), grad_vT.data());
        }
        scatter_head(grad_kT.data(), 0, head, d_model, D, S, Sp, gkvp + b * S * 2 * d_model);
        scatter_head(grad_vT.data(), 1, head, d_model, D, S, Sp, gkvp + b * S * 2 * d_model);
      }
    });
  });
  return {grad_q, grad_kv};
}

namespace {

// activation(x) times the dropout factors of (call, samples), plus `residual` when given (a tensor of
// x's shape), for a contiguous float32 tensor read as (B, R, C): B = samples.numel() batch rows,
// C its last dim, R the rows of each sample; element (b, r, c) takes the factor of sample
// samples[b], row r, column c, as `dropout_factors` lays them out. Without dropout no hash is computed.
template <typename Activation>
at::Tensor hashed_dropout(const at::Tensor& x, const at::Tensor* residual, double p, int64_t call, const at::Tensor& samples,
                          Activation activation) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 2, "fused dropout: a contiguous float32 tensor (B, ..., C) expected");
  TORCH_CHECK(residual == nullptr || (residual->sizes() == x.sizes() && residual->is_contiguous() && residual->scalar_type() == at::kFloat),
              "fused dropout: the residual must be a contiguous float32 tensor of the input's shape");
  auto out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* rp = residual != nullptr ? residual->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const Dropout drop(p);
  const int64_t C = x.size(-1), N = C > 0 ? x.numel() / C : 0;
  const auto skeys = drop.active ? sample_keys(call, samples) : std::vector<uint32_t>(1, 0u);
  const int64_t R = N / static_cast<int64_t>(skeys.size());
  TORCH_CHECK(!drop.active || R * static_cast<int64_t>(skeys.size()) == N, "fused dropout: ", N, " rows of ", C, " do not split into ", skeys.size(), " samples");
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* __restrict xc = xp + n * C;
      float* __restrict oc = op + n * C;
      if (drop.active) {
        const uint32_t key = row_key(skeys[n / R], n % R), threshold = drop.threshold;
        const float keep_scale = drop.keep_scale;
        for (int64_t j = 0; j < C; ++j) oc[j] = activation(xc[j]) * dropout_factor(key, j, threshold, keep_scale);
      } else {
        for (int64_t j = 0; j < C; ++j) oc[j] = activation(xc[j]);
      }
      if (rp != nullptr) {
        const float* __restrict rc = rp + n * C;
        for (int64_t j = 0; j < C; ++j) oc[j] += rc[j];
      }
    }
  });
  return out;
}

}  // namespace

// Dropout: x times the factors of (call, samples). Its backward is the same call on the gradient,
// so no mask is ever stored.
at::Tensor dropout(const at::Tensor& x, double p, int64_t call, const at::Tensor& samples) {
  return hashed_dropout(x, nullptr, p, call, samples, [](float v) { return v; });
}

// residual + dropout(x): a residual connection in one pass. Its gradient is the output's for the
// residual and dropout(grad) for x.
at::Tensor dropout_residual(const at::Tensor& x, const at::Tensor& residual, double p, int64_t call, const at::Tensor& samples) {
  return hashed_dropout(x, &residual, p, call, samples, [](float v) { return v; });
}

// relu, then dropout: max(x, 0) times the factors of (call, samples). Its backward needs no
// factors: where the output is not 0 the factor was 1 / keep rate and x was positive.
at::Tensor relu_dropout(const at::Tensor& x, double p, int64_t call, const at::Tensor& samples) {
  return hashed_dropout(x, nullptr, p, call, samples, [](float v) { return v > 0.0f ? v : 0.0f; });
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

// In place on a (N, C), N = B * R rows of B samples: a = max(a + bias, 0) times the dropout factor
// of (sample n / R, row n % R, column c), as `hashed_dropout` reads a (N, C) tensor. The feed-forward sublayer's first linear
// writes a without its bias (a plain mm), and this one pass over the (N, 4d) hidden tensor adds it:
// at this model's sizes each pass over a fresh (N, 4d) tensor costs as much as the matrix product.
void bias_relu_dropout_(at::Tensor& a, const at::Tensor& bias, double p, int64_t call, const at::Tensor& samples) {
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous() && a.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == a.size(1),
              "fused bias-relu-dropout: a contiguous float32 (N, C) tensor and a bias of C values expected");
  const int64_t N = a.size(0), C = a.size(1);
  float* ap = a.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  const Dropout drop(p);
  const auto skeys = drop.active ? sample_keys(call, samples) : std::vector<uint32_t>(1, 0u);
  const int64_t R = N / static_cast<int64_t>(skeys.size());
  TORCH_CHECK(!drop.active || R * static_cast<int64_t>(skeys.size()) == N, "fused bias-relu-dropout: ", N, " rows do not split into ", skeys.size(), " samples");
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      float* __restrict row = ap + n * C;
      const float* __restrict b = bp;
      if (drop.active) {
        const uint32_t key = row_key(skeys[n / R], n % R), threshold = drop.threshold;
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

// The dropout factors (0 or 1 / keep rate) the kernels apply to a (B, R, C) tensor under (call,
// samples (B,)): for tests, against the model's dropout_mask.
at::Tensor dropout_factors(int64_t R, int64_t C, double p, int64_t call, const at::Tensor& samples) {
  const auto skeys = sample_keys(call, samples);
  const int64_t B = static_cast<int64_t>(skeys.size());
  auto factors = at::empty({B, R, C}, at::kFloat);
  float* fp = factors.data_ptr<float>();
  const Dropout drop(p);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = 0; r < R; ++r) {
      const uint32_t key = row_key(skeys[b], r);
      float* row = fp + (b * R + r) * C;
      for (int64_t j = 0; j < C; ++j) row[j] = drop.active ? dropout_factor(key, j, drop.threshold, drop.keep_scale) : 1.0f;
    }
  return factors;
}

// ---------------------------------------------------------------------------------------------
// Autograd functions over the kernels above, in C++: a Python autograd.Function costs ~20 us of
// interpreter work per call forward and backward, as much as the kernel itself at this model's
// sizes, and a training step makes ~350 such calls. Each takes its dropout key from Python: the
// call key and the batch rows' sample indices (mskt.model.layers.dropout_key).

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct AttentionFunction : public torch::autograd::Function<AttentionFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& kv, const at::Tensor& key_bias, int64_t heads,
                            double scale, double p, int64_t call, const at::Tensor& samples) {
    auto q_c = q.contiguous(), kv_c = kv.contiguous();
    auto result = ::forward(q_c, kv_c, key_bias, heads, scale, p, call, samples);
    ctx->save_for_backward({q_c, kv_c, key_bias, result[0], result[1]});
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["p"] = p;
    ctx->saved_data["call"] = call;
    ctx->saved_data["samples"] = samples;
    return result[0];
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto g = ::backward(grads[0].contiguous(), saved[0], saved[1], saved[2], saved[3], saved[4], ctx->saved_data["heads"].toInt(),
                        ctx->saved_data["scale"].toDouble(), ctx->saved_data["p"].toDouble(), ctx->saved_data["call"].toInt(),
                        ctx->saved_data["samples"].toTensor());
    return {g[0], g[1], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct DropoutFunction : public torch::autograd::Function<DropoutFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double p, int64_t call, const at::Tensor& samples) {
    ctx->saved_data["p"] = p;
    ctx->saved_data["call"] = call;
    ctx->saved_data["samples"] = samples;
    return ::dropout(x.contiguous(), p, call, samples);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {::dropout(grads[0].contiguous(), ctx->saved_data["p"].toDouble(), ctx->saved_data["call"].toInt(), ctx->saved_data["samples"].toTensor()),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct ReluDropoutFunction : public torch::autograd::Function<ReluDropoutFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double p, int64_t call, const at::Tensor& samples) {
    auto out = ::relu_dropout(x.contiguous(), p, call, samples);
    ctx->save_for_backward({out});
    ctx->saved_data["p"] = p;
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    return {::relu_dropout_backward(grads[0].contiguous(), saved[0], ctx->saved_data["p"].toDouble()), at::Tensor(), at::Tensor(), at::Tensor()};
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

// ---------------------------------------------------------------------------------------------
// Transformer stacks: a stack's layers and final LayerNorm as plain forward and backward
// functions, and one autograd node for a group of independent stacks (a model's cross-modal
// transformers, its memory transformers) that runs them concurrently.
//
// Why one node per group: autograd's version of a layer is ~10 nodes and ~25 operations, each
// costing microseconds of bookkeeping at this model's sizes, and the engine runs a CPU graph's
// nodes one at a time. Why concurrently: at B = 24, T = 50, d = 30 two threads make one stack only
// ~1.2x faster than one thread (every kernel and product is too small to split well), while two
// stacks on one thread each run ~2x faster than one thread does them. Inside torch's OpenMP team
// each thread runs whole stacks: nested parallel_for and MKL's products run single-threaded there,
// so no second team of threads is ever opened (one was, when worker threads ran the stacks, and it
// slowed the process; docs/speed.md).

// A layer's parameters, in the order the stack node takes them; a self-attention layer's source
// norm is two empty tensors.
enum LayerParam { kNormXW, kNormXB, kNormSW, kNormSB, kWq, kBq, kWkv, kBkv, kWo, kBo, kNormFW, kNormFB, kW1, kB1, kW2, kB2, kLayerParams };
// A stack's inputs: x, source (empty for self-attention), key_bias, samples (B,) int64 (the batch
// rows' sample indices, for the dropout masks), each layer's parameters, then the final norm's
// weight and bias.
constexpr int64_t kStackHead = 4;
inline int64_t stack_inputs(int64_t layers) { return kStackHead + layers * kLayerParams + 2; }
// Intermediates each part saves for its backward, appended in this order.
enum AttentionSaved { kAx, kAhx, kAxMean, kAxRstd, kAhs, kAsMean, kAsRstd, kAhq, kAq, kAkv, kAout, kAlse, kAttentionSaved };
enum FeedForwardSaved { kFx, kFh, kFmean, kFrstd, kFhidden, kFeedForwardSaved };
enum NormSaved { kNx, kNmean, kNrstd, kNormSaved };
inline int64_t stack_saved(int64_t layers) { return layers * (kAttentionSaved + kFeedForwardSaved) + kNormSaved; }
// Dropout call keys per layer, from Python in this order (the attention weights', the attention
// residual's, the relu's, the feed-forward residual's); 0 where that dropout is off.
constexpr int64_t kLayerKeys = 4;

// One stack's settings: ints (layers, heads, last_only), doubles (eps, p_attn, p_relu, p_res).
struct Stack {
  int64_t layers, heads;
  bool last_only;
  double eps, p_attn, p_relu, p_res;
  int64_t first_input, first_saved, first_key;
};

std::vector<Stack> parse_stacks(at::TensorList inputs, const std::vector<int64_t>& ints, const std::vector<double>& doubles) {
  TORCH_CHECK(ints.size() % 3 == 0 && doubles.size() == ints.size() / 3 * 4, "stacks: 3 ints and 4 doubles per stack");
  std::vector<Stack> stacks;
  int64_t input = 0, saved = 0, key = 0;
  for (size_t i = 0; i < ints.size() / 3; ++i) {
    Stack s{ints[3 * i], ints[3 * i + 1], ints[3 * i + 2] != 0, doubles[4 * i], doubles[4 * i + 1], doubles[4 * i + 2], doubles[4 * i + 3],
            input, saved, key};
    TORCH_CHECK(s.layers > 0 && s.heads > 0, "stacks: stack ", i, " needs layers > 0 and heads > 0");
    input += stack_inputs(s.layers), saved += stack_saved(s.layers), key += s.layers * kLayerKeys;
    stacks.push_back(s);
  }
  TORCH_CHECK(input == static_cast<int64_t>(inputs.size()), "stacks: ", inputs.size(), " tensors given, the settings describe ", input);
  return stacks;
}

// The attention sublayer, pre-LayerNorm with its residual:
// y = x + dropout(Wo attention(Wq LN_x(x) + bq, Wkv LN_s(source) + bkv) + bo), the keys and values
// from the source (cross-modal) or, with an empty source, from LN_x(x) itself. last_only: queries
// and residual of the last step only, y (B, 1, d) (keys and values still from every step).
at::Tensor attention_sublayer(const at::Tensor& x, const at::Tensor& source, const at::Tensor& key_bias, const at::Tensor& samples, const at::Tensor* w,
                              const Stack& s, bool last_only, int64_t key_attn, int64_t key_res, std::vector<at::Tensor>& saved) {
  const bool cross = source.numel() > 0;
  const int64_t B = x.size(0), T = x.size(1), d = x.size(2), Tq = last_only ? 1 : T;
  auto ln_x = ::layer_norm(x.view({B * T, d}), w[kNormXW], w[kNormXB], s.eps);  // (B*T, d), mean, rstd
  at::Tensor s_mean, s_rstd, h_s = ln_x[0];
  if (cross) {
    auto ln_s = ::layer_norm(source.view({-1, d}), w[kNormSW], w[kNormSB], s.eps);  // (B*S, d)
    h_s = ln_s[0], s_mean = ln_s[1], s_rstd = ln_s[2];
  }
  const int64_t S = h_s.size(0) / B;
  auto h_q = last_only ? ln_x[0].view({B, T, d}).select(1, T - 1).contiguous() : ln_x[0];  // (B*Tq, d)
  auto q = at::addmm(w[kBq], h_q, w[kWq].t()).view({B, Tq, d});
  auto kv = at::addmm(w[kBkv], h_s, w[kWkv].t()).view({B, S, 2 * d});
  const double scale = 1.0 / std::sqrt(static_cast<double>(d / s.heads));
  auto attended = ::forward(q, kv, key_bias, s.heads, scale, s.p_attn, key_attn, samples);  // out (B, Tq, d), lse
  auto a = at::addmm(w[kBo], attended[0].view({B * Tq, d}), w[kWo].t());         // (B*Tq, d)
  auto residual = last_only ? x.select(1, T - 1).contiguous() : x.view({B * T, d});
  saved.insert(saved.end(), {x, ln_x[0], ln_x[1], ln_x[2], h_s, s_mean, s_rstd, h_q, q, kv, attended[0], attended[1]});
  return ::dropout_residual(a, residual, s.p_res, key_res, samples).view({B, Tq, d});
}

// Returns the gradient of x; adds the source's into grad_source (defining it on first use) and
// writes the sublayer's parameters' gradients into grads.
at::Tensor attention_sublayer_backward(const at::Tensor& grad, const at::Tensor* saved, const at::Tensor& source, const at::Tensor& key_bias,
                                       const at::Tensor& samples,
                                       const at::Tensor* w, const Stack& s, bool last_only, int64_t key_attn, int64_t key_res,
                                       at::Tensor& grad_source, at::Tensor* grads) {
  const at::Tensor &x = saved[kAx], &q = saved[kAq], &out = saved[kAout], &h_s = saved[kAhs];
  const bool cross = source.numel() > 0;
  const int64_t B = x.size(0), T = x.size(1), d = x.size(2), Tq = last_only ? 1 : T;
  auto grad_y = grad.contiguous().view({B * Tq, d});
  auto grad_a = ::dropout(grad_y, s.p_res, key_res, samples);  // (B*Tq, d)
  auto grad_out = grad_a.mm(w[kWo]).view({B, Tq, d});
  const double scale = 1.0 / std::sqrt(static_cast<double>(d / s.heads));
  auto grad_qkv = ::backward(grad_out, q, saved[kAkv], key_bias, out, saved[kAlse], s.heads, scale, s.p_attn, key_attn, samples);
  auto grad_q = grad_qkv[0].view({B * Tq, d}), grad_kv = grad_qkv[1].view({-1, 2 * d});
  auto grad_h_q = grad_q.mm(w[kWq]);    // (B*Tq, d)
  auto grad_h_s = grad_kv.mm(w[kWkv]);  // (B*S, d)
  at::Tensor grad_h_x;
  if (cross) {
    auto g = ::layer_norm_backward(grad_h_s, source.view({-1, d}), w[kNormSW], saved[kAsMean], saved[kAsRstd]);
    auto g_source = g[0].view(source.sizes());
    grad_source = grad_source.defined() ? grad_source.add_(g_source) : g_source;
    grads[kNormSW] = g[1], grads[kNormSB] = g[2];
    grad_h_x = last_only ? at::zeros({B * T, d}, grad_q.options()) : grad_h_q;
  } else {
    grad_h_x = grad_h_s;  // keys and values came from LN_x(x) too
  }
  if (last_only) {
    grad_h_x.view({B, T, d}).select(1, T - 1).add_(grad_h_q.view({B, d}));
  } else if (!cross) {
    grad_h_x = grad_h_x.add(grad_h_q);
  }
  auto g_x = ::layer_norm_backward(grad_h_x.contiguous(), x.view({B * T, d}), w[kNormXW], saved[kAxMean], saved[kAxRstd]);
  auto grad_x = g_x[0].view({B, T, d});
  if (last_only) {
    grad_x.select(1, T - 1).add_(grad_y);  // the residual's share, on the last step
  } else {
    grad_x.add_(grad_y.view({B, T, d}));
  }
  grads[kNormXW] = g_x[1], grads[kNormXB] = g_x[2];
  grads[kWq] = grad_q.t().mm(saved[kAhq]), grads[kBq] = column_sums(grad_q);
  grads[kWkv] = grad_kv.t().mm(h_s), grads[kBkv] = column_sums(grad_kv);
  grads[kWo] = grad_a.t().mm(out.view({B * Tq, d})), grads[kBo] = column_sums(grad_a);
  return grad_x;
}

// The feed-forward sublayer, pre-LayerNorm with its residual: y = x + dropout(W2 relu_dropout(W1 LN(x) + b1) + b2).
// The first bias, relu and dropout are one in-place pass over the (N, 4d) hidden tensor.
at::Tensor feed_forward_sublayer(const at::Tensor& x, const at::Tensor& samples, const at::Tensor* w, const Stack& s, int64_t key_relu, int64_t key_res,
                                 std::vector<at::Tensor>& saved) {
  const int64_t d = x.size(-1);
  auto x2 = x.view({-1, d});                                          // (N, d)
  auto ln = ::layer_norm(x2, w[kNormFW], w[kNormFB], s.eps);          // h (N, d), mean (N), rstd (N)
  auto hidden = ln[0].mm(w[kW1].t());                                 // (N, 4d), its bias added by the next pass
  bias_relu_dropout_(hidden, w[kB1], s.p_relu, key_relu, samples);
  auto y = ::dropout_residual(at::addmm(w[kB2], hidden, w[kW2].t()), x2, s.p_res, key_res, samples);  // (N, d)
  saved.insert(saved.end(), {x2, ln[0], ln[1], ln[2], hidden});
  return y.view(x.sizes());
}

at::Tensor feed_forward_sublayer_backward(const at::Tensor& grad, const at::Tensor& samples, const at::Tensor* saved, const at::Tensor* w, const Stack& s,
                                          int64_t key_res, at::Tensor* grads) {
  const at::Tensor &x2 = saved[kFx], &h = saved[kFh], &hidden = saved[kFhidden];
  auto grad_y = grad.contiguous().view({-1, x2.size(1)});  // (N, d)
  auto grad_f = ::dropout(grad_y, s.p_res, key_res, samples);      // (N, d)
  auto grad_hidden = grad_f.mm(w[kW2]);                    // (N, 4d)
  grads[kB1] = relu_dropout_backward_(grad_hidden, hidden, s.p_relu);  // in place; (4d)
  auto g = ::layer_norm_backward(grad_hidden.mm(w[kW1]), x2, w[kNormFW], saved[kFmean], saved[kFrstd]);
  grads[kNormFW] = g[1], grads[kNormFB] = g[2];
  grads[kW1] = grad_hidden.t().mm(h);
  grads[kW2] = grad_f.t().mm(hidden), grads[kB2] = column_sums(grad_f);
  return g[0].add_(grad_y).view(grad.sizes());  // plus the residual's share
}

// One stack forward: its layers, then the final LayerNorm. `in` is the stack's inputs.
at::Tensor stack_forward(const Stack& s, const at::Tensor* in, const int64_t* keys, std::vector<at::Tensor>& saved) {
  at::Tensor x = in[0];
  const at::Tensor &source = in[1], &key_bias = in[2], &samples = in[3];
  for (int64_t l = 0; l < s.layers; ++l) {
    const at::Tensor* w = in + kStackHead + l * kLayerParams;
    const int64_t* key = keys + l * kLayerKeys;
    x = attention_sublayer(x, source, key_bias, samples, w, s, s.last_only && l == s.layers - 1, key[0], key[1], saved);
    x = feed_forward_sublayer(x, samples, w, s, key[2], key[3], saved);
  }
  const at::Tensor* norm = in + kStackHead + s.layers * kLayerParams;
  auto ln = ::layer_norm(x.view({-1, x.size(-1)}), norm[0], norm[1], s.eps);
  saved.insert(saved.end(), {x, ln[1], ln[2]});
  return ln[0].view(x.sizes());
}

// One stack backward: writes the gradients of its inputs into grads (the stack's slots).
void stack_backward(const Stack& s, const at::Tensor& grad, const at::Tensor* in, const at::Tensor* saved, const int64_t* keys,
                    at::Tensor* grads) {
  const at::Tensor &source = in[1], &key_bias = in[2], &samples = in[3];
  const at::Tensor* norm = in + kStackHead + s.layers * kLayerParams;
  const at::Tensor* norm_saved = saved + s.layers * (kAttentionSaved + kFeedForwardSaved);
  const at::Tensor& x_last = norm_saved[kNx];
  const int64_t d = x_last.size(-1);
  auto g = ::layer_norm_backward(grad.contiguous().view({-1, d}), x_last.view({-1, d}), norm[0], norm_saved[kNmean], norm_saved[kNrstd]);
  grads[kStackHead + s.layers * kLayerParams] = g[1], grads[kStackHead + s.layers * kLayerParams + 1] = g[2];
  at::Tensor grad_x = g[0].view(x_last.sizes()), grad_source;
  for (int64_t l = s.layers - 1; l >= 0; --l) {
    const at::Tensor* w = in + kStackHead + l * kLayerParams;
    const at::Tensor* layer_saved = saved + l * (kAttentionSaved + kFeedForwardSaved);
    at::Tensor* layer_grads = grads + kStackHead + l * kLayerParams;
    const int64_t* key = keys + l * kLayerKeys;
    grad_x = feed_forward_sublayer_backward(grad_x, samples, layer_saved + kAttentionSaved, w, s, key[3], layer_grads);
    grad_x = attention_sublayer_backward(grad_x, layer_saved, source, key_bias, samples, w, s, s.last_only && l == s.layers - 1, key[0], key[1],
                                         grad_source, layer_grads);
  }
  grads[0] = grad_x, grads[1] = grad_source;
}

// Runs task(i) for every stack i, the most expensive first: each on one thread of torch's OpenMP
// team while there is at least one stack per thread left, then the rest one at a time with the
// whole team (three equal memory stacks on two threads: two side by side, then one on both).
// Side by side only when the threads' shares of the estimated cost are within 10% of each other:
// otherwise a thread would wait for the other, and an unbalanced pair also streams large tensors
// at once. Measured on unaligned MOSI's memory stacks (T = 500 and 375): 939 ms side by side
// against 806 ms one at a time; its six cross-modal stacks balance, and gain 7% side by side.
template <typename Task>
void run_stacks(const std::vector<double>& cost, Task task) {
  const int64_t n = static_cast<int64_t>(cost.size()), threads = at::get_num_threads();
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  int64_t side_by_side = threads > 1 && !at::in_parallel_region() ? n / threads * threads : 0;
  if (side_by_side > 0) {  // the threads' shares, as dynamic scheduling of this order gives them
    std::vector<double> load(threads, 0.0);
    for (int64_t k = 0; k < side_by_side; ++k) *std::min_element(load.begin(), load.end()) += cost[order[k]];
    const double most = *std::max_element(load.begin(), load.end()), mean = std::accumulate(load.begin(), load.end(), 0.0) / threads;
    if (most > 1.1 * mean) side_by_side = 0;
  }
  if (side_by_side > 0) {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      c10::AutoGradMode no_grad(false);  // grad mode is per thread: the team's threads would record graphs
      for (int64_t k = next++; k < side_by_side; k = next++) task(order[k]);
    });
  }
  for (int64_t k = side_by_side; k < n; ++k) task(order[k]);
}

// The relative cost of a stack, for the order above: per layer, the attention's products over
// (Tq, S) and the linears' over Tq query rows (10 d^2 each) and S source rows (2 d^2).
double stack_cost(const Stack& s, const at::Tensor* in) {
  const double T = in[0].size(1), d = in[0].size(2), S = in[1].numel() > 0 ? in[1].size(1) : T;
  return s.layers * (2.0 * T * S * d + (10.0 * T + 2.0 * S) * d * d);
}

struct StacksFunction : public torch::autograd::Function<StacksFunction> {
  static variable_list forward(AutogradContext* ctx, at::TensorList inputs, const std::vector<int64_t>& ints,
                               const std::vector<double>& doubles, const std::vector<int64_t>& keys) {
    const auto stacks = parse_stacks(inputs, ints, doubles);
    variable_list in;
    in.reserve(inputs.size());
    for (const auto& t : inputs) in.push_back(t.contiguous());
    int64_t n_keys = 0;
    std::vector<double> cost;
    for (const auto& s : stacks) {
      n_keys += s.layers * kLayerKeys;
      cost.push_back(stack_cost(s, in.data() + s.first_input));
    }
    TORCH_CHECK(n_keys == static_cast<int64_t>(keys.size()), "stacks: ", keys.size(), " dropout keys given, the settings describe ", n_keys);
    variable_list outputs(stacks.size());
    std::vector<variable_list> saved(stacks.size());
    run_stacks(cost, [&](int64_t i) {
      const auto& s = stacks[i];
      saved[i].reserve(stack_saved(s.layers));
      outputs[i] = stack_forward(s, in.data() + s.first_input, keys.data() + s.first_key, saved[i]);
    });
    variable_list to_save = in;
    for (auto& part : saved) to_save.insert(to_save.end(), part.begin(), part.end());
    ctx->save_for_backward(to_save);
    ctx->saved_data["ints"] = ints;
    ctx->saved_data["doubles"] = doubles;
    ctx->saved_data["keys"] = keys;
    ctx->saved_data["cost"] = cost;
    return outputs;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto all = ctx->get_saved_variables();
    const auto ints = ctx->saved_data["ints"].toIntVector();
    const auto keys = ctx->saved_data["keys"].toIntVector();
    const auto cost = ctx->saved_data["cost"].toDoubleVector();
    int64_t n_inputs = 0;
    for (size_t i = 0; i < ints.size(); i += 3) n_inputs += stack_inputs(ints[i]);
    const variable_list in(all.begin(), all.begin() + n_inputs);
    const auto stacks = parse_stacks(in, ints, ctx->saved_data["doubles"].toDoubleVector());
    variable_list result(n_inputs + 3);  // and none for the two settings lists and the keys
    run_stacks(cost, [&](int64_t i) {
      const auto& s = stacks[i];
      // An output nothing read has no gradient: zeros, so its stack's inputs get theirs (zero).
      const auto grad = grads[i].defined() ? grads[i] : at::zeros_like(all[n_inputs + s.first_saved + stack_saved(s.layers) - kNormSaved]);
      stack_backward(s, grad, in.data() + s.first_input, all.data() + n_inputs + s.first_saved, keys.data() + s.first_key,
                     result.data() + s.first_input);
    });
    for (const auto& s : stacks) result[s.first_input + 2] = result[s.first_input + 3] = at::Tensor();  // key_bias, samples: no gradient
    return result;
  }
};

}  // namespace

// softmax(q k^T * scale + key_bias) with dropout p on the weights (the mask of call key `call` and
// the batch rows' sample indices `samples` (B,) int64), times v, differentiable in q and kv.
at::Tensor attention(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& key_bias, int64_t heads, double scale, double p,
                     int64_t call, const at::Tensor& samples) {
  return AttentionFunction::apply(q, kv, key_bias, heads, scale, p, call, samples);
}

// Independent transformer stacks as one autograd node, run side by side on torch's threads. Per
// stack, `inputs` holds x (B, T, d) already embedded, the source (B, S, d) already embedded or an
// empty tensor (self-attention), the keys' padding bias (B, S), the batch rows' sample indices (B,)
// int64, each layer's 16 parameters in LayerParam order (a self-attention layer's source norm: two
// empty tensors), and the final norm's weight and bias; `ints` holds (layers, heads, last_only),
// `doubles` (eps, p_attn, p_relu, p_res), and `keys` each layer's four dropout call keys
// (kLayerKeys). Returns each stack's final-norm output, (B, T, d), or (B, 1, d) with last_only.
variable_list stacks(const variable_list& inputs, const std::vector<int64_t>& ints, const std::vector<double>& doubles,
                     const std::vector<int64_t>& keys) {
  // As a TensorList, autograd takes each tensor as an input of the node (a vector would be one opaque argument).
  return StacksFunction::apply(at::TensorList(inputs), ints, doubles, keys);
}

at::Tensor dropout_autograd(const at::Tensor& x, double p, int64_t call, const at::Tensor& samples) {
  return DropoutFunction::apply(x, p, call, samples);
}

at::Tensor relu_dropout_autograd(const at::Tensor& x, double p, int64_t call, const at::Tensor& samples) {
  return ReluDropoutFunction::apply(x, p, call, samples);
}

at::Tensor layer_norm_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  return LayerNormFunction::apply(x, weight, bias, eps);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // No kernel touches a Python object: other Python threads (a data loader, a notebook's UI) run
  // while one computes.
  const auto release_gil = py::call_guard<py::gil_scoped_release>();
  m.def("forward", &forward, "fused attention forward (out, lse)", release_gil);
  m.def("backward", &backward, "fused attention backward (grad_q, grad_kv)", release_gil);
  m.def("dropout", &dropout, "x times the dropout factors of (call, samples) (forward and backward)", release_gil);
  m.def("stacks", &stacks, "independent transformer stacks (layers and final norm), differentiable, run side by side", release_gil);
  m.def("column_sums", &column_sums, "column sums of an (N, C) tensor, in a fixed order", release_gil);
  m.def("relu_dropout", &relu_dropout, "max(x, 0) times the dropout factors of (call, samples)", release_gil);
  m.def("relu_dropout_backward", &relu_dropout_backward, "the gradient of relu_dropout from its output", release_gil);
  m.def("layer_norm", &layer_norm, "layer norm over the last dim (y, mean, rstd)", release_gil);
  m.def("layer_norm_backward", &layer_norm_backward, "layer norm backward (grad_x, grad_weight, grad_bias)", release_gil);
  m.def("dropout_factors", &dropout_factors, "the dropout factors of (call, samples) for a (B, R, C) tensor", release_gil);
  m.def("attention", &attention, "differentiable fused attention, dropout keyed by (call, samples)", release_gil);
  m.def("dropout_autograd", &dropout_autograd, "differentiable dropout keyed by (call, samples)", release_gil);
  m.def("relu_dropout_autograd", &relu_dropout_autograd, "differentiable relu then dropout keyed by (call, samples)", release_gil);
  m.def("layer_norm_autograd", &layer_norm_autograd, "differentiable layer norm over the last dim", release_gil);
}
