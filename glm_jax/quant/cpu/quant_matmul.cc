// Weight-only int8 / int4 matrix product for XLA:CPU, called through JAX's FFI (glm_jax/quant/cpu_kernel.py).
//
//   y[M, N] = (x[M, K] @ q[K, N]) * scale[N]      x float32, q int8, scale float32, y float32
//
// q is a quantized Dense kernel in glm-jax's [in, out] layout (glm_jax/quant.py). For 4 bits q is [K/2, N]: each
// byte packs two values along K, element 2j in the high nibble (sign-extended), 2j+1 in the low nibble.
//
// Why: XLA:CPU has no int8-weight product; it converts the whole int8 kernel to a float temporary and then
// multiplies, and runs a batch-1 matrix-vector product on one core. Decoding streams every weight once per token,
// so this kernel converts the weights in registers (never a float copy in memory), and can split the output
// columns across threads (persistent helper threads, or XLA's intra-op pool; the Python side passes how many,
// one by default). Meant for small M (decode: M = batch; short prefills); the Python side dispatches to it only
// there, on CPU.
//
// Portability: the AVX-512 tile is compiled with a target attribute and chosen at run time
// (__builtin_cpu_supports); every other CPU (x86-64 without AVX-512, aarch64) runs the plain C++ loops, which
// the compiler vectorises for the baseline ISA.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define GLM_X86_64 1
#endif

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* x;
  const int8_t* q;
  const float* scale;
  float* y;
  int64_t M, K, N;  // K: unpacked in-features
  int bits;
};

// ---------------------------------------------------------------- portable path
// Columns [c0, c1) of every row of y, in blocks of 64 columns accumulated in float32.
void ColumnsGeneric(const Problem& p, int64_t c0, int64_t c1) {
  constexpr int64_t kB = 64;
  float acc[kB];
  for (int64_t m = 0; m < p.M; ++m) {
    const float* x = p.x + m * p.K;
    for (int64_t j0 = c0; j0 < c1; j0 += kB) {
      const int64_t nb = std::min(kB, c1 - j0);
      for (int64_t j = 0; j < nb; ++j) acc[j] = 0.0f;
      if (p.bits == 8) {
        for (int64_t k = 0; k < p.K; ++k) {
          const int8_t* row = p.q + k * p.N + j0;
          const float xk = x[k];
          for (int64_t j = 0; j < nb; ++j) acc[j] += xk * static_cast<float>(row[j]);
        }
      } else {
        for (int64_t kk = 0; kk < p.K / 2; ++kk) {
          const int8_t* row = p.q + kk * p.N + j0;
          const float x0 = x[2 * kk], x1 = x[2 * kk + 1];
          for (int64_t j = 0; j < nb; ++j) {
            const int32_t b = row[j];
            const int32_t hi = b >> 4;  // arithmetic shift: the sign-extended high nibble
            const int32_t lo = static_cast<int32_t>(static_cast<uint32_t>(b) << 28) >> 28;
            acc[j] += x0 * static_cast<float>(hi) + x1 * static_cast<float>(lo);
          }
        }
      }
      float* y = p.y + m * p.N + j0;
      for (int64_t j = 0; j < nb; ++j) y[j] = acc[j] * p.scale[j0 + j];
    }
  }
}

// Rows of q prefetched ahead. The tile reads each row of q in 128-byte pieces, a page-strided access the hardware
// prefetchers follow poorly, and a decode step's weights are mostly not in cache. Measured on the bench model
// (int8, one thread, ms per decode step): 8 rows ahead 1.31, 32 rows 0.93-1.01, 64 rows 0.90-1.00, 128 rows 1.24.
constexpr int64_t kPrefetchRows = 64;
// ---------------------------------------------------------------- AVX-512 path
#ifdef GLM_X86_64
#define GLM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

// One tile: rows [0, MR) of x (row stride K) times columns [0, 16 * NV) of q, `valid` of them real (the rest
// masked off). The weights are converted int8 -> int32 -> float32 in registers, once for all MR rows.
template <int MR, int NV, int BITS>
GLM_AVX512 void TileAvx512(const float* x, int64_t K, const int8_t* q, int64_t N, const float* scale, float* y,
                           int64_t valid) {
  __m512 acc[MR][NV];
  __mmask16 mk[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    const int64_t r = valid - 16 * v;
    mk[v] = r >= 16 ? static_cast<__mmask16>(0xFFFF) : (r <= 0 ? 0 : static_cast<__mmask16>((1u << r) - 1));
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) acc[m][v] = _mm512_setzero_ps();
  }
  const int64_t rows = BITS == 8 ? K : K / 2;
  for (int64_t k = 0; k < rows; ++k) {
    const int8_t* row = q + k * N;
    if (k + kPrefetchRows < rows) {
      _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * N), _MM_HINT_T0);
      if (NV > 4) _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * N + 64), _MM_HINT_T0);
    }
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      const __m512i iv = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk[v], row + 16 * v));
      if (BITS == 8) {
        const __m512 w = _mm512_cvtepi32_ps(iv);
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m) acc[m][v] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * K + k]), w, acc[m][v]);
      } else {
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_srai_epi32(iv, 4));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(iv, 28), 28));
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m) {
          acc[m][v] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * K + 2 * k]), hi, acc[m][v]);
          acc[m][v] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * K + 2 * k + 1]), lo, acc[m][v]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    const __m512 s = _mm512_maskz_loadu_ps(mk[v], scale + 16 * v);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) _mm512_mask_storeu_ps(y + m * N + 16 * v, mk[v], _mm512_mul_ps(acc[m][v], s));
  }
}

// Accumulator budget: MR * NV <= 16 of the 32 zmm registers, the rest for converted weights and broadcasts.
template <int MR, int BITS>
GLM_AVX512 void RowsAvx512(const Problem& p, int64_t m0, int64_t c0, int64_t c1) {
  constexpr int NV = MR == 1 ? 8 : (MR == 2 ? 8 : (MR <= 4 ? 4 : 2));
  constexpr int64_t W = 16 * NV;
  const float* x = p.x + m0 * p.K;
  float* y = p.y + m0 * p.N;
  for (int64_t j = c0; j < c1; j += W)
    TileAvx512<MR, NV, BITS>(x, p.K, p.q + j, p.N, p.scale + j, y + j, std::min(W, c1 - j));
}

template <int BITS>
GLM_AVX512 void ColumnsAvx512Bits(const Problem& p, int64_t c0, int64_t c1) {
  int64_t m = 0;
  while (m < p.M) {
    const int64_t r = p.M - m;
    if (r >= 8) {
      RowsAvx512<8, BITS>(p, m, c0, c1), m += 8;
    } else if (r >= 4) {
      RowsAvx512<4, BITS>(p, m, c0, c1), m += 4;
    } else if (r == 3) {
      RowsAvx512<3, BITS>(p, m, c0, c1), m += 3;
    } else if (r == 2) {
      RowsAvx512<2, BITS>(p, m, c0, c1), m += 2;
    } else {
      RowsAvx512<1, BITS>(p, m, c0, c1), m += 1;
    }
  }
}

GLM_AVX512 void ColumnsAvx512(const Problem& p, int64_t c0, int64_t c1) {
  if (p.bits == 8) {
    ColumnsAvx512Bits<8>(p, c0, c1);
  } else {
    ColumnsAvx512Bits<4>(p, c0, c1);
  }
}

bool HasAvx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}
#endif

using ColumnsFn = void (*)(const Problem&, int64_t, int64_t);

ColumnsFn PickColumns(int isa) {  // isa: 0 auto, 1 portable loops only
#ifdef GLM_X86_64
  if (isa == 0 && HasAvx512()) return ColumnsAvx512;
#endif
  (void)isa;
  return ColumnsGeneric;
}

// ---------------------------------------------------------------- splitting the columns across threads
// The columns are cut into `chunks` ranges (multiples of 16). The calling thread and up to `tasks` tasks on
// XLA's intra-op pool claim ranges from a shared counter until none is left; the caller then waits only for
// ranges already claimed, so a task the pool starts late (or never) costs nothing and cannot deadlock.
struct Shared {
  Problem p;
  ColumnsFn fn;
  int64_t chunks, width;
  std::atomic<int64_t> next{0}, done{0};
};

constexpr int64_t kRangesPerThread = 2;
constexpr int64_t kMaxHelpers = 15;

// Back-off when the cores are oversubscribed: if the caller had to wait for a helper's range (the helper was
// descheduled, e.g. other processes share the cores) longer than 5 us and than half its own share took, the
// next kSoloCalls products (~35 decode steps of a 56-linear model) run on the calling thread alone, then
// threads are tried again. On idle cores the wait is a fraction of a microsecond (the helper spins between
// calls). Measured on 2 cores shared with other processes (load 4-6): with threads and no back-off a decode
// step took longer than on one thread (2.0 vs 1.25 ms).
constexpr int64_t kMaxWaitNs = 30000;
constexpr int64_t kSoloCalls = 2048;
std::atomic<int64_t> g_solo_calls{0};

void Drain(Shared& s) {
  for (;;) {
    const int64_t c = s.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= s.chunks) return;
    const int64_t c0 = c * s.width, c1 = std::min(s.p.N, c0 + s.width);
    if (c0 < c1) s.fn(s.p, c0, c1);
    s.done.fetch_add(1, std::memory_order_release);
  }
}

// ---------------------------------------------------------------- persistent helper threads
// A helper spins for a while after each job (decode calls the kernel every few microseconds), then sleeps on a
// condition variable. The caller posts the job in a helper's slot, works on the ranges itself, then takes the
// job back if the helper has not picked it up (no waiting for a thread that is asleep or not scheduled); it
// waits only for a helper that took the job, until that helper lets go of it.
struct Job {
  Shared* sh;
  std::atomic<bool> released{false};
};

class Helper {
 public:
  Helper() : thread_([this] { Loop(); }) { thread_.detach(); }  // lives as long as the process

  bool Post(Job* job) {
    Job* expected = nullptr;
    if (!slot_.compare_exchange_strong(expected, job, std::memory_order_seq_cst)) return false;  // busy
    if (sleeping_.load(std::memory_order_seq_cst)) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_one();
    }
    return true;
  }
  // True if the job was taken back before the helper saw it; otherwise the helper has it (wait for `released`).
  bool Revoke(Job* job) {
    Job* expected = job;
    return slot_.compare_exchange_strong(expected, nullptr, std::memory_order_seq_cst);
  }

 private:
  void Loop() {
    for (;;) {
      Job* job = nullptr;
      for (int spins = 0; spins < kSpins && !(job = Take()); ++spins) {
#ifdef GLM_X86_64
        _mm_pause();
#endif
      }
      if (!job) {
        std::unique_lock<std::mutex> lock(mu_);
        sleeping_.store(true, std::memory_order_seq_cst);
        cv_.wait(lock, [&] { return (job = Take()) != nullptr; });
        sleeping_.store(false, std::memory_order_seq_cst);
      }
      Drain(*job->sh);
      job->released.store(true, std::memory_order_release);
    }
  }
  Job* Take() {
    Job* job = slot_.load(std::memory_order_seq_cst);
    if (job && slot_.compare_exchange_strong(job, nullptr, std::memory_order_seq_cst)) return job;
    return nullptr;
  }

  static constexpr int kSpins = 20000;  // ~0.1-0.5 ms of PAUSE before sleeping
  std::atomic<Job*> slot_{nullptr};
  std::atomic<bool> sleeping_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::thread thread_;
};

Helper* Helpers(int64_t i) {
  static Helper* helpers[kMaxHelpers] = {};
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  if (!helpers[i]) helpers[i] = new Helper();
  return helpers[i];
}

void RunWithHelpers(Shared& sh, int64_t n_helpers) {
  Job jobs[kMaxHelpers];
  bool posted[kMaxHelpers] = {};
  for (int64_t i = 0; i < n_helpers; ++i) {
    jobs[i].sh = &sh;
    posted[i] = Helpers(i)->Post(&jobs[i]);
  }
  const auto t0 = std::chrono::steady_clock::now();
  Drain(sh);
  const auto t1 = std::chrono::steady_clock::now();
  bool waited = false;
  for (int64_t i = 0; i < n_helpers; ++i) {
    if (!posted[i] || Helpers(i)->Revoke(&jobs[i])) continue;
    while (!jobs[i].released.load(std::memory_order_acquire)) {
      waited = true;
#ifdef GLM_X86_64
      _mm_pause();
#endif
    }
  }
  if (waited) {  // the helper paid off only if the caller waited for it much less than it worked itself
    const auto t2 = std::chrono::steady_clock::now();
    const auto wait = t2 - t1;
    if (wait > std::chrono::microseconds(5) && wait * 2 > t1 - t0) g_solo_calls.store(kSoloCalls, std::memory_order_relaxed);
  }
}

ffi::Error QuantMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                           ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int32_t bits,
                           int32_t threads, int64_t min_parallel_bytes, int32_t isa, int32_t own_threads) {
  const auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || qd.size() != 2 || sd.size() != 1 || yd.size() != 2)
    return ffi::Error::InvalidArgument("glm_quant_matmul: expected x [M, K], q [K', N], scale [N], y [M, N]");
  if (bits != 8 && bits != 4) return ffi::Error::InvalidArgument("glm_quant_matmul: bits must be 8 or 4");
  const int64_t M = xd[0], K = xd[1], N = qd[1];
  if (qd[0] * (bits == 4 ? 2 : 1) != K || sd[0] != N || yd[0] != M || yd[1] != N)
    return ffi::Error::InvalidArgument("glm_quant_matmul: inconsistent shapes");
  auto sh = std::make_shared<Shared>();
  sh->p = Problem{x.typed_data(), q.typed_data(), scale.typed_data(), y->typed_data(), M, K, N, bits};
  sh->fn = PickColumns(isa);
  if (M == 0 || N == 0) return ffi::Error::Success();

  int64_t n_threads = threads > 0 ? threads : std::max<int64_t>(1, pool.num_threads());
  const int64_t bytes = qd[0] * N;
  if (bytes < min_parallel_bytes) n_threads = 1;
  if (n_threads > 1 && threads <= 0 && g_solo_calls.load(std::memory_order_relaxed) > 0) {
    g_solo_calls.fetch_sub(1, std::memory_order_relaxed);
    n_threads = 1;
  }
  // Ranges of at least 64 columns (a multiple of 16), `per_thread` per thread: a thread that starts late or is
  // descheduled (the cores may be shared) leaves its ranges to the others.
  const int64_t per_thread = n_threads > 1 ? kRangesPerThread : 1;
  const int64_t chunks = std::max<int64_t>(1, std::min((N + 63) / 64, n_threads * per_thread));
  sh->width = ((N + chunks - 1) / chunks + 15) / 16 * 16;
  sh->chunks = (N + sh->width - 1) / sh->width;
  if (sh->chunks <= 1) {
    sh->fn(sh->p, 0, N);
    return ffi::Error::Success();
  }
  if (own_threads) {
    RunWithHelpers(*sh, std::min<int64_t>(kMaxHelpers, std::min(n_threads, sh->chunks) - 1));
    return ffi::Error::Success();
  }
  for (int64_t t = 1; t < std::min(n_threads, sh->chunks); ++t) pool.Schedule([sh] { Drain(*sh); });
  Drain(*sh);
  if (sh->done.load(std::memory_order_acquire) < sh->chunks) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int spins = 0; sh->done.load(std::memory_order_acquire) < sh->chunks; ++spins) {
      if (spins < 4096) {
#ifdef GLM_X86_64
        _mm_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
    const int64_t waited =
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
    if (waited > kMaxWaitNs && threads <= 0) g_solo_calls.store(kSoloCalls, std::memory_order_relaxed);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GlmQuantMatmul, QuantMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("threads")
                                  .Attr<int64_t>("min_parallel_bytes")
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("own_threads"));
