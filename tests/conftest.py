"""Shared fixtures: tiny random-init Llama models and a character tokenizer built here (no hub)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHARS = "0123456789abcdefghijklmnopqrstuvwxyz=+-*;?# \n"
TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}{{ '\\n' }}"


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"])}
    for c in CHARS:
        vocab[c] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()  # characters join with nothing between them
    tok = PreTrainedTokenizerFast(tokenizer_object=backend,
                                  pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = TEMPLATE
    return tok


def make_model_dir(path, hidden: int, layers: int, seed: int) -> str:
    tok = make_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    # Random init spreads probability thinly; sharpen it so greedy steps hit "\n" and EOS
    # sometimes and confidences vary (what the runtime's stopping logic must handle).
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> tuple[str, str, str]:
    """Paths of three tiny random models (small, medium, large), saved with save_pretrained."""
    root = tmp_path_factory.mktemp("tiny_models")
    return (make_model_dir(root / "small", 32, 1, 1), make_model_dir(root / "medium", 32, 2, 2),
            make_model_dir(root / "large", 64, 2, 3))
