// Calls two versions of gqa_t5x/cpu_kernels/decode_step.cc alternately on the same data; built
// and run by tools/kernel_ab.py, which includes them as va.inc and vb.inc (the anonymous
// namespace renamed, the FFI handlers cut). See that file for why.
#include "va.inc"
#include "vb.inc"

#include <sys/mman.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Runs part(t) for t in [0, threads) on that many threads (the caller is one of them).
void OnThreads(int threads, const std::function<void(int)>& part) {
  std::vector<std::thread> others;
  for (int t = 1; t < threads; ++t) others.emplace_back(part, t);
  part(0);
  for (auto& other : others) other.join();
}

// MatmulImpl's strips (each version's own widths for `threads`), dealt out round robin.
template <typename Width, typename Strip>
void Matmul(Width strip_width, Strip strip, const float* x, int64_t M, int64_t K, const float* w,
            int64_t N, float* out, int threads) {
  const int64_t width = strip_width(M, N, threads);
  const int64_t strips = std::max<int64_t>(N / width, 1);
  OnThreads(threads, [&](int part) {
    for (int64_t t = part; t < strips; t += threads) {
      strip(x, M, K, w, N, out, t * width, t + 1 == strips ? N : (t + 1) * width);
    }
  });
}

struct Case {
  std::string name;
  std::function<void(int version, int call)> run;  // version 0: baseline, 1: candidate
  std::function<double()> max_difference;
};

std::mt19937 rng(0);
std::vector<float> Random(int64_t n) {
  std::normal_distribution<float> normal;
  std::vector<float> v(n);
  for (auto& f : v) f = normal(rng);
  return v;
}

// The 2 MiB pages inside v moved onto transparent huge pages, as gqa_t5x.huge_pages does for a
// decode's weights (Linux; where it is refused, v keeps its pages).
void OnHugePages(std::vector<float>& v) {
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(v.data()) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(v.data() + v.size())) & ~(kHuge - 1);
  if (end <= begin) return;
  void* start = reinterpret_cast<void*>(begin);
  if (madvise(start, end - begin, MADV_HUGEPAGE) == 0) madvise(start, end - begin, 25);
}

double MaxDifference(const std::vector<float>& a, const std::vector<float>& b) {
  double e = 0;
  for (size_t i = 0; i < a.size(); ++i) e = std::max<double>(e, std::fabs(a[i] - b[i]));
  return e;
}

// A decode step's products at batch 16 (T5 logits, projections, MLP), the weight cycling through
// enough copies to leave the last-level cache, on huge pages, as in a decode.
std::vector<Case> MatmulCases(int threads) {
  std::vector<Case> cases;
  const int64_t shapes[][3] = {
      {16, 512, 32128}, {16, 512, 4096}, {16, 4096, 512}, {16, 512, 1024}, {16, 1024, 512}};
  for (const auto& s : shapes) {
    const int64_t M = s[0], K = s[1], N = s[2];
    const int copies = std::max<int64_t>(2, (int64_t{96} << 20) / (K * N * 4));
    auto x = std::make_shared<std::vector<float>>(Random(M * K));
    // Copies of one weight: the two versions read different copies of the same values.
    auto w = std::make_shared<std::vector<std::vector<float>>>(copies, Random(K * N));
    for (auto& copy : *w) {
      OnHugePages(copy);  // 25: MADV_COLLAPSE (Linux 6.1), which older headers lack
    }
    auto out = std::make_shared<std::vector<std::vector<float>>>(
        2, std::vector<float>(M * N));
    cases.push_back({std::to_string(M) + " x " + std::to_string(K) + " x " + std::to_string(N),
                     [=](int v, int call) {
                       const float* wp = (*w)[call % copies].data();
                       float* o = (*out)[v].data();
                       if (v == 0) {
                         Matmul(va::StripWidth, va::MatmulStrip, x->data(), M, K, wp, N, o,
                                threads);
                       } else {
                         Matmul(vb::StripWidth, vb::MatmulStrip, x->data(), M, K, wp, N, o,
                                threads);
                       }
                     },
                     [=] { return MaxDifference((*out)[0], (*out)[1]); }});
  }
  return cases;
}

// The cross-attention (one bias row for every head) over `items` (batch x kv heads) of g query
// heads, head dim 64, 2048 keys; keys and values cycle through enough copies to leave the
// last-level cache, as a decode step reads them (at G = 2 and 4 the kernel ran 1.2-1.4x slower
// from memory than from L3).
std::vector<Case> AttentionCases(int threads, int64_t g, int64_t items) {
  const int64_t D = 64, S = 2048;
  const int copies = std::max<int64_t>(2, (int64_t{256} << 20) / (2 * items * D * S * 4));
  auto q = std::make_shared<std::vector<float>>(Random(items * g * D));
  auto k = std::make_shared<std::vector<std::vector<float>>>(copies, Random(items * D * S));
  auto val = std::make_shared<std::vector<std::vector<float>>>(copies, Random(items * D * S));
  auto bias = std::make_shared<std::vector<float>>(S, 0.0f);
  auto out = std::make_shared<std::vector<std::vector<float>>>(
      2, std::vector<float>(items * g * D));
  return {{std::to_string(items) + " items of " + std::to_string(g) + " heads",
           [=](int v, int call) {
             OnThreads(threads, [&](int part) {
               for (int64_t i = part; i < items; i += threads) {
                 const float* qi = q->data() + i * g * D;
                 const float* ki = (*k)[call % copies].data() + i * D * S;
                 const float* vi = (*val)[call % copies].data() + i * D * S;
                 float* oi = (*out)[v].data() + i * g * D;
                 if (v == 0) va::AttentionItem(qi, ki, vi, bias->data(), 0, oi, g, D, S);
                 else vb::AttentionItem(qi, ki, vi, bias->data(), 0, oi, g, D, S);
               }
             });
           },
           [=] { return MaxDifference((*out)[0], (*out)[1]); }}};
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

// kernel_ab matmul|attention THREADS REPS [HEADS_PER_KV ITEMS]
int main(int argc, char** argv) {
  if (argc < 4) return 2;
  const std::string what = argv[1];
  const int threads = std::atoi(argv[2]), reps = std::atoi(argv[3]);
  std::vector<Case> cases =
      what == "matmul" ? MatmulCases(threads)
                       : AttentionCases(threads, std::atoll(argv[4]), std::atoll(argv[5]));
  for (auto& c : cases) {
    c.run(0, 0);
    c.run(1, 0);
    std::vector<double> times[2], ratios;
    for (int call = 0; call < reps; ++call) {
      double t[2];
      for (int j = 0; j < 2; ++j) {
        const int v = j ^ (call % 2);  // each version goes first half the time
        const double start = Now();
        c.run(v, 2 * call + j);  // the next copy of the data: neither reads what the other left
        t[v] = Now() - start;
      }
      times[0].push_back(t[0]);
      times[1].push_back(t[1]);
      ratios.push_back(t[1] / t[0]);
    }
    std::printf("%-24s baseline %8.3f ms  candidate %8.3f ms  candidate / baseline %.3f  "
                "(max difference %.1e)\n",
                c.name.c_str(), Median(times[0]) * 1e3, Median(times[1]) * 1e3, Median(ratios),
                c.max_difference());
    std::fflush(stdout);
  }
  return 0;
}
