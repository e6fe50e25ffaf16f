"""Benchmark: TransformerLens ``patching`` sweeps against ours, in one process, interleaved repeats.

Models: the gpt2-small architecture with random weights (built from ``GPT2Config()``, no download; saved to
a temporary folder and loaded through the same bridge path as every model), a Llama architecture of the same
size (RoPE, RMSNorm, SwiGLU, grouped-query attention) and the bundled ``toy-ioi``.
Prompts: batch 8 of 20 random-word tokens; the corrupted batch differs at 3 positions. For each sweep and
repeat, TransformerLens and ours run back to back (the order alternates per repeat); we report medians,
the ratio, the peak extra memory of each, and the max |difference| between the two results.

Against the physical limit: for each sweep, the minimal FLOPs the exact algorithm needs (``helpers.engine.flops``: the
live variants' runs from their layer and first patched position, the last block's query and MLP at the final
position only, and its unembedding into the two answer columns the logit difference reads), our achieved FLOP/s, and that as a fraction of this machine's dense
matmul throughput measured in the same run (``torch.matmul`` of the model's projection shapes at the token
counts of one to sixteen variants; the best of them is the limit).

TransformerLens runs one forward pass per cell. Sweeps with more cells than ``--tl-max-cells`` time TL on a
random subset of cells (its own ``index_df`` option) and scale the time by cells / subset; the row says so.

Attribution patching: time of ``attribution_patch`` over all heads × positions, in forward-pass
equivalents (one no-grad forward of the same batch), and Spearman correlations against the exact sweeps
on the ``ioi`` task prompts of toy-ioi.

Usage: ``make bench`` or ``python bench/bench_patching.py [--device cuda] [--quick]``; writes
``bench/results.json`` and ``bench/results.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path

import torch

from helpers import MODELS_DIR
from helpers.analyses.pattern_scores import random_word_ids
from helpers.engine import flops as F
from helpers.methods import attribution_patching as A
from helpers.methods import patching as P
from helpers.task.models import load_model, set_threads
from helpers.task.params import load_params
from helpers.task.prompts import PromptPair, make_prompts
from helpers.task.real_models import REAL_MODELS

HERE = Path(__file__).parent
SWEEPS = ["resid_pre", "attn_out", "mlp_out", "head_out", "head_v", "head_pattern", "head_out_by_pos", "head_pattern_dest_src"]
LARGE_MODEL_SWEEPS = ["resid_pre", "attn_out", "mlp_out", "head_out", "head_v", "head_out_by_pos"]  # TL is ~0.5 s a cell on 2 cores
HEAVY_CELLS = 1000  # sweeps with more cells than this run one repeat (ours takes minutes on gpt2-small, CPU)
QUICK_SWEEPS = ["resid_pre", "head_out"]


class PeakMemory:
    """Peak memory above the starting point while the block runs: CUDA allocator stats, or sampled CPU RSS."""

    def __init__(self, device: str):
        self.device = device
        self.peak_mb = 0.0

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.start, self.peak, self.running = self.rss_mb(), self.rss_mb(), True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.rss_mb())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        else:
            self.running = False
            self.thread.join()
            self.peak_mb = self.peak - self.start


def timed(fn, device: str):
    """(result, seconds, peak extra MB) of ``fn()``."""
    with PeakMemory(device) as mem:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return out, seconds, mem.peak_mb


def random_gpt2_small(folder: Path, device: str):
    """gpt2-small architecture, random weights (seed 0), with the bundled tokenizer, loaded through the bridge."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    AutoTokenizer.from_pretrained(MODELS_DIR / "toy-ioi").save_pretrained(folder)
    return load_model(str(folder), device=device)


def random_llama_small(folder: Path, device: str):
    """A Llama architecture of gpt2-small's size (12 layers, d_model 768, 12 heads with 4 key/value groups, SwiGLU
    d_mlp 2048, RoPE, RMSNorm), random weights, with the bundled tokenizer, loaded through the bridge."""
    from transformers import AutoTokenizer

    from helpers.toys.families import build_family_model

    tok = AutoTokenizer.from_pretrained(MODELS_DIR / "toy-ioi")
    build_family_model(
        "llama",
        tok,
        folder,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=2048,
        max_position_embeddings=1024,
    )
    return load_model(str(folder), device=device)


RANDOM_MODELS = {"gpt2-small-random": random_gpt2_small, "llama-small-random": random_llama_small}


def random_prompts(model, batch: int, n_pos: int, seed: int = 0):
    """Clean tokens of random words, corrupted = clean with 3 positions resampled, two answer ids per prompt."""
    gen = torch.Generator().manual_seed(seed)
    words = torch.tensor(random_word_ids(model.tokenizer))
    clean = words[torch.randint(len(words), (batch, n_pos), generator=gen)]
    clean[:, 0] = model.tokenizer.bos_token_id
    corrupted = clean.clone()
    for p in torch.randperm(n_pos - 1, generator=gen)[:3] + 1:
        corrupted[:, p] = words[torch.randint(len(words), (batch,), generator=gen)]
    answers = words[torch.randint(len(words), (batch, 2), generator=gen)]
    return clean, corrupted, answers


def tl_sweep(ctx: P.PatchingContext, name: str, shape: torch.Size, max_cells: int, seed: int = 0):
    """TL's result for ``name``: all cells, or a random subset of ``max_cells`` (returns values, cell indices or None)."""
    if shape.numel() <= max_cells:
        return P.tl_reference(ctx, name), None
    flat = torch.randperm(shape.numel(), generator=torch.Generator().manual_seed(seed))[:max_cells]
    cells = torch.stack(torch.unravel_index(flat, shape), 1)
    return P.tl_reference(ctx, name, cells), cells


def sweep_shape(ctx: P.PatchingContext, name: str) -> torch.Size:
    """Result shape of sweep ``name`` (without running it)."""
    spec = P.SWEEPS[name]
    act = ctx.source_cache[spec.hook_name(0)].shape
    return torch.Size([ctx.model.cfg.n_layers, *P.variant_shape(spec, act)])


def matmul_limit(model, batch: int, n_pos: int, device: str, repeats: int = 5) -> dict:
    """This machine's dense matmul throughput (FLOP/s) on the model's projection shapes ([tokens, d_model] @ [d_model, d]
    for d = d_model and d_mlp), at the token counts of 1, 4 and 16 variants of the batch: the best median is the limit."""
    shape = F.ModelShape.of(model.cfg)
    dtype = next(model.parameters()).dtype
    best, measured = 0.0, {}
    for n_var in (1, 4, 16):
        for width in (shape.d_model, shape.d_mlp):
            x = torch.randn(n_var * batch * n_pos, shape.d_model, device=device, dtype=dtype)
            w = torch.randn(shape.d_model, width, device=device, dtype=dtype)
            torch.matmul(x, w)  # warm-up
            times = [timed(lambda x=x, w=w: torch.matmul(x, w), device)[1] for _ in range(repeats)]
            rate = 2 * x.shape[0] * shape.d_model * width / statistics.median(times)
            measured[f"{x.shape[0]}x{shape.d_model}x{width}"] = round(rate / 1e9, 2)
            best = max(best, rate)
    return {"gflops": round(best / 1e9, 2), "shapes_gflops": measured}


def bench_sweeps(model, label: str, sweeps: list[str], repeats: int, max_cells: int, device: str, batch: int, n_pos: int) -> list[dict]:
    """Interleaved repeats of TL vs ours for each sweep; medians, ratio, memory, max |difference|."""
    clean, corrupted, answers = (t.to(device) for t in random_prompts(model, batch, n_pos))
    ctx = P.make_context(model, PromptPair.denoising(clean, corrupted, answers))
    for warm_up in ("head_out", "resid_pre"):  # also verifies each saving once per model and start layer (not timed)
        P.sweep(ctx, warm_up, progress=False)
    limit = matmul_limit(model, batch, n_pos, device)
    print(f"[{label}] dense matmul limit: {limit['gflops']:.1f} GFLOP/s ({limit['shapes_gflops']})", flush=True)
    rows = []
    for name in sweeps:
        shape = sweep_shape(ctx, name)
        n_repeats = repeats if shape.numel() <= HEAVY_CELLS else 1
        tl_times, our_times, tl_mem, our_mem = [], [], [], []
        for r in range(n_repeats):
            for who in ["tl", "ours"] if r % 2 == 0 else ["ours", "tl"]:
                if who == "ours":
                    ours, s, mb = timed(lambda name=name: P.sweep(ctx, name, progress=False), device)
                    our_times.append(s), our_mem.append(mb)
                else:
                    (ref, cells), s, mb = timed(lambda name=name, shape=shape: tl_sweep(ctx, name, shape, max_cells), device)
                    tl_times.append(s), tl_mem.append(mb)
        n_cells = ours.numel()
        scale = 1.0 if cells is None else n_cells / len(cells)
        diff = (ours.cpu() - ref.cpu()).abs().max() if cells is None else (ours.cpu()[tuple(cells.T)] - ref.cpu()).abs().max()
        tl_med, our_med = statistics.median(tl_times) * scale, statistics.median(our_times)
        minimal = P.sweep_flops(ctx, name)
        rows.append(
            {
                "model": label,
                "sweep": name,
                "cells": n_cells,
                "tl_cells_timed": n_cells if cells is None else len(cells),
                "tl_extrapolated": cells is not None,
                "repeats": n_repeats,
                "tl_median_s": round(tl_med, 4),
                "ours_median_s": round(our_med, 4),
                "speedup": round(tl_med / our_med, 2),
                "tl_peak_mb": round(max(tl_mem), 1),
                "ours_peak_mb": round(max(our_mem), 1),
                "max_abs_diff": float(diff),
                "minimal_gflop": round(minimal / 1e9, 3),
                "ours_gflops": round(minimal / our_med / 1e9, 2),
                "matmul_gflops": limit["gflops"],
                "fraction_of_matmul": round(minimal / our_med / 1e9 / limit["gflops"], 3),
                "matmul_shapes_gflops": limit["shapes_gflops"],
            }
        )
        print(
            f"[{label}] {name}: TL {tl_med:.2f}s{' (extrapolated)' if cells is not None else ''}, ours {our_med:.3f}s, "
            f"{tl_med / our_med:.1f}x, {minimal / 1e9:.2f} GFLOP at {minimal / our_med / 1e9:.1f} GFLOP/s "
            f"({minimal / our_med / 1e9 / limit['gflops']:.0%} of matmul), max|diff| {float(diff):.1e}",
            flush=True,
        )
    return rows


def bench_attribution(model, label: str, device: str, batch: int, n_pos: int, repeats: int) -> dict:
    """Attribution patching over all heads × positions, in forward-pass equivalents (medians over repeats)."""
    clean, corrupted, answers = (t.to(device) for t in random_prompts(model, batch, n_pos))

    def forward():
        with torch.no_grad():
            return model(corrupted)

    forward()  # warm-up
    attr, fwd = [], []
    for _ in range(repeats):
        attr.append(
            timed(lambda: A.attribution_patch(model, PromptPair.denoising(clean, corrupted, answers), ["head_out_by_pos"]), device)[1]
        )
        fwd.append(timed(forward, device)[1])
    a, f = statistics.median(attr), statistics.median(fwd)
    print(f"[{label}] attribution (heads x positions): {a:.3f}s = {a / f:.2f} forward passes", flush=True)
    return {"model": label, "attribution_s": round(a, 4), "forward_s": round(f, 4), "forward_equivalents": round(a / f, 2)}


def attribution_agreement(model, n_prompts: int, ig_steps: int) -> dict:
    """Spearman of attribution (plain and IG) against exact patching, ioi task prompts on this model."""
    prompts = make_prompts(load_params("ioi", n_prompts=n_prompts), model.tokenizer, verbose=False)
    args = (prompts.clean_tokens, prompts.corrupted_tokens, prompts.answer_tokens)
    ctx = P.make_context(model, PromptPair.denoising(*args))
    sweeps = ["head_out", "head_out_by_pos", "resid_pre", "head_v"]
    exact = {s: P.sweep(ctx, s, progress=False) for s in sweeps}
    out = {"n_prompts": n_prompts, "ig_steps": ig_steps}
    for label, steps in [("attribution", 0), ("eap_ig", ig_steps)]:
        est = A.attribution_patch(model, PromptPair.denoising(*args), sweeps, ig_steps=steps).values
        out[label] = {s: round(rho, 4) for s, rho in A.rank_agreement(exact, est).items()}
    print(f"[toy-ioi/ioi] Spearman vs exact: {out}", flush=True)
    return out


def markdown(results: dict) -> str:
    """The results as markdown tables."""
    env = results["environment"]
    lines = [
        "# Patching benchmark: TransformerLens vs circuit-lab",
        "",
        f"{env['device']} ({env['cpu_threads']} torch threads), torch {env['torch']}, transformer-lens {env['transformer_lens']}, "
        f"batch {env['batch']} × {env['n_pos']} tokens, {env['repeats']} interleaved repeats (1 for sweeps over {HEAVY_CELLS} cells), medians; "
        f"on the gpt2-small-size models {env.get('large_repeats', env['repeats'])} repeat(s), TL timed on "
        f"{env.get('large_tl_max_cells', env['tl_max_cells'])} random cells per sweep. "
        "TL times marked 'from N cells' ran N random cells and are scaled to all cells. Peak MB: on CUDA the allocator's peak; "
        "on CPU the growth of the process RSS during the run (freed memory stays with the process, so a later run can show 0). "
        "Generated by `make bench`.",
        *(["", env["note"]] if env.get("note") else []),
        "",
        "Minimal GFLOP: what the exact algorithm needs for the sweep (`helpers.engine.flops`; live variants only). "
        "GFLOP/s: minimal GFLOP / our time. Limit: the best dense `torch.matmul` throughput on the model's projection "
        "shapes, measured in the same run (per model, in the row).",
        "",
        "| model | sweep | cells | TL s | ours s | speed-up | minimal GFLOP | ours GFLOP/s | matmul limit GFLOP/s | of the limit "
        "| TL peak MB | ours peak MB | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["sweeps"]:
        tl = f"{r['tl_median_s']:.2f}" + (f" (from {r['tl_cells_timed']} cells)" if r["tl_extrapolated"] else "")
        peaks = ["—" if r.get(k) is None else f"{r[k]:.0f}" for k in ("tl_peak_mb", "ours_peak_mb")]
        limit = ["—"] * 4
        if "minimal_gflop" in r:
            limit = [f"{r['minimal_gflop']:.3f}", f"{r['ours_gflops']:.1f}", f"{r['matmul_gflops']:.1f}", f"{r['fraction_of_matmul']:.0%}"]
        lines.append(
            f"| {r['model']} | {r['sweep']} | {r['cells']} | {tl} | {r['ours_median_s']:.3f} | **{r['speedup']:.1f}×** | "
            f"{' | '.join(limit)} | {peaks[0]} | {peaks[1]} | {r['max_abs_diff']:.1e} |"
        )
    lines += [
        "",
        "## Attribution patching (all heads × positions)",
        "",
        "| model | attribution s | one forward s | forward equivalents |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {a['model']} | {a['attribution_s']:.3f} | {a['forward_s']:.4f} | {a['forward_equivalents']:.2f} |"
        for a in results["attribution"]
    ]
    agree = results.get("agreement")
    if agree:
        lines += [
            "",
            f"Spearman against exact patching, toy-ioi on `ioi` ({agree['n_prompts']} prompts; EAP-IG with {agree['ig_steps']} steps):",
            "",
            "| estimate | " + " | ".join(agree["attribution"]) + " |",
            "|---|" + "---|" * len(agree["attribution"]),
        ]
        lines += [f"| {k} | " + " | ".join(f"{v:.3f}" for v in agree[k].values()) + " |" for k in ("attribution", "eap_ig")]
    return "\n".join(lines) + "\n"


def rewrite_markdown(folder: Path, stem: str = "results") -> None:
    """Re-render ``<stem>.md`` from ``<stem>.json`` (after a change to the table format)."""
    (folder / f"{stem}.md").write_text(markdown(json.loads((folder / f"{stem}.json").read_text())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n-pos", type=int, default=20)
    parser.add_argument("--tl-max-cells", type=int, default=100, help="time TL on at most this many cells per sweep")
    parser.add_argument("--large-repeats", type=int, default=1, help="repeats on the gpt2-small-size models (minutes a sweep)")
    parser.add_argument("--large-tl-max-cells", type=int, default=50, help="TL cells timed per sweep on the gpt2-small-size models")
    parser.add_argument(
        "--sweeps", nargs="+", choices=sorted(P.SWEEPS), help=f"default: all on toy-ioi, {LARGE_MODEL_SWEEPS} on gpt2-small-random"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=["gpt2-small-random", "llama-small-random", "toy-ioi"],
        help="also the real models (smollm2-135m, gemma3-270m; make real-models first): timed like the gpt2-small-size ones",
    )
    parser.add_argument("--quick", action="store_true", help="toy-ioi, two sweeps, one repeat: checks the script runs")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--markdown-only", action="store_true", help="only re-render results.md from results.json")
    parser.add_argument("--stem", default="results", help="output files <out>/<stem>.json and .md (make bench-real: results_real)")
    args = parser.parse_args()
    if args.markdown_only:
        return rewrite_markdown(args.out, args.stem)
    if args.quick:
        args.models, args.sweeps, args.repeats, args.tl_max_cells = ["toy-ioi"], QUICK_SWEEPS, 1, 40
    set_threads(args.threads)

    results = {
        "environment": {
            "device": args.device if args.device != "cpu" else f"cpu ({platform.processor() or platform.machine()})",
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformer_lens": version("transformer-lens"),
            "batch": args.batch,
            "n_pos": args.n_pos,
            "repeats": args.repeats,
            "tl_max_cells": args.tl_max_cells,
            "large_repeats": args.large_repeats,
            "large_tl_max_cells": args.large_tl_max_cells,
        },
        "sweeps": [],
        "attribution": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.models:
            build = RANDOM_MODELS.get(label)
            model = build(Path(tmp) / label, args.device) if build else load_model(label, device=args.device)
            large = build is not None or label in REAL_MODELS  # gpt2-small size or larger: minutes a sweep
            sweeps = args.sweeps or (LARGE_MODEL_SWEEPS if large else SWEEPS)
            repeats, max_cells = (args.large_repeats, args.large_tl_max_cells) if large else (args.repeats, args.tl_max_cells)
            results["sweeps"] += bench_sweeps(model, label, sweeps, repeats, max_cells, args.device, args.batch, args.n_pos)
            results["attribution"].append(bench_attribution(model, label, args.device, args.batch, args.n_pos, max(args.repeats, 3)))
            if label == "toy-ioi":
                results["agreement"] = attribution_agreement(model, n_prompts=16 if args.quick else 64, ig_steps=8)
    write_outputs(args.out, args.stem, results, markdown(results))


def write_outputs(out: Path, stem: str, results: dict, text: str) -> None:
    """``<out>/<stem>.json`` and ``<out>/<stem>.md``; the markdown is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
