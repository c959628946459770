/// Few-row matmuls with per-row 4-bit weights: the CUDA text of kernels/cuda/qmv.py's kernels.
/// qmv_source.py assembles a kernel from these sections (the @NAME@ places are filled per Variant; EPS,
/// LOG2_BASE, ROPE_SCALE, MMA_CHUNKS, MMA_WARPS and STAGE_WARPS become numbers); qmv_plan.py picks the
/// body and the launch shape. Sections: the header, the CUDA-core body and the tensor-core body, the
/// RMSNorm pieces, the staged input, and SwiGLU's row selection and epilogue. Lines starting with /// are
/// notes, part of no section (kernels/cuda/sources.py); the sections' text, whitespace included, is what
/// the kernels were measured with.

// @section header: device helpers of both bodies

template <typename U>
__device__ __forceinline__ float load_res(const U* p, size_t i) {
  return static_cast<float>(p[i]);
}

// Eight values as floats: two float4 of float32, or one uint4 of eight bfloat16 (first in the low half).
__device__ __forceinline__ void unpack_x8(float4 a, float4 b, float* o) {
  o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
  o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}

__device__ __forceinline__ void unpack_x8(uint4 v, float* o) {
  unsigned int u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    o[2 * i] = __uint_as_float(u[i] << 16);
    o[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
  }
}

// Eight consecutive inputs of row `x` starting at element k (a multiple of 8), as floats.
template <int DT>
__device__ __forceinline__ void load_x8(const unsigned char* x, int k, float* o);

template <>
__device__ __forceinline__ void load_x8<0>(const unsigned char* x, int k, float* o) {  // float32
  const float4* p = reinterpret_cast<const float4*>(x) + (k >> 2);
  unpack_x8(p[0], p[1], o);
}

template <>
__device__ __forceinline__ void load_x8<1>(const unsigned char* x, int k, float* o) {  // bfloat16
  unpack_x8(*(reinterpret_cast<const uint4*>(x) + (k >> 3)), o);
}

// Eight staged inputs (``_STAGE``): 16-byte unit u of shared memory (float32: and unit u + stride).
template <int DT>
__device__ __forceinline__ void load_staged(const uint4* s, int u, int stride, float* o);

template <>
__device__ __forceinline__ void load_staged<0>(const uint4* s, int u, int stride, float* o) {  // float32
  const float4* f = reinterpret_cast<const float4*>(s);
  unpack_x8(f[u], f[u + stride], o);
}

// RMSNorm of eight inputs xv at k (before the 1/rms factor): adds their squares to ss, multiplies them by gamma.
template <int DT>
__device__ __forceinline__ void norm_x8(const void* gamma, int k, float* xv, float& ss) {
  float gv[8];
  load_x8<DT>(reinterpret_cast<const unsigned char*>(gamma), k, gv);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    ss = fmaf(xv[i], xv[i], ss);
    xv[i] *= gv[i];
  }
}

// The bits of a float rounded to bfloat16 (to nearest, ties to even), in the low 16 bits.
__device__ __forceinline__ unsigned int bf16_bits(float f) {
  const unsigned int u = __float_as_uint(f);
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

#ifndef MLX_QLORA_MMA_DEFINED
// d += A b on the tensor cores, for one warp: A 16 x 16 and b 16 x 8 in bfloat16 pairs, d 16 x 8 in float32,
// in PTX's fragment layouts for mma.m16n8k16 (lane = 4 * group + t: a0 = A[group][2t, 2t+1], a1 = A[group+8][..],
// a2 = A[group][2t+8, 2t+9], a3 = A[group+8][..]; b0 = b[2t, 2t+1][group], b1 = b[2t+8, 2t+9][group];
// d = (row group, columns 2t, 2t+1), (row group+8, the same columns)).
__device__ __forceinline__ void mma_bf16_16816(float* d, unsigned int a0, unsigned int a1, unsigned int a2,
                                               unsigned int a3, unsigned int b0, unsigned int b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#endif

/// ROWS output rows in all, P * R weight rows loaded per warp (row_ptr, set by the variant's @SELECT@ code),
/// @EPILOGUE@ writes y from acc and xsum. @STAGE@, @XLOAD@, @XSUM@, @XSUM_REDUCE@ and @XSUM0@ are the input
/// handling: read per warp, or staged in shared memory once per block (the stage section).
// @section body: the CUDA-core body, shared by every variant

  // Packed weights: uint32 words, 8 weights per word, first input in the lowest bits; x (M, K). Each
  // warp computes R consecutive output rows, so every input value is loaded and converted once for R
  // rows. A 4-bit value q becomes the float 1 + q/16 by placing it in the top mantissa bits of 1.0f (no
  // integer-to-float conversion), so the warp accumulates
  //   acc = sum_k (1 + q/16) x = sum(x) + (q.x)/16   and   q.x = 16 * (acc - sum(x)).
  const int lane = threadIdx.x & 31;
  const int n0 = ((blockIdx.x * blockDim.x + threadIdx.x) >> 5) * R;
  constexpr int XBYTES = DT == 0 ? 4 : 2;
  constexpr int CHUNKS = K / 32;  // 16-byte chunks (32 weights) per weight row
  const unsigned char* xb = reinterpret_cast<const unsigned char*>(x);
  @STAGE@
  if (n0 >= ROWS) {
    return;
  }
  constexpr int RR = P * R;       // weight rows read by this warp
  const uint4* row_ptr[RR];
  @SELECT@
  @PROLOGUE@
  float acc[RR][M];
  float xsum[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    xsum[m] = @XSUM0@;
#pragma unroll
    for (int r = 0; r < RR; ++r) {
      acc[r][m] = 0.0f;
    }
  }
#pragma unroll @UNROLL@
  for (int j = lane; j < CHUNKS; j += 32) {
    uint4 packed[RR];
#pragma unroll
    for (int r = 0; r < RR; ++r) {
      packed[r] = row_ptr[r][j];
    }
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int k = j * 32 + t * 8;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float xv[8];
        @XLOAD@
        @XSCALE@
        @XSUM@
#pragma unroll
        for (int r = 0; r < RR; ++r) {
          const unsigned int word = t == 0 ? packed[r].x : t == 1 ? packed[r].y : t == 2 ? packed[r].z : packed[r].w;
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const unsigned int bits = i < 5 ? (word << (19 - 4 * i)) : (word >> (4 * i - 19));
            const float q = __uint_as_float((bits & 0x00780000u) | 0x3f800000u);  // 1 + q/16
            acc[r][m] = fmaf(q, xv[i], acc[r][m]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      @XSUM_REDUCE@
#pragma unroll
      for (int r = 0; r < RR; ++r) {
        acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], offset);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int r = 0; r < RR; ++r) {
      acc[r][m] = 16.0f * (acc[r][m] - xsum[m]);  // q.x, what the epilogues read
    }
  }
  @POSTREDUCE@
  @LOW_RANK@
  // Lane r writes row n0 + r (unrolled with a compare: indexing registers by lane would spill them).
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r == lane) {
      const int n = n0 + r;
      @EPILOGUE@
    }
  }

/// The same sums as the body with the multiply-adds done by mma.m16n8k16, so a lane spends about one integer
/// operation per weight (the CUDA-core body spends three instructions per weight and input row: with several
/// input rows it is bound by issuing them). Each of the block's MMA_WARPS warps takes its share of K for all
/// the block's rows and the partial sums meet in shared memory; then warp 0's lanes r < R run the same
/// epilogues on acc (shared) and xsum. Taken where qmv_plan.takes_mma and prefers_mma (gate/up by default).
// @section body_mma: the tensor-core body (16 output rows per block, bfloat16 inputs)

  // A 4-bit value q becomes the bfloat16 128 + q by placing it in the low mantissa bits of 128.0 (two at
  // a time: nibbles j and j + 4 of a word land in the two halves of one register), so the mma sums
  // (128 + q) x over k and q.x = sum - 128 sum(x). The inputs are rounded to bfloat16 once (after the
  // RMSNorm's weight, if any) and stored in shared memory in the pair order of the weights.
  constexpr int WARPS = MMA_WARPS;
  constexpr int KS = K / WARPS;    // inputs per warp
  constexpr int CH = KS / 32;      // 16-byte chunks (32 weights) of a row per warp
  constexpr int CHUNKS = K / 32;
  constexpr int RR = P * R;        // weight rows of the block: P tiles of 16
  constexpr int U = MMA_CHUNKS;    // chunks per lane and iteration
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int gid = lane >> 2, tid = lane & 3;
  const int n0 = blockIdx.x * R;
  const uint4* row_ptr[2 * P];     // rows gid and gid + 8 of each tile
  @SELECT@
  __shared__ uint4 xs[M * K / 8];  // (M, K) as pairs (j, j + 4), (j + 1, j + 5), ... of 8 inputs
  __shared__ float part[WARPS][RR][M];
  __shared__ float part_x[WARPS][2][M];
  __shared__ float acc[RR][M];
  __shared__ float sum_x[M];
  const unsigned char* xb = reinterpret_cast<const unsigned char*>(x);
  const int k0 = warp * KS;
  float xsum[M];
  float ss[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    xsum[m] = 0.0f;
    ss[m] = 0.0f;
    for (int gi = lane; gi < KS / 8; gi += 32) {
      const int k = k0 + gi * 8;
      float xv[8];
      load_x8<DT>(xb + (size_t)m * K * 2, k, xv);
      @XPREP@
      unsigned int hb[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        hb[i] = bf16_bits(xv[i]);
        xsum[m] += __uint_as_float(hb[i] << 16);
      }
      xs[(m * K + k) / 8] = make_uint4(hb[0] | (hb[4] << 16), hb[1] | (hb[5] << 16), hb[2] | (hb[6] << 16),
                                       hb[3] | (hb[7] << 16));
    }
  }
  __syncwarp();
  float d[P][4];
#pragma unroll
  for (int p = 0; p < P; ++p) {
    d[p][0] = d[p][1] = d[p][2] = d[p][3] = 0.0f;
  }
  // Lane (gid, tid) loads chunks c0 + U tid + u (u < U) of rows gid and gid + 8 and of input row gid, so a
  // quad reads 16 U contiguous bytes of a row: the mma's k index 2 tid, 2 tid + 1, 2 tid + 8, 2 tid + 9 are
  // inputs 8w + (0, 4, 1, 5) or 8w + (2, 6, 3, 7) of a chunk's word w.
#pragma unroll 1
  for (int c0 = 0; c0 < CH; c0 += 4 * U) {
    uint4 wv[U][2 * P];
    uint4 xv[U][4];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + U * tid + u;
      const bool ok = c < CH;
#pragma unroll
      for (int h = 0; h < 2 * P; ++h) {
        wv[u][h] = ok ? row_ptr[h][k0 / 32 + c] : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        xv[u][w] = ok && gid < M ? xs[(gid * K + k0 + c * 32) / 8 + w] : make_uint4(0u, 0u, 0u, 0u);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const unsigned int b[4] = {xv[u][w].x, xv[u][w].y, xv[u][w].z, xv[u][w].w};
#pragma unroll
        for (int p = 0; p < P; ++p) {
          const uint4 wl = wv[u][2 * p], wh = wv[u][2 * p + 1];
          const unsigned int lo = w == 0 ? wl.x : w == 1 ? wl.y : w == 2 ? wl.z : wl.w;
          const unsigned int hi = w == 0 ? wh.x : w == 1 ? wh.y : w == 2 ? wh.z : wh.w;
          unsigned int a[4], a8[4];  // nibbles (j, j + 4) as bfloat16 128 + q
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            a[j] = ((lo >> (4 * j)) & 0x000f000fu) | 0x43004300u;
            a8[j] = ((hi >> (4 * j)) & 0x000f000fu) | 0x43004300u;
          }
          mma_bf16_16816(d[p], a[0], a8[0], a[1], a8[1], b[0], b[1]);
          mma_bf16_16816(d[p], a[2], a8[2], a[3], a8[3], b[2], b[3]);
        }
      }
    }
  }
  // The warps' partial sums: d[p][i] is row p * 16 + gid + 8 (i / 2) of input row 2 tid + i % 2.
#pragma unroll
  for (int p = 0; p < P; ++p) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = 2 * tid + (i & 1);
      if (m < M) {
        part[warp][p * 16 + gid + 8 * (i >> 1)][m] = d[p][i];
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      xsum[m] += __shfl_xor_sync(0xffffffffu, xsum[m], offset);
      ss[m] += __shfl_xor_sync(0xffffffffu, ss[m], offset);
    }
    if (lane == 0) {
      part_x[warp][0][m] = xsum[m];
      part_x[warp][1][m] = ss[m];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < RR * M; idx += WARPS * 32) {
    const int rr = idx / M, m = idx % M;
    float a = 0.0f, sx = 0.0f, sq = 0.0f;
#pragma unroll
    for (int v = 0; v < WARPS; ++v) {
      a += part[v][rr][m];
      sx += part_x[v][0][m];
      sq += part_x[v][1][m];
    }
    a -= 128.0f * sx;
    @NORM@
    acc[rr][m] = a;
    if (rr == 0) {
      sum_x[m] = sx;
    }
  }
  __syncthreads();
  if (warp != 0) {
    return;
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    xsum[m] = sum_x[m];
  }
  // Lane r < R writes row n0 + r: acc is in shared memory, so r is the lane (the lanes write in parallel,
  // and the epilogue is in the code once).
  if (lane < R) {
    const int r = lane;
    const int n = n0 + r;
    @EPILOGUE@
  }

// @section mma_xprep_norm: the tensor-core body's RMSNorm: x * gamma and the sum of squares

      norm_x8<DT>(gamma, k, xv, ss[m]);

// @section mma_norm: the tensor-core body's RMSNorm: the sums scaled by 1/rms

    {
      const float inv_rms = rsqrtf(sq / (float)K + EPS);
      a *= inv_rms;
      sx *= inv_rms;
    }

/// RMSNorm of the input rows before the matmul: every warp computes 1/rms of each input row (the rows are
/// short and cached), the loop multiplies the inputs by the norm's weight gamma (norm_xscale), and the sums
/// are scaled by 1/rms after the reduction (norm_postreduce; the epilogue's formula is linear in acc and xsum).
// @section norm_prologue: RMSNorm before the matmul: 1/rms of each input row, per warp

  float inv_rms[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float ss = 0.0f;
    for (int kk = lane * 8; kk < K; kk += 256) {
      float xv[8];
      load_x8<DT>(xb + (size_t)m * K * XBYTES, kk, xv);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        ss = fmaf(xv[i], xv[i], ss);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      ss += __shfl_xor_sync(0xffffffffu, ss, o);
    }
    inv_rms[m] = rsqrtf(ss / (float)K + EPS);
  }

// @section norm_xscale: RMSNorm: the inputs times gamma in the weight loop

        {
          float gv[8];
          load_x8<DT>(reinterpret_cast<const unsigned char*>(gamma), k, gv);
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            xv[i] *= gv[i];
          }
        }

// @section norm_postreduce: RMSNorm: the reduced sums times 1/rms

#pragma unroll
  for (int m = 0; m < M; ++m) {
    xsum[m] *= inv_rms[m];
#pragma unroll
    for (int r = 0; r < RR; ++r) {
      acc[r][m] *= inv_rms[m];
    }
  }

// @section xsum: the input read per warp: each warp sums the rows itself
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          xsum[m] += xv[i];
        }
/// Staged input (the RMSNorm launches): the block's warps first copy the M input rows into shared memory
/// once, as the RMSNorm's x * gamma in float32, and sum each row and its squares together; every warp then reads the rows from shared memory and starts from the block's sums, instead of
/// reading the rows (and gamma) from L1/L2 and summing them itself. The rows are stored in planes of 16-byte
/// units, so that the lanes' reads of one step (group t of 8 inputs of chunks j = lane + 32 i) are
/// consecutive units, free of bank conflicts: inputs 8 (4 j + t) .. + 7 of row m are unit
/// (m * 4 + t) * SU * CHUNKS + j, and its second half (float32) CHUNKS units further.
// @section stage: the input rows staged in shared memory once per block, through the RMSNorm's weight

  constexpr int SW = STAGE_WARPS;  // warps of the block
  constexpr int SX = 4;  // bytes per staged input
  constexpr int SU = SX / 2;  // 16-byte units per group of 8 inputs
  __shared__ uint4 xs4[M * K * SX / 16];
  __shared__ float stage_part[2][M][SW];
  {
    const int sw = threadIdx.x >> 5;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float sx = 0.0f, ss = 0.0f;
      for (int kk = threadIdx.x * 8; kk < K; kk += SW * 256) {
        const int unit = (m * 4 + ((kk >> 3) & 3)) * SU * CHUNKS + (kk >> 5);
        float xv[8];
        load_x8<DT>(xb + (size_t)m * K * XBYTES, kk, xv);
        
        {
          norm_x8<DT>(gamma, kk, xv, ss);
          float4* dst = reinterpret_cast<float4*>(xs4);
          dst[unit] = make_float4(xv[0], xv[1], xv[2], xv[3]);
          dst[unit + CHUNKS] = make_float4(xv[4], xv[5], xv[6], xv[7]);
        }

#pragma unroll
        for (int i = 0; i < 8; ++i) {
          sx += xv[i];
        }
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        sx += __shfl_xor_sync(0xffffffffu, sx, offset);
        ss += __shfl_xor_sync(0xffffffffu, ss, offset);
      }
      if (lane == 0) {
        stage_part[0][m][sw] = sx;
        stage_part[1][m][sw] = ss;
      }
    }
  }
  __syncthreads();
  float stage_sum[M];
  float stage_ss[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    stage_sum[m] = 0.0f;
    stage_ss[m] = 0.0f;
#pragma unroll
    for (int w = 0; w < SW; ++w) {
      stage_sum[m] += stage_part[0][m][w];
      stage_ss[m] += stage_part[1][m][w];
    }
  }

// @section norm_prologue_staged: RMSNorm with a staged input: 1/rms from the block's sums

  float inv_rms[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    inv_rms[m] = rsqrtf(stage_ss[m] / (float)K + EPS);
  }

// @section select_swiglu: SwiGLU: gate rows (w0) and up rows (w1) of the same index in one warp

#pragma unroll
  for (int r = 0; r < R; ++r) {
    row_ptr[r] = reinterpret_cast<const uint4*>(w0) + (size_t)(n0 + r) * CHUNKS;
    row_ptr[R + r] = reinterpret_cast<const uint4*>(w1) + (size_t)(n0 + r) * CHUNKS;
  }

// @section select_swiglu_mma: SwiGLU in the tensor-core body: rows gid and gid + 8 of gate and of up

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_ptr[h] = reinterpret_cast<const uint4*>(w0) + (size_t)(n0 + gid + 8 * h) * CHUNKS;
    row_ptr[2 + h] = reinterpret_cast<const uint4*>(w1) + (size_t)(n0 + gid + 8 * h) * CHUNKS;
  }

/// @ADD_GATE@ and @ADD_UP@: nothing, or a LoRA addend of gate and of up (Variant.addend) added to the float32 sum.
// @section epilogue_swiglu: SwiGLU: y (M, ROWS) = silu(gate) * up

      const float sg = static_cast<float>(s0[n]), bg = static_cast<float>(b0[n]);
      const float su = static_cast<float>(s1[n]), bu = static_cast<float>(b1[n]);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float g = sg * acc[r][m] + bg * xsum[m]@ADD_GATE@;
        const float u = su * acc[R + r][m] + bu * xsum[m]@ADD_UP@;
        y[(size_t)m * ROWS + n] = static_cast<T>(g / (1.0f + __expf(-g)) * u);
      }

/// Low-rank terms (Variant.low_rank): the second matmul of a LoRA update in the epilogue. lh (M, low_rank_cols)
/// holds x @ A.T of every adapted matrix of the input; output n of matrix g adds F * (lb<g>[n] . lh[m, c:c + r]),
/// times the row's 1/rms where the kernel norms its input (lr_scale: the body's own inv_rms, or in the
/// tensor-core body the same number again from the warps' sums of squares, which stay in shared memory).
// @section low_rank_header: a row of B times a row of A-products, in float32

template <int RK, typename U, typename V>
__device__ __forceinline__ float low_rank_dot(const U* b, const V* h, size_t n, size_t h0) {
  float s = 0.0f;
#pragma unroll
  for (int j = 0; j < RK; ++j) {
    s = fmaf(static_cast<float>(b[n * RK + j]), static_cast<float>(h[h0 + j]), s);
  }
  return s;
}

// @section low_rank_scale: the CUDA-core body's 1/rms of each input row for the low-rank terms
      float lr_scale[M];
#pragma unroll
      for (int m = 0; m < M; ++m) {
        lr_scale[m] = inv_rms[m];
      }
// @section low_rank_scale_mma: the tensor-core body's 1/rms of each input row for the low-rank terms
      float lr_scale[M];
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float sq = 0.0f;
#pragma unroll
        for (int v = 0; v < WARPS; ++v) {
          sq += part_x[v][1][m];
        }
        lr_scale[m] = rsqrtf(sq / (float)K + EPS);
      }

/// The layer's low-rank scratch (Variant.emit, Variant.zero): one float32 array per decoder layer holds the
/// A-products that a launch's outputs feed to the next launch's low-rank terms. The first launch of the layer
/// zeroes it (zero_scratch, block 0); a launch with emit adds, for each row n it writes and each column j,
/// value * ea[n, j] to eh[EMIT_OFFSET + m * EMIT_COLS + j] (the rows' sums taken across the warp, then one
/// float atomicAdd per column): the next launch reads those columns as its lh, so the A-product is no
/// launch of its own. ev[m] holds the value lane r wrote (rounded to T, as the next launch reads it).
// @section zero_scratch: block 0 zeroes the layer's low-rank scratch
  if (blockIdx.x == 0) {
    float* zero_to = const_cast<float*>(zb);
    for (int i = threadIdx.x; i < ZERO_FLOATS; i += blockDim.x) {
      zero_to[i] = 0.0f;
    }
  }
// @section emit: the next launch's A-products of the rows this warp wrote

  {
    float* emit_to = const_cast<float*>(eh) + EMIT_OFFSET;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        v[r] = __shfl_sync(0xffffffffu, ev[m], r);
      }
      for (int j = lane; j < EMIT_COLS; j += 32) {
        float sum = 0.0f;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          sum = fmaf(v[r], static_cast<float>(ea[(size_t)(n0 + r) * EMIT_COLS + j]), sum);
        }
        atomicAdd(emit_to + m * EMIT_COLS + j, sum);
      }
    }
  }

/// The A-products of a launch's low-rank terms where no earlier launch wrote them (q/k/v's, of the layer's
/// input): h (M, R) = x (M, K) @ A.T for A (R, K) in x's dtype, in float32, as a kernel of its own instead of
/// a matmul (in MLX's CUDA graphs a cuBLAS matmul is a captured child graph, and one whose kernels run in
/// clusters makes the whole graph one that is instantiated again at every launch instead of updated).
// @section a_products: h = x @ A.T, one block per column of h (row of A)

  constexpr int XBYTES = DT == 0 ? 4 : 2;
  constexpr int WARPS = A_THREADS / 32;
  const int j = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const unsigned char* xb = reinterpret_cast<const unsigned char*>(x);
  const unsigned char* ab = reinterpret_cast<const unsigned char*>(a) + (size_t)j * K * XBYTES;
  __shared__ float part[M][WARPS];
  float sum[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    sum[m] = 0.0f;
  }
  for (int k = threadIdx.x * 8; k < K; k += A_THREADS * 8) {
    float av[8];
    load_x8<DT>(ab, k, av);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float xv[8];
      load_x8<DT>(xb + (size_t)m * K * XBYTES, k, xv);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        sum[m] = fmaf(av[i], xv[i], sum[m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      sum[m] += __shfl_xor_sync(0xffffffffu, sum[m], o);
    }
    if (lane == 0) {
      part[m][warp] = sum[m];
    }
  }
  __syncthreads();
  if (threadIdx.x < M) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      total += part[threadIdx.x][w];
    }
    h[(size_t)threadIdx.x * R + j] = total;
  }

/// end of qmv.cu (the blank line above ends the last section)
