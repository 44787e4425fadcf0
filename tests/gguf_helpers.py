"""llama.cpp test helpers: the tiny random Llama of helpers.py written as an F32 GGUF (laid out as llama.cpp's
convert_hf_to_gguf.py lays out a Llama: q/k rows permuted per head), and the teacher-forced parity measure."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.numpy import load_file

from prism.inference.base import GenerationRequest
from prism.lm.decoding import SamplingParams
from prism.lm.models import encode

PROJECTIONS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_tiny_gguf(model_dir: Path, path: Path, quantized: bool = False) -> Path:
    """The tiny model as a GGUF: F32, or (quantized) its matrices in Q4_1 as the embedded model's are, whose
    llama.cpp kernels give a row the same result whatever the batch (F32 matrices round differently by batch
    size, in the 6th digit)."""
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    weights = load_file(str(model_dir / "model.safetensors"))
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(config.get("rope_theta") or config["rope_parameters"]["rope_theta"]))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["hidden_size"] // n_head)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1 if quantized else gguf.LlamaFileType.ALL_F32)

    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda item: item[1])
    added = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    tokens = [token for token, _ in vocab]
    for content, index in added.items():
        while len(tokens) <= index:
            tokens.append(f"[PAD{len(tokens)}]")
        tokens[index] = content
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in added else gguf.TokenType.NORMAL for t in tokens])
    merges = tokenizer["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(added[tokenizer_config["bos_token"]])
    writer.add_eos_token_id(added[tokenizer_config["eos_token"]])
    writer.add_pad_token_id(added[tokenizer_config["pad_token"]])
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer_config.get("chat_template") or
                             (model_dir / "chat_template.jinja").read_text())

    def add_matrix(name: str, weight: np.ndarray) -> None:
        weight = np.ascontiguousarray(weight, dtype=np.float32)
        if quantized:
            q4 = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q4_1)
            writer.add_tensor(name, q4, raw_shape=q4.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        else:
            writer.add_tensor(name, weight)

    add_matrix("token_embd.weight", weights["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    for layer in range(config["num_hidden_layers"]):
        for hf, name in PROJECTIONS.items():
            weight = weights[f"model.layers.{layer}.{hf}.weight"]
            if name == "attn_q":
                weight = _permute(weight, n_head)
            elif name == "attn_k":
                weight = _permute(weight, n_kv)
            if weight.ndim == 2:
                add_matrix(f"blk.{layer}.{name}.weight", weight)
            else:
                writer.add_tensor(f"blk.{layer}.{name}.weight", np.ascontiguousarray(weight, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def torch_reference(torch_model: Any, route: str, queries: list[str], positions: int) -> list[tuple]:
    """PyTorch's side of a teacher-forced comparison, per query: the prompt's ids, PyTorch's own greedy reply (up to
    `positions` tokens) and its logits at each position. It depends on the route alone, so one reference serves
    every llama.cpp model compared against it."""
    conversations = [[{"role": "user", "content": query}] for query in queries]
    params = SamplingParams(max_tokens=positions, ignore_eos=True)
    replies = torch_model.generate_batch([GenerationRequest(m, route, params) for m in conversations])
    reference = []
    for messages, reply in zip(conversations, replies):
        continuation = encode(torch_model.tokenizer, reply.text)[:positions]
        prompt = encode(torch_model.tokenizer, torch_model.prompt(messages))
        ids = torch.tensor([prompt + continuation])
        with torch.no_grad(), (torch_model.adapter.disable_adapter() if route == "base" else nullcontext()):
            logits = torch_model.lm.model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        reference.append((prompt, continuation, logits))
    return reference


def agreement_with(reference: list[tuple], cpp_model: Any, cpp_route: str) -> tuple[float, float]:
    """(share of positions with the same greedy token, largest |logit difference| / logit range) of a llama.cpp
    route against a `torch_reference`."""
    same = total = 0
    worst = scale = 0.0
    for prompt, continuation, logits in reference:
        # llama.cpp's logits after the prompt and after each continuation token but the last
        ours = cpp_model.llama.logits(cpp_route, prompt + continuation[:-1], len(prompt) - 1)
        ours = ours[:, : logits.shape[1]]
        same += int((logits.argmax(-1) == ours.argmax(-1)).sum())
        total += len(continuation)
        worst = max(worst, float((logits - ours).abs().max()))
        scale = max(scale, float(logits.max() - logits.min()))
    return same / total, worst / scale


def teacher_forced_agreement(torch_model: Any, cpp_model: Any, route: str, queries: list[str], positions: int,
                             cpp_route: str | None = None) -> tuple[float, float]:
    """(share of positions with the same greedy token, largest |logit difference| / logit range) over the
    queries, teacher-forced: both models read PyTorch's own greedy reply token by token. `cpp_route`: the
    llama.cpp route to compare (default `route`)."""
    return agreement_with(torch_reference(torch_model, route, queries, positions), cpp_model, cpp_route or route)
