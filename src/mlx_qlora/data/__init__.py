"""Training data: tokenizer, prompt and chat templates, sources and formats, preparation and batching."""

from .constants import CROSS_ENTROPY_IGNORE_INDEX
from .conversation import LEARN_MODES, encode_conversation
from .formats import FORMATS, Completion, Conversation, Text
from .dataset import BatchIterator, PreparedDataset, check_tokenizer, read_meta, shard_batch
from .prepare import (
    Example,
    encode_chat,
    prepare_dataset,
    split_indices,
    tokenize_example,
    tokenize_prompt_response,
    tokenize_records,
)
from .sources import ColumnMap, LoadResult, Record, load_records
from .templates import TEMPLATES, PromptTemplate, chat_turns, format_prompt, format_response, get_template
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "CROSS_ENTROPY_IGNORE_INDEX", "BatchIterator", "PreparedDataset", "check_tokenizer", "read_meta",
    "shard_batch", "Example", "encode_chat", "prepare_dataset", "split_indices", "tokenize_example",
    "tokenize_prompt_response", "tokenize_records", "ColumnMap", "LoadResult", "Record", "load_records",
    "TEMPLATES", "PromptTemplate", "chat_turns", "format_prompt", "format_response", "get_template",
    "Tokenizer", "load_tokenizer", "LEARN_MODES", "encode_conversation", "FORMATS", "Completion", "Conversation",
    "Text",
]
