"""What a researcher waits for: every template end to end, per model, on this machine (wall-clock and peak memory).

Models: the real pretrained ones by name (``smollm2-135m``, ``gemma3-270m``: prepared offline by ``make real-models``),
any bundled or local model, and ``gpt2-small-arch``: GPT-2's architecture with GPT-2's real tokenizer (shipped in
``models/tokenizers/gpt2``) and random weights, so prompts, shapes and costs are those of ``gpt2-small`` (its numbers
mean nothing). Each model runs every template through the batch runner, one at a time, in dependency order, as
``make all`` does; each row is the run's wall-clock and its notebook kernel's peak resident memory (the runner's own
sample, ``RunResult.peak_rss_mb``).

Usage: ``python bench/bench_templates.py [--models smollm2-135m gemma3-270m] [--task ioi] [--n-prompts 16] [--threads 2]``;
or ``--from-runs nb_outputs/runs.json`` to tabulate a batch already run (``make all``). Writes ``bench/templates.json``
and ``bench/templates.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

from helpers import MODELS_DIR
from helpers.runner import batch

HERE = Path(__file__).parent
GPT2_ARCH = "gpt2-small-arch"


def gpt2_small_with_real_tokenizer(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    AutoTokenizer.from_pretrained(MODELS_DIR / "tokenizers" / "gpt2").save_pretrained(folder)
    return folder


def rows_of(results: list[dict]) -> list[dict]:
    """Table rows from batch results (``BatchReport.to_json()['runs']``)."""
    return [
        {
            "model": Path(r["model"]).name,
            "task": r["task"],
            "template": r["template"],
            "status": r["status"],
            "wall_s": round(r["seconds"], 1),
            "peak_kernel_rss_mb": r.get("peak_rss_mb"),
            "message": r["message"],
        }
        for r in results
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[GPT2_ARCH])
    parser.add_argument("--task", default="ioi")
    parser.add_argument("--n-prompts", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--from-runs", type=Path, default=None, help="tabulate this runs.json instead of running")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    if args.from_runs:
        data = json.loads(args.from_runs.read_text())
        write(args, rows_of(data["runs"]), note=f"from {args.from_runs}")
        return
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        import os

        os.environ["CIRCUIT_LAB_OUTPUTS"] = str(Path(tmp) / "outputs")
        options = batch.RunOptions(n_prompts=args.n_prompts, threads=args.threads, progress=False)
        for model in args.models:
            name = str(gpt2_small_with_real_tokenizer(Path(tmp) / GPT2_ARCH)) if model == GPT2_ARCH else model
            report = batch.run_batch([args.task], models=[name], options=options)
            rows += rows_of(report.to_json()["runs"])
            write(args, rows)  # after each model, so a stopped run keeps what it measured


def write(args, rows: list[dict], note: str = "") -> None:
    out = {"n_prompts": args.n_prompts, "threads": args.threads, "machine": platform.processor() or platform.machine(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "templates.json").write_text(json.dumps(out, indent=1))
    lines = [
        f"Every template end to end, per model ({note or f'task {args.task}, {args.n_prompts} prompts, {args.threads} CPU threads'}; "
        "peak memory is the notebook kernel's resident set, sampled by the runner):",
        "",
        "| model | task | template | status | wall-clock s | peak kernel RSS GB |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['task']} | {r['template']} | {r['status']} | {r['wall_s']} | "
        f"{'' if r['peak_kernel_rss_mb'] is None else round(r['peak_kernel_rss_mb'] / 1024, 2)} |"
        for r in rows
    ]
    (args.out / "templates.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
