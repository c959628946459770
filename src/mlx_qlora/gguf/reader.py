"""Read a GGUF file (llama.cpp, Ollama) into a Hugging Face model folder.

``gguf_to_hf(path, out)`` writes ``config.json`` (rebuilt from the ``<architecture>.*`` metadata:
``llama``, ``qwen2``, ``qwen3`` or ``phi3``; a Gemma family reads its own, ``Family.gguf_config``),
safetensors shards of the dequantized tensors under Hugging Face names (``mapping.TENSOR_NAMES`` plus the
family's own, with llama.cpp's query/key row order undone for ``llama`` and Gemma's stored ``1 + weight``
norms shifted back), the tokenizer rebuilt from the ``tokenizer.ggml.*`` metadata
(``tokenizer.json`` or ``tokenizer.model``, see ``vocab.py``) and ``tokenizer_config.json`` with the chat
template. Everything downstream (``load_model``, ``convert_checkpoint``, ``load_tokenizer``,
``transformers``) reads that folder unchanged.

Quantized tensors are dequantized with the ``gguf`` package to float32 (``w = d * q + m`` per block of 32
for Q4_1), then stored in ``dtype``: float32 keeps them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..errors import UserError
from ..io import atomic_dir, atomic_write_json, write_safetensors_shards
from ..model.families import FAMILIES
from .mapping import ARCHITECTURES, CONFIG_KEYS, IMPORT_FAMILIES, hf_name, reorder_from_gguf
from .vocab import tokenizer_files

# Tensor types we dequantize (every one the gguf package implements that llama.cpp models use).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
IGNORED_TENSORS = ("rope_freqs.weight",)  # llama.cpp's precomputed RoPE factors; refused below when they matter
NP_DTYPES = {"float32": np.float32, "float16": np.float16}
DEFAULT_SHARD_BYTES = 2 * 2**30
GGUF_MAGIC = b"GGUF"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    return gguf


def open_gguf(path: Union[str, Path]):
    """A ``gguf.GGUFReader`` over ``path``; ``UserError`` for a missing, foreign or truncated file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"{path}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, OSError, KeyError) as e:
        raise UserError(f"{path}: cannot be read as GGUF: the file is truncated or corrupt ({e})") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise UserError(f"{path}: truncated: tensor {tensor.name!r} ends at byte "
                            f"{tensor.data_offset + tensor.n_bytes} but the file has {size}")
    return reader


def read_metadata(reader) -> dict[str, Any]:
    """Every key/value of a GGUF as plain Python values (strings, numbers, lists)."""
    meta = {}
    for key, value in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = value.contents()
        except Exception as e:  # a malformed field
            raise UserError(f"{reader.data.filename}: metadata key {key!r} cannot be read ({e})") from None
    return meta


def _float(value: float) -> float:
    """A float32 metadata value as the shortest decimal that reads back to it (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def hf_config(meta: dict[str, Any], source: str, tensor_names: set[str],
              rope_freqs: Optional[np.ndarray] = None) -> dict[str, Any]:
    """The Hugging Face ``config.json`` for a GGUF's metadata and tensor names (tied embeddings when the
    file has no ``output.weight``); ``rope_freqs``: the values of a ``rope_freqs.weight`` tensor, read back
    as Llama 3.1's scaling (``llama3_scaling``)."""
    arch = meta.get("general.architecture")
    family = gguf_family(arch)
    if family is not None:
        return _family_config(meta, source, tensor_names, family)
    if arch not in ARCHITECTURES:
        raise UserError(f"{source}: general.architecture = {arch!r} is not supported (supported: "
                        f"{', '.join(ARCHITECTURES + _family_architectures())})")
    family = FAMILIES[IMPORT_FAMILIES[arch]]
    config: dict[str, Any] = {"architectures": [family.architecture], "model_type": family.model_type}
    for key, hf_key in CONFIG_KEYS.items():
        if f"{arch}.{key}" in meta:
            value = meta[f"{arch}.{key}"]
            config[hf_key] = _float(value) if isinstance(value, float) else int(value)
    for required in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads"):
        if required not in config:
            key = next(k for k, v in CONFIG_KEYS.items() if v == required)
            raise UserError(f"{source}: metadata key '{arch}.{key}' is missing")
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    if "vocab_size" not in config:
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise UserError(f"{source}: neither '{arch}.vocab_size' nor a token list gives the vocabulary size")
        config["vocab_size"] = len(tokens)
    rope_dims = meta.get(f"{arch}.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != config["head_dim"]:
        raise UserError(f"{source}: {arch}.rope.dimension_count = {rope_dims} rotates part of each head "
                        f"(head_dim {config['head_dim']}), which is not supported")
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": _float(meta[f"{arch}.rope.scaling.factor"])}
    elif scaling not in (None, "none"):
        raise UserError(f"{source}: {arch}.rope.scaling.type = {scaling!r} is not supported (supported: linear)")
    if "rope_freqs.weight" in tensor_names:
        if rope_freqs is None:
            raise UserError(f"{source}: has rope_freqs.weight (Llama 3.1-style RoPE scaling), which is not supported")
        theta = float(config.get("rope_theta", 10000.0))
        config["rope_scaling"] = llama3_scaling(rope_freqs, theta, config["head_dim"], source)
    if "rope_factors_long.weight" in tensor_names:
        raise UserError(f"{source}: has rope_factors_long.weight (Phi-3 longrope scaling), which is not supported")
    if family.gguf_sliding_window and meta.get(f"{arch}.attention.sliding_window"):
        config["sliding_window"] = int(meta[f"{arch}.attention.sliding_window"])
    config.setdefault("rms_norm_eps", 1e-5)
    config.setdefault("rope_theta", 10000.0)
    config.setdefault("max_position_embeddings", 4096)
    config["hidden_act"] = "silu"
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos")):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        config[key] = int(value) if value is not None else None
    return config


def llama3_scaling(freqs: np.ndarray, theta: float, head_dim: int, source: str) -> dict[str, Any]:
    """Llama 3.1's ``rope_scaling`` that gives llama.cpp's ``rope_freqs`` (head_dim/2 divisors of the plain
    frequencies): ``factor`` the largest divisor; the frequencies between the kept (divisor 1) and the
    divided ones satisfy ``1/f = 1/factor + s (1 - 1/factor)`` with ``s = (original / wavelength - low) /
    (high - low)``, a line in 1/wavelength fitted to them. Only ``original/low`` and ``original/high``
    change the frequencies, so ``low_freq_factor`` is taken as 1 (Llama 3.1's and 3.2's own value; then
    ``original`` comes out as their 8192). The result is checked by recomputing the divisors (``UserError``
    naming the file when they do not follow this scaling). With fewer than two smoothed frequencies (a
    small head) the parameters are not identifiable: edges that give the same divisors are returned."""
    from types import SimpleNamespace

    from ..model.layers import llama3_inv_freq

    f = np.asarray(freqs, dtype=np.float64).reshape(-1)
    plain = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if f.shape != plain.shape or not np.all(np.isfinite(f)) or f.min() <= 0:
        raise UserError(f"{source}: rope_freqs.weight has {f.size} values, expected {plain.size} positive ones")
    wavelength = 2 * np.pi / plain
    factor = float(f.max())
    factor = round(factor, 3) if abs(factor - round(factor, 3)) < 1e-5 * factor else factor  # float32's 8.0000006
    kept, divided = np.isclose(f, 1.0, rtol=1e-5), np.isclose(f, factor, rtol=1e-5)
    medium = ~(kept | divided)
    if factor > 1 and medium.sum() >= 2:
        s = (1 / f[medium] - 1 / factor) / (1 - 1 / factor)
        (a, b), *_ = np.linalg.lstsq(np.stack([1 / wavelength[medium], np.ones(int(medium.sum()))], 1), s, rcond=None)
        high = 1 - 1 / b if b < 0 else float("nan")  # low = 1: high - low = -1 / b, original = a (high - low)
        original = -a / b if b < 0 else float("nan")
        candidates = [(original, high)]
    else:  # not identifiable: any edges that reproduce the divisors describe the same model; try a range
        long_edge = wavelength[divided].min() if divided.any() else wavelength.max() * 2
        low_end = wavelength[medium].max() if medium.any() else (wavelength[kept].max() if kept.any() else
                                                                  wavelength.min() / 2)
        candidates = []  # original: a whole number of positions (as configs hold it), at most 256 tried
        for original in np.unique(np.geomspace(np.floor(low_end) + 1, max(np.ceil(long_edge) - 1, np.floor(low_end) + 1),
                                               256).round()):
            if medium.any():  # its one divisor fixes high for this original
                s = (1 / f[medium][0] - 1 / factor) / (1 - 1 / factor)
                high = 1 + (original / wavelength[medium][0] - 1) / s if s > 0 else float("nan")
            else:
                high = original / (low_end * 1.0001) if kept.any() else 2.0
            candidates.append((original, high))
    for original, high in candidates:
        if not (np.isfinite(original) and np.isfinite(high) and high > 1):
            continue
        original = int(round(original))  # configs hold a whole number; the check below judges it
        if abs(high - round(high, 3)) < 1e-4 * high:
            high = round(high, 3)
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                   "high_freq_factor": float(high), "original_max_position_embeddings": original}
        args = SimpleNamespace(head_dim=head_dim, rope_theta=theta, rope_scaling_factor=scaling["factor"],
                               rope_low_freq_factor=1.0, rope_high_freq_factor=scaling["high_freq_factor"],
                               rope_original_max_position_embeddings=original)
        if np.allclose(plain / np.array(llama3_inv_freq(args), dtype=np.float64), f, rtol=1e-4):
            return scaling
    raise UserError(f"{source}: rope_freqs.weight does not follow Llama 3.1's RoPE scaling, which is the only "
                    f"one supported")


def gguf_family(arch: Optional[str]):
    """The family whose llama.cpp architecture is ``arch`` and that reads its own metadata
    (``Family.gguf_config``: Gemma), or None (the common reading, ``IMPORT_FAMILIES``)."""
    return next((f for f in FAMILIES.values() if f.gguf_architecture == arch and f.gguf_config), None)


def _family_architectures() -> tuple[str, ...]:
    return tuple(f.gguf_architecture for f in FAMILIES.values() if f.gguf_config)


def _family_config(meta: dict[str, Any], source: str, tensor_names: set[str], family) -> dict[str, Any]:
    """The Hugging Face config of a GGUF of a family that reads its own metadata (Gemma)."""
    arch = family.gguf_architecture
    if "output.weight" in tensor_names:
        raise UserError(f"{source}: has output.weight: an untied {arch} head is not supported")
    try:
        config = family.gguf_config(meta)
    except KeyError as e:
        raise UserError(f"{source}: metadata key '{e.args[0]}' is missing") from None
    except (ValueError, TypeError) as e:
        raise UserError(f"{source}: {e}") from None
    config = {k: _float(v) if isinstance(v, float) else v for k, v in config.items()}
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None and meta.get("tokenizer.ggml.tokens") is None:
        raise UserError(f"{source}: neither '{arch}.vocab_size' nor a token list gives the vocabulary size")
    config["vocab_size"] = int(vocab) if vocab is not None else len(meta["tokenizer.ggml.tokens"])
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos")):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        config[key] = int(value) if value is not None else None
    return config


@dataclass
class GGUFTensor:
    """One tensor of the file under its Hugging Face name."""

    name: str  # Hugging Face name
    gguf_name: str
    type_name: str  # "Q4_1", "F32", ...
    shape: tuple[int, ...]  # numpy order: (out, in) for a weight matrix


def _family(config: dict[str, Any]):
    return FAMILIES[config["model_type"]]


def plan_tensors(reader, source: str, family=None) -> list[tuple[GGUFTensor, Any]]:
    """``(GGUFTensor, the gguf package's tensor)`` for every tensor (named by ``family``'s table: the
    common names plus its own); ``UserError`` for an unknown name or an unsupported type."""
    out = []
    for tensor in reader.tensors:
        if tensor.name in IGNORED_TENSORS:
            continue
        name = hf_name(tensor.name, family)
        if name is None:
            raise UserError(f"{source}: tensor {tensor.name!r} has no counterpart in our decoder")
        type_name = tensor.tensor_type.name
        if type_name not in SUPPORTED_TYPES:
            raise UserError(f"{source}: tensor {tensor.name!r} has type {type_name}, which is not supported "
                            f"(supported: {', '.join(SUPPORTED_TYPES)})")
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        out.append((GGUFTensor(name, tensor.name, type_name, shape), tensor))
    return out


def dequantized(tensor, info: GGUFTensor, n_heads: int, n_kv_heads: int, family=None) -> np.ndarray:
    """The float32 values of one GGUF tensor, shaped and ordered as the Hugging Face tensor: q/k rows put
    back from llama.cpp's interleaved order when ``family.gguf_permute_qk`` (None: the ``llama``
    architecture's layout), norms shifted back by ``family.gguf_norm_shift`` (llama.cpp's Gemma stores
    ``1 + w``)."""
    gguf = _gguf()
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    values = np.asarray(values, dtype=np.float32).reshape(info.shape)
    if family is not None and family.gguf_norm_shift and info.name.endswith("norm.weight"):
        values = values - np.float32(family.gguf_norm_shift)
    if family is None or family.gguf_permute_qk:
        values = reorder_from_gguf(info.name, values, n_heads, n_kv_heads)
    return values


@dataclass
class GGUFInfo:
    """What ``gguf_to_hf`` read and wrote."""

    source: Path
    out: Path
    config: dict[str, Any]
    tensor_types: dict[str, int] = field(default_factory=dict)  # type name -> number of tensors
    tokenizer_files: list[str] = field(default_factory=list)
    name: Optional[str] = None  # general.name

    def summary(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.tensor_types.items()))
        return (f"{self.source.name}: {self.name or 'unnamed'} ({self.config['num_hidden_layers']} layers, "
                f"hidden {self.config['hidden_size']}, vocab {self.config['vocab_size']}; tensors {types}) -> "
                f"{self.out} with {', '.join(self.tokenizer_files)}")


def gguf_to_hf(path: Union[str, Path], out: Union[str, Path], dtype: str = "float32",
               shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = False) -> GGUFInfo:
    """Write the Hugging Face folder ``out`` for the GGUF file ``path`` (atomically); see the module doc.

    dtype: float32 (exact dequantized values) or float16. Shards of about ``shard_bytes``.
    """
    from safetensors.numpy import save_file
    from tqdm import tqdm

    path, out = Path(path), Path(out)
    if dtype not in NP_DTYPES:
        raise UserError(f"dtype: {dtype!r} is not one of {', '.join(NP_DTYPES)}")
    reader = open_gguf(path)
    meta = read_metadata(reader)
    source = str(path)
    by_gguf = {t.name: t for t in reader.tensors}
    freqs = by_gguf.get("rope_freqs.weight")
    config = hf_config(meta, source, set(by_gguf), None if freqs is None else np.asarray(freqs.data, np.float32))
    family = _family(config)
    plan = plan_tensors(reader, source, family)
    files = tokenizer_files(meta, source)
    names = {info.name for info, _ in plan}
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    missing = sorted(expected - names)
    if missing:
        raise UserError(f"{source}: tensor(s) missing: {', '.join(missing)}")
    config["dtype"] = dtype
    info = GGUFInfo(path, out, config, name=meta.get("general.name"), tokenizer_files=sorted(files))
    for tensor_info, _ in plan:
        info.tensor_types[tensor_info.type_name] = info.tensor_types.get(tensor_info.type_name, 0) + 1

    np_dtype = NP_DTYPES[dtype]
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    by_name = {tensor_info.name: (tensor_info, tensor) for tensor_info, tensor in plan}
    itemsize = np.dtype(np_dtype).itemsize
    sizes = {tensor_info.name: int(np.prod(tensor_info.shape)) * itemsize for tensor_info, _ in plan}
    bar = tqdm(total=len(plan), desc="dequantizing", unit="tensor", disable=not progress)

    def write_shard(file: Path, shard_names: list[str]) -> None:
        """Dequantize one shard's tensors (one shard in memory at a time) and save them."""
        shard = {}
        for name in shard_names:
            tensor_info, tensor = by_name[name]
            shard[name] = dequantized(tensor, tensor_info, n_heads, n_kv, family).astype(np_dtype)
            bar.update(1)
        save_file(shard, str(file), metadata={"format": "pt"})

    with atomic_dir(out) as tmp:
        try:
            # the file's own tensor order: the GGUF is read front to back
            write_safetensors_shards(tmp, sizes, shard_bytes, write_shard, natural_order=False)
        finally:
            bar.close()
        atomic_write_json(tmp / "config.json", config)
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        atomic_write_json(tmp / "generation_config.json",
                          {k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None})
    return info


def is_gguf(path: Union[str, Path]) -> bool:
    """Whether ``path`` names a GGUF file: ``*.gguf``, or an existing file starting with GGUF's magic bytes."""
    path = Path(path)
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        return True  # a missing one then gets open_gguf's message
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC
