/// L2 prefetching from blocks appended to a launch: the device function that kernels/cuda/l2_prefetch.py's
/// prefix calls. Off the GPU (the CPU emulation of the tests) it compiles to nothing. Lines starting with ///
/// are notes, part of no section (kernels/cuda/sources.py).

// @section header: the prefetch loop

// Thread t of n asks L2 for its share of bytes [begin, end) of p, one prefetch per 128-byte line (a hint:
// nothing is read into registers).
__device__ __forceinline__ void l2_prefetch(const void* p, size_t begin, size_t end, size_t t, size_t n) {
#if defined(__CUDA_ARCH__)
  const char* c = static_cast<const char*>(p) + begin;
  const size_t bytes = end - begin;
  for (size_t off = t * 128; off < bytes; off += n * 128) {
    asm volatile("prefetch.global.L2 [%0];" :: "l"(c + off));
  }
#endif
}

/// end of l2_prefetch.cu (the blank line above ends the last section)
