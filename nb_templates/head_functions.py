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
# # Head functions
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/circuit-lab/circuit-lab/blob/main/nb_templates/head_functions.ipynb)
#
# What do the important heads of a task *do*? This notebook reads the important heads from
# `circuit_expms.json` (run that template first; the `heads` parameter overrides the list), then asks of each
# head: does it copy the words it attends to into the logits (copy scores), is its contribution to a word
# proportional to its attention to it, which named positions does it attend to, and does it steer where a
# later head attends. From that evidence it proposes a role for every head, with the numbers that justify it.
# Results go to `head_functions.json`.
#
# Run it in Colab from the badge, or headlessly: `make run TASK=ioi TEMPLATE=head_functions`.


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
input_dir = None  # where circuit_expms.json is read from; default: the output folder
device = None  # default: CUDA if available, else CPU
dtype = "float32"  # or "bfloat16" / "float16" for big models (half the memory; identities then hold to ~1e-2 only)
threads = None  # torch CPU threads (match processes x threads to the cores)
static_images = True  # also save every figure as PNG next to the notebook
heads = None  # e.g. ["L3H2", "L0H1"]; default: the top DLA and patching heads of circuit_expms.json
words = None  # named positions holding words, e.g. ["IO", "S1"]; default: every named slot position
copy_top_k = 5  # a copy counts when the word is among the top k logits
attention_from = ["end"]  # named positions whose attention to the words is shown
role_thresholds = {}  # overrides of helpers.analyses.roles.RoleThresholds, e.g. {"copy_score": 40}
svd_heads = 2  # chosen heads (highest output patching first) whose OV and QK singular directions are shown
svd_directions = 3  # singular directions per circuit
signal_threshold = 0.1  # position-vs-token: least |relative change of the logit diff| that counts as a signal
patching_memory_mb = 1024  # memory budget of one batched patching forward

# %%
import pandas as pd
from IPython.display import display
from scipy.stats import pearsonr

from helpers.analyses import head_functions, position_vs_token, roles, weights
from helpers.engine.capabilities import NotSupported
from helpers.notebook import plotting, sections, session

s = session.start_session("head_functions", task, params_file, model_name, n_prompts, output_dir, device, threads, static_images,
                              input_dir, dtype=dtype)
model, prompts, figs = s.model, s.prompts, s.figures
circuit = session.load_results(s, "circuit_expms")
chosen = sections.important_heads(s, circuit, heads)
labels = [h.label for h in chosen]
positions = head_functions.word_positions(prompts, words)
from_positions = head_functions.word_positions(prompts, attention_from)
thresholds = roles.RoleThresholds(**role_thresholds)
cache = head_functions.clean_cache(model, prompts)
where = {n: prompts.positions.get(n, "differs by template") for n in positions}
print(f"task {s.params.task} | model {s.model_name} | heads {labels} | words at {where}")

# %% [markdown]
# ## 1. Copy scores through the OV circuit
#
# **How it works.** (IOI paper §3.3.) Take the residual stream after the first block at each word's position,
# pass it through one head's OV circuit as if the head attended there fully, then the final LayerNorm and the
# unembedding. The copy score is the percent of (prompt, word) pairs whose own token is among the top
# `copy_top_k` logits (fewer than `copy_top_k` other words score higher; the vocabulary is unembedded a band at a
# time and a pair stops once that many beat its word, which is exact). The negative copy score does the same with the OV output negated. "With bias" adds the
# constant a head writes whatever it attends to: its value bias and the layer's output bias (`b_V W_O + b_O`;
# TransformerLens folds every head's value bias into `b_O`, so the two can only be added together).
# "Attend and copy" reads QK and OV together: on each prompt, the word the head attends to most from the end,
# and whether the head's *actual* output there puts that word in the top `copy_top_k`.
#
# **How to interpret.** A mover has a high positive copy score: whatever it attends to, it raises that word's
# logit. A negative mover has a high negative one. Compare with the distribution over all heads (the
# baseline row): a score is only "high" against it. A score that holds only without the bias is fragile; a
# head that copies in the OV circuit but not in "attend and copy" attends elsewhere than to the words.

# %%
copy = head_functions.copy_scores(model, cache, prompts, positions, copy_top_k)
copy_bias = head_functions.copy_scores(model, cache, prompts, positions, copy_top_k, bias=True)
attend_copy = head_functions.attend_and_copy(model, cache, prompts, positions, copy_top_k)
copy_columns = {"copy score (+)": copy.positive, "copy score (-)": copy.negative, "(+) with bias": copy_bias.positive,
                "(-) with bias": copy_bias.negative, "attend and copy": attend_copy.score,
                "attention to the words": 100 * attend_copy.attention_to_words}
copy_table = pd.DataFrame({name: [float(v[h.index]) for h in chosen] for name, v in copy_columns.items()}, index=labels)
copy_table.loc["baseline: all heads, mean"] = [float(v.mean()) for v in copy_columns.values()]
copy_table.loc["baseline: all heads, 90th percentile"] = [float(v.quantile(0.9)) for v in copy_columns.values()]
display(copy_table.round(1))
for sign, values in [("positive", copy.positive), ("negative", copy.negative)]:
    figs.show(plotting.heatmap(values, f"{sign} copy score (% of words in the top {copy_top_k})", "head", "layer", color_label="%",
                               sequential=(0, 100)), f"copy_score_{sign}", key=sign == "positive")

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 2. Attention vs contribution
#
# **How it works.** (IOI paper fig. 3c.) For each prompt and word: the head's attention from the last
# position to the word, against the head's output there dotted with the word's unembedding (divided by the
# final LayerNorm scale, as in DLA). Pearson correlation and p-value per head.
#
# **How to interpret.** A mover's points lie on a rising line: the more it attends to a word, the more it
# raises that word. A falling line is a negative mover. No relation means the head's output does not depend
# on what it attends to among these words.

# %%
ac = head_functions.attention_vs_contribution(model, cache, prompts, positions)
corr = ac.correlation()
corr_rows = []
for h, label in zip(chosen, labels):
    a, c = ac.attention[h.index].flatten(), ac.contribution[h.index].flatten()
    r, p = pearsonr(a.numpy(), c.numpy())
    corr_rows.append({"head": label, "pearson r": r, "p-value": p})
    word_of_point = [w for _ in range(ac.attention.shape[2]) for w in ac.words]
    figs.show(plotting.scatter(a, c, f"{label}: attention from end vs contribution to the word (r = {r:.2f})",
                               "attention from end", "head output · W_U[word]", hover=word_of_point, color=word_of_point),
              f"attention_vs_contribution_{label}")
display(pd.DataFrame(corr_rows).set_index("head").round(4))

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 3. Attention to named positions
#
# **How it works.** Mean attention (over prompts) from each position in `attention_from` to every named word
# position, for every head: one layer × head grid per word.
#
# **How to interpret.** In IOI, name movers attend from the end to the indirect object, S-inhibition heads
# to the second subject, induction and duplicate heads act at S2. A head bright in the same place of two grids
# splits its attention between those words.

# %%
between = head_functions.attention_between(cache, model.cfg.n_layers, from_positions, positions)
for i, src in enumerate(from_positions):
    values = between[:, :, i].permute(2, 0, 1)  # [word, layer, head]
    figs.show(plotting.head_grids(values, [f"to {word}" for word in positions], f"Attention from {src} to each named word",
                                  "attention", sequential=(0, 1)), f"attention_from_{src}", key=True)

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 4. Proposed head roles
#
# **How it works.** The evidence above, with the DLA and output patching of `circuit_expms.json` and the
# previous-token / duplicate / induction scores, goes through explicit rules (`helpers/analyses/roles.py`, thresholds
# in `role_thresholds`). Movers are found first; then each important head in an earlier layer has its output
# replaced by its corrupted-run value, and if that moves a mover's attention to a word by at least the
# threshold, the head is inhibition-like (it changes where the mover attends).
#
# **How to interpret.** A role is a hypothesis with its evidence, not a verdict; "unclassified" means no rule
# was met. Check a proposed role against the plots above before building a circuit on it (next template:
# `minimal_circuit`).

# %%
evidence = roles.head_evidence(circuit, chosen, copy, corr)
movers = roles.heads_meeting(evidence, "mover", circuit.logit_diff.clean, thresholds)
if movers:
    shift = head_functions.attention_shift(model, cache, prompts, chosen, movers, positions)
    evidence = roles.add_attention_shift(evidence, shift, chosen, movers, list(positions))
role_table = roles.assign_roles(evidence, circuit.logit_diff.clean, thresholds)
print("movers:", [h.label for h in movers] or "none")
print(roles.roles_summary(role_table, thresholds))
display(role_table)

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 5. Position or token: what the heads' output says
#
# **How it works.** (IOI paper §3.3 and Appendix A.) Each head's output at the final position is taken from
# the run of another corruption of the same prompts (the `corruptions:` of the params) and put into the clean
# run; the effect is the relative change of the clean logit difference, `LD(patched) / LD(clean) - 1`
# (0 = nothing changes, -1 = the logit difference is gone, below -1 it is reversed). A corruption that moves the
# subject without renaming it (ABBA -> BABA, `changes: position`) changes what a *position* signal says; one
# that renames it without moving it (names exchanged, `changes: token`) changes what a *token* signal says;
# noise on the subject's embeddings (causal tracing) blurs the word itself.
#
# **How to interpret.** A head that "reads as position" tells later heads *where* the subject is; one that
# "reads as token" tells them *which word* it is; the IOI paper's S-inhibition heads carry both. A name mover
# copies the token: exchanging the names reverses its effect. "neither" is below `signal_threshold`.

# %%
signal_results = position_vs_token.patch_from_all(model, prompts, "end", patching_memory_mb, seed=s.params.seed)
if not signal_results:
    print("This task defines no extra corruptions; add them under `corruptions:` in its params file, e.g.\n"
          "  flipped_order: {template: <the template with the first two slots swapped>, changes: position}\n"
          "  exchanged_names: {template: <the names swapped everywhere>, changes: token}\n"
          "  subject_noise: {noise: [<slot>], scale: 3.0}")
for name, result in signal_results.items():
    print(f"{name} ({result.changes}): logit diff of the corrupted run itself {result.logit_diff_source:.3f} "
          f"(clean {result.logit_diff_clean:.3f})")
    figs.show(plotting.heatmap(result.effect, f"Head output at the end from '{name}': relative change of the clean logit diff",
                               "head", "layer", color_label="LD / LD clean - 1"), f"signal_{name}")
by_kind = {r.changes: r for r in signal_results.values()}
if "position" in by_kind and "token" in by_kind:
    pos_run, tok_run = by_kind["position"], by_kind["token"]
    figs.show(plotting.scatter(pos_run.effect, tok_run.effect, f"Position signal ({pos_run.corruption}) vs token signal ({tok_run.corruption})",
                               f"effect of {pos_run.corruption}", f"effect of {tok_run.corruption}", hover=s.head_names, diagonal=True),
              "signal_position_vs_token")
signal_rows = position_vs_token.signal_table(signal_results, max(len(labels), 5), role_table["role"].to_dict(), signal_threshold)
if signal_rows:
    display(pd.DataFrame(signal_rows).set_index("head").round(3))

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 6. The heads' circuits in the weights
#
# **How it works.** (Elhage et al. 2021.) From the weights alone, no prompts: the full OV circuit
# `W_E W_OV W_U` on the task's words (the tokens at the named word positions) says what a head writes when it
# attends to a word; a copying head puts the word's own logit first (share of words where it does; mean rank of the
# own logit, 0 = top). Once through the token embedding alone and once with MLP0's output added (MLP0 acts as an
# extended embedding in GPT-2-style models). The positional QK circuit (learned position embeddings through the
# head's QK) gives the attention each position would pay to the one before it from position alone: previous-token
# heads stand out. The full QK circuit of the first chosen head on the task's words is drawn too. Last, the top
# singular directions of the `svd_heads` chosen heads that output patching ranks highest: their OV circuits (TransformerLens `SVDInterpreter`: the tokens
# each output direction promotes at one end and at the other) and QK circuits (`FactoredMatrix.svd`: destination
# tokens that look for source tokens along each direction), with the share of the circuit they hold.
#
# **How to interpret.** A mover should copy in the weights as well as on the prompts (section 1); compare with
# the all-heads baseline row. These read one path through the model (token or position alone), so they support or
# question a role; the prompt-based scores decide. Rotary models have no position embedding to read. A head whose
# few top singular directions hold most of its circuit does one low-rank thing; names at the ends of an OV
# direction say the head moves names (a copying head spreads over many directions: its OV is near the identity).

# %%
word_tokens = prompts.clean_tokens.gather(1, head_functions.position_matrix(positions, len(prompts.clean_tokens))).unique()
ov = weights.ov_copying(model, word_tokens)
ov_mlp0 = weights.ov_copying(model, word_tokens, effective_embedding=True)
weights_table = pd.DataFrame({"OV copies (share of words)": [float(ov.top1[h.index]) for h in chosen],
                              "own-logit mean rank": [float(ov.mean_rank[h.index]) for h in chosen],
                              "with MLP0: copies": [float(ov_mlp0.top1[h.index]) for h in chosen]}, index=labels)
weights_table.loc["baseline: all heads, mean"] = [float(ov.top1.mean()), float(ov.mean_rank.mean()), float(ov_mlp0.top1.mean())]
print(f"{len(word_tokens)} distinct words at the named positions")
display(weights_table.round(3))
figs.show(plotting.heatmap(ov_mlp0.top1, "OV circuit (with MLP0) copies the word: share of the task's words", "head", "layer",
                           color_label="share", sequential=(0, 1)), "ov_copying")
try:
    positional = weights.previous_token_offsets(model, min(32, prompts.n_pos * 2), 3)[..., 1]
    figs.show(plotting.heatmap(positional, "Attention to the previous position, from position embeddings alone", "head", "layer",
                               color_label="attention", sequential=(0, 1)), "positional_previous_token")
except NotSupported as err:
    positional = None
    print(err)
patch_out = circuit.patching.head_out()
svd_chosen = sorted(chosen, key=lambda h: -abs(patch_out[h.layer][h.head]))[:svd_heads]  # the heads patching ranks highest
singular = [weights.ov_singular_tokens(model, h.layer, h.head, svd_directions) for h in svd_chosen]
singular += [weights.qk_singular_tokens(model, h.layer, h.head, svd_directions) for h in svd_chosen]
for result in singular:
    print(f"{result.label} {result.circuit}: top {svd_directions} singular values {result.singular_values.numpy().round(2)} "
          f"hold {100 * result.share:.0f}% of the circuit's squared singular values")
    display(pd.DataFrame(result.directions).set_index("direction"))
first = chosen[0]
words_str = [model.tokenizer.decode([int(t)]) for t in word_tokens]
figs.show(plotting.heatmap(weights.qk_tokens(model, first.layer, first.head, word_tokens),
                           f"{labels[0]}: full QK circuit on the task's words (score, before softmax)", "source word",
                           "destination word", x=words_str, y=words_str, color_label="score"), "qk_words")

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 7. Results for the next templates
#
# Everything above, as data: `head_functions.json` next to this notebook.

# %%
results = {
    "template": "head_functions",
    "params": s.params,
    "model": s.model_name,
    "heads": chosen,
    "words": {n: prompts.positions.get(n, "differs by template") for n in positions},
    "copy_scores": {"k": copy_top_k, "positive": copy.positive, "negative": copy.negative, "positive_with_bias": copy_bias.positive,
                    "negative_with_bias": copy_bias.negative, "attend_and_copy": attend_copy.score,
                    "attention_to_words": attend_copy.attention_to_words,
                    "table": copy_table.reset_index(names="head").to_dict("records")},
    "attention_vs_contribution": {"pearson_all_heads": corr, "table": corr_rows},
    "attention_between": {"from": list(from_positions), "to": list(positions), "values": between},
    "weights": {"n_words": len(word_tokens), "ov_copying": ov.top1, "ov_mean_rank": ov.mean_rank, "ov_copying_with_mlp0": ov_mlp0.top1,
                "positional_previous_token": positional, "singular_directions": [r.to_json() for r in singular], "table": weights_table.reset_index(names="head").to_dict("records")},
    "signals": {"threshold": signal_threshold, "results": {name: r.to_json() for name, r in signal_results.items()},
                "table": signal_rows},
    "roles": {"thresholds": thresholds.model_dump(), "table": role_table.reset_index().to_dict("records"),
              "summary": roles.roles_summary(role_table, thresholds)},
    "figures": figs.saved,
    "key_figures": figs.key,
}
print("wrote", s.write_results("head_functions", results))

# %% [markdown]
# ## Your conclusions
#
# What this notebook shows for your task, what to check next. The notes cells (one per section and this one) are
# carried into the new notebook when this one is rerun; an edited notebook is also kept whole under `edited/`.

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.
