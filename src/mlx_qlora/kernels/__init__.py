"""Backend kernels: the fast paths, each with its plain reference formula beside it.

Nothing here knows about models or layers: a kernel takes arrays and returns arrays, and ``supports``
functions say when it applies. The model and the 4-bit layer call one seam per operation, which picks
a kernel from here when it applies and the plain MLX path otherwise (``docs/ARCHITECTURE.md``, "Where
the fast paths plug in"). ``cuda/`` holds the CUDA kernels, built with ``mx.fast.cuda_kernel``.
"""
