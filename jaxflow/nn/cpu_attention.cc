// Fused softmax attention for float32 on CPU: an XLA FFI handler (loaded by cpu_attention.py).
//
// q [N, Tq, H, hd], kt [N, K, hd, S] (keys transposed), v [N, K, S, hd], mask [N, M, Tq, S] (M = 1 or H, true =
// may attend) -> out [N, Tq, H, hd], top and total [N, H, Tq]: per query row the max score and the sum of
// exp(score - top), from which the weights exp(score - top) / total can be recomputed. Query head h reads key
// head h / (H / K); hd is a multiple of the vector width (the caller pads it); N may be several leading dims.
//
// A work item is a group of MR query rows of one (n, h). It walks the keys in blocks of KB (aligned at key 0)
// with an online softmax and skips each chunk of CH keys that the mask closes for every row of the group, so a
// causal mask costs half and a cut costs nothing. Masked scores are -inf and add exact zeros: a row's result does
// not depend on which other rows share its group, its call or its thread. A row that may attend to no key gets
// the mean of all values, as a softmax over equal scores gives: top = the float32 minimum, total = S.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
#define JF_LANES 16
#else
#define JF_LANES 8
#endif
constexpr int W = JF_LANES;        // floats per vector
constexpr int MR = W == 16 ? 8 : 4;  // query rows per micro-kernel: MR x 2 accumulators fit the registers
constexpr int CH = 2 * W;          // keys per chunk: the unit of mask skipping and of the score micro-kernel
constexpr int KB = 4 * CH;         // keys per online-softmax block
typedef float vf __attribute__((vector_size(4 * JF_LANES)));
typedef int32_t vi __attribute__((vector_size(4 * JF_LANES)));
typedef uint8_t vb __attribute__((vector_size(JF_LANES)));

constexpr float INF = std::numeric_limits<float>::infinity();

inline vf load(const float* p) {
  vf x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
inline void store(float* p, vf x) { std::memcpy(p, &x, sizeof x); }
inline vf splat(float x) { return vf{} + x; }

// exp(x) = 2^n e^r, n = round(x / ln 2), r = x - n ln 2 in two parts (Cody-Waite), e^r by its degree-7 Taylor
// polynomial (|r| <= ln2 / 2: truncation < 1e-8 relative); 0 below -87.34 (the smallest normal result), exp(-inf) = 0.
inline vf vexp(vf x) {
  const vf lo = splat(-87.336544f);
  vf c = x < lo ? lo : x;
  c = c > 88.0f ? splat(88.0f) : c;
  const vf n = (c * 1.44269504f + 12582912.0f) - 12582912.0f;  // + 1.5 * 2^23 rounds to an integer
  vf r = c - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;  // 2^n as a float's bits
  return x < lo ? splat(0.0f) : p * (vf)bits;
}

struct Problem {
  const float* q;
  const float* kt;
  const float* v;
  const uint8_t* mask;
  float* out;
  float* top;
  float* total;
  int64_t n, tq, h, kh, hd, s, m;
  float scale;
  int64_t groups;  // ceil(tq / MR)
};

struct Scratch {  // one worker's buffers
  std::vector<float> q, o, p, kt_tail;  // [MR, hd], [MR, hd], [MR, KB], [hd, CH]
  std::vector<uint8_t> mask_tail;       // [MR, CH]
  explicit Scratch(const Problem& pr)
      : q(MR * pr.hd), o(MR * pr.hd), p(MR * KB), kt_tail(pr.hd * CH), mask_tail(MR * CH) {}
};

// acc[r] = q[r] . kt[:, 0:CH] for the MR rows of q [MR, hd]; kt rows are ldk apart.
inline void scores(const float* q, const float* kt, int64_t ldk, int64_t hd, vf acc[MR][2]) {
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = vf{};
  for (int64_t d = 0; d < hd; ++d) {
    const vf k0 = load(kt + d * ldk), k1 = load(kt + d * ldk + W);
    for (int r = 0; r < MR; ++r) {
      const float x = q[r * hd + d];
      acc[r][0] += x * k0;
      acc[r][1] += x * k1;
    }
  }
}

// o[:, d0:d0 + NV W] = alpha * o + p . v over the live chunks: p [MR, KB] over the block's keys, v [keys, hd]
// from the block's first key, keys = the block's keys that exist.
template <int NV>
inline void values(float* o, int64_t hd, int64_t d0, const float* alpha, const float* p, const int* live,
                   int nlive, const float* v, int64_t keys) {
  vf acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < NV; ++i) acc[r][i] = load(o + r * hd + d0 + i * W) * alpha[r];
  for (int c = 0; c < nlive; ++c) {
    const int64_t end = std::min<int64_t>(live[c] + CH, keys);
    for (int64_t j = live[c]; j < end; ++j) {
      vf x[NV];
      for (int i = 0; i < NV; ++i) x[i] = load(v + j * hd + d0 + i * W);
      for (int r = 0; r < MR; ++r) {
        const float pj = p[r * KB + j];
        for (int i = 0; i < NV; ++i) acc[r][i] += pj * x[i];
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < NV; ++i) store(o + r * hd + d0 + i * W, acc[r][i]);
}

bool any(const uint8_t* m) {
  uint64_t bits = 0;
  for (int i = 0; i < CH; i += 8) {
    uint64_t x;
    std::memcpy(&x, m + i, 8);
    bits |= x;
  }
  return bits != 0;
}

// Item -> (row group, n, h): the last row groups, which a causal mask makes the longest, come first.
void run_item(const Problem& pr, int64_t item, Scratch& sc) {
  const int64_t nh = item % (pr.n * pr.h), g = pr.groups - 1 - item / (pr.n * pr.h);
  const int64_t n = nh / pr.h, head = nh % pr.h, kvh = head / (pr.h / pr.kh);
  const int64_t hd = pr.hd, s = pr.s, t0 = g * MR, rows = std::min<int64_t>(MR, pr.tq - t0);
  const float* kt = pr.kt + (n * pr.kh + kvh) * hd * s;
  const float* v = pr.v + (n * pr.kh + kvh) * s * hd;
  // rows past Tq repeat the last row: they change no chunk's liveness, and their results are dropped
  const uint8_t* mrow[MR];
  float* q = sc.q.data();
  for (int r = 0; r < MR; ++r) {
    const int64_t t = t0 + std::min<int64_t>(r, rows - 1);
    mrow[r] = pr.mask + ((n * pr.m + (pr.m == 1 ? 0 : head)) * pr.tq + t) * s;
    std::memcpy(q + r * hd, pr.q + ((n * pr.tq + t) * pr.h + head) * hd, hd * sizeof(float));
  }
  const int64_t whole = s / CH * CH;  // keys in whole chunks; a last partial chunk reads zero-padded copies
  if (whole < s) {
    std::fill(sc.kt_tail.begin(), sc.kt_tail.end(), 0.0f);
    std::fill(sc.mask_tail.begin(), sc.mask_tail.end(), 0);
    for (int64_t d = 0; d < hd; ++d) std::copy(kt + d * s + whole, kt + d * s + s, sc.kt_tail.data() + d * CH);
    for (int r = 0; r < MR; ++r) std::copy(mrow[r] + whole, mrow[r] + s, sc.mask_tail.data() + r * CH);
  }
  float* o = sc.o.data();
  float* p = sc.p.data();
  std::fill(sc.o.begin(), sc.o.end(), 0.0f);
  float top[MR], total[MR], alpha[MR];
  std::fill(top, top + MR, -INF);
  std::fill(total, total + MR, 0.0f);
  for (int64_t b0 = 0; b0 < s; b0 += KB) {
    int live[KB / CH], nlive = 0;  // chunk offsets within the block that some row may attend to
    for (int64_t j0 = b0; j0 < std::min(b0 + KB, s); j0 += CH) {
      const bool tail = j0 == whole;
      const uint8_t* mk[MR];
      bool open = false;
      for (int r = 0; r < MR; ++r) {
        mk[r] = tail ? sc.mask_tail.data() + r * CH : mrow[r] + j0;
        open = open || any(mk[r]);
      }
      if (!open) continue;
      vf acc[MR][2];
      scores(q, tail ? sc.kt_tail.data() : kt + j0, tail ? CH : s, hd, acc);
      const int64_t c = j0 - b0;
      for (int r = 0; r < MR; ++r)
        for (int i = 0; i < 2; ++i) {
          vb bytes;
          std::memcpy(&bytes, mk[r] + i * W, W);
          const vi allowed = __builtin_convertvector(bytes, vi) != 0;
          store(p + r * KB + c + i * W, allowed ? acc[r][i] * pr.scale : splat(-INF));
        }
      live[nlive++] = static_cast<int>(c);
    }
    if (!nlive) continue;
    for (int r = 0; r < MR; ++r) {  // online softmax: p = exp(score - new top), rescale by exp(old - new top)
      float* pr_ = p + r * KB;
      vf mx = splat(-INF);
      for (int c = 0; c < nlive; ++c)
        for (int i = 0; i < 2; ++i) {
          const vf x = load(pr_ + live[c] + i * W);
          mx = x > mx ? x : mx;
        }
      float block_top = -INF;
      for (int i = 0; i < W; ++i) block_top = std::max(block_top, mx[i]);
      const float new_top = std::max(top[r], block_top);
      const float sub = new_top == -INF ? 0.0f : new_top;  // no key yet: p = exp(-inf) = 0, alpha = 0
      alpha[r] = std::exp(top[r] - sub);
      vf sum = vf{};
      for (int c = 0; c < nlive; ++c)
        for (int i = 0; i < 2; ++i) {
          const vf e = vexp(load(pr_ + live[c] + i * W) - sub);
          store(pr_ + live[c] + i * W, e);
          sum += e;
        }
      float block_sum = 0.0f;
      for (int i = 0; i < W; ++i) block_sum += sum[i];
      total[r] = total[r] * alpha[r] + block_sum;
      top[r] = new_top;
    }
    const int64_t keys = std::min<int64_t>(KB, s - b0);
    int64_t d0 = 0;
    for (; d0 + 2 * W <= hd; d0 += 2 * W) values<2>(o, hd, d0, alpha, p, live, nlive, v + b0 * hd, keys);
    if (d0 < hd) values<1>(o, hd, d0, alpha, p, live, nlive, v + b0 * hd, keys);
  }
  bool mean_needed = false;
  for (int r = 0; r < rows; ++r) mean_needed = mean_needed || total[r] == 0.0f;
  std::vector<float> mean;
  if (mean_needed) {  // [hd]: the mean of all values
    mean.assign(hd, 0.0f);
    for (int64_t j = 0; j < s; ++j)
      for (int64_t d = 0; d < hd; ++d) mean[d] += v[j * hd + d];
    for (int64_t d = 0; d < hd; ++d) mean[d] /= static_cast<float>(s);
  }
  for (int r = 0; r < rows; ++r) {
    float* out = pr.out + ((n * pr.tq + t0 + r) * pr.h + head) * hd;
    const int64_t stat = (n * pr.h + head) * pr.tq + t0 + r;
    if (total[r] == 0.0f) {
      std::copy(mean.begin(), mean.end(), out);
      pr.top[stat] = std::numeric_limits<float>::lowest();
      pr.total[stat] = static_cast<float>(s);
    } else {
      for (int64_t d = 0; d < hd; ++d) out[d] = o[r * hd + d] / total[r];
      pr.top[stat] = top[r];
      pr.total[stat] = total[r];
    }
  }
}

// The items handed out one at a time by an atomic counter to the calling thread and helpers on XLA's intra-op
// pool. A helper that starts after the caller returned finds no item left and touches only this shared state.
struct Work {
  Problem pr;
  int64_t items;
  std::atomic<int64_t> next{0};
  std::atomic<int> busy{0};
  std::mutex mu;
  std::condition_variable done;

  void drain() {
    if (next.load() >= items) return;
    Scratch sc(pr);
    for (int64_t i; (i = next.fetch_add(1)) < items;) run_item(pr, i, sc);
  }
};

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> kt,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out,
                     ffi::ResultBuffer<ffi::F32> top, ffi::ResultBuffer<ffi::F32> total, float scale) {
  const auto qd = q.dimensions(), kd = kt.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  if (qd.size() < 3) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "cpu_attention: q's rank < 3");
  const size_t lead = qd.size() - 3;
  if (kd.size() != lead + 3 || vd.size() != lead + 3 || md.size() != lead + 3)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "cpu_attention: ranks do not match");
  int64_t n = 1;
  for (size_t i = 0; i < lead; ++i) {
    if (kd[i] != qd[i] || vd[i] != qd[i] || md[i] != qd[i])
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "cpu_attention: leading dims differ");
    n *= qd[i];
  }
  const int64_t tq = qd[lead], h = qd[lead + 1], hd = qd[lead + 2], kh = kd[lead], s = kd[lead + 2];
  const int64_t m = md[lead];
  if (hd % W || kd[lead + 1] != hd || vd[lead] != kh || vd[lead + 1] != s || vd[lead + 2] != hd || h % kh ||
      (m != 1 && m != h) || md[lead + 1] != tq || md[lead + 2] != s)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "cpu_attention: shapes do not match");
  if (n * tq * h == 0) return ffi::Error::Success();
  if (s == 0) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "cpu_attention: no keys");

  const int64_t groups = (tq + MR - 1) / MR;
  auto work = std::make_shared<Work>();
  work->pr = Problem{q.typed_data(), kt.typed_data(), v.typed_data(),
                     reinterpret_cast<const uint8_t*>(mask.typed_data()), out->typed_data(), top->typed_data(),
                     total->typed_data(), n, tq, h, kh, hd, s, m, scale, groups};
  work->items = n * h * groups;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->items) - 1;
  for (int64_t i = 0; i < helpers; ++i)
    pool.Schedule([work] {
      work->busy.fetch_add(1);
      work->drain();
      {
        std::lock_guard<std::mutex> lock(work->mu);
        work->busy.fetch_sub(1);
      }
      work->done.notify_all();
    });
  work->drain();
  std::unique_lock<std::mutex> lock(work->mu);
  work->done.wait(lock, [&] { return work->busy.load() == 0; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxflowCpuAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q [N, Tq, H, hd]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kt [N, K, hd, S]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v [N, K, S, hd]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask [N, 1|H, Tq, S]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out [N, Tq, H, hd]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // top [N, H, Tq]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // total [N, H, Tq]
                                  .Attr<float>("scale"));
