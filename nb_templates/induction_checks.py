# ---
# jupyter:
#   circuit_lab:
#     scope: model
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: circuit_lab
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
# # Induction checks
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/circuit-lab/circuit-lab/blob/main/nb_templates/induction_checks.ipynb)
#
# Does the model have induction heads, and the previous-token heads they need? On sequences of random
# tokens repeated twice, an induction head attends from each token of the repeat to the token that followed
# its first occurrence and copies it, so the loss on the repeat falls far below the loss on the first copy.
# This notebook scores every head, checks the scores against TransformerLens's `head_detector`, shows the
# patterns of the top heads on a repeated sentence, and measures the K-composition that connects a
# previous-token head to an induction head. Results go to `induction_checks.json`.
#
# Nothing here depends on the task (the task's first clean prompt is only the sentence shown in §4), so a batch
# runs this notebook once per model, into `nb_outputs/_models/<model>/`.
#
# Run it in Colab from the badge, or headlessly: `make run TASK=ioi MODEL=toy-induction TEMPLATE=induction_checks`.


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
task = "ioi"  # params/<task>.yaml (its first clean prompt is the repeated sentence)
params_file = None  # a params YAML path; overrides `task`
model_name = None  # overrides the params' model: a bundled name (models/<name>), a local HF dir, or "gpt2-small"
n_prompts = None  # overrides the params' n_prompts
output_dir = None  # default: nb_outputs/_models/<model>/ (once per model)
device = None  # default: CUDA if available, else CPU
dtype = "float32"  # or "bfloat16" / "float16" for big models (half the memory; identities then hold to ~1e-2 only)
threads = None  # torch CPU threads (match processes x threads to the cores)
static_images = True  # also save every figure as PNG next to the notebook
seq_len = 25  # length of the random sequence r in BOS, r, r (keep 2r+1 within the model's trained context)
batch = 16  # number of random sequences
seed = 0  # seed of the random sequences
role_thresholds = {}  # overrides of helpers.analyses.roles.RoleThresholds (the one place thresholds live), e.g. {"induction": 0.5}
sentence = None  # the natural sentence shown repeated; default: the task's first clean prompt
heads_shown = 6  # attention patterns shown on the repeated sentence (previous-token heads, then induction heads)

# %%
from IPython.display import display
from transformer_lens.utilities import get_act_name

from helpers.analyses import head_functions, pattern_scores, roles
from helpers.notebook import plotting, session
from helpers.schema.heads import heads_above, rank_heads

s = session.start_session("induction_checks", task, params_file, model_name, n_prompts, output_dir, device, threads, static_images, dtype=dtype)
model, figs = s.model, s.figures
print(f"model {s.model_name} ({model.cfg.n_layers} layers x {model.cfg.n_heads} heads) | sequences BOS, r, r with |r| = {seq_len}")

# %% [markdown]
# ## 1. Scores of every head on repeated random tokens
#
# **How it works.** On `batch` sequences `BOS, r, r` (r: `seq_len` random words): the previous-token score is
# the mean attention from each token to the one before it; the duplicate-token score, from each token of the
# second r to its copy in the first r; the induction score, to the token *after* that copy.
#
# **How to interpret.** Scores near 1 are clear-cut heads. In a 2-layer model, induction needs a
# previous-token head in layer 0 and an induction head in layer 1.

# %%
scores, loss = pattern_scores.repeated_token_scores(model, seq_len, batch, seed)
for kind, values in scores.items():
    figs.show(plotting.heatmap(values, f"{kind.replace('_', '-')} score per head", "head", "layer", color_label="score", sequential=(0, 1)),
              f"score_{kind}", key=True)
thresholds = {kind: roles.RoleThresholds(**role_thresholds).for_score(kind) for kind in scores}
found = {kind: heads_above(values, thresholds[kind]) for kind, values in scores.items()}
for kind, hs in found.items():
    print(f"{kind} heads (score >= {thresholds[kind]}):", [str(h) for h in hs] or "none")

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 2. Loss on the repeat
#
# **How it works.** Next-token loss at every position of `BOS, r, r`, averaged over the sequences.
#
# **How to interpret.** Without induction the loss stays near the log of the number of random words on both
# halves. With induction it drops right after the repeat starts.

# %%
first, second = loss[:, :seq_len].mean().item(), loss[:, seq_len:].mean().item()
print(f"mean loss: first r {first:.3f}, second r {second:.3f} (uniform guess: {pattern_scores.uniform_loss(model):.3f})")
figs.show(plotting.lines(loss.mean(0), list(range(1, loss.shape[1] + 1)), "Loss per position on BOS, r, r", "position", "loss (nats)"),
          "repeated_tokens_loss")

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 3. Cross-check with TransformerLens `head_detector`
#
# **How it works.** TransformerLens's `detect_head` scores the same three patterns on texts `r r`. It averages
# over every query row, we over the scored ones; after that rescaling the two must agree exactly.
#
# **How to interpret.** A difference above 1e-5 means one of the implementations scores something else.

# %%
agreement = pattern_scores.head_detector_agreement(model)
print("max |ours - head_detector| per score:", {k: f"{v:.1e}" for k, v in agreement.items()})

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 4. Patterns on a repeated sentence
#
# **How it works.** The attention patterns of the top previous-token and induction heads on a natural
# sentence written twice.
#
# **How to interpret.** A previous-token head draws a line just below the diagonal; an induction head, a line
# `len(sentence)` tokens below it, shifted by one: each token of the repeat attends to the token after its
# first occurrence.

# %%
text = sentence or s.prompts.clean_prompts[0]
tokens = pattern_scores.repeated_tokens(model, text)
shown = (found["prev_token"] + found["induction"])[:heads_shown] or rank_heads(scores["induction"], 2, "pos")  # else the 2 best
_, cache = model.run_with_cache(tokens, names_filter=[get_act_name("pattern", h.layer) for h in shown])
display(plotting.attention_view(model, cache, tokens, shown))

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 5. K-composition: how previous-token heads feed induction heads
#
# **How it works.** The K-composition score of an earlier head into a later head (Elhage et al. 2021) is
# how much of the later head's key input comes from the earlier head's OV output,
# `|W_QK^T W_OV| / (|W_QK| |W_OV|)` in Frobenius norm; TransformerLens computes it from the weights.
#
# **How to interpret.** An induction head's keys must be built by a previous-token head, so their pair
# should score well above the typical pair (the baseline printed: the mean over all earlier-later pairs).

# %%
comp = head_functions.composition_scores(model, "K")
baseline = head_functions.composition_baseline(comp)
pairs = head_functions.composition_pairs(comp, found["prev_token"], found["induction"])
print(f"K-composition baseline (mean over all earlier->later head pairs): {baseline:.3f}")
for p in pairs:
    print(f"  {p['from']} -> {p['to']}: {p['score']:.3f}")
figs.show(plotting.heatmap(comp.flatten(2).flatten(0, 1), "K-composition score (row: earlier head, column: later head)", "later head",
                           "earlier head", x=s.head_names, y=s.head_names, color_label="score", zmid=baseline), "k_composition")

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 6. Results
#
# As data: `induction_checks.json` next to this notebook.

# %%
results = {
    "template": "induction_checks",
    "model": s.model_name,
    "sequences": {"seq_len": seq_len, "batch": batch, "seed": seed},
    "scores": scores,
    "heads": found,
    "thresholds": thresholds,
    "loss": {"first_half": first, "second_half": second, "uniform": pattern_scores.uniform_loss(model)},
    "head_detector_max_abs_diff": agreement,
    "k_composition": {"baseline": baseline, "pairs": pairs, "values": comp},
    "sentence": text,
    "figures": figs.saved,
    "key_figures": figs.key,
}
print("wrote", s.write_results("induction_checks", results))

# %% [markdown]
# ## Your conclusions
#
# What this notebook shows for your task, what to check next. The notes cells (one per section and this one) are
# carried into the new notebook when this one is rerun; an edited notebook is also kept whole under `edited/`.

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.
