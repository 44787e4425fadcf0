"""`discover(log, out)`: prompts from a log -> embeddings (the base model's own hidden states) -> clusters ->
a name for each -> DIR/discover.json, domains.yaml, queries.jsonl, prism.yaml (what `prism bootstrap --config`
reads) and report.html. Nothing leaves DIR; prompts are scrubbed of personal data before anything is written."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from prism.config import resolve_config, with_options
from prism.discovery import clusters as clustering
from prism.discovery.config import DiscoverConfig
from prism.discovery.logs import read_prompts
from prism.discovery.naming import name_clusters
from prism.discovery.report import project, write_report
from prism.engines.local import LocalEngine
from prism.errors import PrismError
from prism.lm.batching import mean_pooled_features
from prism.lm.models import chat_prompt, load_model
from prism.runs import write_json_atomic

log = logging.getLogger("prism")
FILES = ("discover.json", "domains.yaml", "queries.jsonl", "holdout.jsonl", "prism.yaml", "report.html")


def discover(log_file: str | Path, config: DiscoverConfig | None = None, **options: Any) -> dict[str, Any]:
    config = with_options(DiscoverConfig, config, **options)
    out = Path(config.out)
    prompts = read_prompts(log_file, max_prompts=config.max_prompts, scrub_pii=not config.no_scrub, seed=config.seed)
    skipped = sum(prompts.skipped.values())
    log.warning("%s: %d prompts from %d records%s", log_file, len(prompts.prompts), prompts.records,
                f"; skipped {skipped} ({', '.join(f'{n} {why}' for why, n in prompts.skipped.items())})"
                if skipped else "")
    texts = [p.text for p in prompts.prompts]
    lm = load_model(config.model, device=config.device)
    layers = lm.model.config.num_hidden_layers
    layer = layers // 2 if config.layer is None else config.layer
    if not 0 <= layer < layers:
        raise PrismError(f"--layer must be 0 to {layers - 1} for this model, got {layer}")
    started = time.perf_counter()
    # each prompt as the gate reads it: the user turn in the model's chat template (ARI 0.54 against 0.21 on the
    # bare text, MT-Bench + JBB, middle block, embedded model)
    embeddings = mean_pooled_features(lm, [chat_prompt(lm.tokenizer, t) for t in texts], layer,
                                      config.batch_size).numpy()
    embed_s = time.perf_counter() - started
    started = time.perf_counter()
    found = clustering.cluster(embeddings, config.clusters, min_cluster_size=config.min_cluster_size, seed=config.seed)
    cluster_s = time.perf_counter() - started
    ids = sorted(found.centroids, key=lambda c: -int((found.labels == c).sum()))
    central = {c: clustering.central(found, c, config.examples) for c in ids}
    engine = _engine(config, lm)
    try:
        names = dict(zip(ids, name_clusters(engine, [[texts[i] for i in central[c]] for c in ids],
                                            batch_size=config.batch_size, seed=config.seed)))
    finally:
        if hasattr(engine, "close"):  # llama.cpp's contexts
            engine.close()
    if (found.labels == clustering.OTHER).any():
        names[clustering.OTHER] = "other"
        central[clustering.OTHER] = clustering.central(found, clustering.OTHER, config.examples)
    summary = {
        "log": str(log_file), "prompts": len(texts), "records": prompts.records, "skipped": prompts.skipped,
        "sampled_from": prompts.sampled_from, "scrubbed": not config.no_scrub, "model": config.model,
        "embedding": f"block {layer} of {layers}, mean-pooled over the prompt in the chat template",
        "criterion": _criterion(config, found),
        "silhouette": found.silhouette,
        "clusters": [{"id": int(c), "name": names[c], "size": int((found.labels == c).sum()),
                      "share": float((found.labels == c).mean()), "examples": [texts[i] for i in central[c]]}
                     for c in [*ids, *([clustering.OTHER] if clustering.OTHER in names else [])]],
        "seconds": {"embedding": round(embed_s, 2), "clustering": round(cluster_s, 2)},
        "prompts_per_second": round(len(texts) / max(embed_s, 1e-9), 1),
    }
    labelled = [i for i, p in enumerate(prompts.prompts) if p.label is not None]
    if labelled:
        summary["ari"] = clustering.adjusted_rand([prompts.prompts[i].label for i in labelled],  # type: ignore[misc]
                                                  found.labels[labelled])
        summary["ari_prompts"] = len(labelled)
    _write(out, config, summary, texts, found, names)
    return summary


def _criterion(config: DiscoverConfig, found: clustering.Clustering) -> str:
    if config.clusters != "auto":
        return f"{found.k} clusters, as asked"
    tried = sorted(found.silhouette)
    return (f"silhouette over k = {tried[0]}..{tried[-1]}: k = {found.k} ({found.silhouette[found.k]:.3f}); "
            f"clusters under {config.min_cluster_size} prompts merged into 'other'")


def _engine(config: DiscoverConfig, lm: Any) -> Any:
    if config.engine == "transformers":
        return LocalEngine(lm)
    from prism.stages.pipeline import make_engine

    bootstrap = resolve_config(model=config.model, domains=["discover"], engine=config.engine, gguf=config.gguf,
                               base_url=config.base_url, engine_model=config.engine_model, device=config.device)
    return make_engine(bootstrap) or LocalEngine(lm)


def _write(out: Path, config: DiscoverConfig, summary: dict[str, Any], texts: list[str],
           found: clustering.Clustering, names: dict[int, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    domains = [c["name"] for c in summary["clusters"] if c["id"] != clustering.OTHER]
    held_out = set(np.random.default_rng(config.seed).permutation(len(texts))[: int(config.holdout * len(texts))])
    with (out / "queries.jsonl").open("w") as queries, (out / "holdout.jsonl").open("w") as holdout:
        for index, (text, label) in enumerate(zip(texts, found.labels)):
            line = json.dumps({"query": text, "domain": names[int(label)], "cluster": int(label)}, ensure_ascii=False)
            (holdout if index in held_out else queries).write(line + "\n")
    summary["held_out"] = len(held_out)
    (out / "domains.yaml").write_text(yaml.safe_dump({"domains": domains}, sort_keys=False, allow_unicode=True))
    bootstrap = {"model": config.model, "domains": domains, "queries": str((out / "queries.jsonl").resolve()),
                 "queries_mix": ["real"]}
    (out / "prism.yaml").write_text("# prism bootstrap --config " + str(out / "prism.yaml") + " --out runs/NEW\n"
                                    + yaml.safe_dump(bootstrap, sort_keys=False, allow_unicode=True))
    coordinates, method = project(found.points, config.seed)
    write_report(out / "report.html", summary, coordinates, found.labels, names, method)
    write_json_atomic(out / "discover.json", summary)


def format_discovery(summary: dict[str, Any], out: str | Path) -> str:
    lines = [f"{summary['prompts']} prompts ({summary['records']} records"
             + (f"; skipped: {', '.join(f'{n} {why}' for why, n in summary['skipped'].items())}" if summary['skipped']
                else "") + f"), {summary['criterion']}"]
    for c in summary["clusters"]:
        lines.append(f"  {c['name']:<32} {c['size']:>6} ({c['share']:.1%})  e.g. {c['examples'][0][:60]!r}")
    if "ari" in summary:
        lines.append(f"adjusted Rand index against the log's labels: {summary['ari']:.3f} ({summary['ari_prompts']} "
                     "labelled prompts)")
    lines.append(f"embedding {summary['prompts_per_second']} prompts/s; written: "
                 + ", ".join(str(Path(out) / f) for f in FILES))
    lines.append(f"next: prism bootstrap --config {Path(out) / 'prism.yaml'} --out runs/NEW")
    return "\n".join(lines)
