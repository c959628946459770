"""Tokenizers between GGUF metadata and Hugging Face files, both ways.

A GGUF carries its tokenizer as metadata (``tokenizer.ggml.*``):

- ``model = "gpt2"``: byte-level BPE (GPT-2, SmolLM, Llama 3, ...): ``tokens`` spelled in the byte-level
  alphabet, ``merges`` (``"a b"``), ``token_type`` (1 normal, 3 control, 4 user-defined) and ``pre``, the
  name of the rule that splits text before BPE. It becomes a ``tokenizer.json`` for the ``tokenizers``
  library; ``PRE_TOKENIZERS`` lists the splitting rules we know, as ``tokenizers`` JSON.
- ``model = "llama"``: sentencepiece BPE (Llama 2, Mistral): ``tokens``, ``scores`` (the merge priority)
  and ``token_type`` (1 normal, 2 unknown, 3 control, 6 byte). It becomes a sentencepiece
  ``tokenizer.model``, which encodes exactly as llama.cpp's merge-by-score algorithm.

Special token ids, ``add_bos_token`` / ``add_eos_token`` and ``tokenizer.chat_template`` go to
``tokenizer_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from ..io import read_json

# GGUF token types (llama.cpp's numbering; sentencepiece uses the same numbers for its piece types).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_DIGITS_THEN_BYTE_LEVEL = {
    "type": "Sequence",
    "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL],
}
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3 = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {**_BYTE_LEVEL, "use_regex": False},
    ],
}
# Qwen2/2.5/3: Llama 3's rule with every digit alone (transformers' ``Qwen2Tokenizer``).
_QWEN2 = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")},
         "behavior": "Isolated", "invert": False},
        {**_BYTE_LEVEL, "use_regex": False},
    ],
}
# llama.cpp's ``tokenizer.ggml.pre`` name -> the same splitting rule as a ``tokenizers`` pre-tokenizer.
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "gpt-2": _BYTE_LEVEL,  # GPT-2's regex
    "smollm": _DIGITS_THEN_BYTE_LEVEL,  # every digit alone, then GPT-2's regex
    "starcoder": _DIGITS_THEN_BYTE_LEVEL,
    "llama-bpe": _LLAMA3,
    "qwen2": _QWEN2,
}
# Rules whose BPE looks a whole pre-token up in the vocabulary before merging (Llama 3).
IGNORE_MERGES = ("llama-bpe",)
_BYTE_LEVEL_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}


def _get(meta: dict[str, Any], key: str, source: str, required: bool = True):
    if key in meta:
        return meta[key]
    if required:
        raise UserError(f"{source}: metadata key {key!r} is missing (needed to rebuild the tokenizer)")
    return None


def _token_ids(meta: dict[str, Any], tokens: list[str]) -> dict[str, Optional[int]]:
    ids = {}
    for name in ("bos", "eos", "unknown", "padding"):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        ids[name] = int(value) if value is not None and 0 <= int(value) < len(tokens) else None
    return ids


def tokenizer_config(meta: dict[str, Any], tokens: list[str], kind: str) -> dict[str, Any]:
    """``tokenizer_config.json`` for the GGUF's tokenizer: special tokens, BOS/EOS flags, chat template."""
    ids = _token_ids(meta, tokens)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast" if kind == "json" else "LlamaTokenizer",
        # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", kind == "sentencepiece")),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    for key, name in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        if ids[name] is not None:
            config[key] = tokens[ids[name]]
    arch = meta.get("general.architecture")
    if f"{arch}.context_length" in meta:
        config["model_max_length"] = int(meta[f"{arch}.context_length"])
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        config["chat_template"] = template
    return config


def byte_level_tokenizer_json(meta: dict[str, Any], source: str) -> dict[str, Any]:
    """A ``tokenizer.json`` (as a dict) for a ``gpt2`` GGUF tokenizer."""
    tokens = list(_get(meta, "tokenizer.ggml.tokens", source))
    merges = list(_get(meta, "tokenizer.ggml.merges", source))
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise UserError(
            f"{source}: tokenizer.ggml.pre = {pre!r} is not supported (supported: {', '.join(PRE_TOKENIZERS)}); "
            "its text-splitting rule is needed to tokenize exactly as the model was trained"
        )
    added = [
        {"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": kind == CONTROL}
        for i, (token, kind) in enumerate(zip(tokens, types))
        if kind in (CONTROL, USER_DEFINED)
    ]
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": _BYTE_LEVEL_DECODER,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": pre in IGNORE_MERGES, "vocab": vocab,
            "merges": [merge.split(" ", 1) for merge in merges],
        },
    }


def sentencepiece_model(meta: dict[str, Any], source: str) -> bytes:
    """A serialized sentencepiece ``tokenizer.model`` for a ``llama`` GGUF tokenizer."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens = list(_get(meta, "tokenizer.ggml.tokens", source))
    scores = list(_get(meta, "tokenizer.ggml.scores", source))
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if not len(tokens) == len(scores) == len(types):
        raise UserError(f"{source}: tokenizer.ggml.tokens, scores and token_type have different lengths")
    proto = pb.ModelProto()
    for token, score, kind in zip(tokens, scores, types):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, float(score), int(kind)
    ids = _token_ids(meta, tokens)
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = BYTE in types
    spec.unk_id = ids["unknown"] if ids["unknown"] is not None else (types.index(UNKNOWN) if UNKNOWN in types else 0)
    spec.bos_id = ids["bos"] if ids["bos"] is not None else -1
    spec.eos_id = ids["eos"] if ids["eos"] is not None else -1
    spec.pad_id = ids["padding"] if ids["padding"] is not None and ids["padding"] not in (spec.bos_id, spec.eos_id) else -1
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()


def tokenizer_files(meta: dict[str, Any], source: str) -> dict[str, bytes]:
    """``{file name: bytes}`` of the Hugging Face tokenizer files the GGUF metadata describes."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise UserError(f"{source}: no tokenizer in the file (metadata key 'tokenizer.ggml.model' is missing)")
    tokens = list(_get(meta, "tokenizer.ggml.tokens", source))
    if kind == "gpt2":
        tokenizer = byte_level_tokenizer_json(meta, source)
        files = {"tokenizer.json": json.dumps(tokenizer, ensure_ascii=False).encode("utf-8")}
        config = tokenizer_config(meta, tokens, "json")
    elif kind == "llama":
        files = {"tokenizer.model": sentencepiece_model(meta, source)}
        config = tokenizer_config(meta, tokens, "sentencepiece")
    else:
        raise UserError(f"{source}: tokenizer.ggml.model = {kind!r} is not supported (supported: gpt2, llama)")
    files["tokenizer_config.json"] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    return files


# --- the other way: Hugging Face tokenizer files -> GGUF metadata ------------------------------------------


def _canonical_pre(pre_tokenizer: Optional[dict]) -> Optional[str]:
    """``tokenizers``' own serialization of a pre-tokenizer, for comparing two of them."""
    import tokenizers

    if pre_tokenizer is None:
        return None
    minimal = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
               "pre_tokenizer": pre_tokenizer, "post_processor": None, "decoder": None,
               "model": {"type": "BPE", "vocab": {}, "merges": []}}
    serialized = json.loads(tokenizers.Tokenizer.from_str(json.dumps(minimal)).to_str())["pre_tokenizer"]
    for step in serialized.get("pretokenizers", [serialized]):
        if step.get("type") == "ByteLevel":
            step.pop("trim_offsets", None)  # offsets only, not the split: Qwen's files set it false
    return json.dumps(serialized, sort_keys=True)


def pre_tokenizer_name(pre_tokenizer: Optional[dict]) -> Optional[str]:
    """The llama.cpp ``pre`` name of a ``tokenizer.json`` pre-tokenizer, or None when it is not in the table."""
    wanted = _canonical_pre(pre_tokenizer)
    for name, value in PRE_TOKENIZERS.items():
        if _canonical_pre(value) == wanted:
            return name
    return None


def tokenizer_metadata(folder: Path) -> dict[str, Any]:
    """GGUF ``tokenizer.*`` metadata for the tokenizer of a model folder (``tokenizer.model`` preferred,
    else a byte-level BPE ``tokenizer.json``), as ``{key: value}``."""
    folder = Path(folder)
    config = read_json(folder / "tokenizer_config.json", default={})
    if (folder / "tokenizer.model").is_file():
        meta = _sentencepiece_metadata(folder / "tokenizer.model")
    elif (folder / "tokenizer.json").is_file():
        meta = _byte_level_metadata(folder / "tokenizer.json", config)
    else:
        raise UserError(f"{folder}: no tokenizer.model or tokenizer.json to put in the GGUF")
    for key in ("add_bos_token", "add_eos_token"):
        if isinstance(config.get(key), bool):
            meta[f"tokenizer.ggml.{key}"] = config[key]
    template = config.get("chat_template")
    if not template and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str) and template:
        meta["tokenizer.chat_template"] = template
    return meta


def tokenizer_notes(folder: Path) -> list[str]:
    """What of a folder's tokenizer a GGUF cannot carry: a sentencepiece model's normalization rules."""
    path = Path(folder) / "tokenizer.model"
    if not path.is_file():
        return []
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    spec = proto.normalizer_spec
    if spec.name == "identity" and not spec.remove_extra_whitespaces:
        return []
    return [f"note: {path} normalizes text ({spec.name}, remove_extra_whitespaces={spec.remove_extra_whitespaces}); "
            "GGUF has no place for that and llama.cpp tokenizes the text as it is"]


def _sentencepiece_metadata(path: Path) -> dict[str, Any]:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise UserError(f"{path}: not a sentencepiece model ({e})") from None
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        raise UserError(f"{path}: only sentencepiece BPE models can be written to GGUF (llama.cpp's 'llama' tokenizer)")
    spec = proto.trainer_spec
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
        "tokenizer.ggml.scores": [p.score for p in proto.pieces],
        "tokenizer.ggml.token_type": [int(p.type) for p in proto.pieces],
        "tokenizer.ggml.add_space_prefix": bool(proto.normalizer_spec.add_dummy_prefix),
    }
    for key, value in (("bos", spec.bos_id), ("eos", spec.eos_id), ("unknown", spec.unk_id), ("padding", spec.pad_id)):
        if value >= 0:
            meta[f"tokenizer.ggml.{key}_token_id"] = int(value)
    return meta


def _byte_level_metadata(path: Path, config: dict) -> dict[str, Any]:
    data = read_json(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError(f"{path}: only byte-level BPE tokenizer.json files can be written to GGUF "
                        "(for a sentencepiece model keep its tokenizer.model in the folder)")
    pre = pre_tokenizer_name(data.get("pre_tokenizer"))
    if pre is None:
        raise UserError(f"{path}: its pre_tokenizer is not one llama.cpp names here "
                        f"(known: {', '.join(PRE_TOKENIZERS)}); llama.cpp would split text differently")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    special: dict[str, bool] = {}
    for token in data.get("added_tokens") or []:
        vocab.setdefault(token["content"], int(token["id"]))
        special[token["content"]] = bool(token.get("special"))
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]  # llama.cpp's name for an id the vocabulary skips
    types = [UNUSED] * n
    for token, index in vocab.items():
        tokens[index] = token
        types[index] = NORMAL if token not in special else (CONTROL if special[token] else USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value in vocab:
            meta[f"tokenizer.ggml.{key}_token_id"] = vocab[value]
    return meta
