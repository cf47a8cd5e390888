// XLA:CPU kernels (XLA FFI handlers) for the reads of a cached decode step: one query position of
// grouped-query attention over the whole cross-attention cache, the few-row products of the
// step's projections, MLP and logits, and greedy decoding's argmax over the logits.
//
// A decode step at serving batch sizes should read the cache and the weights once, at the
// machine's read bandwidth. Both kernels stream their large operand once, in an order the
// hardware prefetchers can follow (or prefetched ahead), while register tiles do the multiply-adds
// each loaded float allows; the work is shared out over XLA's intra-op thread pool.
//
// Built by gqa_t5x/cpu_kernels/__init__.py with -march=native for the machine it runs on. Vectors
// are GCC/Clang vector extensions as wide as the CPU's float registers, and the register tiles are
// sized to its register file (kLanes, kTileSums).
#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Why per CPU: with 16-float vectors (two AVX2 registers each) on a 2-core Zen 3, the 24-sum tiles
// chosen for AVX-512's 32 registers needed 48 of its 16 and spilled: every kernel ran 2-8x slower.
// kTileSums leaves the rest of the registers for a tile's loaded vectors and a broadcast.
// GQA_T5X_VECTOR_FLOATS and GQA_T5X_TILE_SUMS, defined together, choose a tiling on any CPU (the
// tests build each one; vector extensions compile to whatever registers there are).
#if defined(GQA_T5X_VECTOR_FLOATS) && defined(GQA_T5X_TILE_SUMS)
constexpr int64_t kLanes = GQA_T5X_VECTOR_FLOATS;
constexpr int kTileSums = GQA_T5X_TILE_SUMS;
#elif defined(__AVX512F__)
constexpr int64_t kLanes = 16;
constexpr int kTileSums = 24;  // of 32 registers
#elif defined(__AVX__)
constexpr int64_t kLanes = 8;
constexpr int kTileSums = 12;  // of 16 registers
#elif defined(__aarch64__)
constexpr int64_t kLanes = 4;
constexpr int kTileSums = 24;  // of 32 NEON registers
#else
constexpr int64_t kLanes = 4;
constexpr int kTileSums = 12;  // of SSE's 16 registers
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef uint32_t UVec __attribute__((vector_size(kLanes * sizeof(uint32_t))));

inline Vec Load(const float* p) { Vec v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }
// x - 0 is x for every float (0 + x is not, for x = -0), so this compiles to one broadcast.
inline Vec Splat(float x) { return x - Vec{}; }
inline float Sum(Vec v) { float s = 0; for (int i = 0; i < kLanes; ++i) s += v[i]; return s; }
inline float Max(Vec v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

// exp(x) for the x <= 0 of a softmax after its max is subtracted: Cody-Waite reduction to
// [-ln2/2, ln2/2] and Cephes' degree-6 polynomial (about 1 ulp); below -87 it returns 0, so
// masked positions (bias -1e10) weigh exactly nothing, as in XLA's softmax.
inline Vec Exp(Vec x) {
  const Vec lowest = Splat(-87.0f);
  const Vec xc = x < lowest ? lowest : x;
  // n = round(x / ln2): adding 1.5 * 2^23 rounds to an integer and leaves it in the low mantissa
  // bits, so 2^n is those bits plus the exponent bias, shifted into the exponent.
  const Vec shifter = Splat(12582912.0f);
  const Vec t = xc * 1.44269504088896341f + shifter;
  const Vec nf = t - shifter;
  const Vec r = xc - nf * 0.693359375f - nf * -2.12194440e-4f;
  Vec p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  UVec bits;  // unsigned: the shift drops the shifter's own bits
  std::memcpy(&bits, &t, sizeof(bits));
  bits = (bits + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < lowest ? Splat(0.0f) : p * scale;
}

// A per-thread scratch buffer of at least `floats` floats, aligned to a cache line: vector loads
// that straddle two lines run at well under half speed.
float* Scratch(int64_t floats) {
  thread_local std::unique_ptr<float, decltype(&std::free)> buffer(nullptr, &std::free);
  thread_local int64_t capacity = 0;
  if (capacity < floats) {
    const int64_t bytes = (floats * int64_t{sizeof(float)} + 63) / 64 * 64;
    buffer.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
    capacity = floats;
  }
  return buffer.get();
}

inline float ExpScalar(float x) {
  Vec v = Exp(Splat(x));
  return v[0];
}

// Below this many multiply-adds (or floats read) in all, a kernel runs on the calling thread
// alone: waking a pool worker costs about as much as the work it would take over. Measured on 2
// cores: a toy model's decode (d_model 64, vocabulary 256, batch 2) ran 25-35% faster with it,
// the reproduction's model (d_model 128, batch 8: 65536 and more per kernel) alike, and a limit
// of 2^19 made the latter 25% slower.
constexpr int64_t kInlineWork = int64_t{1} << 16;

// Runs body(i) for every i in [0, n) on the calling thread and, unless `total_work` is under
// kInlineWork, the pool's workers, returning when all are done. Items are claimed from a shared
// counter, so a worker that starts late (the pool busy) finds nothing left and touches nothing
// but the shared state it co-owns.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t total_work, const Body& body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &body]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      body(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers =
      total_work < kInlineWork ? 0 : std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([state, n, work]() { if (state->next.load() < n) work(); });
  }
  work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// ---- One query position of grouped attention over a cache stored [b, G, d, s] ------------------
//
// Per (batch, kv head): scores [g, s] = q [g, d] . keys [d, s] + bias; softmax over s;
// out [g, d] = probabilities [g, s] . values [d, s]. The g = H/G query heads of a group share each
// key and value vector, so each is loaded once for g multiply-adds. The probabilities stay in a
// per-thread buffer ([g, s], a few hundred KiB at most), so keys and values are each read once.
// The bias is one row [s] for every head (cross-attention: the encoder's padding) or a row per
// head [g, s], bias_stride = s apart (self-attention: T5's relative position bias and the causal
// mask).

// Access order, measured on a 2-core Xeon (reading 512 KiB [64, 2048] blocks): 8 rows at a time,
// 128 bytes per row per step and each row prefetched 1 KiB ahead read 30-50% faster than whole
// rows one or two at a time, or 64 rows at once. Register tiles of 8 query heads x 3 vectors of
// scores and 8 heads x 3 value rows (24 sums each, from AVX-512's 32 registers) ran the G = 8 and
// G = 1 steps 10-13% faster than 8 x 2 and 4 x 4 (docs/benchmarks.md); with 16 registers, 4 x 3.
constexpr int kTileHeads = kTileSums / 3;  // query heads per tile, against 3 vectors or value rows
constexpr int64_t kScoreRows = 8;  // key rows streamed together
constexpr int64_t kManyQueries = 16;
constexpr int64_t kScorePrefetch = 256;  // floats ahead in each key row
constexpr int64_t kMixPrefetch = 1024;  // floats ahead in each value row

// p [g, s0:s0 + SV vectors] (+)= q [g, d0:d1] . keys [d0:d1, s0:...] for GB rows (+ bias if first).
template <int GB, int SV>
void ScoresTile(const float* q, const float* keys, const float* bias, int64_t bias_stride,
                float* p, int64_t ldp, int64_t D, int64_t S, int64_t g0, int64_t s0, int64_t d0,
                int64_t d1) {
  Vec acc[GB][SV];
  for (int i = 0; i < GB; ++i) {
    for (int j = 0; j < SV; ++j) {
      acc[i][j] = d0 == 0 ? Load(bias + (g0 + i) * bias_stride + s0 + j * kLanes)
                          : Load(p + (g0 + i) * ldp + s0 + j * kLanes);
    }
  }
  for (int64_t d = d0; d < d1; ++d) {
    const float* row = keys + d * S + s0;
    Vec kv[SV];
    for (int j = 0; j < SV; ++j) {
      kv[j] = Load(row + j * kLanes);
      __builtin_prefetch(row + j * kLanes + kScorePrefetch);
    }
    for (int i = 0; i < GB; ++i) {
      const Vec qv = Splat(q[(g0 + i) * D + d]);
      for (int j = 0; j < SV; ++j) acc[i][j] += qv * kv[j];
    }
  }
  for (int i = 0; i < GB; ++i) {
    for (int j = 0; j < SV; ++j) Store(p + (g0 + i) * ldp + s0 + j * kLanes, acc[i][j]);
  }
}

template <int SV>
void ScoresColumns(const float* q, const float* keys, const float* bias, int64_t bias_stride,
                   float* p, int64_t ldp, int64_t G, int64_t D, int64_t S, int64_t s0, int64_t d0,
                   int64_t d1) {
  int64_t g = 0;
  for (; g + kTileHeads <= G; g += kTileHeads) {
    ScoresTile<kTileHeads, SV>(q, keys, bias, bias_stride, p, ldp, D, S, g, s0, d0, d1);
  }
  if constexpr (kTileHeads > 4) {
    for (; g + 4 <= G; g += 4) {
      ScoresTile<4, SV>(q, keys, bias, bias_stride, p, ldp, D, S, g, s0, d0, d1);
    }
  }
  for (; g < G; ++g) ScoresTile<1, SV>(q, keys, bias, bias_stride, p, ldp, D, S, g, s0, d0, d1);
}

// out [g, d] = p [g, :] . values [d, :] / sum for GB probability rows and DB value rows, over
// whole rows: the GB rows stay in L1 while the DB value rows stream past, prefetched ahead.
template <int GB, int DB>
void MixTile(const float* p, int64_t ldp, const float* values, float* out, int64_t D, int64_t S,
             int64_t s_vec, int64_t g0, int64_t d0, const float* inv_sum) {
  Vec acc[GB][DB] = {};
  for (int64_t s = 0; s < s_vec; s += kLanes) {
    Vec vv[DB];
    for (int j = 0; j < DB; ++j) {
      vv[j] = Load(values + (d0 + j) * S + s);
      __builtin_prefetch(values + (d0 + j) * S + s + kMixPrefetch);
    }
    for (int i = 0; i < GB; ++i) {
      const Vec pv = Load(p + (g0 + i) * ldp + s);
      for (int j = 0; j < DB; ++j) acc[i][j] += pv * vv[j];
    }
  }
  for (int i = 0; i < GB; ++i) {
    for (int j = 0; j < DB; ++j) {
      float total = Sum(acc[i][j]);
      for (int64_t s = s_vec; s < S; ++s) {
        total += p[(g0 + i) * ldp + s] * values[(d0 + j) * S + s];
      }
      out[(g0 + i) * D + d0 + j] = total * inv_sum[g0 + i];
    }
  }
}

template <int GB, int DB>
void MixRows(const float* p, int64_t ldp, const float* values, float* out, int64_t D, int64_t S,
             int64_t s_vec, int64_t g0, const float* inv_sum) {
  int64_t d = 0;
  for (; d + DB <= D; d += DB) MixTile<GB, DB>(p, ldp, values, out, D, S, s_vec, g0, d, inv_sum);
  for (; d < D; ++d) MixTile<GB, 1>(p, ldp, values, out, D, S, s_vec, g0, d, inv_sum);
}

// ---- The same with the heads along the vectors (32, 48, 64 ... query heads per kv head) -------
//
// With many heads sharing each key the scores [g, d] . [d, s] and the mix [g, s] . [s, d] are
// compute-bound products. Laid out [s, g], with the heads along the vectors, each key and value
// float is one broadcast against g/16 vectors of heads, the softmax's max and sum run down the
// columns with no horizontal reductions, and the mix needs no horizontal sums either: it goes a
// chunk of probability rows at a time, exponentiated and then mixed while they are in L1. Laid
// out [g, s], the mix streams 8 whole probability rows from L2 for every 3 value rows.
//
// Measured on a 2-core Xeon (16 items, keys and values in L3): T5-XXL's MQA step (64 query heads
// of dim 64 on one kv head, 2048 keys) 2.6 against 3.6 ms; 32, 48 and 128 heads and head dim 32
// also 20-35% faster. At 16 heads (one vector of heads: load-bound tiles) it was 50% slower, and
// at head dim 128 no faster (presumably as the transposed q and out, 32 KiB each, no longer fit
// in L1 beside a chunk), so those keep the [g, s] layout.
constexpr int64_t kHeadsAlongVectorsMinGroup = 32;
constexpr int64_t kHeadsAlongVectorsMaxDim = 64;
constexpr int64_t kMixChunk = 64;  // probability rows [s, g] exponentiated and mixed at a time
constexpr int64_t kHeadKeyPrefetch = 64;  // floats ahead in each key row
// The scores read this many key rows at a time, summing over them in passes. Why: the hardware
// prefetcher follows a limited number of streams; on a 2-core Xeon two threads reading [64, 2048]
// blocks 64 rows at a time (a column of each row in turn) got 13.9 GB/s from memory, 32 rows at a
// time 26.0, 16 or 8 rows 26.7. Cross-attention over keys and values read from memory
// (tools/kernel_ab.py): 32 heads 0.87-0.94x the time of all 64 rows at once, 64 heads
// 0.97-1.00x; 16 rows a pass was 4-7% slower than 32.
constexpr int64_t kKeyRowsPerPass = 32;

// Register tiles of T rows (keys, or value rows) x V vectors of heads: kTileSums sums, V at most
// kHeadVectors (4, or 3 with 16 registers: 12 sums, 3 vectors of heads and a broadcast).
constexpr int kHeadVectors = kTileSums >= 24 ? 4 : 3;
template <int V>
constexpr int kHeadTileRows = kTileSums / V;

// pt [s0:s0 + T, heads v0:v0 + V vectors] = bias + keys [d0:d1, s] . qt [d0:d1, heads], added to
// what pt holds for a later pass (d0 > 0); the last pass (d1 = D) raises mx, the heads' running
// maximum, to them. The bias is bias [s], or what pt holds if biased_pt (a per-head bias, already
// moved there).
template <int T, int V>
inline void HeadScoresTile(const float* qt, int64_t G, const float* keys, const float* bias,
                           bool biased_pt, float* pt, float* mx, int64_t D, int64_t S, int64_t s0,
                           int64_t v0, int64_t d0, int64_t d1) {
  Vec acc[T][V];
  const bool from_pt = biased_pt || d0 > 0;
  for (int i = 0; i < T; ++i) {
    const Vec b = Splat(from_pt ? 0.0f : bias[s0 + i]);
    for (int j = 0; j < V; ++j) {
      acc[i][j] = from_pt ? Load(pt + (s0 + i) * G + (v0 + j) * kLanes) : b;
    }
  }
  for (int64_t d = d0; d < d1; ++d) {
    Vec qv[V];
    for (int j = 0; j < V; ++j) qv[j] = Load(qt + d * G + (v0 + j) * kLanes);
    const float* row = keys + d * S + s0;
    if (s0 % kLanes < T) __builtin_prefetch(row + kHeadKeyPrefetch);  // once per cache line
    for (int i = 0; i < T; ++i) {
      const Vec kv = Splat(row[i]);
      for (int j = 0; j < V; ++j) acc[i][j] += kv * qv[j];
    }
  }
  for (int i = 0; i < T; ++i) {
    for (int j = 0; j < V; ++j) Store(pt + (s0 + i) * G + (v0 + j) * kLanes, acc[i][j]);
  }
  if (d1 < D) return;
  for (int j = 0; j < V; ++j) {
    float* m = mx + (v0 + j) * kLanes;
    Vec top = Load(m);
    for (int i = 0; i < T; ++i) top = acc[i][j] > top ? acc[i][j] : top;
    Store(m, top);
  }
}

// ot [d0:d0 + T, heads v0:v0 + V vectors] (+)= values [d, c0:c1] . pt [c0:c1, heads].
template <int T, int V>
inline void HeadMixTile(const float* pt, int64_t G, const float* values, float* ot, int64_t S,
                        int64_t d0, int64_t v0, int64_t c0, int64_t c1) {
  Vec acc[T][V];
  for (int i = 0; i < T; ++i) {
    for (int j = 0; j < V; ++j) {
      acc[i][j] = c0 == 0 ? Vec{} : Load(ot + (d0 + i) * G + (v0 + j) * kLanes);
    }
  }
  if (v0 == 0) {  // the next chunk of these value rows, while this one is mixed
    for (int i = 0; i < T; ++i) {
      for (int64_t s = c1; s < std::min(c1 + kMixChunk, S); s += kLanes) {
        __builtin_prefetch(values + (d0 + i) * S + s);
      }
    }
  }
  for (int64_t s = c0; s < c1; ++s) {
    Vec pv[V];
    for (int j = 0; j < V; ++j) pv[j] = Load(pt + s * G + (v0 + j) * kLanes);
    for (int i = 0; i < T; ++i) {
      const Vec vv = Splat(values[(d0 + i) * S + s]);
      for (int j = 0; j < V; ++j) acc[i][j] += vv * pv[j];
    }
  }
  for (int i = 0; i < T; ++i) {
    for (int j = 0; j < V; ++j) Store(ot + (d0 + i) * G + (v0 + j) * kLanes, acc[i][j]);
  }
}

// Calls tile(integral_constant<T>, n0) over rows [0, rows) for tiles of V head vectors: T =
// kHeadTileRows<V> rows at a time, then 4, then 1.
template <int V, typename Tile>
inline void HeadRows(int64_t rows, const Tile& tile) {
  constexpr int T = kHeadTileRows<V>;
  int64_t n = 0;
  for (; n + T <= rows; n += T) tile(std::integral_constant<int, T>{}, n);
  if constexpr (T > 4) {
    for (; n + 4 <= rows; n += 4) tile(std::integral_constant<int, 4>{}, n);
  }
  for (; n < rows; ++n) tile(std::integral_constant<int, 1>{}, n);
}

// Calls body(integral_constant<V>, v0) for head vectors [0, GV) in groups of kHeadVectors, then
// the 3, 2 or 1 left.
template <typename Body>
inline void HeadVectors(int64_t GV, const Body& body) {
  int64_t v = 0;
  for (; v + kHeadVectors <= GV; v += kHeadVectors) {
    body(std::integral_constant<int, kHeadVectors>{}, v);
  }
  if constexpr (kHeadVectors > 3) {
    if (GV - v == 3) body(std::integral_constant<int, 3>{}, v);
  }
  if (GV - v == 2) body(std::integral_constant<int, 2>{}, v);
  if (GV - v == 1) body(std::integral_constant<int, 1>{}, v);
}

void AttentionHeadsAlongVectors(const float* q, const float* keys, const float* values,
                                const float* bias, int64_t bias_stride, float* out, int64_t G,
                                int64_t D, int64_t S) {
  const int64_t GV = G / kLanes;
  // Scratch: probabilities pt [S, G], qt [D, G] (q transposed), ot [D, G] (out transposed), the
  // heads' maxima and sums [G].
  float* pt = Scratch(S * G + 2 * D * G + 2 * G);
  float* qt = pt + S * G;
  float* ot = qt + D * G;
  float* mx = ot + D * G;
  float* sum = mx + G;
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t d = 0; d < D; ++d) qt[d * G + g] = q[g * D + d];
    if (bias_stride) {
      for (int64_t s = 0; s < S; ++s) pt[s * G + g] = bias[g * bias_stride + s];
    }
    mx[g] = -INFINITY;
    sum[g] = 0;
  }
  for (int64_t d0 = 0; d0 < D; d0 += kKeyRowsPerPass) {
    const int64_t d1 = std::min(d0 + kKeyRowsPerPass, D);
    HeadVectors(GV, [&](auto v, int64_t v0) {
      HeadRows<v>(S, [&](auto t, int64_t s0) {
        HeadScoresTile<t, v>(qt, G, keys, bias, bias_stride != 0, pt, mx, D, S, s0, v0, d0, d1);
      });
    });
  }
  for (int64_t c0 = 0; c0 < S; c0 += kMixChunk) {
    const int64_t c1 = std::min(c0 + kMixChunk, S);
    for (int64_t v = 0; v < GV; ++v) {
      const Vec m = Load(mx + v * kLanes);
      Vec total = Load(sum + v * kLanes);
      for (int64_t s = c0; s < c1; ++s) {
        float* e = pt + s * G + v * kLanes;
        const Vec x = Exp(Load(e) - m);
        Store(e, x);
        total += x;
      }
      Store(sum + v * kLanes, total);
    }
    HeadVectors(GV, [&](auto v, int64_t v0) {
      HeadRows<v>(D, [&](auto t, int64_t d0) {
        HeadMixTile<t, v>(pt, G, values, ot, S, d0, v0, c0, c1);
      });
    });
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inv = 1.0f / sum[g];
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = ot[d * G + g] * inv;
  }
}

void AttentionItem(const float* q, const float* keys, const float* values, const float* bias,
                   int64_t bias_stride, float* out, int64_t G, int64_t D, int64_t S) {
  if (G % kLanes == 0 && G >= kHeadsAlongVectorsMinGroup && D <= kHeadsAlongVectorsMaxDim) {
    AttentionHeadsAlongVectors(q, keys, values, bias, bias_stride, out, G, D, S);
    return;
  }
  // Probability rows padded to whole, aligned vectors and one vector more: p [g, ldp], then 1 /
  // row sums. Rows 2^k floats apart (S = 2048: 8 KiB) all fall in the same L1 sets, and the
  // tiles touch 8 of them beside the key or value rows (also 8 KiB apart): more lines than an
  // 8-way L1 holds. With the extra vector the G = 8 kernel ran 10% faster on one Zen 4 core (on
  // two, where reading the cache bounds it, alike).
  const int64_t ldp = (S + kLanes - 1) / kLanes * kLanes + kLanes;
  float* p = Scratch(G * ldp + G);
  float* inv_sum = p + G * ldp;
  const int64_t s_vec = S / kLanes * kLanes;
  // Many query heads per kv head (MQA) make the scores compute-bound: then all key rows go at once
  // and each probability is written once, instead of once per group of rows.
  const int64_t score_rows = G >= kManyQueries ? D : kScoreRows;
  for (int64_t d0 = 0; d0 < D; d0 += score_rows) {
    const int64_t d1 = std::min(d0 + score_rows, D);
    int64_t s0 = 0;
    for (; s0 + 3 * kLanes <= S; s0 += 3 * kLanes) {
      ScoresColumns<3>(q, keys, bias, bias_stride, p, ldp, G, D, S, s0, d0, d1);
    }
    for (; s0 + kLanes <= S; s0 += kLanes) {
      ScoresColumns<1>(q, keys, bias, bias_stride, p, ldp, G, D, S, s0, d0, d1);
    }
  }
  for (int64_t s0 = s_vec; s0 < S; ++s0) {
    for (int64_t g = 0; g < G; ++g) {
      float s = bias[g * bias_stride + s0];
      for (int64_t d = 0; d < D; ++d) s += q[g * D + d] * keys[d * S + s0];
      p[g * ldp + s0] = s;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* row = p + g * ldp;
    float m = row[0];
    int64_t s = 0;
    if (s_vec) {
      Vec mv = Load(row);
      for (s = kLanes; s < s_vec; s += kLanes) {
        const Vec x = Load(row + s);
        mv = x > mv ? x : mv;
      }
      m = Max(mv);
    }
    for (; s < S; ++s) m = std::max(m, row[s]);
    Vec sum_v = {};
    for (s = 0; s < s_vec; s += kLanes) {
      const Vec e = Exp(Load(row + s) - m);
      Store(row + s, e);
      sum_v += e;
    }
    float sum = Sum(sum_v);
    for (; s < S; ++s) {
      row[s] = ExpScalar(row[s] - m);
      sum += row[s];
    }
    inv_sum[g] = 1.0f / sum;
  }
  int64_t g = 0;
  for (; g + kTileHeads <= G; g += kTileHeads) {
    MixRows<kTileHeads, 3>(p, ldp, values, out, D, S, s_vec, g, inv_sum);
  }
  if constexpr (kTileHeads > 4) {
    for (; g + 4 <= G; g += 4) MixRows<4, 4>(p, ldp, values, out, D, S, s_vec, g, inv_sum);
  }
  for (; g < G; ++g) MixRows<1, 8>(p, ldp, values, out, D, S, s_vec, g, inv_sum);
}

ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                         ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::F32> values,
                         ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = keys.dimensions(), vd = values.dimensions();
  const auto bd = bias.dimensions();
  const bool per_head = bd.size() == 4;  // [b, k, g, s], else one row for every head [b, s]
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || (bd.size() != 2 && !per_head) ||
      !std::equal(kd.begin(), kd.end(), vd.begin()) || kd[0] != qd[0] || kd[1] != qd[1] ||
      kd[2] != qd[3] || bd[0] != qd[0] || bd[bd.size() - 1] != kd[3] ||
      (per_head && (bd[1] != qd[1] || bd[2] != qd[2]))) {
    return ffi::Error::InvalidArgument(
        "gqa_t5x_attention expects q [b, k, g, d], keys and values [b, k, d, s], "
        "bias [b, s] or [b, k, g, s]");
  }
  const int64_t B = qd[0], KH = qd[1], G = qd[2], D = qd[3], S = kd[3];
  const float* qp = q.typed_data();
  const float* kp = keys.typed_data();
  const float* vp = values.typed_data();
  const float* bp = bias.typed_data();
  float* op = out->typed_data();
  ParallelFor(pool, B * KH, B * KH * G * D * S, [&](int64_t item) {
    AttentionItem(qp + item * G * D, kp + item * D * S, vp + item * D * S,
                  bp + (per_head ? item * G : item / KH) * S, per_head ? S : 0, op + item * G * D,
                  G, D, S);
  });
  return ffi::Error::Success();
}

// ---- out [M, N] = x [M, K] . w [K, N] for the few rows M of a decode step ----------------------
//
// A decode step's projections and logits multiply a few rows (the batch) by a weight read once:
// memory-bound, and XLA:CPU's GEMMs run them at a third to a half of the read bandwidth (they pack
// the weight for a reuse that a few rows do not have). Here each task owns a strip of columns and
// streams the weight's rows through it in blocks, prefetching the next block while it works; the
// strip's [M, width] sums stay in L1 or L2, and register tiles of kTileSums / 3 rows of x by 3
// vectors of columns (with AVX-512's 32 registers: 24 sums, 3 weight vectors and a broadcast) do
// the M multiply-adds each loaded weight float allows.

// Measured on 2-core Xeons: 8 x 3 tiles over strips of 1024 columns in blocks of 16 rows ran the
// T5 logits' [16, 512] x [512, 32128] 15-20% faster than 4 x 4 tiles over 256 columns in blocks of
// 32 (cold weight 4.7 against 5.6 ms, in L3 3.5 against 4.4); the query and out projections
// 20-25% faster. Blocks of 8 rows or two blocks of prefetch ahead were slower; reading this
// pattern alone, prefetching into L2 (prefetcht1) reached 22 GB/s where prefetching into L1
// reached 19.5. On a 2-core Zen 4 (32 KiB L1d, 1 MiB L2), blocks of 32 rows ran every decode
// shape 7-15% faster than 16 (weights cold, two threads, tools/kernel_ab.py; 64 alike, 16 rows
// prefetched two blocks ahead slower). On the Xeon, before the sums' rows were padded
// (MatmulStrip), 32 rows had been 5-10% slower from L3 or memory. With AVX2's 4-row tiles (a 2-core
// Zen 3), each weight vector is read by four row tiles, and blocks of 16 rows ran the logits and
// the query projection 13-15% faster than 32 (the others alike, two runs of tools/kernel_ab.py).
constexpr int64_t kStripAccumulators = 16384;  // floats of sums per strip (64 KiB)
constexpr int64_t kStripMaxWidth = 1024;  // columns: at most a 4 KiB run of each weight row
constexpr int64_t kStripRows = 16;  // rows of x per pass over a strip
constexpr int64_t kTileVectors = 3;  // vectors of columns per tile
constexpr int64_t kTileRows = kTileSums / kTileVectors;  // rows of x per register tile
// Weight rows per block (with 32: 128 KiB of a 1024-column strip).
constexpr int64_t kBlockRows = kTileSums >= 24 ? 32 : 16;
constexpr int kPrefetchToL2 = 2;  // __builtin_prefetch locality: prefetcht1
constexpr int kPrefetchToL1 = 3;  // prefetcht0

// acc [m0:m0+MB, c0:c0+CB vectors] += x [m0:m0+MB, k0:k1] . w [k0:k1, strip columns], the MB x CB
// sums in registers over the whole k block; `ahead`, if set, prefetches the same columns of the
// weight rows one block further on (into L2), and `next_tile` the next CB vectors of these rows
// (into L1, for the next column tile).
template <int MB, int CB>
inline void StripTile(const float* x, int64_t K, const float* w, int64_t N, float* acc,
                      int64_t ld, int64_t m0, int64_t c0, int64_t k0, int64_t k1, bool first,
                      int64_t ahead, bool next_tile) {
  Vec sum[MB][CB];
  for (int i = 0; i < MB; ++i) {
    for (int j = 0; j < CB; ++j) {
      sum[i][j] = first ? Vec{} : Load(acc + (m0 + i) * ld + (c0 + j) * kLanes);
    }
  }
  for (int64_t k = k0; k < k1; ++k) {
    const float* row = w + k * N + c0 * kLanes;
    Vec wv[CB];
    for (int j = 0; j < CB; ++j) wv[j] = Load(row + j * kLanes);
    if (ahead) {
      for (int j = 0; j < CB; ++j) {
        __builtin_prefetch(row + ahead * N + j * kLanes, 0, kPrefetchToL2);
      }
    }
    if (next_tile) {  // x86 prefetches never fault: past the strip's (or weight's) end is harmless
      for (int j = 0; j < CB; ++j) __builtin_prefetch(row + (CB + j) * kLanes, 0, kPrefetchToL1);
    }
    for (int i = 0; i < MB; ++i) {
      const Vec xv = Splat(x[(m0 + i) * K + k]);
      for (int j = 0; j < CB; ++j) sum[i][j] += xv * wv[j];
    }
  }
  for (int i = 0; i < MB; ++i) {
    for (int j = 0; j < CB; ++j) Store(acc + (m0 + i) * ld + (c0 + j) * kLanes, sum[i][j]);
  }
}

// One column tile of a block through every row tile back to back, so that only the first reads
// its weight rows from L2 or memory (prefetching the same columns a block further on) and the
// others find them in L1; the last prefetches the next column tile's into L1. Measured on a
// 2-core Xeon (tools/kernel_ab.py, weights cold, three runs): that prefetch ran the logits 3-5%
// faster, the projections and MLP 1-8%.
template <int CB>
inline void ColumnTile(const float* x, int64_t K, const float* w, int64_t N, float* acc,
                       int64_t ld, int64_t rows, int64_t c, int64_t k0, int64_t k1, bool first,
                       int64_t ahead) {
  int64_t m = 0;
  for (; m + kTileRows <= rows; m += kTileRows, ahead = 0) {
    StripTile<kTileRows, CB>(x, K, w, N, acc, ld, m, c, k0, k1, first, ahead,
                             m + kTileRows == rows);
  }
  if constexpr (kTileRows > 4) {
    for (; m + 4 <= rows; m += 4, ahead = 0) {
      StripTile<4, CB>(x, K, w, N, acc, ld, m, c, k0, k1, first, ahead, m + 4 == rows);
    }
  }
  for (; m < rows; ++m, ahead = 0) {
    StripTile<1, CB>(x, K, w, N, acc, ld, m, c, k0, k1, first, ahead, m + 1 == rows);
  }
}

// out [:, n0:n1] for one strip: its whole vectors of columns, then any single columns left. Rows
// of x go kStripRows at a time, and the weight's rows kBlockRows at a time, column tile by
// column tile (ColumnTile).
void MatmulStrip(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* out,
                 int64_t n0, int64_t n1) {
  const int64_t nv = (n1 - n0) / kLanes, width = nv * kLanes;
  // The sums' rows one vector longer than the strip: 1024 floats apart they would share L1 sets
  // (as ldp in AttentionItem). The logits ran 7% faster on one Zen 4 core.
  const int64_t ld = width + kLanes;
  for (int64_t m0 = 0; nv && m0 < M; m0 += kStripRows) {
    const int64_t rows = std::min(kStripRows, M - m0);
    float* acc = Scratch(rows * ld);
    const float* xm = x + m0 * K;
    for (int64_t k0 = 0; k0 < K; k0 += kBlockRows) {
      const int64_t k1 = std::min(k0 + kBlockRows, K);
      const int64_t ahead = k1 + kBlockRows <= K ? kBlockRows : 0;
      int64_t c = 0;
      for (; c + kTileVectors <= nv; c += kTileVectors) {
        ColumnTile<kTileVectors>(xm, K, w + n0, N, acc, ld, rows, c, k0, k1, k0 == 0, ahead);
      }
      for (; c < nv; ++c) ColumnTile<1>(xm, K, w + n0, N, acc, ld, rows, c, k0, k1, k0 == 0, ahead);
    }
    for (int64_t m = 0; m < rows; ++m) {
      std::memcpy(out + (m0 + m) * N + n0, acc + m * ld, width * sizeof(float));
    }
  }
  for (int64_t n = n0 + width; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      float total = 0;
      for (int64_t k = 0; k < K; ++k) total += x[m * K + k] * w[k * N + n];
      out[m * N + n] = total;
    }
  }
}

// The columns of each strip of an [M, K] x [K, N] product on `threads` threads: as many as the
// accumulators allow (whole vectors, at most a 4 KiB run of a row), then narrowed until every
// thread has a strip. The last strip takes the columns left over.
int64_t StripWidth(int64_t M, int64_t N, int64_t threads) {
  const int64_t pass_rows = std::clamp<int64_t>(M, 1, kStripRows);
  int64_t width = std::clamp<int64_t>(kStripAccumulators / pass_rows / kLanes * kLanes, kLanes,
                                      kStripMaxWidth);
  while (width > kLanes && N / width < threads) width /= 2;
  return std::max<int64_t>(width / kLanes * kLanes, kLanes);
}

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("gqa_t5x_matmul expects x [M, K] and w [K, N]");
  }
  const int64_t M = xd[0], K = xd[1], N = wd[1];
  const int64_t width = StripWidth(M, N, pool.num_threads());
  const int64_t strips = std::max<int64_t>(N / width, 1);
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* op = out->typed_data();
  ParallelFor(pool, strips, M * K * N, [&](int64_t t) {
    MatmulStrip(xp, M, K, wp, N, op, t * width, t + 1 == strips ? N : (t + 1) * width);
  });
  return ffi::Error::Success();
}

// ---- The index of each row's first maximum (or first NaN), as numpy's argmax -------------------
//
// Greedy decoding's argmax over the vocabulary: XLA:CPU's (value, index) reduction took 1.1 ms
// for T5's [16, 32128] logits and a max then a min index 0.6 ms; a row is 128 KiB, so a vector
// max and a second pass over the row, still in L2, for the first position that equals it take
// a fraction of that. The second pass a vector at a time: T5's logits 87-90 against 61 us per
// jitted call, scalar against vector (2-core Xeon).
int32_t FirstArgmax(const float* row, int64_t n) {
  const int64_t n_vec = n / kLanes * kLanes;
  float top = -INFINITY;
  bool nan = false;
  if (n_vec) {
    Vec mv = Load(row), bad = {};
    for (int64_t i = 0; i < n_vec; i += kLanes) {
      const Vec x = Load(row + i);
      mv = x > mv ? x : mv;
      bad = x != x ? Splat(1.0f) : bad;
    }
    top = Max(mv);
    nan = Max(bad) > 0;
  }
  for (int64_t i = n_vec; i < n; ++i) {
    nan = nan || row[i] != row[i];
    top = row[i] > top ? row[i] : top;
  }
  // The first position holding it, a vector at a time: the lanes that match, the lowest of them.
  const Vec target = Splat(top);
  int64_t i = 0;
  for (; i < n_vec; i += kLanes) {
    const Vec x = Load(row + i);
    const UVec hit = nan ? x != x : x == target;
    for (int j = 0; j < kLanes; ++j) {
      if (hit[j]) return static_cast<int32_t>(i + j);
    }
  }
  for (; i < n; ++i) {
    if (nan ? row[i] != row[i] : row[i] == top) return static_cast<int32_t>(i);
  }
  return 0;  // every entry -inf: the first, as numpy
}

ffi::Error ArgmaxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                      ffi::ResultBuffer<ffi::S32> out) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || xd[1] < 1 || xd[1] > INT32_MAX) {
    return ffi::Error::InvalidArgument("gqa_t5x_argmax expects x [M, N], 1 <= N < 2^31");
  }
  const int64_t N = xd[1];
  const float* xp = x.typed_data();
  int32_t* op = out->typed_data();
  ParallelFor(pool, xd[0], xd[0] * N, [&](int64_t m) { op[m] = FirstArgmax(xp + m * N, N); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GqaAttention, AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GqaArgmax, ArgmaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GqaMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
