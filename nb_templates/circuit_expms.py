# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Circuit experiments
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/circuit-lab/circuit-lab/blob/main/nb_templates/circuit_expms.ipynb)
#
# Where in the model does the behaviour of a task live? This notebook takes one task from `params/<task>.yaml`
# (a clean prompt template, a corrupted one, a correct and an incorrect answer) and localises the logit
# difference between the two answers: first by reading it off the residual stream (direct logit attribution),
# then by causal intervention (activation patching), then by looking at what the top heads attend to.
# Its numbers go to `circuit_expms.json`, which later templates read.
#
# Run it in Colab from the badge, or headlessly: `make run TASK=ioi MODEL=toy-ioi`.

# %% tags=["colab"]
# In Colab only: fetch the project (templates, params, bundled models) and install it. Locally `make run` did this.
import os
import subprocess
import sys

if "google.colab" in sys.modules and not os.path.isdir("/content/circuit-lab"):
    subprocess.run(["git", "clone", "--depth", "1", "https://github.com/circuit-lab/circuit-lab", "/content/circuit-lab"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "/content/circuit-lab"], check=True)
if "google.colab" in sys.modules:
    sys.path.insert(0, "/content/circuit-lab")
    os.chdir("/content/circuit-lab")

# %% tags=["parameters"]
task = "ioi"  # params/<task>.yaml
params_file = None  # a params YAML path; overrides `task`
model_name = None  # overrides the params' model: a bundled name (models/<name>), a local HF dir, or "gpt2-small"
n_prompts = None  # overrides the params' n_prompts
output_dir = None  # default: nb_outputs/<task>/<model>/
device = None  # default: CUDA if available, else CPU
dtype = "float32"  # or "bfloat16" / "float16" for big models (half the memory; identities then hold to ~1e-2 only)
threads = None  # torch CPU threads (match processes x threads to the cores)
static_images = True  # also save every figure as PNG next to the notebook
induction_seq_len = 25  # length of the random sequence r in BOS, r, r (keep 2r+1 within the trained context)
induction_batch = 16
patching_memory_mb = 1024  # memory budget of one batched patching forward (variants are chunked to fit)
importance_reference = "corrupted"  # head importance: means over the "corrupted" prompts (IOI's ABC) or the "clean" ones
attribution_ig_steps = 8  # integrated-gradients steps for EAP-IG (0: plain attribution patching only)
heads_per_band = 4  # attention patterns shown per layer band (its heads with the largest |output patching effect|)

# %%
import pandas as pd
from IPython.display import display
from transformer_lens import utilities

from helpers.analyses import pattern_scores
from helpers.analyses.dla import logit_lens_vocabulary
from helpers.methods import attribution_patching, importance, patching, path_patching
from helpers.notebook import plotting, sections, session
from helpers.schema.heads import rank_heads

s = session.start_session("circuit_expms", task, params_file, model_name, n_prompts, output_dir, device, threads, static_images, dtype=dtype)
model, prompts, figs = s.model, s.prompts, s.figures
top_k = s.params.analysis.top_k
print(f"task {s.params.task} | model {s.model_name} ({model.cfg.n_layers} layers x {model.cfg.n_heads} heads) | "
      f"{len(prompts.clean_prompts)} prompts of {prompts.n_pos} tokens | outputs in {s.out_dir}")
print("named positions:", {name: prompts.axis_labels[i] for name, i in prompts.positions.items()},
      f"| differ between templates: {prompts.varying_positions}" if prompts.varying_positions else "")
if len(prompts.template_names) > 1:
    print(f"{len(prompts.template_names)} sentence templates, prompts split evenly: {prompts.template_names}")

# %% [markdown]
# ## 1. Does the model do the task?
#
# **How it works.** `test_prompt` shows the model's top next tokens for one clean prompt and the rank of the
# correct answer. The logit difference (correct minus incorrect answer logit at the last position) is the
# metric for the rest of the notebook: positive means the model prefers the correct answer.
#
# **How to interpret.** A task worth dissecting has a clearly positive clean logit difference and a
# corrupted one near zero or negative; the gap between them is what patching tries to restore.

# %%
utilities.test_prompt(prompts.clean_prompts[0], model.to_string(prompts.answer_tokens[0, :1]), model, top_k=top_k)

# %%
ld = session.logit_diffs(s)
print(f"clean logit diff {ld.clean.mean():.3f} (accuracy {ld.clean_accuracy:.2f}) | corrupted logit diff {ld.corrupted.mean():.3f}")
display(ld.table(prompts).head(8))
template_of = [prompts.template_names[t] for t in prompts.templates.tolist()]
figs.show(plotting.scatter(ld.clean, ld.corrupted, "Logit difference per prompt", "clean logit diff", "corrupted logit diff",
                           hover=prompts.clean_prompts, color=template_of if len(prompts.template_names) > 1 else None),
          "logit_diff_per_prompt")
if len(prompts.template_names) > 1:
    display(sections.template_breakdown(s, ld).round(3))

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 2. Direct logit attribution
#
# **How it works.** The final residual stream is a sum of what every component wrote. Applying the final
# LayerNorm (with its cached scale) and projecting on the unembedding direction `W_U[correct] - W_U[incorrect]`
# gives each component's *direct* contribution to the logit difference. The logit lens applies the same
# projection to the accumulated residual stream after each half layer. The contributions of all components
# plus the unembedding-bias difference add up to the logit difference exactly (the identity error is printed).
# Where a norm follows each head's or MLP's write (Gemma-2/3's post-norms), its scale is frozen at its value in
# this run, like the final norm's: the norm is then linear, each head's share passes through it on its own and the
# shares still add up (the printed line names the frozen scales).
#
# The table reads the logit lens over the whole vocabulary: after each layer, the mean rank of the correct and
# incorrect answers (0 = top), how often the correct one is already the top token, and the tokens most often on top.
#
# **How to interpret.** Where the logit lens jumps, the layers above write the answer. Heads with large
# positive DLA push the correct answer directly (mover-like); large negative ones push against it. DLA says
# nothing about indirect effects: a head can matter by feeding later heads, which patching reveals.

# %%
dla = sections.direct_logit_attribution(s)
print(dla.summary())
figs.show(plotting.lines(dla.lens, dla.lens_labels, "Logit lens: logit difference of the accumulated residual stream",
                         "residual stream after", "logit difference"), "logit_lens")
lens_vocabulary = logit_lens_vocabulary(model, dla.cache, prompts.answer_tokens)
display(pd.DataFrame(lens_vocabulary).set_index("after").round(2))
figs.show(plotting.lines(dla.layers, dla.layer_labels, "DLA per layer component", "component", "logit difference contribution"),
          "dla_layers")
figs.show(plotting.heatmap(dla.heads, "DLA per head (clean prompts, final position)", "head", "layer",
                           color_label="logit diff contribution"), "dla_heads", key=True)
top_dla_pos = rank_heads(dla.heads, top_k, "pos")
top_dla_neg = rank_heads(dla.heads, top_k, "neg")
print("top positive DLA heads:", [str(h) for h in top_dla_pos])
print("top negative DLA heads:", [str(h) for h in top_dla_neg])

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 3. Attention patterns of the top heads
#
# **How it works.** For the first clean prompt, the attention patterns of the top positive and top negative
# DLA heads (rows: destination token, columns: source token).
#
# **How to interpret.** A mover head at the final position attends to the token whose logit it raises
# (for IOI: the indirect object). Look for which named position each head attends to from the end.

# %%
for group, chosen in [("positive", top_dla_pos), ("negative", top_dla_neg)]:
    print(f"top {group} DLA heads:", [h.label for h in chosen])
    display(plotting.attention_view(model, dla.cache, prompts.clean_tokens, chosen))

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 4. Activation patching
#
# **How it works.** Run the corrupted prompts, but copy one activation in from the clean run, and measure how
# much of the clean logit difference comes back: 0 = corrupted run, 1 = clean run. Sweeps: the residual
# stream before each layer, each layer's attention and MLP output (by layer and position), each head's
# output `z`, value `v` and attention pattern (by layer and head, all positions), and each head's output at
# each position. All patch variants of a layer run as batches (within `patching_memory_mb`) starting from the
# cached corrupted residual stream at that layer; the results equal TransformerLens's `patching` (tested).
#
# **How to interpret.** In the residual-stream sweep, the information moves from the corrupted token's
# position to the final position as layers go up; where it moves, attention heads carry it. A head whose
# output matters and whose *value* patch explains it moves information; one whose *pattern* patch explains it
# changes *where* it attends.

# %%
ctx = patching.make_context(model, prompts)
sweep_names = ["resid_pre", "attn_out", "mlp_out", "head_out", "head_v", "head_pattern", "head_out_by_pos"]
unsupported = {name: err for name in sweep_names if (err := patching.unsupported_reason(model, name))}
sweeps = {name: patching.sweep(ctx, name, patching_memory_mb) for name in sweep_names[:-1] if name not in unsupported}
by_pos_heads = patching.heads_to_sweep(sweeps["head_out"], s.params.analysis.by_pos_heads)  # None: every head
sweeps["head_out_by_pos"] = patching.sweep(ctx, "head_out_by_pos", patching_memory_mb, heads=by_pos_heads)
if by_pos_heads is not None:
    print(f"head_out_by_pos: the {len(by_pos_heads)} heads with the largest |head_out| effect (analysis.by_pos_heads; null: all "
          f"{sweeps['head_out'].numel()}):", ", ".join(f"L{layer}H{head}" for layer, head in by_pos_heads))
print(f"baselines: clean logit diff {ctx.source_logit_diff:.3f}, corrupted {ctx.base_logit_diff:.3f}")
if ctx.normalisation.status != "ok":
    print("WARNING:", ctx.normalisation.message)
skipped_sweeps = {name: str(err) for name, err in unsupported.items()}
for why in skipped_sweeps.values():
    print("skipped:", why)

# %% [markdown]
# The residual stream and each layer's attention and MLP output, by layer and position:

# %%
for name in ["resid_pre", "attn_out", "mlp_out"]:
    figs.show(plotting.heatmap(sweeps[name], f"Patching {name} (normalised logit diff recovered)", "position", "layer",
                               x=prompts.axis_labels, color_label="recovered"), f"patch_{name}", key=name == "resid_pre")

# %% [markdown]
# Each head's output, value and attention pattern, patched at every position at once:

# %%
head_sweeps = [name for name in ["head_out", "head_v", "head_pattern"] if name in sweeps]
for name in head_sweeps:  # under grouped-query attention, v is patched per key/value group (shared by several heads)
    axis = patching.layout(model, name)[-1].replace("_", " ")
    figs.show(plotting.heatmap(sweeps[name], f"Patching {name}, all positions (normalised logit diff recovered)", axis, "layer",
                               color_label="recovered"), f"patch_{name}", key=name == "head_out")

# %% [markdown]
# Each head's output at one position at a time (rows: heads, columns: positions). On a model with more heads than
# `analysis.by_pos_heads` (24 by default), only the heads with the largest |effect| in the all-position sweep run here,
# each exactly; the others are left out of the plot and are null in the JSON (`patching.by_pos_heads` lists the heads
# that ran). The attribution comparison below reads the same cells.

# %%
by_pos_rows = sweeps["head_out_by_pos"].permute(0, 2, 1).flatten(0, 1)  # [layer*head, pos]; heads not swept: NaN rows
swept = ~by_pos_rows.isnan().all(1)
figs.show(plotting.heatmap(by_pos_rows[swept], "Patching head output at one position" + ("" if by_pos_heads is None else
                           f" (the {len(by_pos_heads)} heads with the largest all-position effect)"), "position", "head",
                           x=prompts.axis_labels, y=[name for name, kept in zip(s.head_names, swept.tolist()) if kept],
                           color_label="recovered"), "patch_head_out_by_pos")

# %%
per_head = [name for name in head_sweeps if patching.layout(model, name)[-1] == "head"]
for name, label in [("head_v", "value"), ("head_pattern", "pattern")]:
    if name in per_head:
        figs.show(plotting.scatter(sweeps["head_out"], sweeps[name], f"Head output vs {label} patching", "output patching effect",
                                   f"{label} patching effect", hover=s.head_names, diagonal=True), f"scatter_out_vs_{label}")
top_patch = {name: rank_heads(sweeps[name], top_k, "abs") for name in per_head}
print("top heads by output patching:", [str(h) for h in top_patch["head_out"]])

# %% [markdown]
# ### 4b. Attribution patching: the same sweeps from one backward pass
#
# **How it works.** Attribution patching (Nanda; EAP, Syed et al. 2023) estimates every patching effect at
# once: the gradient of the metric at the corrupted run, dotted with (clean - corrupted activation), summed
# over what a sweep patches together. One clean forward, one corrupted forward and one backward pass cover
# all sweeps. EAP-IG (Hanna et al. 2024) averages the gradient over `attribution_ig_steps` points between the
# corrupted and clean embeddings, which helps where the metric is far from linear.
#
# **How to interpret.** Points on the diagonal mean the linear estimate is good; the Spearman correlation
# says whether it ranks heads as exact patching does. Use attribution to scan large sweeps (many prompts or
# positions, big models), then confirm its top cells with exact patching.

# %%
attr_names = ["resid_pre", "head_out", "head_v", "head_out_by_pos"]
attr_args = (model, prompts, attr_names)
estimates = {"attribution": attribution_patching.attribution_patch(*attr_args).values}
if attribution_ig_steps:
    estimates["eap_ig"] = attribution_patching.attribution_patch(*attr_args, ig_steps=attribution_ig_steps).values
agreement = {label: attribution_patching.rank_agreement(sweeps, est) for label, est in estimates.items()}
display(pd.DataFrame(agreement).rename_axis("sweep (Spearman vs exact)"))
for label, est in estimates.items():
    figs.show(plotting.scatter(sweeps["head_out"], est["head_out"], f"{label} vs exact patching of head outputs "
                               f"(Spearman {agreement[label]['head_out']:.2f})", "exact patching effect", f"{label} estimate",
                               hover=s.head_names, diagonal=True), f"{label}_vs_exact_head_out")

# %% [markdown]
# #### Why EAP-IG can rank heads worse than plain attribution here
#
# **How it works.** Exact patching above *denoises*: one head's clean output goes into the corrupted run while
# every other head stays corrupted. Plain attribution is the first-order estimate of exactly that, taken at the
# corrupted run. EAP-IG integrates the gradient along the path on which *every* component moves from corrupted to
# clean together, so each head's share is its effect while the others change too (its shares sum to the total
# effect): between its *denoising* effect (others corrupted) and its *noising* effect (others clean: the share of
# the gap lost when that head alone is corrupted in the clean run). Heads that matter only jointly (two heads that
# both must act, a backup that takes over) differ most between the two directions. So each estimate is compared
# with exact patching in both directions and with their mean.
#
# **How to interpret.** When EAP-IG ranks like the mean of the two directions and plain attribution like
# denoising, neither is wrong: they estimate different quantities. Use plain attribution to predict single-head
# denoising; use EAP-IG for what a head contributes to the joint change, as edge-level discovery does, where
# EAP-IG's top edges make the more faithful circuits (`circuit_discovery`; Hanna et al. 2024, MIB).

# %%
noising = patching.sweep(patching.make_context(model, prompts.noising()),
                         "head_out", patching_memory_mb)
by_direction = attribution_patching.agreement_by_direction({label: est["head_out"] for label, est in estimates.items()},
                                                           sweeps["head_out"], noising)
display(pd.DataFrame(by_direction).T.round(3).rename_axis("head_out estimate (Spearman vs exact)"))
print(attribution_patching.direction_reading(by_direction))

# %% [markdown]
# ### 4c. Path patching to the logits
#
# **How it works.** (IOI paper, Appendix B.) In the corrupted run one sender head's output takes its clean
# value while every other head is frozen to its corrupted output (MLPs are recomputed), so only the paths
# from the sender to the final residual stream that avoid other heads carry the change. 1 = the clean logit
# difference restored. For a head in the last layer this equals its output-patching effect above (tested).
#
# **How to interpret.** Heads high here write the answer (directly or through MLPs); heads high in output
# patching but low here act through later heads: look for them as senders into those heads' q, k or v
# (`minimal_circuit` does this for a whole circuit).

# %%
path_to_logits = path_patching.path_patch_to_logits(ctx)
figs.show(plotting.heatmap(path_to_logits, "Path patching: each sender to the final residual stream", "head", "layer",
                           color_label="recovered"), "path_to_logits")
top_paths = rank_heads(path_to_logits, top_k, "abs")
print("top senders to the logits:", [str(h) for h in top_paths])

# %% [markdown]
# ### 4d. Loss-based importance: mean-ablate each head
#
# **How it works.** Each head's output is replaced, at every position, by its mean at that position over the
# `importance_reference` prompts (default the corrupted ones, as the IOI paper's mean over its ABC prompts and as
# `minimal_circuit`; "clean" takes the mean over the task's own prompts), and the run on the clean prompts is
# compared with the unablated one: the increase in the answer's loss
# (`-log p(correct)` at the final position), in the mean next-token loss over the prompt and its answer, and
# the change in logit difference. Unlike patching, this needs no corrupted prompt: it asks whether the model
# needs the head at all on these prompts.
#
# **How to interpret.** Heads that cost answer loss but little logit difference help predict the answer's
# *kind* (any name) rather than *which* name; heads high in both are the task's heads. A head that matters in
# patching but not here has a backup that takes over when it is gone (section 7). With `importance_reference =
# "clean"` on a task whose answer is the same in every prompt (numseq: always " 5"), the mean still carries the
# answer and every head looks unimportant: that is the reference, not the model.
#
# **Cost.** Each exact ablation reruns the model from the head's layer with full-vocabulary logits at every position
# (about 5 minutes for SmolLM2-135M's 270 heads at 64 prompts on two cores). Every head first gets a first-order
# estimate (the gradient at the clean run times the move to the mean: one forward and backward); on a model with more
# heads than `analysis.importance_heads` (16 by default), only the heads the estimate ranks highest (that many by
# answer loss and by logit difference) and the `top_k` heads of output patching are ablated exactly. The others are
# blank in the heatmaps and null in the JSON (`importance.heads` lists the exact ones); `importance_heads: null` in the
# params runs every head.

# %%
head_importance = importance.head_importance(model, prompts.clean_tokens, prompts.answer_tokens, patching_memory_mb, groups=prompts.templates,
                                             reference_tokens={"corrupted": prompts.corrupted_tokens, "clean": None}[importance_reference],
                                             reference_name=importance_reference, max_heads=s.params.analysis.importance_heads,
                                             also=[(h.layer, h.head) for h in top_patch.get("head_out", [])])
print(f"means over {head_importance.reference}; unablated: answer loss {head_importance.baseline['answer_loss']:.3f}, sequence loss {head_importance.baseline['sequence_loss']:.3f}, "
      f"logit diff {head_importance.baseline['logit_diff']:.3f}")
exact_note = "" if head_importance.heads is None else f" ({len(head_importance.heads)} heads exact; blank: estimated only)"
if head_importance.heads is not None:
    print(f"ablated exactly: {len(head_importance.heads)} of {head_importance.answer_loss.numel()} heads (analysis.importance_heads; "
          "null: all):", ", ".join(f"L{layer}H{head}" for layer, head in head_importance.heads))
    figs.show(plotting.heatmap(head_importance.estimated["answer_loss"], "Mean-ablating each head: estimated increase in answer loss "
                               "(first order, every head)", "head", "layer", color_label="Δ loss"), "importance_answer_loss_estimated")
print("estimate vs exact, Spearman over the heads ablated exactly:", {k: round(v, 3) for k, v in head_importance.agreement().items()})
figs.show(plotting.heatmap(head_importance.answer_loss, "Mean-ablating each head: increase in answer loss (nats)" + exact_note, "head",
                           "layer", color_label="Δ loss"), "importance_answer_loss")
figs.show(plotting.heatmap(head_importance.logit_diff, "Mean-ablating each head: change in logit difference" + exact_note, "head", "layer",
                           color_label="Δ logit diff"), "importance_logit_diff")
figs.show(plotting.scatter(head_importance.answer_loss, head_importance.logit_diff, "Loss-based vs logit-difference importance",
                           "Δ answer loss (nats)", "Δ logit diff", hover=s.head_names), "importance_loss_vs_logit_diff")
top_importance = rank_heads(head_importance.answer_loss, top_k, "pos")
print("heads whose ablation costs the most answer loss:", [str(h) for h in top_importance])

# %% [markdown]
# ### 4e. Per sentence template
#
# **How it works.** When the task mixes several sentence templates (`templates:` in the params, e.g. ABBA and
# BABA), everything above averages over all prompts. Here the logit difference, the top DLA head and output
# patching of every head are computed for each template's prompts alone (patching normalised by that template's
# own clean and corrupted logit differences).
#
# **How to interpret.** A circuit claimed for the task should hold in every template: a head that matters in
# ABBA but not in BABA tracks the name order, not the task.

# %%
if len(prompts.template_names) > 1:
    head_out_by_template = patching.run_sweep(ctx, patching.SWEEPS["head_out"], memory_mb=patching_memory_mb, groups=prompts.templates)
    template_table = sections.template_breakdown(s, ld, dla, head_out_by_template)
    display(template_table.round(3))
    for name, values in zip(prompts.template_names, head_out_by_template):
        figs.show(plotting.heatmap(values, f"Patching head_out, template {name} only (normalised logit diff recovered)", "head", "layer",
                                   color_label="recovered"), f"patch_head_out_{name}")
else:
    head_out_by_template, template_table = None, None
    print("This task has one sentence template; list several under `templates:` in its params to compare them here.")

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 5. Heads by layer band
#
# **How it works.** The most important heads (by output patching) within each band of layers, with their
# attention patterns on the first clean prompt.
#
# **How to interpret.** Early heads usually move token identity to nearby positions; late heads read from
# named positions at the end. Compare which named positions each band attends to.

# %%
bands = sections.layer_bands(s)
for band, layers in bands.items():
    in_band = [h for h in rank_heads(sweeps["head_out"], None, "abs") if h.layer in layers][:heads_per_band]
    print(f"{band} layers {layers}:", [str(h) for h in in_band])
    display(plotting.attention_view(model, dla.cache, prompts.clean_tokens, in_band))

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 6. Induction, duplicate-token and previous-token scores
#
# **How it works.** On sequences `BOS, r, r` of random tokens (r of length `induction_seq_len`), a
# previous-token head attends from each token to the one before; a duplicate-token head attends from a token
# in the second r to its copy in the first r; an induction head attends to the token *after* that copy (and
# so predicts the next token). The loss on the second r, when induction works, is far below the first.
#
# **How to interpret.** Scores near 1 are clear; compare with the model card. Induction claims need a
# previous-token head in an earlier layer as well.

# %%
scores, loss_per_token = pattern_scores.repeated_token_scores(model, induction_seq_len, induction_batch, seed=s.params.seed)
for name, values in scores.items():
    figs.show(plotting.heatmap(values, f"{name.replace('_', '-')} score per head", "head", "layer", color_label="score", sequential=(0, 1)),
              f"score_{name}")
half = induction_seq_len
print(f"mean loss: first r {loss_per_token[:, :half].mean():.3f}, second r {loss_per_token[:, half:].mean():.3f}")
figs.show(plotting.lines(loss_per_token.mean(0), list(range(1, loss_per_token.shape[1] + 1)), "Loss per position on BOS, r, r",
                         "position", "loss (nats)"), "repeated_tokens_loss")
top_scores = {name: rank_heads(values, top_k, "pos") for name, values in scores.items()}

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 7. Backup heads
#
# **How it works.** Mean-ablate the top positive-DLA head at the final position (replace its output there by
# its mean over prompts) and recompute every head's DLA. Heads whose DLA rises take over part of its job
# (backup heads, IOI paper §3.4). The final-LayerNorm scale ratio tells how much of a change is only the
# LayerNorm re-scaling the residual stream.
#
# **How to interpret.** Points above the diagonal are heads that write more of the answer once the top head is
# gone. If the logit difference falls much less than the top head's DLA, backups compensate.

# %%
backup = sections.backup_heads(s, dla, top_dla_pos[0], top_k)
print(f"ablated {backup.ablated.label}: logit diff {backup.logit_diff_before:.3f} -> {backup.logit_diff_after:.3f}; "
      f"final LN scale ratio (after/before) {backup.ln_scale_ratio:.3f}")
print("heads whose DLA rose most:", [(h.label, round(h.dla_before, 3), round(h.dla_after, 3)) for h in backup.risers])
figs.show(plotting.scatter(backup.dla_before, backup.dla_after, f"DLA per head before vs after ablating {backup.ablated.label}",
                           "DLA before", "DLA after", hover=s.head_names, diagonal=True), "backup_dla_scatter")

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 8. Results for the next templates
#
# Everything above, as data: `circuit_expms.json` next to this notebook.

# %%
results = {
    "template": "circuit_expms",
    "params": s.params,
    "model": s.model_name,
    "prompts": {"n": len(prompts.clean_prompts), "n_pos": prompts.n_pos, "positions": prompts.positions,
                "position_labels": prompts.position_labels, "first_clean": prompts.clean_prompts[0], "first_corrupted": prompts.corrupted_prompts[0]},
    "logit_diff": {"clean": ld.clean.mean(), "corrupted": ld.corrupted.mean(), "clean_accuracy": ld.clean_accuracy,
                   "clean_per_prompt": ld.clean, "corrupted_per_prompt": ld.corrupted},
    "dla": {"identity_error": dla.identity_error, "layer_identity_error": dla.layer_identity_error, "exact": dla.exact,
            "caveats": dla.caveats, "frozen_scales": dla.frozen_scales, "logit_lens": dict(zip(dla.lens_labels, dla.lens.tolist())),
            "logit_lens_vocabulary": lens_vocabulary,
            "layers": dict(zip(dla.layer_labels, dla.layers.tolist())), "heads": dla.heads,
            "top_positive": top_dla_pos, "top_negative": top_dla_neg},
    "patching": {"values": sweeps, "layouts": {name: patching.layout(model, name) for name in sweeps}, "top_heads": top_patch,
                 "by_pos_heads": by_pos_heads,
                 "baselines": {"clean": ctx.source_logit_diff, "corrupted": ctx.base_logit_diff},
                 "normalisation": ctx.normalisation.to_json(), "not_supported": skipped_sweeps,
                 "interventions": {name: patching.describe(model, name) for name in sweeps}},
    "attribution_patching": {"values": estimates, "spearman_vs_exact": agreement, "ig_steps": attribution_ig_steps,
                             "head_out_by_direction": by_direction, "head_out_noising": noising},
    "path_patching": {"to_logits": path_to_logits, "top_senders": top_paths},
    "importance": {**head_importance.to_json(), "top_answer_loss": top_importance},
    "templates": {"names": prompts.template_names, "per_prompt": prompts.templates, "varying_positions": prompts.varying_positions,
                  "head_out": head_out_by_template,
                  "breakdown": None if template_table is None else template_table.reset_index().to_dict("records")},
    "head_scores": {"values": scores, "top": top_scores, "seq_len": induction_seq_len},
    "backup": {"ablated": backup.ablated, "logit_diff_before": backup.logit_diff_before, "logit_diff_after": backup.logit_diff_after,
               "ln_scale_ratio": backup.ln_scale_ratio, "risers": backup.risers},
    "layer_bands": bands,
    "figures": figs.saved,
    "key_figures": figs.key,
}
print("wrote", s.write_results("circuit_expms", results))

# %% [markdown]
# ## Your conclusions
#
# What this notebook shows for your task, what to check next. The notes cells (one per section and this one) are
# carried into the new notebook when this one is rerun; an edited notebook is also kept whole under `edited/`.

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.
