"""`prism discover` at scale on the embedded model: a log of --prompts distinct prompts (MT-Bench turns,
JailbreakBench goals, ARC and MMLU questions, numbered), timed part by part: reading and scrubbing, embedding
(prompts/s and tokens/s), clustering with --clusters auto (silhouette over k = 2..20), and the process's peak
memory, which the embeddings (prompts x hidden size floats) and one batch bound, not the log.

    .venv/bin/python benchmarks/discover.py [--prompts 10000] [--json FILE]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import resource
import tempfile
import time
from pathlib import Path

from prism.discovery import clusters
from prism.discovery.logs import read_prompts
from prism.evaluation.data import default_data_dir
from prism.library_warnings import silence_library_warnings
from prism.lm.batching import mean_pooled_features
from prism.lm.models import chat_prompt, encode, load_model


def source_prompts() -> list[str]:
    data = default_data_dir()
    texts = [turn for line in (data / "mt_bench" / "question.jsonl").read_text().splitlines()
             for turn in json.loads(line)["turns"]]
    with (data / "jbb" / "harmful.csv").open() as handle:
        texts += [row["Goal"] for row in csv.DictReader(handle)]
    for name in ("arc/easy_test.jsonl", "mmlu/test_subset.jsonl"):
        texts += [json.loads(line)["question"] for line in (data / name).read_text().splitlines()]
    return texts


def main() -> None:
    silence_library_warnings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=10000)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    texts = source_prompts()
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "log.jsonl"
        log.write_text("".join(json.dumps({"prompt": f"{texts[i % len(texts)]} (request {i})"}) + "\n"
                               for i in range(args.prompts)))
        started = time.perf_counter()
        prompts = [p.text for p in read_prompts(log).prompts]
        read_s = time.perf_counter() - started
    lm = load_model("embedded", device="cpu")
    rendered = [chat_prompt(lm.tokenizer, t) for t in prompts]
    tokens = sum(len(encode(lm.tokenizer, r)) for r in rendered)
    started = time.perf_counter()
    embeddings = mean_pooled_features(lm, rendered, lm.model.config.num_hidden_layers // 2).numpy()
    embed_s = time.perf_counter() - started
    started = time.perf_counter()
    found = clusters.cluster(embeddings, "auto", min_cluster_size=5, seed=0)
    cluster_s = time.perf_counter() - started
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    figures = {"prompts": len(prompts), "tokens": tokens, "read_s": read_s, "embed_s": embed_s,
               "prompts_per_s": len(prompts) / embed_s, "tokens_per_s": tokens / embed_s, "cluster_s": cluster_s,
               "k": found.k, "peak_rss_gb": peak_gb}
    print(f"{len(prompts)} prompts ({tokens} tokens in the chat template): read and scrubbed in {read_s:.1f} s; "
          f"embedded in {embed_s:.0f} s ({figures['prompts_per_s']:.1f} prompts/s, {figures['tokens_per_s']:.0f} "
          f"tokens/s, block {lm.model.config.num_hidden_layers // 2} of {lm.model.config.num_hidden_layers}); "
          f"clustered in {cluster_s:.0f} s (auto: k = {found.k}); peak RSS {peak_gb:.2f} GB")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
