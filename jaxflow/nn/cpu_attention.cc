// Fused softmax attention for float32 on CPU: an XLA FFI handler (loaded by cpu_attention.py).
//
// q [N, Tq, H, hd], kt [N, K, ceil(S / CH), hd, CH] (the keys transposed in chunks of CH, zero-padded),
// v [N, K, S, hd], mask [N, M, Tq, S] (M = 1 or H, true = may attend) -> out [N, Tq, H, hd], top and total
// [N, H, Tq]: per query row the max score and the sum of exp(score - top), from which the weights
// exp(score - top) / total can be recomputed. Query head h reads key head h / (H / K); hd is a multiple of the
// vector width (the caller pads it); N may be several leading dims.
//
// A work item is a block of GB groups of MR query rows of one (n, h). It walks the keys in blocks of KB (aligned
// at key 0) with an online softmax per row, and each group skips the chunks of CH keys that the mask closes for
// all its rows, so a causal mask costs half and a cut costs nothing. Masked scores are -inf and add exact zeros:
// a row's result does not depend on which other rows share its group, its call or its thread. A row that may
// attend to no key gets the mean of all values, as a softmax over equal scores gives: top = the float32 minimum,
// total = S.

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
constexpr int KB = 8 * CH;         // keys per online-softmax block
constexpr int GB = 4;              // groups of MR rows per work item: they share each key block while it is cached
typedef float vf __attribute__((vector_size(4 * JF_LANES)));
typedef int32_t vi __attribute__((vector_size(4 * JF_LANES)));

constexpr float INF = std::numeric_limits<float>::infinity();

inline vf load(const float* p) {
  vf x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
inline void store(float* p, vf x) { std::memcpy(p, &x, sizeof x); }
inline vf splat(float x) { return vf{} + x; }

// exp(x) for x <= 0: 2^n e^r, n = round(x / ln 2), r = x - n ln 2 in two parts (Cody-Waite), e^r by its degree-7
// Taylor polynomial (|r| <= ln2 / 2: truncation < 1e-8 relative). Below x = -88, n = -127 makes 2^n's bits 0: the
// result is 0 (exp(-inf) too), as it is from about -87.7 on.
inline vf vexp(vf x) {
  const vf c = x > -88.0f ? x : splat(-88.0f);
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
  return p * (vf)bits;
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
  int64_t blocks;  // row blocks: ceil(tq / (GB MR))
};

struct Scratch {  // one worker's buffers
  std::vector<float> q, o, p;         // [GB, hd, MR] (transposed), [GB, MR, hd], [GB, MR, KB]
  std::vector<uint8_t> mask_tail;     // [GB MR, CH]: the last partial chunk's mask, zero-padded
  float top[GB * MR], total[GB * MR], alpha[GB * MR];
  int live[GB][KB / CH], nlive[GB];   // per group, the offsets in the block of the chunks it may attend to
  explicit Scratch(const Problem& pr)
      : q(GB * pr.hd * MR), o(GB * MR * pr.hd), p(GB * MR * KB), mask_tail(GB * MR * CH) {}
};

inline float hmax(vf x) {
  float a[W];
  store(a, x);
  float m = a[0];
  for (int i = 1; i < W; ++i) m = std::max(m, a[i]);
  return m;
}

inline float hsum(vf x) {
  float a[W];
  store(a, x);
  float m = a[0];
  for (int i = 1; i < W; ++i) m += a[i];
  return m;
}

// acc[r] = q[:, r] . kt[:, 0:CH] for the MR rows of q [hd, MR] and one chunk of keys kt [hd, CH].
inline void scores(const float* q, const float* kt, int64_t hd, vf acc[MR][2]) {
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = vf{};
  for (int64_t d = 0; d < hd; ++d) {
    const vf k0 = load(kt + d * CH), k1 = load(kt + d * CH + W);
    for (int r = 0; r < MR; ++r) {
      const float x = q[d * MR + r];
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

// x[j] = scale x[j] where the mask allows key j, else -inf (restrict: the bytes may not alias the scores, so
// this vectorises)
inline void mask_scores(float* __restrict x, const uint8_t* __restrict m, float scale) {
  for (int j = 0; j < CH; ++j) x[j] = m[j] ? x[j] * scale : -INF;
}

// Whether a chunk's mask bytes (0 or 1) allow any key, and all keys.
bool any(const uint8_t* m) {
  uint64_t bits = 0;
  for (int i = 0; i < CH; i += 8) {
    uint64_t x;
    std::memcpy(&x, m + i, 8);
    bits |= x;
  }
  return bits != 0;
}

bool all(const uint8_t* m) {
  uint64_t bits = ~uint64_t{0};
  for (int i = 0; i < CH; i += 8) {
    uint64_t x;
    std::memcpy(&x, m + i, 8);
    bits &= x;
  }
  return bits == 0x0101010101010101;
}

// One key block for one group of MR rows: the scores of its live chunks, then the online softmax: p = exp(score -
// new top) and alpha = exp(old top - new top), by which total (here) and o (in group_values) are rescaled.
void group_scores(const Problem& pr, Scratch& sc, int gi, const uint8_t* const* mrow, const float* kt, int64_t b0) {
  const int64_t hd = pr.hd, whole = pr.s / CH * CH, keys = std::min<int64_t>(KB, pr.s - b0);
  float* p = sc.p.data() + gi * MR * KB;
  int* live = sc.live[gi];
  int& nlive = sc.nlive[gi];
  nlive = 0;
  vf mx[MR];                     // per row, lane-wise maxima of its scores
  for (int r = 0; r < MR; ++r) mx[r] = splat(-INF);
  for (int64_t j0 = b0; j0 < b0 + keys; j0 += CH) {
    const uint8_t* mk[MR];
    bool open = false, full = true;
    for (int r = 0; r < MR; ++r) {
      mk[r] = j0 == whole ? sc.mask_tail.data() + (gi * MR + r) * CH : mrow[r] + j0;
      open = open || any(mk[r]);
      full = full && all(mk[r]);
    }
    if (!open) continue;
    vf acc[MR][2];
    scores(sc.q.data() + gi * hd * MR, kt + j0 * hd, hd, acc);
    const int64_t c = j0 - b0;
    for (int r = 0; r < MR; ++r) {
      float* x = p + r * KB + c;
      for (int i = 0; i < 2; ++i) store(x + i * W, full ? acc[r][i] * pr.scale : acc[r][i]);
      if (!full) mask_scores(x, mk[r], pr.scale);
      for (int i = 0; i < 2; ++i) {
        const vf y = load(x + i * W);
        mx[r] = y > mx[r] ? y : mx[r];
      }
    }
    live[nlive++] = static_cast<int>(c);
  }
  if (!nlive) return;
  float* top = sc.top + gi * MR;
  float* total = sc.total + gi * MR;
  vf old = splat(0.0f), sub = splat(0.0f);
  for (int r = 0; r < MR; ++r) {
    old[r] = top[r];
    top[r] = std::max(top[r], hmax(mx[r]));
    sub[r] = top[r] == -INF ? 0.0f : top[r];  // no key yet: p = exp(-inf) = 0 and alpha = 0
  }
  const vf alpha = vexp(old - sub);
  for (int r = 0; r < MR; ++r) sc.alpha[gi * MR + r] = alpha[r];
  for (int r = 0; r < MR; ++r) {
    vf sum = vf{};
    for (int c = 0; c < nlive; ++c)
      for (int i = 0; i < 2; ++i) {
        float* x = p + r * KB + live[c] + i * W;
        const vf e = vexp(load(x) - sub[r]);
        store(x, e);
        sum += e;
      }
    total[r] = total[r] * alpha[r] + hsum(sum);
  }
}

// o += p v for one group and key block, after group_scores.
void group_values(const Problem& pr, Scratch& sc, int gi, const float* v, int64_t b0) {
  const int64_t hd = pr.hd, keys = std::min<int64_t>(KB, pr.s - b0);
  if (!sc.nlive[gi]) return;
  float* o = sc.o.data() + gi * MR * hd;
  const float* p = sc.p.data() + gi * MR * KB;
  const float* alpha = sc.alpha + gi * MR;
  int64_t d0 = 0;
  for (; d0 + 2 * W <= hd; d0 += 2 * W) values<2>(o, hd, d0, alpha, p, sc.live[gi], sc.nlive[gi], v + b0 * hd, keys);
  if (d0 < hd) values<1>(o, hd, d0, alpha, p, sc.live[gi], sc.nlive[gi], v + b0 * hd, keys);
}

// Item -> (row block, n, h): the last row blocks, which a causal mask makes the longest, come first. The GB groups
// of a row block take each key block in turn, while it is in cache.
void run_item(const Problem& pr, int64_t item, Scratch& sc) {
  const int64_t nh = item % (pr.n * pr.h), t0 = (pr.blocks - 1 - item / (pr.n * pr.h)) * GB * MR;
  const int64_t n = nh / pr.h, head = nh % pr.h, kvh = head / (pr.h / pr.kh);
  const int64_t hd = pr.hd, s = pr.s, rows = std::min<int64_t>(GB * MR, pr.tq - t0);
  const int groups = static_cast<int>((rows + MR - 1) / MR);
  const float* kt = pr.kt + (n * pr.kh + kvh) * hd * ((s + CH - 1) / CH * CH);
  const float* v = pr.v + (n * pr.kh + kvh) * s * hd;
  // rows past Tq repeat the last row: they change no chunk's liveness, and their results are dropped
  const uint8_t* mrow[GB * MR];
  for (int64_t r = 0; r < groups * MR; ++r) {
    const int64_t t = t0 + std::min(r, rows - 1);
    mrow[r] = pr.mask + ((n * pr.m + (pr.m == 1 ? 0 : head)) * pr.tq + t) * s;
    const float* qr = pr.q + ((n * pr.tq + t) * pr.h + head) * hd;
    for (int64_t d = 0; d < hd; ++d) sc.q[(r / MR * hd + d) * MR + r % MR] = qr[d];
  }
  const int64_t whole = s / CH * CH;
  if (whole < s) {
    std::fill(sc.mask_tail.begin(), sc.mask_tail.end(), 0);
    for (int r = 0; r < groups * MR; ++r) std::copy(mrow[r] + whole, mrow[r] + s, sc.mask_tail.data() + r * CH);
  }
  std::fill(sc.o.begin(), sc.o.end(), 0.0f);
  std::fill(sc.top, sc.top + GB * MR, -INF);
  std::fill(sc.total, sc.total + GB * MR, 0.0f);
  for (int64_t b0 = 0; b0 < s; b0 += KB) {  // the groups take the block's keys, then its values, while cached
    for (int gi = 0; gi < groups; ++gi) group_scores(pr, sc, gi, mrow + gi * MR, kt, b0);
    for (int gi = 0; gi < groups; ++gi) group_values(pr, sc, gi, v, b0);
  }
  std::vector<float> mean;  // [hd]: the mean of all values, for rows that may attend to no key
  for (int64_t r = 0; r < rows; ++r) {
    float* out = pr.out + ((n * pr.tq + t0 + r) * pr.h + head) * hd;
    const int64_t stat = (n * pr.h + head) * pr.tq + t0 + r;
    if (sc.total[r] == 0.0f) {
      if (mean.empty()) {
        mean.assign(hd, 0.0f);
        for (int64_t j = 0; j < s; ++j)
          for (int64_t d = 0; d < hd; ++d) mean[d] += v[j * hd + d];
        for (int64_t d = 0; d < hd; ++d) mean[d] /= static_cast<float>(s);
      }
      std::copy(mean.begin(), mean.end(), out);
      pr.top[stat] = std::numeric_limits<float>::lowest();
      pr.total[stat] = static_cast<float>(s);
    } else {
      for (int64_t d = 0; d < hd; ++d) out[d] = sc.o[r * hd + d] / sc.total[r];
      pr.top[stat] = sc.top[r];
      pr.total[stat] = sc.total[r];
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
  if (kd.size() != lead + 4 || vd.size() != lead + 3 || md.size() != lead + 3)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "cpu_attention: ranks do not match");
  int64_t n = 1;
  for (size_t i = 0; i < lead; ++i) {
    if (kd[i] != qd[i] || vd[i] != qd[i] || md[i] != qd[i])
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "cpu_attention: leading dims differ");
    n *= qd[i];
  }
  const int64_t tq = qd[lead], h = qd[lead + 1], hd = qd[lead + 2], kh = vd[lead], s = vd[lead + 1];
  const int64_t m = md[lead];
  if (hd % W || vd[lead + 2] != hd || kd[lead] != kh || kd[lead + 1] != (s + CH - 1) / CH || kd[lead + 2] != hd ||
      kd[lead + 3] != CH || h % kh || (m != 1 && m != h) || md[lead + 1] != tq || md[lead + 2] != s)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "cpu_attention: shapes do not match");
  if (n * tq * h == 0) return ffi::Error::Success();
  if (s == 0) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "cpu_attention: no keys");

  const int64_t blocks = (tq + GB * MR - 1) / (GB * MR);
  auto work = std::make_shared<Work>();
  work->pr = Problem{q.typed_data(), kt.typed_data(), v.typed_data(),
                     reinterpret_cast<const uint8_t*>(mask.typed_data()), out->typed_data(), top->typed_data(),
                     total->typed_data(), n, tq, h, kh, hd, s, m, scale, blocks};
  work->items = n * h * blocks;
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
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kt [N, K, S / CH, hd, CH]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v [N, K, S, hd]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask [N, 1|H, Tq, S]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out [N, Tq, H, hd]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // top [N, H, Tq]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // total [N, H, Tq]
                                  .Attr<float>("scale"));

// Keys per chunk: the caller lays the keys out in chunks of this many, zero-padded.
extern "C" int JaxflowCpuAttentionChunk() { return CH; }
