"""The llama.cpp engine against the PyTorch model, on the tiny random Llama written as an F32 GGUF."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import gguf
import pytest

from gguf_helpers import teacher_forced_agreement, write_tiny_gguf
from helpers import BASE_QUERIES, KWAY_PERSONAS, PERSONA_QUERIES, LiveServer, build_tiny_model
from prism.engines.base import Prompt
from prism.engines.llamacpp import LlamaCppEngine
from prism.engines.local import LocalEngine
from prism.errors import PrismError
from prism.inference.base import GenerationRequest
from prism.inference.gguf_export import export_gguf
from prism.inference.llamacpp import LlamaCppModel
from prism.inference.transformers import PrismModel
from prism.lm import llama, llama_probe
from prism.lm.decoding import SamplingParams
from prism.lm.llama_batch import load_weights

if llama.llama_cpp_missing():
    if os.environ.get("CI"):  # the project installs it: a CI without it has a broken install step
        pytest.fail(f"llama-cpp-python is not importable in CI: {llama.llama_cpp_missing()}", pytrace=False)
    pytest.skip("llama-cpp-python is not installed", allow_module_level=True)

QUERIES = PERSONA_QUERIES + BASE_QUERIES
POSITIONS = 32
# At least 95% of teacher-forced positions must pick the same greedy token. Both engines run the same F32
# weights here, but llama.cpp keeps its KV cache in F16 and sums matrix products in another order, so a
# position whose two best logits are within that rounding of each other may flip. The logits themselves
# must agree to within 1% of their range (measured: 0.3-0.5%), which rules out any layout mistake.
MIN_AGREEMENT = 0.95
MAX_RELATIVE_DIFF = 0.01


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")


@pytest.fixture(scope="module")
def gguf_run(tiny_run: Path, tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("gguf-run") / "run"
    shutil.copytree(tiny_run, run)
    export_gguf(run, base_gguf=tiny_gguf, merged=True, merged_type="f32")
    return run


@pytest.fixture(scope="module")
def torch_model(gguf_run: Path) -> PrismModel:
    return PrismModel.from_run(gguf_run, device="cpu")


@pytest.fixture(scope="module")
def cpp_model(gguf_run: Path, tiny_gguf: Path) -> LlamaCppModel:
    return LlamaCppModel.from_run(gguf_run, gguf=tiny_gguf, persona_model="lora", max_model_len=512)


def test_adapter_gguf_has_llama_cpp_names_shapes_and_alpha(gguf_run: Path, tiny_model_dir: Path):
    reader = gguf.GGUFReader(str(gguf_run / "gguf" / "adapter.gguf"))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(8.0)  # the fixture's lora_alpha
    names = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    # 7 projections in blocks 1 and 2 of the 3-layer model; block 0 carries no LoRA (the gate reads it)
    assert len(names) == 2 * 7 * 2
    assert not any(name.startswith("blk.0.") for name in names)
    assert names["blk.1.attn_q.weight.lora_a"] == (64, 4)  # ggml order: (in, rank)
    assert names["blk.1.attn_k.weight.lora_b"] == (4, 32)  # (rank, out): 2 kv heads of 16
    assert names["blk.2.ffn_down.weight.lora_a"] == (128, 4)


@pytest.mark.parametrize("route", ["persona", "base"])
def test_greedy_tokens_agree_with_pytorch_teacher_forced(torch_model, cpp_model, route):
    agreement, worst = teacher_forced_agreement(torch_model, cpp_model, route, QUERIES, POSITIONS)
    assert agreement >= MIN_AGREEMENT, f"{route}: {agreement:.3f} of positions agree (relative diff {worst:.2e})"
    assert worst < MAX_RELATIVE_DIFF


def test_the_merged_persona_gguf_agrees_with_the_adapter(torch_model, gguf_run, tiny_gguf):
    merged = LlamaCppModel.from_run(gguf_run, gguf=tiny_gguf, persona_model="merged", max_model_len=512)
    assert merged.persona_source == "merged"
    agreement, worst = teacher_forced_agreement(torch_model, merged, "persona", QUERIES, POSITIONS)
    assert agreement >= MIN_AGREEMENT and worst < MAX_RELATIVE_DIFF


def test_routes_and_replies_match_the_pytorch_model(torch_model, cpp_model):
    conversations = [[{"role": "user", "content": q}] for q in QUERIES]
    ours, theirs = cpp_model.decide(conversations), torch_model.decide(conversations)
    assert [d.route for d in ours] == ["persona"] * len(PERSONA_QUERIES) + ["base"] * len(BASE_QUERIES)
    assert [d.route for d in ours] == [d.route for d in theirs]
    assert [d.gate_probability for d in ours] == pytest.approx([d.gate_probability for d in theirs], abs=1e-5)
    for conversation in conversations:
        expected = torch_model.generate(conversation, max_tokens=12)
        got = cpp_model.generate(conversation, max_tokens=12)
        assert (got.route, got.text, got.finish_reason) == (expected.route, expected.text, expected.finish_reason)


def test_stream_sampling_stop_strings_and_context_limit(cpp_model):
    messages = [{"role": "user", "content": QUERIES[0]}]
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    first = cpp_model.generate_batch([GenerationRequest(messages, "base", params)])[0]
    again = cpp_model.generate_batch([GenerationRequest(messages, "base", params)])[0]
    assert first.text == again.text and first.completion_tokens == 10 and first.finish_reason == "length"
    events = list(cpp_model.stream([GenerationRequest(messages, "auto", SamplingParams(max_tokens=6)),
                                    GenerationRequest(messages, "base", SamplingParams(max_tokens=6))]))
    assert [e.index for e in events if e.decision] == [0, 1]  # every route before any text
    assert events[0].decision.route == "persona" and events[1].decision.forced
    done = [e.completion for e in sorted(events, key=lambda e: e.index) if e.completion]  # they finish in any order
    assert len(done) == 2
    stop = done[1].text[2:4]
    if stop.strip():
        cut = cpp_model.generate(messages, route="base", max_tokens=6, stop=[stop])
        assert cut.text == done[1].text[: done[1].text.index(stop)] and cut.finish_reason == "stop"
    with pytest.raises(PrismError, match="maximum context length is 512"):
        cpp_model.generate(messages, max_tokens=600)


def test_judge_verdicts_and_stage_generation_match_transformers(cpp_model, torch_model, tiny_gguf):
    engine = LlamaCppEngine.open(str(torch_model.run_path), torch_model.tokenizer, gguf=str(tiny_gguf))
    local = LocalEngine(torch_model.lm)
    prompts = [Prompt(q, system="Compare two answers.", assistant_prefix="Verdict:") for q in QUERIES]
    with torch_model.adapter.disable_adapter():
        expected = local.option_probs(prompts, ["A", "B", "TIE"], batch_size=4)
        reference = _by_index(local.generate(prompts, max_new_tokens=8, temperature=0.0, seeds=[0] * len(prompts),
                                                   batch_size=1))
    got = engine.option_probs(prompts, ["A", "B", "TIE"], batch_size=4)
    for mine, theirs in zip(got, expected):
        assert mine.probs == pytest.approx(theirs.probs, abs=1e-3)
        assert mine.mass == pytest.approx(theirs.mass, abs=1e-3)
    generated = _by_index(engine.generate(prompts, max_new_tokens=8, temperature=0.0, seeds=[0] * len(prompts),
                                                   batch_size=1))
    assert generated == reference


def test_the_pointwise_judge_rates_alike_on_llama_cpp_and_transformers(torch_model, tiny_gguf):
    from types import SimpleNamespace

    from prism.stages import judge_pointwise

    engine = LlamaCppEngine.open(str(torch_model.run_path), torch_model.tokenizer, gguf=str(tiny_gguf))
    items = [({"query": q}, f"a persona answer to {q}", f"a plain answer to {q}", variant)
             for q in QUERIES for variant in ("persona", "plain")]
    config = SimpleNamespace(judge_max_chars=1500, batch_size=4)
    with torch_model.adapter.disable_adapter():
        expected = list(judge_pointwise.judge(SimpleNamespace(config=config, generator=LocalEngine(torch_model.lm)),
                                              items))
    got = list(judge_pointwise.judge(SimpleNamespace(config=config, generator=engine), items))
    for mine, theirs in zip(got, expected):
        assert mine["score"] == pytest.approx(theirs["score"], abs=1e-3)
        assert mine["rating_probs"] == pytest.approx(theirs["rating_probs"], abs=1e-3)
    assert len({round(r["score"], 4) for r in got}) > 1


def _by_index(batches) -> dict[int, str]:
    return {i: g.text for indices, generations in batches for i, g in zip(indices, generations)}


def test_served_on_llama_cpp(cpp_model):
    from openai import OpenAI

    from prism.serving.server import create_app

    live = LiveServer(create_app(cpp_model, default_max_tokens=8)).start()
    try:
        client = OpenAI(base_url=live.url + "/v1", api_key="none")
        reply = client.chat.completions.with_raw_response.create(
            model="prism", messages=[{"role": "user", "content": PERSONA_QUERIES[0]}], max_tokens=8, temperature=0)
        body = reply.parse()
        assert reply.headers["x-prism-route"] == "persona"
        expected = cpp_model.generate(PERSONA_QUERIES[0], max_tokens=8)
        assert body.choices[0].message.content == expected.text
        chunks = list(client.chat.completions.create(model="prism-base", stream=True, max_tokens=8, temperature=0,
                                                     messages=[{"role": "user", "content": BASE_QUERIES[0]}]))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == cpp_model.generate(BASE_QUERIES[0], route="base", max_tokens=8).text
    finally:
        live.stop()


def test_missing_llama_cpp_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(llama, "llama_cpp_missing", lambda: "ImportError: No module named 'llama_cpp'")
    monkeypatch.setattr(llama, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="prism"):
        assert llama.resolve_backend("auto", "embedded", None) == "transformers"
        assert llama.resolve_backend("llamacpp", "embedded", None) == "transformers"
    warnings = [r for r in caplog.records if "llama-cpp-python is unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "pip install llama-cpp-python" in warnings[0].getMessage()


def test_a_build_that_dies_in_its_probe_falls_back_once_and_is_never_loaded(monkeypatch, caplog, tmp_path,
                                                                               tiny_gguf: Path):
    """A llama.cpp build that kills its process (SIGILL, as a -march=native build does on a CPU that advertises
    AMX it cannot run) must cost a probe subprocess, not this process: auto falls back to transformers with one
    line saying why and how to rebuild, --engine llamacpp is a clear error, loading the weights refuses, and the verdict
    is cached so the probe runs once per build and GGUF."""
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(llama, "_warned", set())
    runs = tmp_path / "probe-runs"
    dies = f"open({str(runs)!r}, 'a').write('x'); import os, signal; os.kill(os.getpid(), signal.SIGILL)"
    monkeypatch.setattr(llama_probe, "probe_command", lambda gguf: [sys.executable, "-c", dies])
    with caplog.at_level(logging.WARNING, logger="prism"):
        assert llama.resolve_backend("auto", "org/model", str(tiny_gguf)) == "transformers"
        assert llama.resolve_backend("auto", "org/model", str(tiny_gguf)) == "transformers"
    warnings = [r.getMessage() for r in caplog.records if "cannot run" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "SIGILL" in warnings[0] and "make llamacpp" in warnings[0] and "transformers" in warnings[0]
    with pytest.raises(PrismError, match="SIGILL"):
        llama.resolve_backend("llamacpp", "org/model", str(tiny_gguf))
    with pytest.raises(PrismError, match="cannot run tiny-f32.gguf"):
        load_weights(tiny_gguf)
    assert runs.read_text() == "x", "the verdict is cached: one probe for four uses"


def test_a_build_that_runs_passes_its_probe(monkeypatch, tmp_path, tiny_gguf: Path):
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "cache"))
    assert llama_probe.probe_failure(tiny_gguf) is None  # the real probe, in a subprocess
    assert llama.resolve_backend("llamacpp", "org/model", str(tiny_gguf)) == "llamacpp"


def test_engine_choice():
    assert llama.resolve_backend("auto", "embedded", None) == "llamacpp"
    assert llama.resolve_backend("auto", "org/some-model", None) == "transformers"
    assert llama.resolve_backend("auto", "org/some-model", "model.gguf") == "llamacpp"
    assert llama.resolve_backend("transformers", "embedded", None) == "transformers"
    with pytest.raises(PrismError, match="needs a GGUF"):
        llama.resolve_backend("llamacpp", "org/some-model", None)
    with pytest.raises(PrismError, match="unknown engine"):
        llama.resolve_backend("vllm", "embedded", None)


def test_export_refuses_a_gguf_of_another_model(tiny_run, tmp_path):
    other = build_tiny_model(tmp_path / "two-layers", layers=2)
    wrong = write_tiny_gguf(other, tmp_path / "two-layers.gguf")
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    with pytest.raises(PrismError, match="has no tensor blk.2"):
        export_gguf(run, base_gguf=wrong)
    with pytest.raises(PrismError, match="does not exist"):
        export_gguf(run, base_gguf=tmp_path / "missing.gguf")
    assert not (run / "gguf" / "adapter.gguf").exists()


def snapshot(run: Path) -> dict[str, tuple[int, int]]:
    """Every file under a run directory with its size and modification time."""
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(run.rglob("*"))}


def test_a_stale_export_is_redone_outside_the_run_and_loading_never_writes_into_it(gguf_run, tiny_gguf, tmp_path,
                                                                                     monkeypatch):
    """A run whose RUN/gguf is older than its adapter loads, serves and reloads from an export made in PRISM's
    cache, on llama.cpp and on transformers: not one file of the run directory is written, added or removed (the
    suite runs as root, where a read-only mode would not stop a write: the files themselves are compared)."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    shutil.copytree(gguf_run, run)
    weights_path = run / "adapter" / "adapter_model.safetensors"
    weights = load_file(str(weights_path))
    save_file({k: v * 2 if "lora_B" in k else v for k, v in weights.items()}, str(weights_path))
    before = snapshot(run)
    model = LlamaCppModel.from_run(run, gguf=tiny_gguf, max_model_len=256)
    assert model.persona_source == "lora"  # the merged model of the old adapter is not served
    request = GenerationRequest([{"role": "user", "content": PERSONA_QUERIES[0]}], "persona",
                                SamplingParams(max_tokens=6, ignore_eos=True))
    served = model.generate_batch([request])[0]
    assert served.route == "persona" and served.completion_tokens == 6
    assert list((tmp_path / "cache" / "exports").glob("*/adapter.gguf"))
    model.reload()
    model.close()
    torch_served = PrismModel.from_run(run, device="cpu").generate(PERSONA_QUERIES[0], max_tokens=2)
    assert torch_served.completion_tokens == 2
    assert snapshot(run) == before


def test_exporting_again_from_the_same_adapter_keeps_its_merged_model(gguf_run, tiny_gguf, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(gguf_run, run)
    merged = (run / "gguf" / "persona.gguf").read_bytes()
    exported = export_gguf(run, base_gguf=tiny_gguf)  # e.g. a k-way run's adapters added, the binary one unchanged
    assert exported.merged is not None and (run / "gguf" / "persona.gguf").read_bytes() == merged
    assert json.loads((run / "gguf" / "export.json").read_text())["merged"] == "persona.gguf"
    assert LlamaCppModel.from_run(run, gguf=tiny_gguf, max_model_len=256).persona_source == "merged"


def test_bootstrap_stages_on_llama_cpp(tiny_config, tiny_gguf, tmp_path):
    import json

    from prism.runs import STAGES, RunDir
    from prism.stages.pipeline import bootstrap

    config = tiny_config(engine="llamacpp", gguf=str(tiny_gguf), domains=["math", "safety"], queries_per_persona=3)
    summary = bootstrap(config, tmp_path / "run")
    assert all(summary["stages"][s] == "done" for s in STAGES if s not in ("distill", "adapter_outcomes"))
    assert summary["counts"]["answers"] == 2 * summary["counts"]["queries"] > 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    for stage in ("personas", "queries", "answers", "verify"):
        assert manifest["stages"][stage]["engine"] == {"kind": "llamacpp", "model": str(tiny_gguf), "weights": "as-is",
                                                       "threads": llama.default_threads(), "sequences": 8}
    assert manifest["stages"]["gate"]["engine"]["kind"] == "transformers"
    judgments = RunDir(tmp_path / "run").read("judgments")
    assert judgments and all(j["verdict_source"] == "logits" for j in judgments)
    assert all(abs(sum(j["probs"].values()) - 1) < 1e-6 for j in judgments)


def test_cli_export_and_chat_on_llama_cpp(tiny_run, tiny_gguf, tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    exported = subprocess.run([sys.executable, "-m", "prism.cli", "export", "gguf", str(run), "--gguf", str(tiny_gguf),
                               "--merged", "--merged-type", "f16"], capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0, exported.stderr
    assert f"{run}/gguf/adapter.gguf" in exported.stdout and f"{run}/gguf/persona.gguf" in exported.stdout
    merged = gguf.GGUFReader(str(run / "gguf" / "persona.gguf"))
    assert merged.fields["general.finetune"].contents() == "prism-persona"
    types = {t.name: t.tensor_type.name for t in merged.tensors}
    assert types["blk.1.attn_q.weight"] == "F16" and types["blk.0.attn_q.weight"] == "F32"  # block 0 untouched

    # no --gguf: the base GGUF recorded by the export is used, and auto picks llama.cpp for it
    chat = subprocess.run([sys.executable, "-m", "prism.cli", "chat", str(run), "--max-tokens", "4",
                           "--temperature", "0"],
                          input=f"{PERSONA_QUERIES[0]}\n/route base\n{PERSONA_QUERIES[0]}\n/quit\n",
                          capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0, chat.stderr
    assert "on llamacpp" in chat.stdout
    assert "[persona · gate p(persona)=" in chat.stdout and "[base · pinned]" in chat.stdout

    refused = subprocess.run([sys.executable, "-m", "prism.cli", "chat", str(tiny_run), "--engine", "llamacpp"],
                             input="", capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "needs a GGUF" in refused.stderr and "Traceback" not in refused.stderr


def test_a_reload_on_llama_cpp_re_exports_the_new_adapter_and_keeps_the_old_on_failure(gguf_run, tiny_gguf,
                                                                                        tmp_path):
    from safetensors.torch import load_file, save_file

    from prism.lm.gate import save_threshold

    run = shutil.copytree(gguf_run, tmp_path / "run")
    (run / "gguf" / "persona.gguf").unlink()  # the LoRA route, re-exported on reload
    model = LlamaCppModel.from_run(run, gguf=tiny_gguf, max_model_len=512)
    request = GenerationRequest([{"role": "user", "content": PERSONA_QUERIES[0]}], "persona",
                                SamplingParams(max_tokens=10, ignore_eos=True))
    old_text = model.generate_batch([request])[0].text
    weights = run / "adapter" / "adapter_model.safetensors"
    save_file({k: v * 4.0 if "lora_B" in k else v for k, v in load_file(str(weights)).items()}, str(weights))
    save_threshold(run / "gate", 0.8)

    info = model.reload()
    fresh = LlamaCppModel.from_run(run, gguf=tiny_gguf, max_model_len=512).generate_batch([request])[0].text
    assert info.threshold == 0.8 == model.threshold == model.router.threshold and info.persona_model == "lora"
    assert model.generate_batch([request])[0].text == fresh != old_text

    (run / "gate" / "gate.safetensors").unlink()
    with pytest.raises(PrismError, match="cannot load the gate"):
        model.reload()
    assert model.threshold == 0.8 and model.generate_batch([request])[0].text == fresh


def test_a_kway_run_on_llama_cpp_has_a_lora_gguf_and_a_context_per_persona(tiny_kway_run, tiny_gguf, tmp_path):
    run = tmp_path / "kway"
    shutil.copytree(tiny_kway_run, run)
    exported = export_gguf(run, base_gguf=tiny_gguf)
    assert sorted(exported.kway) == sorted(KWAY_PERSONAS)
    for path in exported.kway.values():
        reader = gguf.GGUFReader(str(path))
        assert reader.fields["adapter.type"].contents() == "lora"
        assert reader.tensors and not any(t.name.startswith("blk.0.") for t in reader.tensors)
    cpp = LlamaCppModel.from_run(run, gguf=tiny_gguf, persona_model="lora", max_model_len=512)
    torch_model = PrismModel.from_run(run, device="cpu")
    assert cpp.routing == "kway" and cpp.personas == KWAY_PERSONAS
    conversations = [[{"role": "user", "content": q}] for q in QUERIES]
    assert [(d.route, d.persona) for d in cpp.decide(conversations)] == \
        [(d.route, d.persona) for d in torch_model.decide(conversations)]
    for persona in KWAY_PERSONAS:
        # the reference: the same run with this persona's adapter as its only (binary) adapter
        alone = tmp_path / f"alone-{persona}"
        shutil.copytree(run, alone, ignore=shutil.ignore_patterns("kway", "gguf"))
        shutil.rmtree(alone / "adapter")
        shutil.copytree(run / "kway" / "adapters" / persona, alone / "adapter")
        reference = PrismModel.from_run(alone, device="cpu")
        agreement, worst = teacher_forced_agreement(reference, cpp, "persona", QUERIES, POSITIONS,
                                                    cpp_route=f"persona-{persona}")
        assert agreement >= MIN_AGREEMENT and worst <= MAX_RELATIVE_DIFF, (persona, agreement, worst)
    reply = cpp.generate(BASE_QUERIES[0], route="persona", persona="review", max_tokens=4)
    assert (reply.route, reply.persona) == ("persona", "review")
    assert cpp.reload().personas == KWAY_PERSONAS
    # a request may name the gate that decides it, on llama.cpp as on transformers
    params = SamplingParams(max_tokens=3)
    for routing in ("binary", "kway"):
        requests = [GenerationRequest(c, params=params, routing=routing) for c in conversations]
        assert [(c.route, c.persona, round(c.gate_probability, 5)) for c in cpp.generate_batch(requests)] == \
            [(c.route, c.persona, round(c.gate_probability, 5)) for c in torch_model.generate_batch(requests)]
    binary = [d.route for d in cpp.decide(conversations, routing="binary")]
    assert binary == [d.route for d in torch_model.decide(conversations, routing="binary")]
    assert [d.persona for d in cpp.decide(conversations, routing="binary")] == [None] * len(QUERIES)


def test_a_llama_cpp_stream_left_open_blocks_no_one(cpp_model):
    import threading

    abandoned = cpp_model.stream([GenerationRequest([{"role": "user", "content": BASE_QUERIES[0]}],
                                                    params=SamplingParams(max_tokens=200, ignore_eos=True))])
    assert next(abandoned).decision is not None and next(abandoned).delta is not None  # then never read again
    done = []
    other = threading.Thread(target=lambda: done.append(cpp_model.generate(BASE_QUERIES[1], max_tokens=4)),
                             daemon=True)
    other.start()
    other.join(timeout=60)
    assert done and done[0].completion_tokens == 4, "another request waited on a stream nobody reads"
    abandoned.close()


def test_a_run_is_opened_once_per_load(gguf_run, tiny_gguf, monkeypatch):
    from prism.inference import artifacts
    from prism.inference.loading import load_gated_model

    opened = []
    real = artifacts.FinishedRun.open.__func__

    def counted(cls, run, config):
        opened.append(run)
        return real(cls, run, config)

    monkeypatch.setattr(artifacts.FinishedRun, "open", classmethod(counted))
    for engine in ("llamacpp", "transformers"):
        opened.clear()
        model = load_gated_model(gguf_run, engine=engine, gguf=tiny_gguf, max_model_len=256)
        assert model.engine == engine and len(opened) == 1, (engine, opened)
