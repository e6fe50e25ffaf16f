"""Train the bundled toy models (``make toy-models``): one config, one loop, a seed, a log line per eval.

Three models in HF format, loaded later through the very same TransformerLens bridge path as ``gpt2-small``:

* ``toy-ioi``: GPT-2 architecture, 4 layers, trained on a mixture of IOI sentences (ABBA and BABA), sequence
  continuation (numbers, months, weekdays) and repeated random word segments placed after a random prefix.
* ``toy-ioi-llama``: the same data mixture and loop on a Llama architecture (rotary positions, RMSNorm,
  SwiGLU MLP, grouped-query attention with 2 key/value heads for 4 query heads), so that every identity is
  also checked on a second family that really does the task.
* ``toy-induction``: GPT-2 architecture, 2 layers, trained only on random-word sequences: in-context bigrams (each word of a
  small random set has a successor fixed for that sequence only) and segments that recur at random offsets,
  so the only way to predict is content-based (previous-token + induction heads); a fraction of sequences
  has ``x[t+1] == x[t-1]``, which makes a previous-token head useful early. Its learned position
  embeddings start from a small sinusoidal table. Induction heads form within 2,000 steps (earlier recipes
  without the bigram task and the sinusoidal start did not form them in 8,000).

Induction is claimed only when (a) the loss on a repeat shifted by a random prefix stays low and (b) a
previous-token head and an induction head each score >= ``ACCEPTANCE_SCORE`` (0.5): low loss on a plain repeat
can be a positional shortcut, not evidence of induction.

Usage: ``python -m helpers.toys.toy_models --model toy-ioi --steps 3500`` (``--smoke`` trains a few steps into a
temporary directory, which is what the test does).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from helpers import MODELS_DIR
from helpers.analyses.pattern_scores import pattern_scores, random_word_ids, repeated_token_scores
from helpers.analyses.roles import RoleThresholds
from helpers.schema.heads import heads_above
from helpers.task.models import load_model
from helpers.task.vocab import build_tokenizer, build_vocab, read_pool, save_tokenizer, words_of

# IOI templates in BABA form: [B] is the subject (mentioned twice), [A] the indirect object (the answer).
IOI_TEMPLATES: list[str] = [
    "When [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
]
IOI_HELDOUT_TEMPLATES: list[str] = [
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
]
# Sequence continuation: "[w1] is 7. [w2] is 8. [w3] is" -> " 9"; the connector differs per family.
SEQUENCE_FAMILIES: dict[str, tuple[str, str, bool]] = {  # family -> (pool, connector, cyclic)
    "numbers": ("numbers", "is", False),
    "months": ("months", "is in", True),
    "days": ("days", "is on", True),
}
ANSWER_CONTEXT_WEIGHT = 0.1  # loss weight of non-answer tokens in IOI/continuation sequences
EXTRA_WORDS: list[str] = sorted(
    {w for t in IOI_TEMPLATES + IOI_HELDOUT_TEMPLATES for w in words_of(t)}
    | {w for _, conn, _ in SEQUENCE_FAMILIES.values() for w in conn.split()}
)


@dataclass
class ToyConfig:
    """Everything that determines a bundled model: architecture, data mixture, optimiser, seed."""

    name: str
    n_layer: int
    architecture: str = "gpt2"  # "gpt2" (learned positions, LayerNorm, GELU) or "llama" (RoPE, RMSNorm, SwiGLU, GQA)
    n_kv_head: int | None = None  # llama: key/value heads (fewer than n_head: grouped-query attention)
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 128
    steps: int = 3500
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05
    seed: int = 0
    eval_every: int = 500
    # sequences per task in one optimiser step
    mixture: dict[str, int] = field(default_factory=dict)
    repeat_seq_len: int = 64
    skip_fraction: float = 0.0  # fraction of random sequences with x[t+1] == x[t-1]
    tile: bool = False  # random sequences: prefix + segment tiled to the end (else one copied segment)
    sinusoidal_positions: bool = False  # initialise the (still learned) position embeddings sinusoidally


CONFIGS: dict[str, ToyConfig] = {
    "toy-ioi": ToyConfig(
        name="toy-ioi",
        n_layer=4,
        steps=3000,
        mixture={"ioi": 32, "numbers": 12, "months": 6, "days": 6, "repeat": 16},
    ),
    "toy-ioi-llama": ToyConfig(
        name="toy-ioi-llama",
        n_layer=4,
        architecture="llama",
        n_kv_head=2,
        steps=1200,  # IOI accuracy was 0.99 at step 1,000 of a 3,000-step run; 1,200 keeps retraining under ~20 min
        eval_every=1200,  # evaluation draws from the data RNG: changing it changes the weights
        mixture={"ioi": 32, "numbers": 12, "months": 6, "days": 6, "repeat": 16},
    ),
    "toy-induction": ToyConfig(
        name="toy-induction",
        n_layer=2,
        lr=1e-3,
        steps=2000,
        mixture={"bigram": 32, "repeat": 16},
        skip_fraction=0.2,
        eval_every=2000,  # evaluation draws from the data RNG: changing it changes the weights
        sinusoidal_positions=True,
    ),
}


class Corpus:
    """Generates training/eval text and token batches for one vocabulary, from a seeded ``random.Random``."""

    def __init__(self, tokenizer, rng: random.Random):
        self.tok = tokenizer
        self.rng = rng
        self.names = read_pool("names")
        self.places = read_pool("places")
        self.objects = read_pool("objects")
        self.items = read_pool("names") + read_pool("nouns")
        self.bos_id: int = tokenizer.bos_token_id
        self.random_word_ids: list[int] = random_word_ids(tokenizer)

    def encode(self, text: str) -> list[int]:
        """BOS + token ids of ``text``; raises on any unknown word (the vocabulary must cover all training text)."""
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if self.tok.unk_token_id in ids:
            raise ValueError(f"out-of-vocabulary word in training text: {text!r}")
        return [self.bos_id] + ids

    def ioi_text(self, template: str) -> tuple[str, str, str]:
        """(prompt without the answer, IO name, S name) for one template, ABBA or BABA at random."""
        a, b = self.rng.sample(self.names, 2)
        filled = template.replace("[PLACE]", self.rng.choice(self.places)).replace("[OBJECT]", self.rng.choice(self.objects))
        if self.rng.random() < 0.5:  # ABBA: the first mention is the IO
            filled = filled.replace("[B] and [A]", "[A] and [B]", 1)
        filled = filled.replace("[A]", a).replace("[B]", b)
        prompt = filled[: -len(a) - 1]
        return prompt, a, b

    def sequence_text(self, family: str, n_items: int | None = None) -> tuple[str, str]:
        """(prompt, answer) for a continuation task: ``n_items`` consecutive values, predict the next."""
        pool_name, connector, cyclic = SEQUENCE_FAMILIES[family]
        values = read_pool(pool_name)
        n = n_items or self.rng.randint(2, 7)
        start = self.rng.randrange(len(values) if cyclic else len(values) - n)
        run = [values[(start + i) % len(values)] for i in range(n + 1)]
        words = self.rng.sample(self.items, n + 1)
        parts = [f"{words[i]} {connector} {run[i]}." for i in range(n)]
        prompt = " ".join(parts) + f" {words[n]} {connector}"
        return prompt, run[n]

    def repeat_tokens(self, seq_len: int, skip: bool, tile: bool = False, prefix_max: int = 40) -> tuple[list[int], list[int]]:
        """Random words with recurring segments at random offsets; returns (ids, loss mask on predictable tokens).

        ``tile``: a random prefix (0-24 words), then a random segment of 6-24 words repeated to the end; the
        period differs per sequence, so only "find the earlier copy of this token, predict its successor" works.
        """
        ids = [self.bos_id] + [self.rng.choice(self.random_word_ids) for _ in range(seq_len - 1)]
        mask = [0] * seq_len
        if skip:  # x[t+1] == x[t-1] from a random start: rewards attending to the previous token
            start = self.rng.randint(1, seq_len // 2)
            for t in range(start + 1, seq_len - 1):
                if self.rng.random() < 0.5:
                    ids[t + 1] = ids[t - 1]
                    mask[t + 1] = 1
            return ids, mask
        if tile:
            prefix, period = self.rng.randint(0, 24), self.rng.randint(6, 24)
            for t in range(1 + prefix + period, seq_len):
                ids[t] = ids[t - period]
                mask[t] = int(t > 1 + prefix + period)
            return ids, mask
        seg_len = self.rng.randint(4, 20)
        src = self.rng.randint(1, min(prefix_max, seq_len - 2 * seg_len - 1))
        dst = self.rng.randint(src + seg_len, seq_len - seg_len)
        ids[dst : dst + seg_len] = ids[src : src + seg_len]
        for t in range(dst + 1, dst + seg_len):
            mask[t] = 1
        return ids, mask

    def bigram_tokens(self, seq_len: int, follow: float = 0.8) -> tuple[list[int], list[int]]:
        """In-context bigrams: 8-20 random words, each with a successor fixed for this sequence only.

        With probability ``follow`` the next word is the current word's successor, else a random word of the
        set; so the successor can be read off only from an earlier occurrence of the current word (what an
        induction head does), at positions that differ per sequence. Loss mask: targets whose current word has
        occurred before.
        """
        words = self.rng.sample(self.random_word_ids, self.rng.randint(8, 20))
        successor = dict(zip(words, self.rng.sample(words, len(words))))
        ids, mask, seen = [self.bos_id, self.rng.choice(words)], [0, 0], set()
        while len(ids) < seq_len:
            cur = ids[-1]
            nxt = successor[cur] if self.rng.random() < follow else self.rng.choice(words)
            mask.append(int(cur in seen))
            seen.add(cur)
            ids.append(nxt)
        return ids, mask

    def batch(self, mixture: dict[str, int], repeat_seq_len: int, skip_fraction: float, tile: bool = False):
        """Right-padded token batch and its loss mask for one step of the ``mixture``."""
        rows: list[tuple[list[int], list[int]]] = []
        for task, count in mixture.items():
            for _ in range(count):
                if task == "ioi":
                    prompt, answer, _ = self.ioi_text(self.rng.choice(IOI_TEMPLATES))
                elif task in SEQUENCE_FAMILIES:
                    prompt, answer = self.sequence_text(task)
                if task == "ioi" or task in SEQUENCE_FAMILIES:
                    ids = self.encode(f"{prompt} {answer}")
                    # the answer carries the task; other tokens (mostly unpredictable names) get a small weight
                    rows.append((ids, [0] + [ANSWER_CONTEXT_WEIGHT] * (len(ids) - 2) + [1]))
                elif task == "bigram":
                    rows.append(self.bigram_tokens(repeat_seq_len))
                elif task == "repeat":
                    rows.append(self.repeat_tokens(repeat_seq_len, self.rng.random() < skip_fraction, tile))
                else:
                    raise ValueError(f"unknown task in mixture: {task}")
        width = max(len(ids) for ids, _ in rows)
        tokens = torch.full((len(rows), width), self.bos_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width))
        for i, (ids, m) in enumerate(rows):
            tokens[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(m)] = torch.tensor(m, dtype=torch.float)
        return tokens, mask


def sinusoidal_positions(n_pos: int, d_model: int, scale: float = 0.05) -> Float[Tensor, "pos d_model"]:
    """Transformer sinusoidal position table times ``scale``: a start from which previous-token heads form fast."""
    pos = torch.arange(n_pos, dtype=torch.float)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, dtype=torch.float) / d_model)
    table = torch.zeros(n_pos, d_model)
    table[:, 0::2], table[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return scale * table


def masked_lm_loss(logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"], mask: Float[Tensor, "batch pos"]) -> Tensor:
    """Mean next-token cross-entropy over positions whose target has mask 1."""
    logprobs = logits[:, :-1].log_softmax(-1)
    target_lp = logprobs.gather(-1, tokens[:, 1:, None])[..., 0]
    weights = mask[:, 1:]
    return -(target_lp * weights).sum() / weights.sum().clamp(min=1)


@torch.no_grad()
def answer_accuracy(model, corpus: Corpus, prompts: list[tuple[str, str, str | None]]) -> dict[str, float]:
    """Accuracy (answer is the argmax) and, where a wrong answer is given, mean logit diff answer - wrong.

    One right-padded batch; causal attention means padding after a prompt cannot change its last logits.
    """
    rows = [corpus.encode(prompt) for prompt, _, _ in prompts]
    tokens = torch.full((len(rows), max(map(len, rows))), corpus.bos_id)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    last = torch.tensor([len(r) - 1 for r in rows])
    logits = model(tokens).logits[torch.arange(len(rows)), last]
    answers = torch.tensor([corpus.encode(" " + answer)[1] for _, answer, _ in prompts])
    out = {"accuracy": (logits.argmax(-1) == answers).float().mean().item()}
    if prompts[0][2] is not None:
        wrong = torch.tensor([corpus.encode(" " + w)[1] for _, _, w in prompts])
        idx = torch.arange(len(rows))
        out["logit_diff"] = (logits[idx, answers] - logits[idx, wrong]).mean().item()
    return out


@torch.no_grad()
def induction_evidence(model, corpus: Corpus, n: int = 64, seg_len: int = 20, max_len: int = 64) -> dict:
    """Loss on a repeat shifted by a random prefix, plus per-head previous-token and induction scores.

    Sequence: BOS, random prefix (5 words up to what fits in ``max_len``, the trained length), r (``seg_len``
    words), r again. The scores are ``pattern_scores.pattern_scores`` (the one definition every template uses), with r
    starting after the prefix.
    """
    prefix = corpus.rng.randint(5, max_len - 1 - 2 * seg_len)
    rows = []
    for _ in range(n):
        pre = [corpus.rng.choice(corpus.random_word_ids) for _ in range(prefix)]
        seg = [corpus.rng.choice(corpus.random_word_ids) for _ in range(seg_len)]
        rows.append([corpus.bos_id] + pre + seg + seg)
    tokens = torch.tensor(rows)
    out = model(tokens, output_attentions=True)
    start2 = 1 + prefix + seg_len
    mask = torch.zeros_like(tokens, dtype=torch.float)
    mask[:, start2 + 1 :] = 1
    loss_repeat = masked_lm_loss(out.logits, tokens, mask).item()
    scores = pattern_scores(torch.stack(out.attentions), seg_len, first=1 + prefix)  # attentions: [layer][batch, head, q, k]
    return {
        "loss_shifted_repeat": loss_repeat,
        "prev_token_scores": scores["prev_token"].tolist(),
        "induction_scores": scores["induction"].tolist(),
    }


def evaluate(model, corpus: Corpus, n: int = 200) -> dict:
    """Held-out metrics: IOI per template family, continuation tasks, and induction evidence."""
    model.eval()
    metrics: dict = {}
    for label, templates in [("ioi_train_templates", IOI_TEMPLATES), ("ioi_heldout_templates", IOI_HELDOUT_TEMPLATES)]:
        metrics[label] = answer_accuracy(model, corpus, [corpus.ioi_text(corpus.rng.choice(templates)) for _ in range(n)])
        metrics[label + "_per_template"] = {
            t: answer_accuracy(model, corpus, [corpus.ioi_text(t) for _ in range(40)])["accuracy"] for t in templates
        }
    for family in SEQUENCE_FAMILIES:
        metrics[family] = answer_accuracy(model, corpus, [(*corpus.sequence_text(family), None) for _ in range(n)])
    metrics["induction"] = induction_evidence(model, corpus)
    model.train()
    return metrics


def architecture_config(cfg: ToyConfig, tokenizer):
    """The ``transformers`` config of ``cfg``'s architecture, sized by ``cfg`` (d_mlp = 4 d_model, tied embeddings)."""
    from transformers import GPT2Config, LlamaConfig

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if cfg.architecture == "llama":
        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.n_embd,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_kv_head or cfg.n_head,
            intermediate_size=4 * cfg.n_embd,
            max_position_embeddings=cfg.n_positions,
            tie_word_embeddings=True,
            **ids,
        )
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=4 * cfg.n_embd,
        **ids,
    )


def train(cfg: ToyConfig, out_dir: Path, log_every: int = 100) -> dict:
    """Train ``cfg`` deterministically on CPU and save HF weights, tokenizer, metrics and a model card to ``out_dir``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tokenizer = build_tokenizer(build_vocab(EXTRA_WORDS))
    corpus = Corpus(tokenizer, rng)
    model = AutoModelForCausalLM.from_config(architecture_config(cfg, tokenizer), attn_implementation="eager")
    if cfg.sinusoidal_positions and cfg.architecture == "gpt2":
        with torch.no_grad():
            model.transformer.wpe.weight.copy_(sinusoidal_positions(cfg.n_positions, cfg.n_embd))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps)
        return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))

    history = []
    t0 = time.time()
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        tokens, mask = corpus.batch(cfg.mixture, cfg.repeat_seq_len, cfg.skip_fraction, cfg.tile)
        loss = masked_lm_loss(model(tokens).logits, tokens, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0:
            print(f"[{cfg.name}] step {step:5d} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            m = evaluate(model, corpus, n=100)
            ind = m["induction"]
            summary = {
                "step": step + 1,
                "ioi_acc": m["ioi_train_templates"]["accuracy"],
                "numbers_acc": m["numbers"]["accuracy"],
                "shifted_repeat_loss": round(ind["loss_shifted_repeat"], 3),
                "max_prev_token": round(max(max(r) for r in ind["prev_token_scores"]), 3),
                "max_induction": round(max(max(r) for r in ind["induction_scores"]), 3),
            }
            history.append(summary)
            print(f"[{cfg.name}] eval {summary}", flush=True)
    wall = time.time() - t0
    model.eval()
    final = evaluate(model, corpus, n=400)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    save_tokenizer(tokenizer, out_dir)
    report = {
        "config": asdict(cfg),
        "train_wall_clock_s": round(wall, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "n_random_words": len(corpus.random_word_ids),
        "final": final,
        "history": history,
    }
    final["head_scores"] = template_head_scores(out_dir)
    (out_dir / "training_metrics.json").write_text(json.dumps(report, indent=1))
    (out_dir / "README.md").write_text(model_card(cfg, report))
    return report


ARCHITECTURE_NAMES = {"gpt2": "GPT-2 (learned positions, LayerNorm, GELU MLP)", "llama": "Llama (rotary positions, RMSNorm, SwiGLU MLP)"}


def head_score_lines(scores: dict | None) -> list[str]:
    """Model-card lines for the scores the ``induction_checks`` template reports (BOS, r, r)."""
    if not scores:
        return []
    lines = [
        "",
        f"Scores as the `induction_checks` template computes them (BOS, r, r; |r| = {scores['seq_len']}, "
        f"{scores['batch']} sequences, seed {scores['seed']}), heads at or above the role thresholds (``roles.RoleThresholds``):",
        "",
    ]
    for kind in ("prev_token", "duplicate_token", "induction"):
        threshold = RoleThresholds().for_score(kind)
        lines.append(f"- {kind.replace('_', '-')} (>= {threshold}): {_listed(heads_above(scores[kind], threshold))}")
    return lines


def _listed(heads) -> str:
    return ", ".join(f"{h.label} ({h.value:.2f})" for h in heads) or "none"


# The bar a trained toy's induction evidence must pass (random prefix, r, r): a previous-token and
# an induction head each at or above it. Higher than the role thresholds: it certifies training, not a role.
ACCEPTANCE_SCORE = 0.5


def model_card(cfg: ToyConfig, report: dict) -> str:
    """Markdown model card: config, data mixture, steps, wall-clock, held-out accuracies, induction evidence."""
    f = report["final"]
    ind = f["induction"]

    lines = [
        f"# {cfg.name}",
        "",
        "Trained by `make toy-models` (`python -m helpers.toys.toy_models`), deterministic seed; see `helpers/toys/toy_models.py`.",
        "",
        f"- Architecture: {ARCHITECTURE_NAMES[cfg.architecture]}, {cfg.n_layer} layers, d_model {cfg.n_embd}, {cfg.n_head} heads"
        + (f" ({cfg.n_kv_head} key/value heads: grouped-query attention)" if cfg.n_kv_head else "")
        + f", d_mlp {4 * cfg.n_embd}, n_ctx {cfg.n_positions}, tied embeddings",
        f"- Data mixture per step: {cfg.mixture}; loss weight 1 on answers, {ANSWER_CONTEXT_WEIGHT} on other prompt tokens; random-sequence length {cfg.repeat_seq_len}; skip-pattern fraction {cfg.skip_fraction}; "
        f"{'prefix + tiled segment' if cfg.tile else 'one segment copied to a random later offset'}"
        + (
            "; `bigram`: in-context bigrams (8-20 random words, each with a successor fixed for that sequence only, followed 80% of the time)"
            if "bigram" in cfg.mixture
            else ""
        ),
        *(["- Position embeddings (learned) initialised to a sinusoidal table × 0.05"] if cfg.sinusoidal_positions else []),
        f"- Optimiser: AdamW lr {cfg.lr}, betas (0.9, 0.98), weight decay {cfg.weight_decay} on matrices, {cfg.warmup_steps} warm-up steps, cosine decay",
        f"- Steps: {cfg.steps}; seed {cfg.seed}; wall-clock {report['train_wall_clock_s']} s on {report['threads']} CPU threads (torch {report['torch']})",
        "",
        "## Held-out evaluation (fresh random prompts, 400 each)",
        "",
        "| task | accuracy | mean logit diff (answer - wrong name) |",
        "|---|---|---|",
        f"| IOI, training templates | {f['ioi_train_templates']['accuracy']:.3f} | {f['ioi_train_templates']['logit_diff']:.2f} |",
        f"| IOI, held-out templates | {f['ioi_heldout_templates']['accuracy']:.3f} | {f['ioi_heldout_templates']['logit_diff']:.2f} |",
    ]
    lines += [f"| {fam} continuation | {f[fam]['accuracy']:.3f} | |" for fam in SEQUENCE_FAMILIES]
    lines += [
        "",
        "IOI accuracy per template (40 prompts each): "
        + "; ".join(
            f"`{t}` {a:.2f}" for t, a in {**f["ioi_train_templates_per_template"], **f["ioi_heldout_templates_per_template"]}.items()
        ),
        "",
        "## Induction evidence (BOS, random prefix, r, r: 20-word r, all within the trained 64 positions)",
        "",
        f"- Loss on the repeated half: {ind['loss_shifted_repeat']:.3f} (uniform over the random words: {math.log(report['n_random_words']):.2f})",
        f"- Previous-token heads (score >= {ACCEPTANCE_SCORE}): {_listed(heads_above(ind['prev_token_scores'], ACCEPTANCE_SCORE))}",
        f"- Induction heads (score >= {ACCEPTANCE_SCORE}): {_listed(heads_above(ind['induction_scores'], ACCEPTANCE_SCORE))}",
        "- Induction is claimed only if both lists are non-empty and the shifted-repeat loss is low.",
        *head_score_lines(f.get("head_scores")),
        "",
        "Training history: see `training_metrics.json`.",
    ]
    return "\n".join(lines) + "\n"


HEAD_SCORE_SETUP = {"seq_len": 25, "batch": 16, "seed": 0}  # the defaults of the induction_checks template


def template_head_scores(model_dir: Path) -> dict:
    """Previous-token / duplicate / induction scores exactly as ``induction_checks`` computes them (bridge model)."""
    scores, _ = repeated_token_scores(load_model(str(model_dir), device="cpu"), **HEAD_SCORE_SETUP)
    return {**HEAD_SCORE_SETUP, **{k: [[round(float(x), 4) for x in row] for row in v] for k, v in scores.items()}}


def evaluate_saved(name: str, out_dir: Path) -> dict:
    """Re-evaluate a saved checkpoint (same seed for the eval stream) and rewrite its metrics and model card."""
    from transformers import AutoModelForCausalLM

    cfg = CONFIGS[name]
    report = json.loads((out_dir / "training_metrics.json").read_text())
    tokenizer = build_tokenizer(build_vocab(EXTRA_WORDS))
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), attn_implementation="eager").eval()
    report["final"] = evaluate(model, Corpus(tokenizer, random.Random(cfg.seed + 1)), n=400)
    report["n_random_words"] = len(Corpus(tokenizer, random.Random(0)).random_word_ids)
    report["final"]["head_scores"] = template_head_scores(out_dir)
    (out_dir / "training_metrics.json").write_text(json.dumps(report, indent=1))
    (out_dir / "README.md").write_text(model_card(cfg, report))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(CONFIGS), action="append", help="which model(s); default: all")
    parser.add_argument("--steps", type=int, help="override the number of steps")
    parser.add_argument("--out", type=Path, default=MODELS_DIR, help="parent directory of the model folders")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--smoke", action="store_true", help="a few steps, for tests")
    parser.add_argument("--evaluate-only", action="store_true", help="re-evaluate saved models, rewrite their cards")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.model or sorted(CONFIGS):
        if args.evaluate_only:
            evaluate_saved(name, args.out / name)
            continue
        cfg = CONFIGS[name]
        if args.steps or args.smoke:  # a copy: CONFIGS stays the shipped models' record
            steps = args.steps or 5
            cfg = replace(cfg, steps=steps, eval_every=max(steps, 1), warmup_steps=min(cfg.warmup_steps, steps))
        train(cfg, args.out / name)


if __name__ == "__main__":
    main()
