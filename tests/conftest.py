"""Tiny randomly initialised models of every supported family, and a tiny tokenizer. No downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

# Training runs of tiny models stay eager: each new shape would cost a torch.compile of seconds, and
# what is tested there is the training, not the compiler. tests/test_training_speed.py tests the
# compiled path (ops and a run) with this unset.
os.environ.setdefault("T2R_NO_COMPILE", "1")

VOCAB = 320
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRAINING_TEXT = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be on "
    "his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
    "families, that he is considered the rightful property of some one or other of their daughters.",
    "The history of the world is the history of a few people who had faith in themselves.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money.",
]


def tiny_config(family: str):
    """A 2-layer config of `family`; GQA for the Llama family, partial rotary for GPT-NeoX."""
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, hidden_size=64)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
        return cls(
            **common,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=8192,
            tie_word_embeddings=family != "mistral",
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64, n_positions=8192, bos_token_id=1, eos_token_id=2
        )
    if family == "gpt_neox":
        return GPTNeoXConfig(
            **common,
            intermediate_size=128,
            max_position_embeddings=8192,
            rotary_pct=0.25,
            use_parallel_residual=True,
            bos_token_id=1,
            eos_token_id=2,
        )
    if family in MORE_FAMILIES:
        return more_family_config(family, common)
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox")
# Llama-shaped families with their own differences (tests/test_families.py): q/k norms per head
# (qwen3) or over all heads with post-norms (olmo2), NoPE layers (smollm3), multipliers (granite),
# fused q/k/v and partial rotary (phi3), scaled embeddings and (1 + w) norms (gemma), sandwich
# norms, a local layer with a window of 8 shorter than the tests' sequences and its own rotary,
# a query scalar and capped logits (gemma3_text), the same with soft-capped attention scores and no
# q/k norms (gemma2: a cap of 0.02, near the tiny model's typical score, so that it bends them).
# StableLM: per-head q/k LayerNorms, partial rotary and a parallel residual; OPT: learned positions,
# pre-scaled queries, a narrower embedding projected in and out (opt: pre-norm; opt_post_norm: 350m's).
MORE_FAMILIES = (
    "qwen3", "olmo2", "smollm3", "granite", "phi3", "gemma", "gemma2", "gemma3_text", "stablelm", "opt",
    "opt_post_norm",
)  # fmt: skip


def more_family_config(family: str, common: dict):
    import transformers

    shared = dict(
        **common, num_key_value_heads=2, intermediate_size=128, max_position_embeddings=8192,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    if family == "qwen3":
        return transformers.Qwen3Config(**shared, head_dim=16)
    if family == "olmo2":
        return transformers.Olmo2Config(**shared)
    if family == "smollm3":
        return transformers.SmolLM3Config(**shared, no_rope_layers=[1, 0])  # layer 1 has no positions
    if family == "granite":
        return transformers.GraniteConfig(
            **shared, embedding_multiplier=6.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0
        )
    if family == "phi3":
        return transformers.Phi3Config(**shared, partial_rotary_factor=0.5, original_max_position_embeddings=8192)
    if family == "gemma":
        return transformers.GemmaConfig(**shared, head_dim=16)
    if family == "stablelm":
        return transformers.StableLmConfig(
            **shared, partial_rotary_factor=0.25, qk_layernorm=True, use_parallel_residual=True
        )
    if family.startswith("opt"):
        return transformers.OPTConfig(
            vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, hidden_size=64, ffn_dim=128,
            word_embed_proj_dim=32, max_position_embeddings=64, do_layer_norm_before=family == "opt",
            bos_token_id=1, eos_token_id=2, pad_token_id=0, enable_bias=True,
        )  # fmt: skip
    if family == "gemma2":  # eager: the teacher's own soft-capping runs only in its eager attention
        return transformers.Gemma2Config(
            **shared, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=24, attn_logit_softcapping=0.02, final_logit_softcapping=30.0,
            attn_implementation="eager",
        )  # fmt: skip
    return transformers.Gemma3TextConfig(
        **shared, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=24, final_logit_softcapping=30.0,
    )  # fmt: skip


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32).eval()
    if family in MORE_FAMILIES:  # norms initialised to the identity would hide a norm left out
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "norm" in name:
                    parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here on a few sentences: encodes any text, no download."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def save_teacher(folder: Path, family: str = "llama", seed: int = 0) -> Path:
    model = tiny_model(family, seed)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def teacher_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama teacher saved as a Hugging Face folder (safetensors + tokenizer)."""
    return save_teacher(tmp_path_factory.mktemp("teacher") / "tiny-llama")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the user's cache, never reach for the network."""
    monkeypatch.setenv("T2R_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "t2r-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n".join(TRAINING_TEXT * 12))
    return path


@pytest.fixture(scope="session")
def converted_folder(teacher_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "model"
    from t2r.cli import main

    assert main(["convert", "--model", str(teacher_folder), "--feature-map", "t2r", "--out", str(out)]) == 0
    return out
