"""One small tokenizer interface over sentencepiece (``tokenizer.model``) and Hugging Face ``tokenizer.json``.

``load_tokenizer(path)`` accepts a model directory (``tokenizer.model`` is preferred, else ``tokenizer.json``)
or one of those files. Every id list it returns is plain text tokens: BOS and EOS are added only when asked.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Sequence, Union

from ..errors import UserError
from ..io import read_json

PathLike = Union[str, os.PathLike]

# Special-token strings tried, in order, when a tokenizer.json comes without a tokenizer_config.json.
_BOS_GUESSES = ("<s>", "<|begin_of_text|>", "<|startoftext|>")
_EOS_GUESSES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>")
_PAD_GUESSES = ("<pad>", "<|pad|>", "[PAD]")


def file_checksum(path: PathLike) -> str:
    """sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Tokenizer:
    """Text <-> token ids.

    Attributes: ``bos_id``, ``eos_id`` and ``pad_id`` (``None`` when the model has none; ``bos_id`` is also
    None when ``tokenizer_config.json`` says ``add_bos_token: false``), ``vocab_size``, ``checksum`` (sha256
    of the tokenizer file), ``path``, ``kind`` (``"sentencepiece"`` or ``"json"``) and ``chat_template`` (the
    jinja2 ``chat_template`` of ``tokenizer_config.json``, or None). Build one with ``load_tokenizer``.
    """

    def __init__(
        self,
        backend,
        kind: str,
        path: Path,
        bos_id: Optional[int],
        eos_id: Optional[int],
        pad_id: Optional[int],
        vocab_size: int,
        chat_template: Optional[str] = None,
    ):
        self._backend = backend
        self.kind = kind
        self.path = Path(path)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.chat_template = chat_template
        self.checksum = file_checksum(path)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind}, file={self.path.name}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})"
        )

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_eos:
            if self.eos_id is None:
                raise UserError(f"tokenizer {self.path} has no EOS token")
            ids = ids + [self.eos_id]
        return ids

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``; BOS first / EOS last only when asked (BOS is skipped if the model has none)."""
        if self.kind == "sentencepiece":
            ids = self._backend.encode(text)
        else:
            ids = self._backend.encode(text, add_special_tokens=False).ids
        return self._wrap(list(ids), add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]`` in one call into the native library (no BOS/EOS)."""
        if not texts:
            return []
        if self.kind == "sentencepiece":
            return self._backend.encode(list(texts))
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def token_ends(self, text: str) -> tuple[list[int], list[int]]:
        """``(ids, ends)``: the ids of ``text`` and, per token, the character offset where its text ends.

        Cutting ``text[:ends[k - 1]]`` keeps the text of the first ``k`` tokens. A token that covers no
        complete character (the leading bytes of a byte-fallback character) ends where the previous one did.
        """
        if self.kind == "sentencepiece":
            proto = self._backend.encode(text, out_type="proto")
            # sentencepiece reports byte offsets; map each byte offset that ends a character to it.
            char_at_byte = {0: 0}
            position = 0
            for index, char in enumerate(text):
                position += len(char.encode("utf-8"))
                char_at_byte[position] = index + 1
            ids, ends, last = [], [], 0
            for piece in proto.pieces:
                ids.append(piece.id)
                last = max(last, char_at_byte.get(piece.end, last))
                ends.append(last)
            return ids, ends
        encoding = self._backend.encode(text, add_special_tokens=False)
        ends, last = [], 0
        for _, end in encoding.offsets:
            last = max(last, end)
            ends.append(last)
        return list(encoding.ids), ends

    def encode_spans(self, text: str) -> tuple[list[int], list[int], list[int]]:
        """``(ids, starts, ends)``: the ids of a rendered chat ``text`` and each token's character span.

        Special-token strings are ids, as the chat template means them: a ``tokenizer.json`` finds its added
        tokens in the text itself; for sentencepiece, which reads ``</s>`` as plain characters, the text is cut
        at the BOS/EOS strings, they become their ids and each piece between is tokenized on its own (as
        Mistral's reference tokenizer does turn by turn). No BOS is added.
        """
        if self.kind != "sentencepiece":
            encoding = self._backend.encode(text, add_special_tokens=False)
            return list(encoding.ids), [a for a, _ in encoding.offsets], [b for _, b in encoding.offsets]
        specials = {self.id_to_piece(i): i for i in (self.bos_id, self.eos_id) if i is not None}
        ids, starts, ends = [], [], []
        position = 0
        while position < len(text):
            hits = [(text.find(piece, position), piece) for piece in specials]
            hits = [(at, piece) for at, piece in hits if at >= 0]
            at, piece = min(hits) if hits else (len(text), None)
            if at > position:
                segment_ids, segment_ends = self.token_ends(text[position:at])
                previous = position
                for token, end in zip(segment_ids, segment_ends):
                    ids.append(token)
                    starts.append(previous)
                    ends.append(position + end)
                    previous = position + end
            if piece is None:
                break
            ids.append(specials[piece])
            starts.append(at)
            ends.append(at + len(piece))
            position = at + len(piece)
        return ids, starts, ends

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens (BOS, EOS, pad) are left out."""
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._backend.decode(ids)
        return self._backend.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary string of one id (for messages and tests)."""
        if self.kind == "sentencepiece":
            return self._backend.id_to_piece(int(token_id))
        return self._backend.id_to_token(int(token_id))


def _load_sentencepiece(path: Path) -> Tokenizer:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor()
    try:
        processor.load(str(path))
    except (OSError, RuntimeError) as e:
        raise UserError(f"{path}: not a sentencepiece model ({e})") from None

    def optional(i: int) -> Optional[int]:
        return None if i < 0 else i

    return Tokenizer(
        processor,
        "sentencepiece",
        path,
        bos_id=optional(processor.bos_id()),
        eos_id=optional(processor.eos_id()),
        pad_id=optional(processor.pad_id()),
        vocab_size=processor.get_piece_size(),
        chat_template=_chat_template(path.parent, read_json(path.parent / "tokenizer_config.json", default={})),
    )


def _special_token_string(value) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path, tokenizer_config: dict) -> Optional[str]:
    """The jinja2 chat template of a tokenizer folder: ``tokenizer_config.json``'s ``chat_template`` (a string,
    or the entry named "default" of a list), else a ``chat_template.jinja`` file, else None."""
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if isinstance(template, str) and template:
        return template
    file = folder / "chat_template.jinja"
    return file.read_text(encoding="utf-8") if file.is_file() else None


def _load_json(path: Path) -> Tokenizer:
    import tokenizers

    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type on bad files
        raise UserError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
    tokenizer_config = read_json(path.parent / "tokenizer_config.json", default={})
    model_config = read_json(path.parent / "config.json", default={})

    def resolve(key: str, guesses: tuple[str, ...]) -> Optional[int]:
        name = _special_token_string(tokenizer_config.get(f"{key}_token"))
        if name is not None and backend.token_to_id(name) is not None:
            return backend.token_to_id(name)
        value = model_config.get(f"{key}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
        for guess in guesses:
            if backend.token_to_id(guess) is not None:
                return backend.token_to_id(guess)
        return None

    # A tokenizer that puts no BOS before a text (SmolLM2, Qwen) says so with add_bos_token: false.
    no_bos = tokenizer_config.get("add_bos_token") is False
    return Tokenizer(
        backend,
        "json",
        path,
        bos_id=None if no_bos else resolve("bos", _BOS_GUESSES),
        eos_id=resolve("eos", _EOS_GUESSES),
        pad_id=resolve("pad", _PAD_GUESSES),
        vocab_size=backend.get_vocab_size(with_added_tokens=True),
        chat_template=_chat_template(path.parent, tokenizer_config),
    )


def find_tokenizer_file(path: PathLike) -> Path:
    """The tokenizer file for ``path``: the file itself, or a directory's ``tokenizer.model`` (preferred)
    or ``tokenizer.json``. Raises ``UserError`` when there is none."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (path / name).is_file():
                return path / name
        raise UserError(f"{path}: no tokenizer.model or tokenizer.json in this directory")
    if path.is_file():
        return path
    raise UserError(f"{path}: no such tokenizer file or model directory")


def load_tokenizer(path: PathLike) -> Tokenizer:
    """Load a tokenizer from a model directory or a ``tokenizer.model`` / ``tokenizer.json`` file.

    A ``.json`` file is read with the ``tokenizers`` library (BOS/EOS/pad from a ``tokenizer_config.json``
    or ``config.json`` beside it, else the usual special-token names); any other file as sentencepiece.
    """
    file = find_tokenizer_file(path)
    if file.suffix == ".json":
        return _load_json(file)
    return _load_sentencepiece(file)
