"""QLoRA fine-tuning of Mistral-family language models on MLX."""

from .blas import preload_openblas as _preload_openblas

_preload_openblas()  # must run before the first `import mlx.core`

__version__ = "0.1.0"
