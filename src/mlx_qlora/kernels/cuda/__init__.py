"""CUDA kernels (MLX's CUDA backend): 4-bit matmuls for few rows, one-token attention over a static cache,
per-row dequantization, L2 prefetching, and attention padded for cuDNN's fused backward. Their CUDA text
lives in the ``.cu`` files beside the modules (``sources.py`` reads them). The CPU tests run every
kernel's source through an emulation (``tests/kernels/cuda_emulation.h``)."""
