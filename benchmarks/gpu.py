"""PRISM at real model shapes on one device (a GPU, or the CPU at the tiny shape as a smoke test): models
of named shapes with random weights, built on the device, each measured side by side in one run:

1. generation tok/s at batch 1 and 32 (PrismModel, base route, greedy, fixed length);
2. distillation at micro-batch 4 x 1024 tokens: the teacher's top-k pass against its bare forward, and one
   student step (forward + backward), each with its time and peak device memory, with and without
   gradient checkpointing;
3. routing: auto against the route forced to the gate's own choice at batch 1, and at batch 32 a mixed
   batch, base-only and persona-only.
Every system is warmed up on the same shapes first, and rounds are interleaved; the best round is kept.

    python benchmarks/gpu.py [--shapes smollm2-135m,llama-3.2-1b,qwen2.5-1.5b,llama-3.1-8b] [--device cuda]

Random weights of the real shapes measure speed and memory, not quality. The embedded tokenizer renders
the prompts (its ids fit every shape's vocabulary); `--tokenizer DIR` takes another.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"arch": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152},
    "smollm2-135m": {"arch": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152},
    "llama-3.2-1b": {"arch": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
    "qwen2.5-1.5b": {"arch": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936},
    "llama-3.1-8b": {"arch": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
}
QUERIES = ["Write a haiku about the sea.", "What is the capital of France?", "Explain recursion in Python.",
           "How do I store cleaning chemicals safely?", "Compare two answers to a question.",
           "Give me three tips for a job interview.", "What is 17 times 23?", "Summarize the plot of Hamlet."]


def build(shape: str, device: torch.device, dtype: torch.dtype, tokenizer: Any) -> Any:
    """A LoadedModel of the shape with random weights, built directly on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from prism.lm.models import LoadedModel

    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    config_class, model_class = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config,
                                                                                         Qwen2ForCausalLM)
    config = config_class(**spec, max_position_embeddings=4096, tie_word_embeddings=shape != "llama-3.1-8b",
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.device(device):
        model = model_class(config).to(dtype).eval()
    parameters = sum(p.numel() for p in model.parameters())
    return LoadedModel(model, tokenizer, {"name": shape, "parameters": parameters,
                                          "num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size})


def prism_model(lm: Any) -> Any:
    """The shape as a routed model: a LoRA adapter with non-zero weights on layers 1..N-1, and a gate whose
    threshold sends about half of QUERIES to it."""
    from peft import get_peft_model

    from prism.config import resolve_config
    from prism.inference.transformers import ADAPTER, PrismModel
    from prism.lm.batching import block0_features
    from prism.lm.gate import Gate, GateConfig
    from prism.lm.models import chat_prompt, decoder_layers, layers_pattern
    from prism.stages.distill import lora_config

    cfg = resolve_config(model="x")
    features = block0_features(lm, [chat_prompt(lm.tokenizer, q) for q in QUERIES])
    gate = Gate(GateConfig(input_dim=lm.model.config.hidden_size))
    gate.mean.copy_(features.mean(0))
    gate.std.copy_(features.std(0).clamp(min=1e-4))
    probabilities = gate.persona_probability(features)
    gate.config.threshold = float(probabilities.median())
    adapter = get_peft_model(lm.model, lora_config(cfg, len(decoder_layers(lm.model)), layers_pattern(lm.model)),
                             adapter_name=ADAPTER)
    for name, p in adapter.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    adapter.to(lm.model.dtype).eval()
    return PrismModel(lm, gate, adapter)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work: Callable[[], Any]) -> tuple[float, float | None]:
    """(seconds, peak device memory in GiB, None on the CPU) of one call."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    started = time.perf_counter()
    work()
    synchronize(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak


def best_of(device: torch.device, systems: dict[str, Callable[[], Any]], rounds: int
            ) -> dict[str, tuple[float, float | None]]:
    """Each system warmed up once, then `rounds` interleaved rounds (order rotated); the fastest round."""
    for work in systems.values():
        work()
    found: dict[str, list[tuple[float, float | None]]] = {name: [] for name in systems}
    names = list(systems)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            found[name].append(timed(device, systems[name]))
    return {name: min(values, key=lambda v: v[0]) for name, values in found.items()}


def requests(model: Any, routes: list[str], tokens: int) -> list[Any]:
    from prism.inference.base import GenerationRequest
    from prism.lm.decoding import SamplingParams

    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    return [GenerationRequest([{"role": "user", "content": QUERIES[i % len(QUERIES)]}], route, params)
            for i, route in enumerate(routes)]


def generation(model: Any, device: torch.device, tokens: int, rounds: int) -> str:
    systems = {f"batch {n}": (lambda n=n: model.generate_batch(requests(model, ["base"] * n, tokens)))
               for n in (1, 32)}
    best = best_of(device, systems, rounds)
    return "; ".join(f"{name} {n * tokens / best[name][0]:.1f} tok/s" for name, n in (("batch 1", 1),
                                                                                       ("batch 32", 32)))


def routing(model: Any, device: torch.device, tokens: int, rounds: int) -> str:
    decided = [d.route for d in model.decide([[{"role": "user", "content": q}] for q in QUERIES])]
    one = {"auto": lambda: model.generate_batch(requests(model, ["auto"], tokens)),
           "same route": lambda: model.generate_batch(requests(model, decided[:1], tokens))}
    best_one = best_of(device, one, rounds)
    mixed = [decided[i % len(decided)] for i in range(32)]
    if len(set(mixed)) == 1:
        mixed = ["base", "persona"] * 16
    batch = {"base-only": lambda: model.generate_batch(requests(model, ["base"] * 32, tokens)),
             "mixed": lambda: model.generate_batch(requests(model, mixed, tokens)),
             "persona-only": lambda: model.generate_batch(requests(model, ["persona"] * 32, tokens))}
    best = best_of(device, batch, rounds)
    return (f"batch 1 auto / same route {best_one['auto'][0] / best_one['same route'][0]:.3f}; batch 32 "
            f"mixed / base-only {best['base-only'][0] / best['mixed'][0]:.3f}, persona-only / base-only "
            f"{best['base-only'][0] / best['persona-only'][0]:.3f} ({mixed.count('persona')} of 32 rows persona)")


def distillation(lm: Any, device: torch.device, micro_batch: int, length: int, rounds: int) -> str:
    from peft import get_peft_model

    from prism.config import resolve_config
    from prism.lm.models import decoder_layers, layers_pattern
    from prism.stages.distill import (
        Example,
        answer_span_logits,
        distill_loss,
        lora_config,
        set_checkpointing,
        teacher_targets,
    )

    generator = torch.Generator().manual_seed(0)
    vocab = min(lm.model.config.vocab_size, len(lm.tokenizer))
    examples = [Example(ids, ids, length - 64) for ids in
                (torch.randint(0, vocab, (length,), generator=generator).tolist() for _ in range(micro_batch))]

    def bare_forward() -> None:  # the teacher's own forward (answer-span logits), without top-k or copies
        with torch.no_grad():
            answer_span_logits(lm.model, [e.teacher_ids for e in examples], [e.answer_len for e in examples],
                               lm.tokenizer.pad_token_id)

    teacher = best_of(device, {"bare forward": bare_forward,
                               "teacher top-64": lambda: teacher_targets(lm, examples, 64, micro_batch)}, rounds)
    targets = teacher_targets(lm, examples, 64, micro_batch)
    cfg = resolve_config(model="x")
    student = get_peft_model(lm.model, lora_config(cfg, len(decoder_layers(lm.model)), layers_pattern(lm.model)))
    student.train()

    def step() -> None:
        loss, count = distill_loss(student, examples, targets, lm.tokenizer.pad_token_id, 2.0)
        (loss / count).backward()
        student.zero_grad(set_to_none=True)

    plain = best_of(device, {"step": step}, rounds)["step"]
    set_checkpointing(student, True)
    checkpointed = best_of(device, {"step": step}, rounds)["step"]
    set_checkpointing(student, False)
    student.unload()

    def text(value: tuple[float, float | None]) -> str:
        return f"{value[0]:.3f} s" + (f", peak {value[1]:.1f} GiB" if value[1] is not None else "")

    return (f"teacher top-64 {text(teacher['teacher top-64'])} vs bare forward {text(teacher['bare forward'])} "
            f"(ratio {teacher['teacher top-64'][0] / teacher['bare forward'][0]:.2f}); student step "
            f"{text(plain)}; with gradient checkpointing {text(checkpointed)}")


def main() -> None:
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")  # the stages' progress bars would interleave with the figures
    from transformers import AutoTokenizer

    from prism.library_warnings import silence_library_warnings
    from prism.lm.models import embedded_checkpoint

    silence_library_warnings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="smollm2-135m,llama-3.2-1b,qwen2.5-1.5b,llama-3.1-8b",
                        help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per generated request")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024, help="tokens per distillation sequence")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokenizer", help="a tokenizer folder (default: the embedded model's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or str(embedded_checkpoint()))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, {dtype}; torch {torch.__version__}")
    for shape in args.shapes.split(","):
        lm = build(shape, device, dtype, tokenizer)
        print(f"{shape}: {lm.identity['parameters'] / 1e6:.0f}M parameters")
        print(f"  1. generation: {generation(prism_model_base(lm), device, args.tokens, args.rounds)}")
        print(f"  2. distillation, micro-batch {args.micro_batch} x {args.length}: "
              f"{distillation(lm, device, args.micro_batch, args.length, args.rounds)}")
        print(f"  3. routing: {routing(prism_model(lm), device, args.tokens, args.rounds)}", flush=True)
        del lm
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def prism_model_base(lm: Any) -> Any:
    """The shape with no adapter, for plain generation speed."""
    from prism.inference.transformers import PrismModel
    from prism.lm.gate import Gate, GateConfig

    return PrismModel(lm, Gate(GateConfig(input_dim=lm.model.config.hidden_size, constant_route=0)))


if __name__ == "__main__":
    main()
