"""Tiny random Llama models and PEFT LoRA experts, built in the test itself (no model hub here)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from .helpers import tiny_llama_config

VOCAB = 99  # the size of tests.helpers.make_tiny_tokenizer, so both can be used together
LORA_GAIN = 1.0  # peft's random init is already large enough to matter; more makes float32 rounding loud

# Experts that differ in rank, alpha, rslora and target modules, as users' experts do.
EXPERT_SPECS = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=6, lora_alpha=12, target_modules=["k_proj", "o_proj", "q_proj"], use_rslora=True),
    dict(r=2, lora_alpha=2, target_modules=["gate_proj", "down_proj", "v_proj"]),
]


def save_tiny_base(folder: Path, hidden_size: int = 32, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(VOCAB, hidden_size))
    model.generation_config.eos_token_id = None  # random weights: let generation run its full length
    model.save_pretrained(folder)
    return folder


def load_base(folder: Path) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config.use_cache = False  # peft's XLoraModel refuses a base with use_cache on
    return model.eval()


def save_expert(base_folder: Path, folder: Path, seed: int, **lora_kwargs) -> Path:
    """A PEFT LoRA adapter with random (non-zero) A and B, saved in PEFT's layout."""
    torch.manual_seed(seed)
    model = get_peft_model(load_base(base_folder), LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():  # peft's random init is tiny; make the experts matter
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(LORA_GAIN)
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
