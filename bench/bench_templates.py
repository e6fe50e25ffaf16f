"""What a Colab user waits for: each template end to end on a gpt2-small-architecture model, on this machine.

The model has GPT-2's architecture and GPT-2's real tokenizer (shipped in ``models/tokenizers/gpt2``) with
random weights (no weights can be downloaded here), so prompts, shapes and costs are those of ``gpt2-small``;
its numbers mean nothing. Each template runs through the batch runner, one at a time, in dependency order;
we report its wall-clock and the peak resident memory of the notebook's kernel process (sampled every 0.2 s).

Usage: ``python bench/bench_templates.py [--n-prompts 16] [--threads 2]``; writes ``bench/templates.json``
and ``bench/templates.md``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from helpers import MODELS_DIR, batch, layout

HERE = Path(__file__).parent
TEMPLATES = ["induction_checks", "circuit_expms", "head_functions", "minimal_circuit"]  # dependency order, quickest first


def gpt2_small_with_real_tokenizer(folder: Path) -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    AutoTokenizer.from_pretrained(MODELS_DIR / "tokenizers" / "gpt2").save_pretrained(folder)
    return folder


class KernelPeak:
    """Peak RSS (MB) over this process's descendants while the block runs (the notebook kernels)."""

    def __enter__(self):
        self.peak, self.stop = 0.0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        me = psutil.Process()
        while not self.stop.is_set():
            for child in me.children(recursive=True):
                try:
                    self.peak = max(self.peak, child.memory_info().rss / 2**20)
                except psutil.Error:
                    pass
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-prompts", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = gpt2_small_with_real_tokenizer(Path(tmp) / "gpt2-small-arch")
        layout.OUTPUTS_DIR = Path(tmp) / "outputs"
        options = batch.RunOptions(n_prompts=args.n_prompts, threads=args.threads, progress=False)
        for template in TEMPLATES:
            with KernelPeak() as peak:
                report = batch.run_batch(["ioi"], models=[str(model_dir)], templates=[template], options=options)
            result = next(r for r in report.results if r.template == template)
            rows.append(
                {
                    "template": template,
                    "status": result.status,
                    "wall_s": round(result.seconds, 1),
                    "peak_kernel_rss_mb": round(peak.peak),
                    "message": result.message,
                }
            )
            print(rows[-1], flush=True)
            write(args, rows)  # after each template, so a stopped run keeps what it measured


def write(args, rows: list[dict]) -> None:
    out = {
        "model": "gpt2-small architecture (random weights), GPT-2 tokenizer",
        "n_prompts": args.n_prompts,
        "threads": args.threads,
        "torch": torch.__version__,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "templates.json").write_text(json.dumps(out, indent=1))
    lines = [
        f"Templates end to end on a gpt2-small-architecture model with GPT-2's tokenizer, task ioi, "
        f"{args.n_prompts} prompts, {args.threads} CPU threads:",
        "",
        "| template | status | wall-clock s | peak kernel RSS MB |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['template']} | {r['status']} | {r['wall_s']} | {r['peak_kernel_rss_mb']} |" for r in rows]
    (args.out / "templates.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
