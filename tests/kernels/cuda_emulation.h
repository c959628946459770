// Runs the bodies of our mx.fast.cuda_kernel sources on the CPU: one std::thread per CUDA thread,
// blocks one after another, __syncthreads as a block barrier and warp shuffles through a per-warp
// exchange buffer. Enough of CUDA for kernels whose warps call shuffles uniformly; used by
// tests/kernels/test_emulated.py to check the kernels' logic where no GPU exists.
#pragma once

#include <sys/mman.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__ static

using uint32_t = std::uint32_t;
using int32_t = std::int32_t;
using uint8_t = std::uint8_t;
struct uint4 { unsigned int x, y, z, w; };
struct uint2 { unsigned int x, y; };
struct float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

struct Dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local Dim3 threadIdx, blockIdx;
inline Dim3 blockDim, gridDim;

inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline float __expf(float x) { return std::exp(x); }
template <typename U> inline U __ldcg(const U* p) { return *p; }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned int atomicExch(unsigned int* p, unsigned int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned int) { std::this_thread::yield(); }
[[noreturn]] inline void __trap() { std::fprintf(stderr, "__trap\n"); std::abort(); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

// bfloat16 with round-to-nearest-even, as CUDA's conversions.
inline uint16_t float_to_bf16_bits(float f) {
  unsigned int u = __float_as_uint(f);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  explicit __nv_bfloat16(float f) : bits(float_to_bf16_bits(f)) {}
  operator float() const { return __uint_as_float((unsigned int)bits << 16); }
};
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__nv_bfloat16(a), __nv_bfloat16(b)}; }
struct __half2 { _Float16 x, y; };
inline __half2 __floats2half2_rn(float a, float b) { return {(_Float16)a, (_Float16)b}; }

struct EmulatedWarp {
  std::barrier<> sync{32};
  float exchange[32];
  unsigned int mma_a[32][4], mma_b[32][2];
};
inline thread_local std::barrier<>* g_block_barrier = nullptr;
inline thread_local std::vector<std::unique_ptr<EmulatedWarp>>* g_warps = nullptr;

inline void __syncthreads() { g_block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned int, float value, int lane_mask) {
  EmulatedWarp& w = *(*g_warps)[threadIdx.x >> 5];
  const int lane = threadIdx.x & 31;
  w.exchange[lane] = value;
  w.sync.arrive_and_wait();
  const float other = w.exchange[lane ^ lane_mask];
  w.sync.arrive_and_wait();
  return other;
}

inline void __syncwarp() { (*g_warps)[threadIdx.x >> 5]->sync.arrive_and_wait(); }

// __shfl_sync with a source lane (the whole warp calls it, as our kernels do).
inline float __shfl_sync(unsigned int, float value, int src_lane) {
  EmulatedWarp& w = *(*g_warps)[threadIdx.x >> 5];
  const int lane = threadIdx.x & 31;
  w.exchange[lane] = value;
  w.sync.arrive_and_wait();
  const float other = w.exchange[src_lane & 31];
  w.sync.arrive_and_wait();
  return other;
}

// float atomicAdd: a compare-and-swap loop on the bits (blocks run one after another, threads of a block at once).
inline float atomicAdd(float* p, float v) {
  unsigned int* u = reinterpret_cast<unsigned int*>(p);
  unsigned int old = __atomic_load_n(u, __ATOMIC_SEQ_CST);
  while (!__atomic_compare_exchange_n(u, &old, __float_as_uint(__uint_as_float(old) + v), false, __ATOMIC_SEQ_CST,
                                      __ATOMIC_SEQ_CST)) {
  }
  return __uint_as_float(old);
}

// mma.sync.m16n8k16 (bfloat16 in, float32 accumulate) for the warp: each lane hands in its fragments, then
// computes its four outputs from the whole A (16 x 16) and b (16 x 8), products summed in float32 in k order.
#define MLX_QLORA_MMA_DEFINED
inline float bf16_half(unsigned int reg, int high) { return __uint_as_float(high ? reg & 0xffff0000u : reg << 16); }
inline void mma_bf16_16816(float* d, unsigned int a0, unsigned int a1, unsigned int a2, unsigned int a3,
                           unsigned int b0, unsigned int b1) {
  EmulatedWarp& w = *(*g_warps)[threadIdx.x >> 5];
  const int lane = threadIdx.x & 31;
  w.mma_a[lane][0] = a0; w.mma_a[lane][1] = a1; w.mma_a[lane][2] = a2; w.mma_a[lane][3] = a3;
  w.mma_b[lane][0] = b0; w.mma_b[lane][1] = b1;
  w.sync.arrive_and_wait();
  const int group = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = group + 8 * (i >> 1), col = 2 * t + (i & 1);
    float sum = 0.0f;
    for (int k = 0; k < 16; ++k) {
      const int kt = (k & 7) >> 1, high = k & 1, upper = k >> 3;  // k = 2 kt + high (+ 8 upper)
      const float a = bf16_half(w.mma_a[(row & 7) * 4 + kt][(row >> 3) + 2 * upper], high);
      const float b = bf16_half(w.mma_b[col * 4 + kt][upper], high);
      sum += a * b;
    }
    d[i] += sum;
  }
  w.sync.arrive_and_wait();
}

inline void run_block(unsigned b, unsigned n, const std::function<void()>& kernel) {
  std::barrier<> block_barrier(n);
  std::vector<std::unique_ptr<EmulatedWarp>> warps;
  for (unsigned w = 0; w < (n + 31) / 32; ++w) warps.push_back(std::make_unique<EmulatedWarp>());
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < n; ++t) {
    threads.emplace_back([&, t, b] {
      threadIdx = {t, 0, 0};
      blockIdx = {b, 0, 0};
      g_block_barrier = &block_barrier;
      g_warps = &warps;
      kernel();
    });
  }
  for (auto& th : threads) th.join();
}

// grid and block in threads per block and blocks (CUDA's launch shape, not MLX's total threads).
inline void launch(Dim3 grid, Dim3 block, const std::function<void()>& kernel) {
  blockDim = block;
  gridDim = grid;
  for (unsigned b = 0; b < grid.x; ++b) run_block(b, block.x, kernel);  // 1-D blocks only
}

// Global memory of a launch (inputs and outputs), mapped once.
inline char* shared_alloc(size_t n) {
  void* p = mmap(nullptr, n ? n : 1, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) { std::perror("mmap"); std::exit(1); }
  return static_cast<char*>(p);
}

inline std::vector<char> read_file(const char* path) {
  FILE* f = std::fopen(path, "rb");
  if (!f) { std::perror(path); std::exit(1); }
  std::fseek(f, 0, SEEK_END);
  long size = std::ftell(f);
  std::fseek(f, 0, SEEK_SET);
  std::vector<char> data(size);
  if (size && std::fread(data.data(), 1, size, f) != (size_t)size) { std::perror(path); std::exit(1); }
  std::fclose(f);
  return data;
}

inline void write_file(const char* path, const void* data, size_t size) {
  FILE* f = std::fopen(path, "wb");
  std::fwrite(data, 1, size, f);
  std::fclose(f);
}
