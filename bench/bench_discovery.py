"""Benchmark: edge-level circuit discovery (helpers.methods.edges, helpers.analyses.discovery).

1. Cost at gpt2-small size: the gpt2-small architecture and a Llama architecture of the same size (random weights,
   batch 8 of 20 random-word tokens, as ``bench_patching``). Scoring every edge (EAP; EAP-IG with 5 steps) and the
   exact evaluation of one curve point (the circuit and 10 random circuits in one batched call) are given in
   forward-pass equivalents: their time over one plain no-grad forward of the same batch (medians of repeats).
2. Quality on the bundled models: faithfulness curves with CPR/CMD for EAP, EAP-IG and random circuits, the
   smallest circuit reaching faithfulness 0.8 with its controls, Spearman of the scores against exact single-edge
   patching (toy-ioi, ioi task; toy-ioi-llama, ioi_llama), the K-composition edges found on toy-induction (induction
   as a patching task), and precision / recall / ROC AUC on the planted-circuit model (``helpers.toys.planted``).

Usage: ``make bench-discovery`` or ``python bench/bench_discovery.py [--threads N] [--quick]``; writes
``bench/discovery.json`` and ``bench/discovery.md``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from bench_patching import RANDOM_MODELS, random_prompts, timed, write_outputs  # noqa: E402

from helpers import MODELS_DIR  # noqa: E402
from helpers.analyses import discovery as D  # noqa: E402
from helpers.analyses.pattern_scores import induction_task  # noqa: E402
from helpers.methods import edges as E  # noqa: E402
from helpers.methods import scoring as S  # noqa: E402
from helpers.task.models import load_model, set_threads  # noqa: E402
from helpers.task.params import load_params  # noqa: E402
from helpers.task.prompts import PromptPair, make_prompts  # noqa: E402
from helpers.toys.planted import PLANTED_EDGES, build_planted_model, planted_task  # noqa: E402

ACDC_THRESHOLDS = (0.003, 0.01, 0.03, 0.1)


def cost(model, label: str, repeats: int, n_random: int = 10) -> dict:
    """Seconds and forward-pass equivalents of edge scoring and of one exact curve point."""
    clean, corrupted, answers = random_prompts(model, 8, 20)
    ectx = E.edge_context(model, PromptPair.denoising(clean, corrupted, answers))
    g = ectx.graph
    scores = E.edge_scores(ectx, "eap")
    masks = torch.cat(
        [D.top_edges(g, scores, g.n_edges // 20)[None], D.random_edge_masks(g, g.n_edges // 20, n_random, torch.Generator().manual_seed(0))]
    )

    def forward():
        with torch.no_grad():
            return model(clean)

    forward()
    runs = {
        "forward": forward,
        "eap": lambda: E.edge_scores(ectx, "eap"),
        "eap-ig": lambda: E.edge_scores(ectx, "eap-ig", 5),
        "curve point": lambda: E.evaluate_masks(ectx, masks),
    }
    times = {name: statistics.median(timed(fn, "cpu")[1] for _ in range(repeats)) for name, fn in runs.items()}
    row = {"model": label, "edges": g.n_edges, "forward_s": round(times["forward"], 4)}
    for name in ("eap", "eap-ig", "curve point"):
        row[f"{name}_s"] = round(times[name], 4)
        row[f"{name}_forward_equivalents"] = round(times[name] / times["forward"], 2)
    row["curve point_variants"] = len(masks)
    print(f"[{label}] {row}", flush=True)
    return row


def quality(label: str, ectx: E.EdgeContext, target: float, single_edges: bool, known: list[str] | None = None) -> dict:
    """Curves, smallest circuit and (optionally) agreement with exact single-edge patching / a known circuit."""
    g = ectx.graph
    out: dict = {"task": label, "edges": g.n_edges, "heads": sum(s.kind == "head" for s in g.senders), "methods": {}}
    exact = None
    if single_edges:
        t0 = time.perf_counter()
        exact = S.single_edge_effects(ectx, progress=False)
        out["single_edges_s"] = round(time.perf_counter() - t0, 2)
    index = g.edge_index
    for method in E.GRADIENT_METHODS:
        t0 = time.perf_counter()
        scores = E.edge_scores(ectx, method)
        score_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        curve = D.faithfulness_curve(ectx, scores, method, n_random=10, progress=False)
        curve_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        found = D.smallest_circuit(ectx, scores, method, target, n_random=20)
        found_s = time.perf_counter() - t0
        row = {
            "cpr": round(curve.cpr, 4),
            "cmd": round(curve.cmd, 4),
            "random_cpr": round(curve.random_cpr, 4),
            "random_cmd": round(curve.random_cmd, 4),
            "score_s": round(score_s, 3),
            "curve_s": round(curve_s, 2),
            "curve_points": len(curve.points),
            "smallest_s": round(found_s, 2),
            "smallest": found.message(),
            "smallest_edges": len(found.circuit.edges),
            "smallest_heads": len(found.circuit.heads),
            "smallest_faithfulness": round(found.circuit.faithfulness, 4),
            "random_edges_mean": round(statistics.mean(found.random_edges), 4) if found.random_edges else None,
            "core_heads": found.core_heads,
            "core_faithfulness": round(found.core_faithfulness, 4),
            "random_core_mean": round(statistics.mean(found.random_core), 4) if found.random_core else None,
            "random_core_max": round(max(found.random_core), 4) if found.random_core else None,
        }
        if exact is not None:
            row["spearman_vs_exact"] = round(float(spearmanr(exact[index[:, 0], index[:, 1]], scores[index[:, 0], index[:, 1]])[0]), 4)
        if known:
            rec = D.recovery(g, scores, found.circuit.edges, known)
            row.update(precision=rec.precision, recall=rec.recall, auc=round(rec.auc, 4))
        if label.startswith("toy-induction"):
            names = g.edge_names()
            ranked = sorted(range(len(names)), key=lambda i: -abs(float(scores[index[i, 0], index[i, 1]])))
            k_comp = [n for n in names if n.startswith("L0H0->L1H") and n.endswith(".k")]
            row["k_composition_in_circuit"] = [e for e in found.circuit.edges if e in k_comp]
            row["k_composition_ranks"] = {n: ranked.index(names.index(n)) + 1 for n in k_comp}
        out["methods"][method] = row
        print(f"[{label}] {method}: {row}", flush=True)
    t0 = time.perf_counter()
    curve, circuits = D.acdc_curve(ectx, ACDC_THRESHOLDS, n_random=10, progress=False)
    points = []
    for threshold, circuit, point in zip(sorted(ACDC_THRESHOLDS, reverse=True), circuits, curve.points):
        row = {
            "threshold": threshold,
            "edges": len(circuit.edges),
            "heads": len(circuit.heads),
            "faithfulness": round(circuit.faithfulness, 4),
            "random_mean": round(point.random_mean, 4),
        }
        if known:
            found = set(circuit.edges) & set(known)
            row.update(precision=len(found) / max(len(circuit.edges), 1), recall=len(found) / len(known))
        points.append(row)
    out["acdc"] = {"cpr": round(curve.cpr, 4), "cmd": round(curve.cmd, 4), "seconds": round(time.perf_counter() - t0, 1), "points": points}
    print(f"[{label}] acdc: {out['acdc']}", flush=True)
    return out


def markdown(results: dict) -> str:
    lines = [
        f"# Circuit discovery benchmark\n\n{results['machine']}; torch {results['torch']}, {results['threads']} threads.\n",
        "## Cost (batch 8 × 20 tokens, random weights)\n",
        "Forward-pass equivalents: time over one plain no-grad forward of the same batch (medians). A curve point is "
        "one batched exact evaluation of the circuit and 10 random circuits.\n",
        "| model | edges | forward | EAP | EAP-IG (5 steps) | curve point (11 circuits) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["cost"]:
        lines.append(
            f"| {r['model']} | {r['edges']} | {r['forward_s']:.3f} s | {r['eap_s']:.2f} s = {r['eap_forward_equivalents']} | "
            f"{r['eap-ig_s']:.2f} s = {r['eap-ig_forward_equivalents']} | {r['curve point_s']:.2f} s = "
            f"{r['curve point_forward_equivalents']} |"
        )
    lines += [
        "\n## Quality on the bundled models (target faithfulness 0.8)\n",
        "| task | method | CPR ↑ | CMD ↓ | random CPR / CMD | Spearman vs exact | smallest circuit | core heads (faithfulness; random same-size mean / max) | known circuit: precision / recall / AUC |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for q in results["quality"]:
        for m, r in q["methods"].items():
            known = f"{r['precision']:.2f} / {r['recall']:.2f} / {r['auc']:.3f}" if "precision" in r else ""
            if "k_composition_in_circuit" in r:
                known = f"K-composition edges in the circuit: {', '.join(r['k_composition_in_circuit']) or 'none'} (ranks {r['k_composition_ranks']})"
            lines.append(
                f"| {q['task']} ({q['edges']} edges, {q['heads']} heads) | {m} | {r['cpr']:.3f} | {r['cmd']:.3f} | "
                f"{r['random_cpr']:.3f} / {r['random_cmd']:.3f} | {r.get('spearman_vs_exact', '')} | "
                f"{r['smallest_edges']} edges, {r['smallest_heads']} heads, {r['smallest_faithfulness']:.3f} (random edges {r['random_edges_mean']}) | "
                f"{', '.join(r['core_heads'])} ({r['core_faithfulness']:.3f}; {r['random_core_mean']} / {r['random_core_max']}) | {known} |"
            )
    lines += [
        "\n## ACDC (exact greedy pass, one evaluation per edge in sequence)\n",
        "| task | CPR ↑ | CMD ↓ | threshold: edges, heads, faithfulness (random same-size mean) | time |",
        "|---|---|---|---|---|",
    ]
    for q in results["quality"]:
        a = q["acdc"]
        pts = "; ".join(
            f"{p['threshold']}: {p['edges']} edges, {p['heads']} heads, {p['faithfulness']:.3f} ({p['random_mean']:.3f})"
            + (f", P/R {p['precision']:.2f}/{p['recall']:.2f}" if "precision" in p else "")
            for p in a["points"]
        )
        lines.append(f"| {q['task']} | {a['cpr']:.3f} | {a['cmd']:.3f} | {pts} | {a['seconds']} s |")
    lines += [
        "\nTimings (s): "
        + "; ".join(
            f"{q['task']} {m}: score {r['score_s']}, curve {r['curve_s']} ({r['curve_points']} sizes), smallest {r['smallest_s']}"
            for q in results["quality"]
            for m, r in q["methods"].items()
        )
    ]
    lines += [
        "Single-edge exact patching (s): "
        + "; ".join(f"{q['task']}: {q['single_edges_s']}" for q in results["quality"] if "single_edges_s" in q)
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the bundled toy models only (no gpt2-small-size cost rows)")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for discovery.json and discovery.md")
    args = parser.parse_args()
    set_threads(args.threads)
    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "threads": args.threads,
        "cost": [],
        "quality": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        if not args.quick:
            for label, build in RANDOM_MODELS.items():
                model = build(Path(tmp) / label, "cpu")
                results["cost"].append(cost(model, label, args.repeats))
                del model
        for model_name, task in (("toy-ioi", "ioi"), ("toy-ioi-llama", "ioi_llama")):
            model = load_model(model_name, device="cpu")
            params = load_params(task)
            prompts = make_prompts(params, model.tokenizer, verbose=False, prepend_bos=model.cfg.default_prepend_bos)
            ectx = E.edge_context(model, prompts)
            results["quality"].append(quality(f"{model_name} / {task} ({len(prompts.clean_tokens)} prompts)", ectx, 0.8, True))
        model = load_model("toy-induction", device="cpu")
        ectx = E.edge_context(model, PromptPair.denoising(*induction_task(model, 20, 32, seed=0)))
        results["quality"].append(quality("toy-induction / induction (32 prompts)", ectx, 0.8, True))
        from transformers import AutoTokenizer

        planted = load_model(
            str(build_planted_model(AutoTokenizer.from_pretrained(MODELS_DIR / "toy-ioi"), Path(tmp) / "planted")), device="cpu"
        )
        ectx = E.edge_context(planted, PromptPair.denoising(*planted_task(planted, batch=32)))
        results["quality"].append(quality("planted / word two back (32 prompts)", ectx, 0.95, True, list(PLANTED_EDGES)))
    write_outputs(args.out, "discovery", results, markdown(results))


if __name__ == "__main__":
    main()
