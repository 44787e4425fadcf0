"""`prism discover`: prompts from logs, scrubbing, clusters, the written files, and the bootstrap reading them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import BASE_QUERIES, PERSONA_QUERIES
from prism.cli import main
from prism.config import load_config_file, resolve_config
from prism.discovery import clusters
from prism.discovery.discover import discover
from prism.discovery.logs import read_prompts, scrub
from prism.errors import PrismError
from prism.runs import RunDir


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prompts_come_from_every_log_format_and_what_has_none_is_counted(tmp_path):
    served = write_jsonl(tmp_path / "requests.jsonl", [
        {"endpoint": "/v1/chat/completions", "status": 200, "messages": [
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "How do I bake bread?"}]},
        {"endpoint": "/v1/chat/completions", "status": 400, "messages": [{"role": "user", "content": "too long"}]},
        {"endpoint": "/v1/chat/completions", "status": 200},  # logged without --log-prompts
        {"prompt": "Plan a trip to Rome", "label": "travel"},
    ])
    log = read_prompts(served)
    assert [p.text for p in log.prompts] == ["How do I bake bread?", "Plan a trip to Rome"]
    assert [p.label for p in log.prompts] == [None, "travel"]
    assert log.skipped == {"failed requests": 1, "records without a prompt": 1} and log.records == 4
    table = tmp_path / "prompts.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([["id", "Question", "label"], ["1", "What is a monad?", "code"], ["2", "", "code"]])
    assert [(p.text, p.label) for p in read_prompts(table).prompts] == [("What is a monad?", "code")]
    text = tmp_path / "prompts.txt"
    text.write_text("one prompt\n\nanother prompt\n")
    assert [p.text for p in read_prompts(text).prompts] == ["one prompt", "another prompt"]


def test_bad_logs_are_clear_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(PrismError, match="holds no prompt .*the file is empty"):
        read_prompts(tmp_path / "empty.jsonl")
    failed = write_jsonl(tmp_path / "failed.jsonl",
                         [{"status": 500, "messages": [{"role": "user", "content": "x"}]}] * 3)
    with pytest.raises(PrismError, match="3 failed requests"):
        read_prompts(failed)
    (tmp_path / "garbage.bin").write_bytes(bytes(range(256)) * 20)
    with pytest.raises(PrismError, match="is binary"):
        read_prompts(tmp_path / "garbage.bin")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 10)
    with pytest.raises(PrismError, match="not UTF-8"):
        read_prompts(tmp_path / "latin.txt")
    (tmp_path / "columns.csv").write_text("id,answer\n1,yes\n")
    with pytest.raises(PrismError, match="no prompt column .*id, answer"):
        read_prompts(tmp_path / "columns.csv")
    with pytest.raises(PrismError, match="no log file"):
        read_prompts(tmp_path / "missing.jsonl")


def test_personal_data_is_masked_and_dates_stay():
    text = "Mail me at jane.doe+x@example.co.uk or call +1 (415) 555-0134; card 4111 1111 1111 1111, born 1990-05-04"
    assert scrub(text) == "Mail me at [email] or call [number]; card [number], born 1990-05-04"


def test_a_long_log_is_sampled_to_max_prompts(tmp_path):
    log = write_jsonl(tmp_path / "many.jsonl", [{"prompt": f"prompt number {i}"} for i in range(500)])
    sampled = read_prompts(log, max_prompts=50, seed=1)
    assert len(sampled.prompts) == 50 and sampled.sampled_from == 500
    assert len({p.text for p in sampled.prompts}) == 50
    assert max(int(p.text.split()[-1]) for p in sampled.prompts) > 100  # not just the first 50


def blobs(k: int, per: int, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 4
    points = np.concatenate([centre + rng.normal(size=(per, dim)) for centre in centres])
    return points, [str(i // per) for i in range(k * per)]


def test_clusters_recover_separated_intents_and_shuffled_embeddings_do_not():
    points, truth = blobs(k=4, per=30)
    found = clusters.cluster(points, "auto", min_cluster_size=5, seed=0)
    assert found.k == 4 and clusters.adjusted_rand(truth, found.labels) > 0.95
    shuffled = np.random.default_rng(3).permutation(points)  # negative control: embeddings no longer match labels
    assert abs(clusters.adjusted_rand(truth, clusters.cluster(shuffled, 4, min_cluster_size=1, seed=0).labels)) < 0.1


def test_small_clusters_are_merged_into_other():
    points, _ = blobs(k=3, per=20)
    lone = np.random.default_rng(5).normal(size=(3, 32)) * 4 + 40  # three prompts far from the rest
    found = clusters.cluster(np.concatenate([points, lone]), 4, min_cluster_size=5, seed=0)
    assert (found.labels[-3:] == clusters.OTHER).all() and (found.labels[:-3] != clusters.OTHER).all()


def labelled_log(path: Path) -> Path:
    records = [{"prompt": q, "label": "persona"} for q in PERSONA_QUERIES * 4] + \
              [{"prompt": q, "label": "base"} for q in BASE_QUERIES * 4] + \
              [{"prompt": "Write to me at someone@example.com about my order 123456789012", "label": "base"}]
    return write_jsonl(path, records)


def test_discover_writes_domains_queries_a_bootstrap_config_and_a_report(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "found"
    main(["discover", str(labelled_log(tmp_path / "log.jsonl")), "--out", str(out), "--model", str(tiny_model_dir),
          "--clusters", "2", "--min-cluster-size", "2", "--device", "cpu", "--holdout", "0.25"])
    printed = capsys.readouterr().out
    summary = json.loads((out / "discover.json").read_text())
    assert summary["prompts"] == 17 and sum(c["size"] for c in summary["clusters"]) == 17
    assert "ari" in summary and summary["ari_prompts"] == 17 and "adjusted Rand index" in printed
    assert summary["embedding"].startswith("block 1 of 3, mean-pooled")  # the middle one of the tiny model's three
    domains = yaml.safe_load((out / "domains.yaml").read_text())["domains"]
    assert len(domains) == len(set(domains)) == len([c for c in summary["clusters"] if c["id"] >= 0])
    queries = [json.loads(line) for line in (out / "queries.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (out / "holdout.jsonl").read_text().splitlines()]
    assert len(held) == 4 and len(queries) == 13  # 25% of the 17 prompts held out, none of them in both
    for folder_file in out.iterdir():  # scrubbed before anything was written
        text = folder_file.read_text(errors="replace")
        assert "someone@example.com" not in text and "123456789012" not in text, folder_file.name
    assert "Write to me at [email] about my order [number]" in (out / "queries.jsonl").read_text() + \
        (out / "holdout.jsonl").read_text()
    config = resolve_config(load_config_file(out / "prism.yaml"))
    assert config.domains == domains and config.query_sources() == ["real"]
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_a_bootstrap_takes_real_queries_filtered_and_recorded_by_source(tiny_config, tmp_path):
    from prism.stages.pipeline import bootstrap

    file = write_jsonl(tmp_path / "queries.jsonl", [
        {"query": "How should I structure a persuasive essay?", "domain": "writing"},
        {"query": "How should I structure a persuasive essay?", "domain": "writing"},  # a duplicate
        {"query": "short", "domain": "writing"},  # too short
        {"query": "Is it safe to mix bleach and ammonia?", "domain": "Safety"},
        {"query": "What year did the Berlin wall fall?", "domain": "factual recall"},
        {"query": "Where is the best pizza in Naples?", "domain": "travel"},  # no such domain in the run
    ])
    run = tmp_path / "run"
    bootstrap(tiny_config(queries_file=str(file), queries_per_persona=1, distill_epochs=1, gate_epochs=2), run)
    records = RunDir(run).read("queries")
    assert {r["source"] for r in records} == {"real"}
    assert [r["query"] for r in records if r["status"] == "kept"] == [
        "How should I structure a persuasive essay?", "Is it safe to mix bleach and ammonia?",
        "What year did the Berlin wall fall?"]
    assert sorted(r["status"] for r in records if r["status"] != "kept") == ["duplicate", "too_short"]
    stage = RunDir(run).manifest()["stages"]["queries"]
    assert stage["kept"] == {"real": 3} and stage["real"]["outside_domains"] == {"travel": 1}
    assert len(stage["real"]["sha256"]) == 64


def test_real_and_synthetic_queries_together(tiny_config, tmp_path):
    from prism.stages import queries
    from prism.stages.context import StageContext
    from prism.stages.personas import run as write_personas

    file = write_jsonl(tmp_path / "queries.jsonl", [{"query": "How do I start a short story?", "domain": "writing"}])
    config = tiny_config(queries_file=str(file), queries_mix=["real", "synthetic"], queries_per_persona=2)
    from prism.lm.models import load_model

    ctx = StageContext(run=RunDir(tmp_path / "run"), config=config, lm=load_model(config.model, device="cpu"))
    ctx.run.path.mkdir()
    write_personas(ctx)
    info = queries.run(ctx)
    sources = {r["source"] for r in ctx.run.read("queries")}
    assert sources == {"real", "synthetic"} and info["kept"]["real"] == 1


def test_bad_query_options_are_clear_errors(tiny_config, tmp_path):
    with pytest.raises(PrismError, match="--queries-mix real needs the queries"):
        tiny_config(queries_mix=["real"])
    with pytest.raises(PrismError, match="--queries-mix takes real, synthetic"):
        tiny_config(queries_file="q.jsonl", queries_mix=["mined"])
    with pytest.raises(PrismError, match="leaves real queries out"):
        tiny_config(queries_file="q.jsonl", queries_mix=["synthetic"])
    (tmp_path / "bad.jsonl").write_text('{"query": "no domain here"}\n')
    from prism.stages.queries import read_real_queries

    with pytest.raises(PrismError, match="line 1: needs a \"query\" and its \"domain\""):
        read_real_queries(tmp_path / "bad.jsonl")


def test_compare_reports_routing_per_domain_and_the_judges_verdict(tiny_run, tmp_path):
    from prism.evaluation.compare_runs import compare_runs, format_comparison

    held = write_jsonl(tmp_path / "holdout.jsonl", [{"query": q, "domain": "persona-like"} for q in PERSONA_QUERIES]
                       + [{"query": q, "domain": "base-like"} for q in BASE_QUERIES])
    result = compare_runs(tiny_run, tiny_run, held, out=str(tmp_path / "cmp"), max_tokens=4, device="cpu")
    assert result["routing"]["old"] == result["routing"]["new"] == {"base-like": 0.0, "persona-like": 1.0}
    assert result["verdict"]["overall"]["n"] == 4
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["prompts"] == 4
    assert "persona-like" in format_comparison(result)


@pytest.mark.e2e
def test_on_the_embedded_model_the_clusters_recover_known_intents(tmp_path):
    """MT-Bench's 80 first turns (8 categories) and 40 JailbreakBench harmful goals as a labelled log: the
    embedded model's middle block, mean-pooled, clustered by KMeans with k = 9."""
    from prism.evaluation.data import default_data_dir

    try:
        benchmarks = default_data_dir()
    except PrismError as exc:
        pytest.skip(f"the benchmark files this test reads are not here: {exc}")
    questions = [json.loads(line) for line in (benchmarks / "mt_bench" / "question.jsonl").read_text().splitlines()]
    with (benchmarks / "jbb" / "harmful.csv").open() as handle:
        goals = [row["Goal"] for row in csv.DictReader(handle)][:40]
    log = write_jsonl(tmp_path / "log.jsonl", [{"prompt": q["turns"][0], "label": q["category"]} for q in questions]
                      + [{"prompt": g, "label": "harmful"} for g in goals])
    summary = discover(log, out=str(tmp_path / "found"), clusters=9, min_cluster_size=1, device="cpu")
    assert summary["ari"] >= ARI_FLOOR, summary["ari"]
    from prism.discovery.logs import read_prompts as read
    from prism.lm.batching import mean_pooled_features
    from prism.lm.models import chat_prompt, load_model

    lm = load_model("embedded", device="cpu")
    prompts = read(log).prompts
    embeddings = mean_pooled_features(lm, [chat_prompt(lm.tokenizer, p.text) for p in prompts],
                                      lm.model.config.num_hidden_layers // 2).numpy()
    shuffled = np.random.default_rng(0).permutation(embeddings)  # negative control
    shuffled_labels = clusters.cluster(shuffled, 9, min_cluster_size=1, seed=0).labels
    assert abs(clusters.adjusted_rand([p.label for p in prompts], shuffled_labels)) < 0.05


ARI_FLOOR = 0.45  # measured 0.54 (mean of 3 KMeans seeds; seed 0: see the closing note of the issue) on this machine


def test_the_loop_from_served_traffic_to_a_new_run_compared_with_the_old(tiny_run, tiny_model_dir, tiny_config,
                                                                          tmp_path):
    import httpx2

    from helpers import LiveServer
    from prism.evaluation.compare_runs import compare_runs
    from prism.inference.transformers import PrismModel
    from prism.serving.request_log import RequestLog
    from prism.serving.server import create_app
    from prism.stages.pipeline import bootstrap

    served = PrismModel.from_run(tiny_run, device="cpu", max_model_len=256)
    log = RequestLog(tmp_path / "requests.jsonl", log_prompts=True)  # 1. serve, logging the prompts
    live = LiveServer(create_app(served, default_max_tokens=2, request_log=log, metrics=False)).start()
    try:
        for take in range(5):
            for query in PERSONA_QUERIES + BASE_QUERIES:
                reply = httpx2.post(live.url + "/v1/chat/completions", timeout=60, json={
                    "model": "prism", "messages": [{"role": "user", "content": f"{query} (take {take})"}]})
                assert reply.status_code == 200
    finally:
        live.stop()
        log.close()
    found = tmp_path / "found"  # 2. domains from the traffic
    main(["discover", str(tmp_path / "requests.jsonl"), "--out", str(found), "--model", str(tiny_model_dir),
          "--clusters", "2", "--min-cluster-size", "2", "--device", "cpu"])
    domains = yaml.safe_load((found / "domains.yaml").read_text())["domains"]
    new = tmp_path / "v2"  # 3. a run on them, from the logged queries (the tiny sizes of the test config)
    bootstrap(tiny_config(**load_config_file(found / "prism.yaml"), queries_per_persona=2, distill_epochs=1), new)
    queries = RunDir(new).read("queries")
    assert queries and {q["source"] for q in queries} == {"real"} and {q["domain"] for q in queries} <= set(domains)
    result = compare_runs(tiny_run, new, found / "holdout.jsonl", max_tokens=2, device="cpu")  # 4. old vs new
    held = [json.loads(line) for line in (found / "holdout.jsonl").read_text().splitlines()]
    assert set(result["routing"]["new"]) == {h["domain"] for h in held} and result["prompts"] == len(held) == 4
    assert result["verdict"]["overall"]["n"] == 4
    assert PrismModel.from_run(new, device="cpu").generate("Hello", max_tokens=2).completion_tokens >= 1  # 5. serve
