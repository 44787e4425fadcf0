"""Fixtures: a tiny random Llama-architecture chat model built in code, so tests need no download."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from prism.config import resolve_config
from prism.models import LoadedModel, load_model

# Larger than Llama's default 0.02 so the random model's next-token distributions are peaked, like a
# trained model's, and a teacher's top-64 tokens hold most of the probability mass.
INIT_STD = 0.2
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML with a default system prompt when none is given, as SmolLM2's template does.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "You are an expert in writing, safety, math and code review. Answer the question clearly and precisely.",
    "What is the capital of France? How do I write a poem about the sea? Explain recursion in Python.",
    "Compare two answers to the user's question. Which answer is better? Reply with exactly one of: A, B, TIE.",
    "Verdict: A Verdict: B Verdict: TIE. The quick brown fox jumps over the lazy dog 0123456789.",
]


def build_tiny_model(directory: Path, layers: int = 3, seed: int = 0) -> Path:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token="<|im_start|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        initializer_range=INIT_STD, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def tiny_lm(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture()
def tiny_config(tiny_model_dir: Path):
    """A config factory for fast pipeline runs on the tiny model."""

    def make(**overrides):
        values = dict(model=str(tiny_model_dir), domains=["writing", "safety", "factual recall"], preset="tiny",
                      queries_per_persona=4, persona_max_tokens=24, query_max_tokens=16, answer_max_tokens=12,
                      batch_size=8, distill_epochs=3, distill_batch_size=2, distill_micro_batch_size=2,
                      gate_epochs=10, device="cpu", seed=0)
        values.update(overrides)
        return resolve_config(**values)

    return make
