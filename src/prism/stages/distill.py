"""Stage 6: context distillation of the persona into one LoRA adapter (a k-way run then distills each kept
persona alone into an adapter of its own, RUN/kway/adapters/<persona>, by the same recipe).

Teacher = base model WITH the persona in context; student = base + LoRA WITHOUT it. The loss is
KL(teacher || student) over the persona answer's tokens, on the teacher's top-k logits at temperature T,
times T^2. Block 0 gets no LoRA, so the gate's feature is the same with the adapter on or off.

Data parallel under `accelerate launch` (one process per GPU, or gloo on CPUs): each process takes an
interleaved share of every global batch, and the processes sum their gradients before the optimizer
step. The update is the single-process update (the loss is the mean over the global batch's answer
tokens), so the number of processes changes speed, not the adapter. Summing the flattened gradients
ourselves rather than wrapping the model in DDP keeps that true when a global batch has fewer examples
than there are processes (the last batch of an epoch): a process with nothing to do still joins the sum.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, reduce
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from prism.config import DEFAULT_DEVICE, BootstrapConfig, persona_slug
from prism.errors import PrismError
from prism.lm.batching import length_sorted_batches, pad_batch
from prism.lm.models import LoadedModel, chat_prompt, decoder_layers, encode, layers_pattern
from prism.runs import ADAPTER_CONFIG, adapter_dir, has_adapter_weights
from prism.stages import verify
from prism.stages.context import StageContext
from prism.stages.records import Label, read_labels

log = logging.getLogger("prism")
CHECKPOINT = "distill_checkpoint"


@dataclass
class Example:
    teacher_ids: list[int]  # persona prompt + answer
    student_ids: list[int]  # base prompt + answer
    answer_len: int


@dataclass
class TeacherTargets:
    values: torch.Tensor  # (answer_len, k) top-k teacher logits
    indices: torch.Tensor  # (answer_len, k) their token ids


def build_example(tokenizer: PreTrainedTokenizerBase, query: str, persona: str, answer: str,
                  max_length: int) -> Example | None:
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    teacher_prompt = encode(tokenizer, chat_prompt(tokenizer, query, system=persona))
    student_prompt = encode(tokenizer, chat_prompt(tokenizer, query))
    room = max_length - max(len(teacher_prompt), len(student_prompt))
    if room < 1:
        return None
    answer_ids = answer_ids[:room]
    return Example(teacher_prompt + answer_ids, student_prompt + answer_ids, len(answer_ids))


def answer_span_logits(model: torch.nn.Module, rows: list[list[int]], answer_lens: list[int], pad_id: int
                       ) -> list[torch.Tensor]:
    """Each row's logits that predict its answer tokens, (answer_len, vocab) in the model's dtype. Left padding
    ends every row at the same position, so the LM head runs over the last max(answer_len) + 1 positions only:
    never over the prompts (at an 8B shape, full-length float32 logits were the largest tensor)."""
    ids, mask = pad_batch(rows, pad_id, side="left")
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    device = next(model.parameters()).device
    keep = max(answer_lens) + 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   logits_to_keep=keep, use_cache=False).logits
    return [logits[row, keep - n - 1 : keep - 1] for row, n in enumerate(answer_lens)]


def distributed_state(device: str | torch.device = DEFAULT_DEVICE) -> PartialState:
    """The processes `accelerate launch` started (a single one otherwise), on CPUs when `device` says so."""
    wanted = str(device)
    return PartialState(cpu=wanted.startswith("cpu") or (wanted == "auto" and not torch.cuda.is_available()))


@torch.no_grad()
def teacher_targets(lm: LoadedModel, examples: list[Example], top_k: int, micro_batch: int) -> list[TeacherTargets]:
    """Top-k teacher logits of every example; with several processes each computes a share and all
    processes end up with all of them."""
    model, pad = lm.model, lm.tokenizer.pad_token_id
    state = distributed_state(lm.device)
    mine = list(range(state.process_index, len(examples), state.num_processes))
    targets: dict[int, TeacherTargets] = {}
    batches = length_sorted_batches([len(examples[i].teacher_ids) for i in mine], micro_batch)
    for batch in tqdm(batches, desc="teacher logits", leave=False, disable=not state.is_main_process):
        rows = [mine[j] for j in batch]
        parts = answer_span_logits(model, [examples[i].teacher_ids for i in rows],
                                   [examples[i].answer_len for i in rows], pad)
        for i, part in zip(rows, parts):
            top = part.float().topk(top_k, dim=-1)  # on the model's device: only k values per token leave it
            targets[i] = TeacherTargets(top.values.cpu(), top.indices.to(torch.int32).cpu())
    if state.num_processes > 1:
        targets = dict(gather_object(list(targets.items())))
    return [targets[i] for i in range(len(examples))]


def topk_kl(student_logits: torch.Tensor, target: TeacherTargets, temperature: float) -> torch.Tensor:
    """Summed over positions: KL(teacher || student) with BOTH distributions renormalized over the teacher's
    top-k tokens, at temperature T (without the T^2 factor). Exactly zero when the student's logits equal the
    teacher's, whatever k: reading the student's full-vocabulary log-probabilities at those k tokens instead
    would add -log(student mass on the top-k) > 0, a floor that does not depend on the persona."""
    teacher_logp = torch.log_softmax(target.values.float() / temperature, dim=-1)
    # pick the k logits first, then widen them: a float32 copy of the full-vocabulary logits is never made
    picked = student_logits.gather(-1, target.indices.long().to(student_logits.device)).float()
    student_logp = torch.log_softmax(picked / temperature, dim=-1)
    teacher_logp = teacher_logp.to(student_logp.device)
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum()


@torch.no_grad()
def persona_signal(model: torch.nn.Module, examples: list[Example], targets: list[TeacherTargets], pad_id: int,
                   temperature: float, micro_batch: int) -> float:
    """The loss before any update, per answer token over the whole distill set: how far the persona in the
    teacher's context moves the model's next-token distributions. Zero means the teacher did not see a
    persona (or the persona changes nothing), and then there is nothing to distill."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for batch in length_sorted_batches([len(e.student_ids) for e in examples], micro_batch):
        loss, count = distill_loss(model, [examples[i] for i in batch], [targets[i] for i in batch], pad_id,
                                   temperature)
        total, tokens = total + loss.item(), tokens + count
    model.train(was_training)
    return total / max(tokens, 1)


def lora_config(cfg: BootstrapConfig, num_layers: int, pattern: str) -> LoraConfig:
    """LoRA on the blocks above the gate's layer only: up to it both routes compute the same states, so the gate
    decides on them during the shared prefill."""
    gate_layer = cfg.gate_layer_of(num_layers)
    if not 0 <= gate_layer < num_layers - 1:
        raise PrismError(f"gate_layer {gate_layer} leaves no block above it for the adapter: this model has "
                         f"{num_layers} blocks, so pass a gate layer from 0 to {num_layers - 2}")
    return LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        layers_to_transform=list(range(gate_layer + 1, num_layers)), layers_pattern=pattern,
        task_type="CAUSAL_LM",
    )


def distill_loss(model: torch.nn.Module, examples: list[Example], targets: list[TeacherTargets],
                 pad_id: int, temperature: float) -> tuple[torch.Tensor, int]:
    """Sum of the per-token KL (times T^2) over a micro-batch, and its number of answer tokens."""
    parts = answer_span_logits(model, [e.student_ids for e in examples], [e.answer_len for e in examples], pad_id)
    total = sum((topk_kl(part, target, temperature) for part, target in zip(parts, targets)),
                parts[0].new_zeros((), dtype=torch.float32))
    return total * temperature**2, sum(e.answer_len for e in examples)


def activation_bytes(lm: LoadedModel, micro_batch: int, length: int) -> int:
    """A rule-of-thumb size of one micro-batch's saved activations in 16-bit training: about 34 bytes per
    token, hidden unit and layer (Korthikanti et al., 2022, without attention-score storage)."""
    config = lm.model.config
    return 34 * micro_batch * length * config.hidden_size * config.num_hidden_layers


def use_gradient_checkpointing(cfg: BootstrapConfig, lm: LoadedModel) -> bool:
    """'on'/'off' as asked; 'auto': on when the device is CUDA and the micro-batch's activations would take
    more than 80% of its free memory (the CPU and small models train without)."""
    if cfg.distill_gradient_checkpointing != "auto":
        return cfg.distill_gradient_checkpointing == "on"
    if lm.device.type != "cuda":
        return False
    free, _total = torch.cuda.mem_get_info(lm.device)
    return activation_bytes(lm, cfg.distill_micro_batch_size, cfg.distill_max_length) > 0.8 * free


def set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Activation (gradient) checkpointing of the decoder layers, non-reentrant; transformers 5.24 renamed
    the methods (the old names warn)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if on:
        enable = getattr(base, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
        disable()


def _sum_across_processes(params: list[torch.nn.Parameter]) -> None:
    """Replace each process's gradients by their sum over all processes (one all-reduce)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    total = reduce(torch.cat([g.flatten() for g in grads]), reduction="sum")
    offset = 0
    for p in params:
        p.grad = total[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def train_adapter(ctx: StageContext, examples: list[Example], targets: list[TeacherTargets],
                  name: str | None = None, out: Path | None = None) -> dict:
    """Train a LoRA adapter on the teacher's targets and save it to `out` (default RUN/adapter); `name` tags a
    k-way adapter's log records and checkpoint. The base model is left as it was found (LoRA unloaded). One
    training loop, kept in one piece so it reads top to bottom like any PyTorch loop (set-up, steps with
    accumulation, logging, saving)."""
    cfg, run_dir, lm = ctx.config, ctx.run, ctx.model
    checkpoint = run_dir.path / (CHECKPOINT if name is None else f"{CHECKPOINT}-{name}")
    out = out or adapter_dir(run_dir.path)
    state = distributed_state(lm.device)
    main = state.is_main_process
    torch.manual_seed(cfg.seed)  # the same LoRA initialization in every process
    num_layers = len(decoder_layers(lm.model))
    model = get_peft_model(lm.model, lora_config(cfg, num_layers, layers_pattern(lm.model)))
    checkpointing = use_gradient_checkpointing(cfg, lm)
    if checkpointing:
        set_checkpointing(model, True)
        log.info("distill: gradient checkpointing on (activations recomputed in the backward pass)")
    trainable, total = model.get_nb_trainable_parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.distill_lr, weight_decay=cfg.distill_weight_decay)
    batch = min(cfg.distill_batch_size, len(examples))
    steps_per_epoch = math.ceil(len(examples) / batch)
    total_steps = steps_per_epoch * cfg.distill_epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(cfg.distill_warmup_ratio * total_steps),
                                                total_steps)
    signal = persona_signal(model, examples, targets, lm.tokenizer.pad_token_id, cfg.distill_temperature,
                            cfg.distill_micro_batch_size)  # LoRA B = 0: the student is still the base model
    log.info("distill: persona signal (KL at step 0, per answer token) %.6f", signal)
    start_epoch, step = _resume(checkpoint, model, optimizer, scheduler)
    if start_epoch:
        log.info("distill: resuming after epoch %d (step %d)", start_epoch, step)
    if main:
        run_dir.rewrite("distill_log", [r for r in run_dir.read("distill_log")
                                        if r.get("adapter") != name or r["step"] <= step])
    if state.num_processes > 1:
        log.info("distill: data parallel over %d processes (%s)", state.num_processes, state.distributed_type)
    pad = lm.tokenizer.pad_token_id
    bar = tqdm(total=total_steps, initial=step, desc="distill" if name is None else f"distill {name}", unit="step",
               leave=False, disable=not main)
    model.train()
    for epoch in range(start_epoch, cfg.distill_epochs):
        order = list(range(len(examples)))
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        for first in range(0, len(order), batch):
            started = time.time()
            group = sorted(order[first : first + batch], key=lambda i: len(examples[i].student_ids))
            group_tokens = sum(examples[i].answer_len for i in group)
            share = group[state.process_index :: state.num_processes]
            optimizer.zero_grad()
            loss_sum = 0.0
            for m in range(0, len(share), cfg.distill_micro_batch_size):
                micro = share[m : m + cfg.distill_micro_batch_size]
                loss, _ = distill_loss(model, [examples[i] for i in micro], [targets[i] for i in micro], pad,
                                       cfg.distill_temperature)
                (loss / group_tokens).backward()  # mean over the answer tokens of the whole global batch
                loss_sum += loss.item()
            if state.num_processes > 1:
                _sum_across_processes(params)
                loss_sum = float(reduce(torch.tensor([loss_sum], device=state.device), reduction="sum"))
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.distill_grad_clip))
            optimizer.step()
            scheduler.step()
            step += 1
            record = {"step": step, "epoch": epoch, "loss": loss_sum / group_tokens, "grad_norm": grad_norm,
                      "lr": scheduler.get_last_lr()[0], "tokens": group_tokens, "seconds": time.time() - started,
                      "processes": state.num_processes, **({} if name is None else {"adapter": name})}
            if main:
                run_dir.append("distill_log", [record])
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        if main:
            _save_checkpoint(checkpoint, model, optimizer, scheduler, epoch + 1, step)
    bar.close()
    model.eval()
    if checkpointing:
        set_checkpointing(model, False)
    if main:
        model.save_pretrained(str(out), safe_serialization=True)
        shutil.rmtree(checkpoint, ignore_errors=True)
    model.unload()  # the LoRA layers out again: the next adapter (k-way) starts from the bare base model
    state.wait_for_everyone()  # the others read the log and the adapter the main process wrote
    losses = [r["loss"] for r in run_dir.read("distill_log") if r.get("adapter") == name]
    return {"trainable_params": trainable, "share_of_base": trainable / (total - trainable), "steps": step,
            "loss_first": losses[0], "loss_last": losses[-1], "persona_signal": signal,
            "gradient_checkpointing": checkpointing}


def _save_checkpoint(directory: Path, model: PeftModel, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, step: int) -> None:
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()},
              str(tmp / "adapter.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                "step": step}, tmp / "state.pt")
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def _resume(directory: Path, model: PeftModel, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler) -> tuple[int, int]:
    if not (directory / "state.pt").is_file():
        return 0, 0
    set_peft_model_state_dict(model, load_file(str(directory / "adapter.safetensors")))
    state = torch.load(directory / "state.pt", weights_only=True)  # tensors and numbers only, no pickled code
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["epoch"], state["step"]


def distill_examples(lm: LoadedModel, records: list[Label], max_length: int) -> list[Example]:
    examples = [build_example(lm.tokenizer, r.query, r.persona, r.persona_answer, max_length)
                for r in records]
    kept = [e for e in examples if e is not None]
    if not kept:
        raise PrismError(f"every distillation prompt is longer than distill_max_length={max_length}")
    return kept


def distill_one(ctx: StageContext, records: list[Label], name: str | None = None, out: Path | None = None) -> dict:
    """Teacher targets, then one adapter trained on them: its metrics."""
    cfg, lm = ctx.config, ctx.model
    examples = distill_examples(lm, records, cfg.distill_max_length)
    targets = teacher_targets(lm, examples, cfg.distill_top_k, cfg.distill_micro_batch_size)
    metrics = train_adapter(ctx, examples, targets, name, out)
    return {"examples": len(examples), "answer_tokens": sum(e.answer_len for e in examples), **metrics}


def distill_kway(ctx: StageContext, records: list[Label]) -> dict:
    """One adapter per kept persona, on that persona's wins alone, into RUN/kway/adapters/<persona> (PEFT's
    multi-adapter layout). An adapter already saved is kept: a cut-short stage resumes at the next one."""
    classes, merged = verify.kway_classes(read_labels(ctx.run), ctx.config.kway_min_wins)
    adapters: dict[str, dict] = {}
    done = ctx.run.manifest()["stages"].get("distill", {}).get("kway_adapters", {})
    for persona in classes[1:]:
        out = adapter_dir(ctx.run.path, persona)
        if persona in done and has_adapter_weights(out):
            adapters[persona] = done[persona]
            continue
        mine = [r for r in records if persona_slug(r.domain) == persona]
        log.info("distill: k-way adapter %s on %d examples", persona, len(mine))
        adapters[persona] = distill_one(ctx, mine, persona, out)
        if distributed_state(ctx.model.device).is_main_process:
            ctx.run.update_stage("distill", kway_adapters=adapters)
    return {"kway_adapters": adapters, "kway_merged_into_base": merged}


def run(ctx: StageContext) -> dict:
    records = [r for r in read_labels(ctx.run) if r.label == 1]
    if not records:
        log.warning("verify kept no distillation example (the persona answer never won by the run's judge): "
                    "skipping adapter training; the gate routes everything to the base model")
        return {"skipped": "no distillation examples", "examples": 0}
    if ctx.config.routing != "kway":
        return distill_one(ctx, records)
    # k-way: the binary adapter first (the `prism` routing a k-way run is compared with), kept across a resume
    saved = ctx.run.manifest()["stages"].get("distill", {}).get("binary_adapter")
    info = saved if saved and has_adapter_weights(adapter_dir(ctx.run.path)) else None
    if info is None:
        info = distill_one(ctx, records)
        if distributed_state(ctx.model.device).is_main_process:
            ctx.run.update_stage("distill", binary_adapter=info)
    return {**info, **distill_kway(ctx, records)}


def load_adapter(lm: LoadedModel, run_dir: str | Path) -> PeftModel:
    path = adapter_dir(Path(run_dir))
    if not (path / ADAPTER_CONFIG).is_file():
        raise PrismError(f"{run_dir} has no trained adapter (distill skipped or not run yet)")
    return PeftModel.from_pretrained(lm.model, str(path)).eval()
