/// Per-row 4-bit dequantization: the CUDA text of kernels/cuda/dequant.py's kernel. Lines starting with ///
/// are notes, part of no section (kernels/cuda/sources.py).

// @section header: nibbles to floats and stores of 8 outputs per word

// 4-bit value -> exact float without an integer conversion: 2^23 + q has q in its low mantissa bits.
__device__ __forceinline__ float nibble(unsigned int word, int i) {
  return __uint_as_float(0x4b000000u | ((word >> (4 * i)) & 0xFu)) - 8388608.0f;
}

template <int DT>
__device__ __forceinline__ void store8(void* y, size_t i, unsigned int word, float s, float b);

template <>
__device__ __forceinline__ void store8<0>(void* y, size_t i, unsigned int word, float s, float b) {
  float4* out = reinterpret_cast<float4*>(y) + i * 2;  // 8 floats
  out[0] = make_float4(fmaf(s, nibble(word, 0), b), fmaf(s, nibble(word, 1), b),
                       fmaf(s, nibble(word, 2), b), fmaf(s, nibble(word, 3), b));
  out[1] = make_float4(fmaf(s, nibble(word, 4), b), fmaf(s, nibble(word, 5), b),
                       fmaf(s, nibble(word, 6), b), fmaf(s, nibble(word, 7), b));
}

// Two values rounded to a 16-bit float type, packed in one word (first value in the low half).
template <int DT>
__device__ __forceinline__ unsigned int pack2(float a, float b);

template <>
__device__ __forceinline__ unsigned int pack2<1>(float a, float b) {  // bfloat16
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<unsigned int*>(&v);
}

template <>
__device__ __forceinline__ unsigned int pack2<2>(float a, float b) {  // float16
  __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<unsigned int*>(&v);
}

template <int DT>
__device__ __forceinline__ void store8(void* y, size_t i, unsigned int word, float s, float b) {
  unsigned int pairs[4];
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    pairs[p] = pack2<DT>(fmaf(s, nibble(word, 2 * p), b), fmaf(s, nibble(word, 2 * p + 1), b));
  }
  reinterpret_cast<uint4*>(y)[i] = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);  // 8 16-bit values
}

// @section body: each thread converts PER words, all loads issued before the first store

  // w (N, K/8) uint32, first input in the lowest bits; scales, biases (N, 1); y (N, K).
  // Block b reads the PER * blockDim.x words from b * PER * blockDim.x on, in PER passes of one word per
  // thread: each pass a warp reads 128 contiguous bytes and writes its 256 outputs contiguously.
  constexpr int WORDS = K / 8;  // words per row
  const size_t total = (size_t)N * WORDS;
  const size_t first = (size_t)blockIdx.x * PER * blockDim.x + threadIdx.x;
  unsigned int words[PER];
#pragma unroll
  for (int j = 0; j < PER; ++j) {  // every load issued before the first store
    const size_t i = first + (size_t)j * blockDim.x;
    words[j] = i < total ? w[i] : 0u;
  }
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const size_t i = first + (size_t)j * blockDim.x;
    if (i < total) {
      const int n = (int)(i / WORDS);
      store8<DT>(y, i, words[j], static_cast<float>(scales[n]), static_cast<float>(biases[n]));
    }
  }

/// end of dequant.cu (the blank line above ends the last section)
