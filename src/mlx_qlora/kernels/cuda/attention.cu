/// One-token attention over a static key/value cache in two passes: the CUDA text of
/// kernels/cuda/attention.py's kernels (@UNROLL@ and SCALE become numbers there). Lines starting with ///
/// are notes, part of no section (kernels/cuda/sources.py).

/// Pass 1 reads a lane's PL consecutive values of a key or value row with one load where it can (4 values of
/// bfloat16: 8 bytes; of float32: 16 bytes; rows of D = 128 start at multiples of that), else one load per
/// value.
// @section partial_header: loads of a lane's values of a key or value row

template <typename U, int N>
struct RowLoad {
  static __device__ __forceinline__ void run(const U* p, float* o) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      o[i] = static_cast<float>(p[i]);
    }
  }
};

template <>
struct RowLoad<float, 4> {
  static __device__ __forceinline__ void run(const float* p, float* o) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
  }
};

template <>
struct RowLoad<__nv_bfloat16, 4> {
  static __device__ __forceinline__ void run(const __nv_bfloat16* p, float* o) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    o[0] = __uint_as_float(v.x << 16); o[1] = __uint_as_float(v.x & 0xffff0000u);
    o[2] = __uint_as_float(v.y << 16); o[3] = __uint_as_float(v.y & 0xffff0000u);
  }
};

/// Each warp takes runs of UNROLL consecutive slots of the range and keeps, for all REP query heads that share
/// the key/value head, a running maximum, sum of exponentials and exp-weighted sum of values (online softmax),
/// each lane holding D/32 consecutive head dimensions: every key and value row is read once, by one warp, with
/// the loads of UNROLL rows in flight together. The warps' results are then merged through shared memory and
/// the block writes per head the maximum score, the sum of exp(score - max) and the exp-weighted sum of values.
// @section partial: pass 1: one block per (sequence, key/value head, range of slots)

  // q (B, H, 1, D); k, v (B, HKV, C, D); offset: the position just written.
  // part_acc (B, H, S, D), part_ml (B, H, S, 2): float32 partial results of split s.
  constexpr int REP = H / HKV;
  constexpr int WARPS = THREADS / 32;
  constexpr int PL = D / 32;  // head dimensions per lane
  constexpr int UNROLL = @UNROLL@;
  __shared__ float qs[REP * D];
  __shared__ float wacc[WARPS * REP * D];
  __shared__ float wml[WARPS * REP * 2];
  const int split = (blockIdx.x) % S;
  const int bk = (blockIdx.x) / S;  // b * HKV + hk
  const int b = bk / HKV;
  const int hk = bk % HKV;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int pos = offset[0];
  const int n_valid = pos >= C ? C : pos + 1;  // slots 0 .. pos until the ring wraps, then all
  const int chunk = (n_valid + S - 1) / S;
  const int s0 = split * chunk < n_valid ? split * chunk : n_valid;
  const int s1 = s0 + chunk < n_valid ? s0 + chunk : n_valid;
  const size_t q0 = ((size_t)b * H + (size_t)hk * REP) * D;
  const T* kh = k + (size_t)bk * C * D;
  const T* vh = v + (size_t)bk * C * D;
  auto q_at = [&](size_t i) { return static_cast<float>(q[i]); };
  auto key_row = [&](int s, float* o) { RowLoad<T, PL>::run(kh + (size_t)s * D + lane * PL, o); };
  auto value_row = [&](int s, float* o) { RowLoad<T, PL>::run(vh + (size_t)s * D + lane * PL, o); };
  for (int i = tid; i < REP * D; i += THREADS) {
    qs[i] = q_at(q0 + i) * SCALE;
  }
  __syncthreads();
  float qr[REP][PL];
  float m[REP];
  float l[REP];
  float acc[REP][PL];
#pragma unroll
  for (int r = 0; r < REP; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int i = 0; i < PL; ++i) {
      qr[r][i] = qs[r * D + lane * PL + i];
      acc[r][i] = 0.0f;
    }
  }

  for (int base = s0 + warp * UNROLL; base < s1; base += WARPS * UNROLL) {
    float kv[UNROLL][PL];
    float vv[UNROLL][PL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (base + u < s1) {
        key_row(base + u, kv[u]);
        value_row(base + u, vv[u]);
      } else {
#pragma unroll
        for (int i = 0; i < PL; ++i) {
          kv[u][i] = 0.0f;
          vv[u][i] = 0.0f;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (base + u < s1) {  // the same for every lane
        float dot[REP];
#pragma unroll
        for (int r = 0; r < REP; ++r) {
          dot[r] = 0.0f;
#pragma unroll
          for (int i = 0; i < PL; ++i) {
            dot[r] = fmaf(qr[r][i], kv[u][i], dot[r]);
          }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
          for (int r = 0; r < REP; ++r) {
            dot[r] += __shfl_xor_sync(0xffffffffu, dot[r], o);
          }
        }
#pragma unroll
        for (int r = 0; r < REP; ++r) {
          const float mn = fmaxf(m[r], dot[r]);
          const float alpha = __expf(m[r] - mn);  // 0 for the first slot (m = -inf)
          const float p = __expf(dot[r] - mn);
          l[r] = fmaf(l[r], alpha, p);
#pragma unroll
          for (int i = 0; i < PL; ++i) {
            acc[r][i] = fmaf(acc[r][i], alpha, p * vv[u][i]);
          }
          m[r] = mn;
        }
      }
    }
  }

  // merge the warps: M = max of their maxima, weights exp(m_w - M) (0 for a warp without slots)
#pragma unroll
  for (int r = 0; r < REP; ++r) {
#pragma unroll
    for (int i = 0; i < PL; ++i) {
      wacc[(warp * REP + r) * D + lane * PL + i] = acc[r][i];
    }
    if (lane == 0) {
      wml[(warp * REP + r) * 2] = m[r];
      wml[(warp * REP + r) * 2 + 1] = l[r];
    }
  }
  __syncthreads();
  for (int idx = tid; idx < REP * D; idx += THREADS) {
    const int r = idx / D;
    const int d = idx % D;
    float M = -INFINITY;
    for (int w = 0; w < WARPS; ++w) {
      M = fmaxf(M, wml[(w * REP + r) * 2]);
    }
    float a = 0.0f;
    float L = 0.0f;
    for (int w = 0; w < WARPS; ++w) {
      const float mw = wml[(w * REP + r) * 2];
      if (mw != -INFINITY) {
        const float e = __expf(mw - M);
        a = fmaf(e, wacc[(w * REP + r) * D + d], a);
        L = fmaf(e, wml[(w * REP + r) * 2 + 1], L);
      }
    }
    const size_t row = ((size_t)b * H + hk * REP + r) * S + split;
    part_acc[row * D + d] = a;
    if (d == 0) {
      part_ml[row * 2] = M;
      part_ml[row * 2 + 1] = L;
    }
  }

/// out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s, with M the largest m_s (ranges without slots have
/// m = -inf, l = 0 and acc = 0, and weigh 0). The loops have no branch, so the compiler may issue their loads
/// together.
// @section combine: pass 2: one block per (sequence, query head) combines the ranges

  // part_acc (B, H, S, D), part_ml (B, H, S, 2) -> out (B, 1, H * D)
  const int bh = blockIdx.x;
  const int d = threadIdx.x;
  auto ml_at = [&](size_t i) { return part_ml[i]; };
  auto acc_at = [&](size_t i) { return part_acc[i]; };
  float ms[S];
#pragma unroll
  for (int j = 0; j < S; ++j) {
    ms[j] = ml_at(((size_t)bh * S + j) * 2);
  }
  float M = -INFINITY;
#pragma unroll
  for (int j = 0; j < S; ++j) {
    M = fmaxf(M, ms[j]);
  }
  float L = 0.0f;
  float acc = 0.0f;
#pragma unroll
  for (int j = 0; j < S; ++j) {
    const float w = ms[j] == -INFINITY ? 0.0f : __expf(ms[j] - M);
    L += w * ml_at(((size_t)bh * S + j) * 2 + 1);
    acc += w * (d < D ? acc_at(((size_t)bh * S + j) * D + d) : 0.0f);
  }
  if (d < D) {
    out[(size_t)bh * D + d] = static_cast<T>(acc / L);
  }

/// With the o_proj launch's low-rank term on the layer's scratch (qmv_source.Variant.emit_cols): each thread
/// multiplies the value it wrote by its row of ea (o_proj's A.T) and the block's warps add their sums into
/// the scratch with float atomics, so the A-product of the attention output is no launch of its own.
// @section combine_emit: pass 2 also writes o_proj's A-products of the output

  {
    const float v = d < D ? static_cast<float>(static_cast<T>(acc / L)) : 0.0f;
    const size_t n = (size_t)(bh % H) * D + d;  // the value's index in its row of H * D
    float* emit_to = const_cast<float*>(eh) + EMIT_OFFSET + (size_t)(bh / H) * EMIT_COLS;
    for (int j = 0; j < EMIT_COLS; ++j) {
      float sum = d < D ? v * static_cast<float>(ea[n * EMIT_COLS + j]) : 0.0f;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        sum += __shfl_xor_sync(0xffffffffu, sum, o);
      }
      if ((threadIdx.x & 31) == 0) {
        atomicAdd(emit_to + j, sum);
      }
    }
  }

/// end of attention.cu (the blank line above ends the last section)
