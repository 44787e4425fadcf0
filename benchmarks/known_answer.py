"""A known-answer experiment: PRISM on domains where a program can check what the persona does.

The embedded 135M model follows one persona measurably: a terse expert persona shortens its answers. So the
experiment has two domains where that persona helps by the domain's verifier (max-words: an answer of at most
25 words passes) and one control domain where the same persona hurts by its own verifier (min-words: the
domain asks for explanations of at least 80 words). From the domain names and personas alone, it runs the whole
method with the verifier judge (queries, answers, verify, gate, distill), then answers held-out queries of each
domain with base, persona, lora and prism and scores them by the same verifiers. If PRISM works, lora beats
base on the helped domains and the gate sends little of the control domain to the adapter.

    .venv/bin/python benchmarks/known_answer.py [--quick] [--real] [--out runs/known-answer] [--json FILE]
        [--routing binary|kway] [--queries N] [--heldout N] [--answer-tokens N] [--epochs N] [--seed S]
        [--examples] [--label-samples K]

With --real the domains are made of real prompts from the shipped benchmark files instead of generated ones:
ARC questions asked as open questions (the terse persona helps by max-words:25) and MT-Bench's writing, roleplay
and humanities prompts (it hurts by min-words:80); the bootstrap's queries and the held-out ones are disjoint.
Every table has an `oracle` row (each domain on the better of base and lora), and the headline says PRISM's mean
pass rate as a share of the oracle's; the report also gives the share of MMLU, ARC (multiple choice) and JBB
prompts the gate sends to the adapter.

A verifier is not a judge of quality: the adapter is rewarded for brevity, not for better answers.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prism import bootstrap, resolve_config
from prism.config import GATE_CLASSIFIERS
from prism.errors import PrismError
from prism.evaluation.config import EvalConfig
from prism.evaluation.runner import evaluate
from prism.evaluation.stats import paired_accuracy_test
from prism.library_warnings import silence_library_warnings
from prism.runs import RunDir

TERSE = "You are a terse expert. You answer in one short sentence of at most 15 words."


@dataclass(frozen=True)
class Domain:
    name: str
    persona: str
    verifier: str
    helped: bool  # whether the persona is expected to help by this domain's verifier
    examples: tuple[str, ...] = ()  # a few queries of the domain, shown to the query writer with --examples


DOMAINS = (
    Domain("quick one-line facts", TERSE, "max-words:25", helped=True, examples=(
        "What is the capital of Japan?", "Who painted the Mona Lisa?", "How many legs does a spider have?",
        "At what temperature does water boil in Celsius?", "Which planet is closest to the Sun?",
        "In what year did the Second World War end?")),
    Domain("short definitions of words", TERSE, "max-words:25", helped=True, examples=(
        "What does the word 'ephemeral' mean?", "Define 'ubiquitous'.", "What is the meaning of 'candid'?",
        "What does 'meticulous' mean?", "Give a short definition of 'resilient'.",
        "What does the word 'frugal' mean?")),
    Domain("in-depth explanations", TERSE, "min-words:80", helped=False, examples=(  # the control
        "Explain in detail how the immune system fights a viral infection.",
        "Can you explain thoroughly how inflation affects an economy?",
        "Explain step by step how a computer runs a program.",
        "Give a detailed explanation of how photosynthesis works.", "Explain in depth why the Roman Empire declined.",
        "Describe in detail how new vaccines are developed and tested.")),
)
SIZES = {"quick": {"queries": 8, "heldout": 8}, "demo": {"queries": 16, "heldout": 12},
         "full": {"queries": 24, "heldout": 24}}
REAL_DOMAINS = (
    Domain("science questions", TERSE, "max-words:25", helped=True),
    Domain("writing, roleplay and humanities", TERSE, "min-words:80", helped=False),
)
MTBENCH_CATEGORIES = ("writing", "roleplay", "humanities")
ROUTED_SHARE_PROMPTS = 100  # MMLU, ARC and JBB prompts the gate is asked about


def real_prompts(seed: int, queries: int, heldout: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Bootstrap and held-out prompts of REAL_DOMAINS, disjoint, shuffled by `seed`: ARC-Easy and ARC-Challenge
    question stems (no options), and the first turns of MT-Bench's writing, roleplay and humanities questions
    (30 in all: split in half when fewer than asked)."""
    import random

    from prism.config import default_data_dir
    from prism.evaluation.data import load_arc, load_mtbench

    data = default_data_dir()
    science = [i["question"] for split in ("easy", "challenge") for i in load_arc(data, split=split)]
    writing = [q["turns"][0] for q in load_mtbench(data)["questions"] if q["category"] in MTBENCH_CATEGORIES]
    train, test = [], []
    for domain, pool in zip(REAL_DOMAINS, (science, writing)):
        random.Random(seed).shuffle(pool)
        n_train = min(queries, len(pool) // 2)
        n_test = min(heldout, len(pool) - n_train)
        train += [{"domain": domain.name, "query": q} for q in pool[:n_train]]
        test += [{"domain": domain.name, "query": q} for q in pool[n_train:n_train + n_test]]
    return train, test


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_experiment(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    domains = REAL_DOMAINS if args.real else DOMAINS
    personas = out / "personas.yaml"
    personas.write_text(yaml.safe_dump({d.name: d.persona for d in domains}, sort_keys=False))
    examples = {d.name: list(d.examples) for d in domains} if args.examples else {}
    real: dict[str, Any] = {}
    if args.real:
        train, test = real_prompts(args.seed, args.queries, args.heldout)
        real = {"queries_file": str(write_jsonl(out / "bootstrap_prompts.jsonl", train))}
        heldout = {"data": {"verified": str(write_jsonl(out / "heldout_prompts.jsonl", test))}}
    else:
        heldout = {"limit": {"verified": args.heldout}}
    config = resolve_config(model=args.model, personas_file=str(personas), domains=[d.name for d in domains],
                            preset="tiny", queries_per_persona=args.queries, answer_max_tokens=args.answer_tokens,
                            distill_epochs=args.epochs, judge="verifier",
                            verifiers={d.name: d.verifier for d in domains}, routing=args.routing,
                            kway_min_wins=args.kway_min_wins, seed=args.seed, device="cpu",
                            domain_examples=examples, label_samples=args.label_samples, gate_layer=args.gate_layer,
                            gate_pool=args.gate_pool, gate_classifier=args.gate_classifier, **real)
    started = time.perf_counter()
    summary = bootstrap(config, out / "run")
    bootstrap_seconds = time.perf_counter() - started
    systems = ["base", "persona", "lora", "prism", *(["kway", "kway-lora"] if args.routing == "kway" else [])]
    started = time.perf_counter()
    results = evaluate(out / "run", EvalConfig(benches=["verified"], systems=systems, **heldout), device="cpu")
    eval_seconds = time.perf_counter() - started
    report = collect(out / "run", domains, summary, results, systems, bootstrap_seconds, eval_seconds)
    report["routed_shares"] = benchmark_routed_shares(out / "run", args.seed)
    return report


def benchmark_routed_shares(run: Path, seed: int) -> dict[str, float]:
    """The share of MMLU, ARC (multiple choice, as `prism eval` asks them) and JBB prompts the run's gate sends to
    the adapter: where the persona should not answer knowledge questions, and where a safety persona may."""
    import random

    from prism.config import default_data_dir
    from prism.evaluation.data import load_arc, load_jbb, load_mmlu
    from prism.evaluation.knowledge import choice_prompt
    from prism.inference.router import Router

    data = default_data_dir()
    prompts = {"mmlu": [choice_prompt(i["question"], i["choices"]) for i in load_mmlu(data)],
               "arc": [choice_prompt(i["question"], i["choices"]) for i in load_arc(data, split="challenge")],
               "jbb harmful": [i["goal"] for i in load_jbb(data) if i["kind"] == "harmful"]}
    router = Router.from_run(run, device="cpu")
    shares = {}
    for name, texts in prompts.items():
        chosen = random.Random(seed).sample(texts, min(ROUTED_SHARE_PROMPTS, len(texts)))
        decisions = router.decide([[{"role": "user", "content": t}] for t in chosen])
        shares[name] = sum(d.route != "base" for d in decisions) / len(decisions)
    return shares


def paired_gain(run: Path, system: str, domains: list[str]) -> dict[str, Any] | None:
    """`system` against base on the same held-out queries of `domains`: pass-rate difference, its paired bootstrap
    interval and McNemar's p."""
    covered = set(json.loads((run / "eval" / "eval_config.json").read_text())["items"]["verified"])
    scores = [r for r in RunDir(run / "eval").read("verified_scores") if r["item"] in covered]

    def by_item(name: str) -> dict[str, float]:
        return {r["item"]: r["score"] for r in scores if r["system"] == name and r["domain"] in domains}

    base, mine = by_item("base"), by_item(system)
    shared = sorted(set(base) & set(mine))
    if not shared:
        return None
    return paired_accuracy_test([mine[i] == 1.0 for i in shared], [base[i] == 1.0 for i in shared])


def oracle_headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each domain on the better of base and lora (the oracle a router that knew each domain would reach); PRISM's
    mean pass rate over domains as a share of the oracle's, and beside base, persona and lora."""
    def mean(system: str) -> float | None:
        rates = [r["pass_rate"].get(system) for r in rows]
        return None if any(v is None for v in rates) else sum(rates) / len(rates)

    for row in rows:
        rates = [row["pass_rate"].get(s) for s in ("base", "lora") if row["pass_rate"].get(s) is not None]
        row["pass_rate"]["oracle"] = max(rates) if rates else None
        prism = row["pass_rate"].get("prism")
        row["prism_below_oracle"] = None if prism is None or not rates else max(rates) - prism
    means = {s: mean(s) for s in ("base", "persona", "lora", "prism", "oracle")}
    oracle, prism = means["oracle"], means["prism"]
    return {"mean_pass_rate": means,
            "prism_share_of_oracle": prism / oracle if prism is not None and oracle else None,
            "largest_domain_gap_to_oracle": max((r["prism_below_oracle"] for r in rows
                                                 if r["prism_below_oracle"] is not None), default=None)}


def collect(run: Path, domains: tuple[Domain, ...], summary: dict[str, Any], results: dict[str, Any],
            systems: list[str], bootstrap_seconds: float, eval_seconds: float) -> dict[str, Any]:
    gate = summary["gate"]
    rows = []
    for domain in domains:
        # a run whose persona never won has no adapter: the eval then has no lora row, and prism is base
        entries = {s: ((results.get(s) or {}).get("verified") or {}).get("domains", {}).get(domain.name, {})
                   for s in systems}
        rows.append({"name": domain.name, "helped": domain.helped, "verifier": domain.verifier,
                     "n": entries["base"].get("pass_rate_n"),
                     "pass_rate": {s: entries[s].get("pass_rate") for s in systems},
                     "pass_rate_ci": {s: entries[s].get("pass_rate_ci") for s in systems},
                     "routed_share": entries["prism"].get("routing_rate"),
                     **({"kway_routed_share": entries["kway"].get("routing_rate"),
                         "kway_routing_shares": entries["kway"].get("routing_shares")} if "kway" in systems else {}),
                     "bootstrap_pass_rate": (summary["verify"].get("domains") or {}).get(domain.name)})
    helped = [d.name for d in domains if d.helped]
    control = [d.name for d in domains if not d.helped]
    routed_control = [r["routed_share"] for r in rows if not r["helped"] and r["routed_share"] is not None]
    report = {
        "model": summary["model"], "domains": rows,
        "gate": {"heldout_accuracy": gate.get("heldout_accuracy"),
                 "balanced_accuracy": gate.get("heldout_balanced_accuracy"),
                 "majority_baseline": gate.get("majority_baseline"), "heldout_method": gate.get("heldout_method"),
                 "train_accuracy": gate.get("train_accuracy"), "kind": gate.get("kind"),
                 "auroc": gate.get("heldout_auroc"), "intervals": gate.get("heldout_intervals"),
                 "domain_rate_auroc": (gate.get("targets") or {}).get("domain_rate_auroc"),
                 "classifier": gate.get("classifier"), "threshold": gate.get("threshold")},
        "distill_examples": summary["counts"]["distill"], "queries": summary["counts"]["queries"],
        "domain_separability": summary.get("domain_separability"), "labels": summary.get("labels"),
        "distill": summary.get("distill"),
        "headline": {"lora_vs_base_helped": paired_gain(run, "lora", helped),
                     "prism_vs_base_helped": paired_gain(run, "prism", helped),
                     "prism_vs_base_control": paired_gain(run, "prism", control),
                     "prism_routed_share_control": sum(routed_control) / len(routed_control) if routed_control
                     else None, **oracle_headline(rows)},
        "seconds": {"bootstrap": round(bootstrap_seconds, 1), "eval": round(eval_seconds, 1)},
    }
    if "kway" in summary:
        kway = summary["kway"]
        report["kway"] = {"classes": kway["classes"], "merged_into_base": kway["merged_into_base"],
                          "gate": kway["gate"], "adapters": kway["adapters"],
                          "kway_vs_base_helped": paired_gain(run, "kway", helped)}
    return report


def _percent(value: float | None, interval: list[float] | None = None) -> str:
    if value is None:
        return "–"
    text = f"{100 * value:.0f}%"
    return text + (f" [{100 * interval[0]:.0f}, {100 * interval[1]:.0f}]" if interval else "")


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _gain(paired: dict[str, Any] | None) -> str:
    if not paired:
        return "n/a"
    low, high = paired["delta_ci"]
    return (f"{100 * paired['delta']:+.1f} points [{100 * low:+.1f}, {100 * high:+.1f}], McNemar "
            f"p={paired['p_value']:.3f} over {paired['items']} paired queries")


def format_report(report: dict[str, Any]) -> str:
    systems = list(report["domains"][0]["pass_rate"])
    header = f"{'domain':<28} {'helped':>6} {'n':>3}  " + "  ".join(f"{s:>15}" for s in systems) + "  prism routed"
    lines = [f"known-answer experiment on {report['model']}: verifier pass rates on held-out queries (95% CI)", header]
    for row in report["domains"]:
        cells = [_percent(row["pass_rate"][s], row["pass_rate_ci"].get(s)) for s in systems]
        lines.append(f"{row['name']:<28} {'yes' if row['helped'] else 'no':>6} {row['n'] or 0:>3}  "
                     + "  ".join(f"{c:>15}" for c in cells) + f"  {_percent(row['routed_share']):>12}")
    gate = report["gate"]
    lines.append(f"gate: held-out accuracy {_number(gate['heldout_accuracy'])} ({gate['heldout_method']}), balanced "
                 f"{_number(gate['balanced_accuracy'])}, majority-class baseline {_number(gate['majority_baseline'])}; "
                 f"distill examples {report['distill_examples']} of {report['queries']} queries")
    separability = report.get("domain_separability") or {}
    if separability.get("accuracy") is not None:
        lines.append(f"domain separability (probe on the gate's feature, out-of-fold): {separability['accuracy']:.3f}, "
                     f"chance {separability['chance']:.3f}")
    labels = report.get("labels") or {}
    if labels.get("reliability"):
        lines.append(f"labels: {labels['label_samples']} answer pairs per query, split-half agreement "
                     f"{labels['reliability']['split_half_agreement']:.3f}")
    if (report["distill"] or {}).get("skipped"):
        lines.append(f"distill skipped: {report['distill']['skipped']} (no adapter: lora is missing and prism is base)")
    if "kway" in report:
        kway = report["kway"]
        recall = ", ".join(f"{k} {v:.2f}" for k, v in (kway["gate"].get("heldout_recall") or {}).items())
        lines.append(f"k-way: classes {', '.join(kway['classes'])}; held-out recall {recall or 'n/a'}; kway vs base on "
                     f"the helped domains {_gain(kway['kway_vs_base_helped'])}")
        for row in report["domains"]:
            shares = ", ".join(f"{k} {_percent(v)}" for k, v in (row.get("kway_routing_shares") or {}).items())
            lines.append(f"k-way routes {row['name']}: {shares or 'n/a'}")
    if gate.get("auroc") is not None:
        intervals = gate.get("intervals") or {}
        auroc_interval = intervals.get("auroc") or [gate["auroc"], gate["auroc"]]
        threshold = gate.get("threshold") or {}
        lines.append(f"gate: {(gate.get('classifier') or {}).get('chosen')} chosen by cross-validation; out-of-fold "
                     f"AUROC {gate['auroc']:.3f} [{auroc_interval[0]:.3f}, {auroc_interval[1]:.3f}]; threshold "
                     f"{threshold.get('threshold', 0.5):.3f} ({threshold.get('chosen_by', 'default')})"
                     + (f"; AUROC of each query's domain rate alone {gate['domain_rate_auroc']:.3f}"
                        if gate.get("domain_rate_auroc") is not None else ""))
    if report.get("routed_shares"):
        lines.append("routed to the adapter by the gate: " + ", ".join(
            f"{name} {_percent(share)}" for name, share in report["routed_shares"].items()))
    head = report["headline"]
    lines.append(f"headline: lora vs base on the helped domains {_gain(head['lora_vs_base_helped'])}; prism routes "
                 f"{_percent(head['prism_routed_share_control'])} of the control domain to the adapter")
    means = head["mean_pass_rate"]
    if head.get("prism_share_of_oracle") is not None:
        share = head["prism_share_of_oracle"]
        lines.append(f"headline: prism's mean pass rate {_percent(means['prism'])} is {share:.2f} "
                     f"of the oracle's {_percent(means['oracle'])} (base {_percent(means['base'])}, persona everywhere "
                     f"{_percent(means['persona'])}, lora {_percent(means['lora'])}); the largest gap to the oracle on "
                     f"a domain: {100 * head['largest_domain_gap_to_oracle']:.0f} points")
    return "\n".join(lines)


def what_it_shows(report: dict[str, Any], run: Path) -> str:
    """One line, from the measured numbers alone: did PRISM keep the persona where it helps and leave it where it
    does not, on prompts it never saw."""
    head, rows = report["headline"], report["domains"]
    routed = ", ".join(f"{_percent(r['routed_share'])} of {r['name']} ({'helped' if r['helped'] else 'not helped'})"
                       for r in rows)
    share = head.get("prism_share_of_oracle")
    if share is None:
        return f"what it shows: no adapter was trained, so PRISM is the base model here (see above); run: {run}"
    verdict = ("PRISM answers held-out prompts about as well as a router that knew each prompt's domain"
               if share >= 0.9 else "PRISM's gate loses part of what knowing each prompt's domain would give")
    return (f"what it shows: {verdict} ({share:.2f} of the oracle's mean pass rate; the gate sent {routed} to the "
            f"adapter). Chat with the run: .venv/bin/prism chat {run}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 bootstrap and 8 held-out queries per domain")
    parser.add_argument("--demo", action="store_true", help="`make demo`: --real with 16 bootstrap and 12 held-out "
                        "prompts per domain, and a closing line that says what the table shows")
    parser.add_argument("--real", action="store_true", help="domains of real benchmark prompts (ARC questions, "
                        "MT-Bench writing/roleplay/humanities) instead of generated queries")
    parser.add_argument("--gate-layer", type=int, help="the decoder block the gate reads (default: the bootstrap's)")
    parser.add_argument("--gate-pool", choices=("mean", "last"), default="mean", help="the gate's pooling")
    parser.add_argument("--gate-classifier", choices=GATE_CLASSIFIERS, default="auto")
    parser.add_argument("--out", default="runs/known-answer", help="where the run and its eval go (resumed)")
    parser.add_argument("--json", help="also write the report as JSON to this file")
    parser.add_argument("--routing", choices=("binary", "kway"), default="binary")
    parser.add_argument("--queries", type=int, help="bootstrap queries per domain (quick 8, full 24)")
    parser.add_argument("--heldout", type=int, help="held-out queries per domain (quick 8, full 24)")
    parser.add_argument("--answer-tokens", type=int, default=128, help="answer length cap (bootstrap and eval)")
    parser.add_argument("--epochs", type=int, default=10, help="distillation epochs (the paper's 10)")
    parser.add_argument("--kway-min-wins", type=int, default=2,
                        help="with --routing kway: wins a domain needs for its own adapter (the bootstrap's default is "
                        "4, more than a quick run's 8 queries per domain give)")
    parser.add_argument("--examples", action="store_true", help="give each domain a few example queries (shown to the "
                        "query writer few-shot, never used as queries)")
    parser.add_argument("--label-samples", type=int, default=1, help="K answer pairs per query (the label's win rate)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="embedded")
    args = parser.parse_args()
    args.real = args.real or args.demo
    sizes = SIZES["quick" if args.quick else "demo" if args.demo else "full"]
    args.queries = args.queries or sizes["queries"]
    args.heldout = args.heldout or sizes["heldout"]
    silence_library_warnings()
    logging.basicConfig(level=logging.INFO, format="prism: %(message)s")
    try:
        report = run_experiment(args)
    except PrismError as exc:
        raise SystemExit(f"known_answer: error: {exc}") from None
    print(format_report(report))
    if args.demo:
        print(what_it_shows(report, Path(args.out) / "run"))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
