"""GGUF (llama.cpp, Ollama) import and export: ``gguf_to_hf`` reads a GGUF into a Hugging Face folder,
``export_gguf`` writes a model folder as a float16, Q8_0 or float32 GGUF."""

from .mapping import TENSOR_NAMES, from_gguf_rows, gguf_name, hf_name, to_gguf_rows
from .reader import GGUFInfo, gguf_to_hf, is_gguf, open_gguf, read_metadata
from .writer import ExportReport, export_gguf

__all__ = [
    "TENSOR_NAMES", "from_gguf_rows", "gguf_name", "hf_name", "to_gguf_rows", "GGUFInfo", "gguf_to_hf",
    "is_gguf", "open_gguf", "read_metadata", "ExportReport", "export_gguf",
]
