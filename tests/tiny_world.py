"""The tiny world every test builds on, built in the test itself (there is no model hub here).

One random 2-layer Llama (hidden 32), two character-level tokenizers, PEFT LoRA experts and X-LoRA
checkpoints:

    tok = make_tiny_tokenizer(folder)                 # ChatML template, no pad token (like SmolLM2's GGUF)
    save_tiny_llama(folder, vocab_size=len(tok))      # a random Llama beside it: a local transformers folder
    base, experts = build_world(root)                 # a base folder and three experts (library tests)
    save_server_base(folder)                          # the server tests' base: a tokenizer one id wider
                                                      # than the model (the genuine fault path, POISON)
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 99  # the size of make_tiny_tokenizer, so a library-test model and that tokenizer go together
LORA_GAIN = 1.0  # peft's random init is already large enough to matter; more makes float32 rounding loud

# Experts that differ in rank, alpha, rslora and target modules, as users' experts do.
EXPERT_SPECS = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=6, lora_alpha=12, target_modules=["k_proj", "o_proj", "q_proj"], use_rslora=True),
    dict(r=2, lora_alpha=2, target_modules=["gate_proj", "down_proj", "v_proj"]),
]

# -----------------------------------------------------------------------------
# tokenizers

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2
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
    vocab = {tok: i for i, tok in enumerate(CHATML_SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.add_special_tokens(CHATML_SPECIALS)  # matched whole, before the per-character split
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # "\n" falls between matches
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(path)
    return fast


SERVER_MODEL_VOCAB = 96
POISON = "~"  # a character whose token id is past the server base's embedding table
_SERVER_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
_SERVER_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>: {% endif %}"
)


def save_char_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """The server tests' tokenizer. Character-level: specials, newline, ' '..'z' (ids 0..95), then '{', '|',
    '}', '~' (96..99); <s> before every prompt."""
    chars = ["\n"] + [chr(c) for c in range(32, 123)] + ["{", "|", "}", "~"]
    vocab = {tok: i for i, tok in enumerate(_SERVER_SPECIALS + chars)}
    assert vocab["z"] == SERVER_MODEL_VOCAB - 1 and vocab[POISON] >= SERVER_MODEL_VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = _SERVER_TEMPLATE
    fast.save_pretrained(folder)
    return fast


# -----------------------------------------------------------------------------
# the model


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


def save_tiny_llama(
    folder: str | Path, vocab_size: int = VOCAB, seed: int = 0, hidden_size: int = 32, eos: bool = True
) -> LlamaForCausalLM:
    """A random 2-layer Llama saved to `folder`; about 10k parameters, instant on CPU. eos=False: its
    generation config has no eos, so generation runs its full length (random weights)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size, hidden_size))
    if not eos:
        model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    return model


def save_tiny_base(folder: Path, hidden_size: int = 32, seed: int = 0) -> Path:
    """The library tests' base (VOCAB ids, no eos)."""
    save_tiny_llama(folder, VOCAB, seed, hidden_size, eos=False)
    return folder


def save_server_base(folder: Path, seed: int = 0) -> Path:
    """The server tests' base: SERVER_MODEL_VOCAB ids and save_char_tokenizer beside it."""
    save_tiny_llama(folder, SERVER_MODEL_VOCAB, seed)
    save_char_tokenizer(folder)
    return folder


def load_base(folder: Path) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config.use_cache = False  # peft's XLoraModel refuses a base with use_cache on
    return model.eval()


# -----------------------------------------------------------------------------
# experts and checkpoints


def save_expert(base_folder: Path, folder: Path, seed: int, gain: float = LORA_GAIN, **lora_kwargs) -> Path:
    """A PEFT LoRA adapter with random (non-zero) A and B times `gain`, saved in PEFT's layout."""
    torch.manual_seed(seed)
    model = get_peft_model(load_base(base_folder), LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(gain)
    model.save_pretrained(folder)
    return folder


def build_world(root: Path, names: list[str] | None = None) -> tuple[Path, dict[str, str]]:
    """A base model folder and three experts; returns (base folder, expert name -> folder)."""
    base = save_tiny_base(root / "base")
    names = names or [str(i) for i in range(len(EXPERT_SPECS))]
    experts = {
        name: str(save_expert(base, root / f"expert-{name}", seed=10 + i, **spec))
        for i, (name, spec) in enumerate(zip(names, EXPERT_SPECS, strict=True))
    }
    return base, experts


def save_checkpoint(base_folder: Path, experts: dict[str, str], folder: Path) -> Path:
    """An X-LoRA checkpoint (random depth-2 classifier) written by xlora_core."""
    from xlora_core import XLoraConfig, XLoraModel

    torch.manual_seed(1)
    base = LlamaForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    config = XLoraConfig(hidden_size=32, adapters=experts, xlora_depth=2, xlora_size=16)
    XLoraModel(base, config).save_pretrained(folder)
    return folder
