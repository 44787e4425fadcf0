"""`prism export gguf`: a run's PEFT adapter as a llama.cpp LoRA GGUF, and optionally a merged persona model.

llama.cpp reads a LoRA as pairs `<base tensor>.lora_a` (numpy shape (r, in), PEFT's lora_A) and
`.lora_b` ((out, r), PEFT's lora_B) with `adapter.lora.alpha`, and scales by alpha / r like PEFT.
llama.cpp's converter stores Llama's q/k projections with the rows of each head permuted (rotary
halves interleaved), so lora_B of q_proj/k_proj gets the same row permutation.

Everything lands in RUN/gguf/: adapter.gguf, persona.gguf (merged, optional), for a k-way run one
adapter-<persona>.gguf per persona adapter, and export.json, which names the base GGUF and each adapter's
hash, so an engine can tell whether the export is current.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prism.errors import PrismError
from prism.inference.artifacts import FinishedRun
from prism.inference.config import LoadConfig
from prism.lm.llama import base_gguf_for
from prism.lm.models import cache_dir, file_sha256
from prism.routes import PERSONA, adapter_key, served_name
from prism.runs import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPORT_DIR, adapter_dir, write_json_atomic

log = logging.getLogger("prism")
ADAPTER_FILE = "adapter.gguf"
MERGED_FILE = "persona.gguf"
INFO_FILE = "export.json"


# HF model_type -> llama.cpp architecture. Only what the parity test covers: other architectures need
# their own tensor layout checks (e.g. which projections llama.cpp's converter permutes).
ARCHITECTURES = {"llama": "llama"}
MERGED_TYPES = ("q8_0", "f16", "f32")
DEFAULT_MERGED_TYPE = MERGED_TYPES[0]  # the base's 4-bit type would round a small LoRA delta away


@dataclass
class GGUFExport:
    adapter: Path
    merged: Path | None
    base_gguf: Path
    info: dict[str, Any]
    kway: dict[str, Path] = field(default_factory=dict)  # k-way persona -> its LoRA GGUF


def kway_adapter_file(persona: str) -> str:
    return f"adapter-{persona}.gguf"


def read_export_info(directory: Path) -> dict[str, Any] | None:
    """What the export in `directory` (RUN/gguf, or one outside the run) was made from."""
    path = directory / INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def recorded_base_gguf(run_path: Path) -> str | None:
    """The base GGUF the run's last export named, if that file is still there."""
    recorded = (read_export_info(run_path / EXPORT_DIR) or {}).get("base_gguf")
    return recorded if recorded and Path(recorded).is_file() else None


def export_is_current(run_path: Path, base_gguf: Path, persona: str | None = None,
                      directory: Path | None = None) -> bool:
    """Whether the export in `directory` (default RUN/gguf) holds adapter.gguf (or a k-way persona's
    adapter-<persona>.gguf) made from the run's present adapter for this base GGUF."""
    directory = directory or run_path / EXPORT_DIR
    info = read_export_info(directory)
    if info is None or Path(info.get("base_gguf", "")) != base_gguf:
        return False
    if persona is None:
        exported, recorded = ADAPTER_FILE, info.get("adapter_sha256")
    else:
        exported, recorded = kway_adapter_file(persona), (info.get("kway_adapters") or {}).get(persona)
    weights = adapter_dir(run_path, persona) / ADAPTER_WEIGHTS
    return (directory / exported).is_file() and weights.is_file() and recorded == file_sha256(weights)


def export_outside(run: FinishedRun, base_gguf: Path) -> Path:
    """Where a run's adapters are exported when its own RUN/gguf is missing or stale: a folder of PRISM's cache
    named by what the export is made from (the adapters' weights and the base GGUF), so loading never writes into
    the run directory (it may be read-only, or shared) and the same adapters are exported once."""
    digests = [file_sha256(directory / ADAPTER_WEIGHTS) for _, directory in sorted(run.adapters.items())]
    key = hashlib.sha256("\n".join([str(base_gguf.resolve()), *digests]).encode()).hexdigest()[:16]
    return cache_dir() / "exports" / key


def _permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k layout: within each head, the two rotary halves interleaved row by row."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def lora_tensors(directory: Path, model: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float, int, str]:
    """({gguf base tensor name: (lora_a, lora_b)}, alpha for llama.cpp, rank, architecture) of a PEFT adapter
    (a run's `adapter/`, or a k-way persona's) on `model`, the run's base model."""
    import gguf
    from safetensors.numpy import load_file

    try:
        adapter_config = json.loads((directory / ADAPTER_CONFIG).read_text())
        weights = load_file(str(directory / ADAPTER_WEIGHTS))
    except FileNotFoundError:
        raise PrismError(f"{directory} holds no adapter (adapter_config.json and adapter_model.safetensors): "
                         "finish the distill stage first") from None
    model_config = _model_config(model)
    model_type = model_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise PrismError(f"GGUF export supports {', '.join(ARCHITECTURES)} models; this run's model is "
                         f"{model_type!r}")
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise PrismError("the adapter has per-module ranks or alphas (rank_pattern/alpha_pattern), which a llama.cpp "
                         "LoRA GGUF cannot record: retrain it with one rank and alpha")
    rank, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
    # llama.cpp scales by alpha / r; rsLoRA's alpha / sqrt(r) is the same scale with alpha * sqrt(r)
    gguf_alpha = alpha * math.sqrt(rank) if adapter_config.get("use_rslora") else alpha
    n_head, n_kv_head = model_config["num_attention_heads"], model_config["num_key_value_heads"]
    layers = model_config["num_hidden_layers"]
    arch = ARCHITECTURES[model_type]
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), layers)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in weights.items():
        module, _, part = key.rpartition(".lora_")  # ...layers.3.self_attn.q_proj .lora_A.weight
        hf_name = module.removeprefix("base_model.model.") + ".weight"
        target = names.get_name(hf_name, try_suffixes=(".weight",))
        if target is None or part not in ("A.weight", "B.weight"):
            raise PrismError(f"the adapter tensor {key} has no llama.cpp counterpart")
        pairs.setdefault(target, {})[part[0]] = value.astype(np.float32)
    tensors = {}
    for name, pair in sorted(pairs.items()):
        lora_a, lora_b = pair["A"], pair["B"]
        if ".attn_q." in name:
            lora_b = _permute_rows(lora_b, n_head)
        elif ".attn_k." in name:
            lora_b = _permute_rows(lora_b, n_kv_head)
        tensors[name] = (lora_a, np.ascontiguousarray(lora_b))
    return tensors, gguf_alpha, rank, arch


def _model_config(model: str) -> dict[str, Any]:
    from transformers import AutoConfig

    from prism.lm.models import resolve_model

    path, _ = resolve_model(model)
    try:
        return AutoConfig.from_pretrained(path).to_dict()
    except OSError as exc:
        raise PrismError(f"cannot read the config of the run's model {model!r}: {exc}") from None


def _check_against_base(reader: Any, tensors: dict[str, tuple[np.ndarray, np.ndarray]], arch: str,
                        base: Path) -> None:
    base_arch = reader.fields["general.architecture"].contents()
    if base_arch != arch:
        raise PrismError(f"{base} is a {base_arch!r} model but the adapter is for {arch!r}: wrong base GGUF")
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # ggml order: (in, out)
    for name, (lora_a, lora_b) in tensors.items():
        if name not in shapes:
            raise PrismError(f"{base} has no tensor {name}: it is not the run's base model")
        if shapes[name] != (lora_a.shape[1], lora_b.shape[0]):
            raise PrismError(f"{base}: {name} is {shapes[name]} but the adapter expects "
                             f"({lora_a.shape[1]}, {lora_b.shape[0]}): it is not the run's base model")


def write_lora_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, np.ndarray]], alpha: float, arch: str,
                    name: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    for tensor_name, (lora_a, lora_b) in tensors.items():
        writer.add_tensor(tensor_name + ".lora_a", lora_a)
        writer.add_tensor(tensor_name + ".lora_b", lora_b)
    _finish(writer)


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_merged_gguf(path: Path, reader: Any, tensors: dict[str, tuple[np.ndarray, np.ndarray]], scale: float,
                      merged_type: str) -> None:
    """The base GGUF with W + scale * B @ A in every adapted tensor, stored as `merged_type` (the base's
    own 4-bit type would round most of a small LoRA delta away); the other tensors keep their bytes."""
    import gguf

    qtype = gguf.GGMLQuantizationType[merged_type.upper()]
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(path), arch)
    for key in reader.fields.values():
        if key.name.startswith("GGUF.") or key.name in ("general.architecture", "general.file_type"):
            continue
        value_type = key.types[0]
        sub_type = key.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key.name, key.contents(), value_type, sub_type=sub_type)
    writer.add_string("general.finetune", served_name(PERSONA))
    for tensor in reader.tensors:
        if tensor.name not in tensors:
            writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
            continue
        lora_a, lora_b = tensors[tensor.name]
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(lora_b.shape[0], lora_a.shape[1])
        merged = weight + scale * (lora_b @ lora_a)
        data = gguf.quants.quantize(merged.astype(np.float32), qtype)
        writer.add_tensor(tensor.name, data, raw_shape=data.shape, raw_dtype=qtype)
    _finish(writer)


def export_gguf(run: str | Path, *, base_gguf: str | Path | None = None, merged: bool = False,
                merged_type: str = DEFAULT_MERGED_TYPE) -> GGUFExport:
    """Write RUN/gguf/adapter.gguf (and with `merged`, RUN/gguf/persona.gguf; for a k-way run each persona's
    adapter-<persona>.gguf) for llama.cpp."""
    if merged_type not in MERGED_TYPES:
        raise PrismError(f"--merged-type must be one of {', '.join(MERGED_TYPES)}, got {merged_type!r}")
    # the export reads the adapters only: no model code runs, whatever the run's trust_remote_code
    return export_run(FinishedRun.open(run, LoadConfig(trust_remote_code=True)), base_gguf=base_gguf, merged=merged,
                      merged_type=merged_type)


def export_run(run: FinishedRun, *, base_gguf: str | Path | None = None, merged: bool = False,
               merged_type: str = DEFAULT_MERGED_TYPE, out: Path | None = None) -> GGUFExport:
    """`export_gguf` of an opened run, into `out` (default RUN/gguf)."""
    import gguf

    base = base_gguf_for(run.config, base_gguf)
    tensors, alpha, rank, arch = lora_tensors(adapter_dir(run.path), run.model)
    reader = gguf.GGUFReader(str(base))
    _check_against_base(reader, tensors, arch, base)
    out = out or run.path / EXPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    adapter_path = out / ADAPTER_FILE
    write_lora_gguf(adapter_path.with_suffix(".tmp"), tensors, alpha, arch, f"PRISM persona adapter of {run.path.name}")
    adapter_path.with_suffix(".tmp").replace(adapter_path)
    kway: dict[str, Path] = {}
    kway_hashes: dict[str, str] = {}
    for persona in run.personas:
        directory = run.adapters[adapter_key(persona)]
        persona_tensors, persona_alpha, _rank, _arch = lora_tensors(directory, run.model)
        _check_against_base(reader, persona_tensors, arch, base)
        kway[persona] = out / kway_adapter_file(persona)
        write_lora_gguf(kway[persona].with_suffix(".tmp"), persona_tensors, persona_alpha, arch,
                        f"PRISM {persona} adapter of {run.path.name}")
        kway[persona].with_suffix(".tmp").replace(kway[persona])
        kway_hashes[persona] = file_sha256(directory / ADAPTER_WEIGHTS)
    adapter_sha256 = file_sha256(adapter_dir(run.path) / ADAPTER_WEIGHTS)
    previous = read_export_info(out) or {}
    merged_path = None
    if merged:
        merged_path = out / MERGED_FILE
        write_merged_gguf(merged_path.with_suffix(".tmp"), reader, tensors, alpha / rank, merged_type)
        merged_path.with_suffix(".tmp").replace(merged_path)
    elif (out / MERGED_FILE).exists():
        if (previous.get("merged") and previous.get("adapter_sha256") == adapter_sha256
                and previous.get("base_gguf") == str(base)):
            merged_path, merged_type = out / MERGED_FILE, previous["merged_type"]  # made from this same adapter
        else:
            (out / MERGED_FILE).unlink()  # a merged model of an older adapter must not be served
    info = {"base_gguf": str(base), "base_gguf_sha256": file_sha256(base), "adapter_sha256": adapter_sha256,
            "architecture": arch, "rank": rank, "alpha": alpha, "lora_tensors": len(tensors),
            "merged": MERGED_FILE if merged_path else None, "merged_type": merged_type if merged_path else None,
            **({"kway_adapters": kway_hashes} if kway_hashes else {})}
    write_json_atomic(out / INFO_FILE, info)
    log.info("wrote %s (%d LoRA tensor pairs, alpha %g)%s%s", adapter_path, len(tensors), alpha,
             f" and {merged_path}" if merged_path else "",
             f" and {len(kway)} k-way adapters ({', '.join(p.name for p in kway.values())})" if kway else "")
    return GGUFExport(adapter_path, merged_path, base, info, kway)

