"""Tiny models and tokenizers built inside the tests (there is no model hub here).

    tok = make_tiny_tokenizer(folder)              # character-level, ChatML chat template, no pad token
    make_tiny_llama(folder, vocab_size=len(tok))   # random 2-layer Llama, saved beside it

Together they make `folder` a local transformers folder that `load_base_model(str(folder))` accepts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII and newline (99 ids), saved to `path`.

    eos is <|im_end|> and there is deliberately no pad token, like SmolLM2 without its GGUF metadata,
    so tests see load_base_model fill one in.
    """
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.add_special_tokens(SPECIALS)  # matched whole, before the per-character split
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # "\n" falls between matches
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(path)
    return fast


def tiny_llama_config(vocab_size: int, hidden_size: int = 32) -> LlamaConfig:
    """The random 2-layer Llama every test builds on (ids 0, 1, 2 = pad, bos, eos)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def make_tiny_llama(path: str | Path, vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A random 2-layer Llama (hidden 32) saved to `path`; about 10k parameters, instant on CPU."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size))
    model.save_pretrained(path)
    return model
