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
# # MLP neurons
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/circuit-lab/circuit-lab/blob/main/nb_templates/mlp_neurons.ipynb)
#
# Which MLP layers matter for the task, and inside them, which neurons? This notebook reads the MLP-layer
# patching and DLA from `circuit_expms.json` (run that template first), then goes to single neurons: each
# neuron's direct logit attribution (its activation times its output weights, read through the unembedding),
# exact activation patching of every neuron of the most important MLP layers, where the top neurons fire on the
# task's prompts, and which tokens their output directions promote. Results go to `mlp_neurons.json`.
#
# Run it in Colab from the badge, or headlessly: `make run TASK=ioi TEMPLATE=mlp_neurons`.


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
layers = None  # MLP layers whose neurons are patched one by one, e.g. [0, 3]; default: the `n_layers_patched` with the largest mlp_out patching effect
n_layers_patched = 2  # how many MLP layers are opened up by default
top_k = 10  # neurons listed (by |DLA| and by |patching effect|)
n_exact = 64  # per opened-up layer, the neurons patched exactly: those with the largest attribution estimate (None: every neuron)
n_examples = 5  # top-activating prompt positions shown per top neuron
neurons_examined = 3  # from each list (by DLA, by patching), the top neurons whose examples and output tokens are shown
patching_memory_mb = 1024  # working memory of one batched patching forward

# %%
import pandas as pd
import torch
from IPython.display import display
from transformer_lens.utilities import get_act_name

from helpers.analyses import dla, neurons
from helpers.engine import metrics
from helpers.engine.hooks import run_with_checked_cache
from helpers.methods import patching
from helpers.notebook import plotting, session

s = session.start_session("mlp_neurons", task, params_file, model_name, n_prompts, output_dir, device, threads, static_images,
                              input_dir, dtype=dtype)
model, prompts, figs = s.model, s.prompts, s.figures
circuit = session.load_results(s, "circuit_expms")
layer_scores = neurons.mlp_layer_scores(circuit)
chosen = sorted(layers if layers is not None else sorted(layer_scores, key=layer_scores.get, reverse=True)[:n_layers_patched])
print(f"task {s.params.task} | model {s.model_name} | MLP layers opened up: {chosen}")

# %% [markdown]
# ## 1. Which MLP layers matter
#
# **How it works.** From `circuit_expms`: each MLP layer's direct logit attribution (what its output writes along
# the logit-difference direction at the final position) and its output-patching effect at each position (clean
# into corrupted; 1 = the clean logit difference restored).
#
# **How to interpret.** A layer with a large patching effect but a small DLA matters through later components
# (it feeds heads or MLPs); one with a large DLA writes the answer directly. The layers with the largest patching
# effect are opened up neuron by neuron below (the `layers` parameter chooses others).

# %%
mlp_dla = {int(k.split("_")[0]): v for k, v in circuit.dla.layers.items() if k.endswith("_mlp_out")}
display(pd.DataFrame({"MLP DLA": mlp_dla, "max |mlp_out patching| over positions": layer_scores}).rename_axis("layer").round(3))
figs.show(plotting.heatmap(circuit.patching.values["mlp_out"], "Patching mlp_out by position (from circuit_expms)", "position",
                           "layer", x=prompts.position_labels, color_label="recovered"), "mlp_out_patching")

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 2. Neuron-level direct logit attribution
#
# **How it works.** A neuron writes its post-activation times its row of `W_out` into the residual stream. Read
# through the final norm (with the clean run's cached scale) and dotted with `W_U[:, correct] − W_U[:, incorrect]`,
# that is the neuron's direct contribution to the logit difference at the final position. The neurons of a layer
# plus its `b_out` sum to the layer's MLP DLA: the identity error below measures it.
#
# **How to interpret.** A few neurons with large DLA in a layer mean the layer's direct effect is sparse and those
# neurons are worth reading (sections 4–5); many small ones mean it is spread out. DLA is only the direct path.

# %%
_, cache = run_with_checked_cache(model, prompts.clean_tokens, dla.dla_hook_names(model) + neurons.neuron_hook_names(model))
ndla = neurons.neuron_dla(model, cache, dla.logit_diff_direction(model, prompts.answer_tokens))
print(f"neuron DLA identity: max |sum of neurons + b_out - MLP DLA| = {ndla.identity_error:.2e}"
      + f"\nnorm scales frozen at their values in this run: {', '.join(ndla.frozen_scales)}")
top_dla = ndla.top(top_k)
display(pd.DataFrame(top_dla).round(4))
figs.show(plotting.bars([n["dla"] for n in top_dla], [f"L{n['layer']}N{n['neuron']}" for n in top_dla],
                        f"Top {top_k} neurons by |DLA|", "neuron", "DLA (logit diff)"), "neuron_dla", key=True)

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 3. Neuron activation patching
#
# **How it works.** In the corrupted run, one neuron's post-activation (at every position) takes its clean value;
# the logit difference is normalised as in activation patching (1 = clean restored). First an attribution estimate
# for every neuron of every layer (one forward and one backward: gradient × clean − corrupted activation); then,
# in the chosen layers, the `n_exact` neurons with the largest estimates are patched exactly, each one variant of a
# batched run through the model's own forward (`n_exact = None` patches every neuron; on the toy model that takes
# about a minute). Checks (printed): patching all neurons of a layer at once equals patching its `mlp_out`, and the
# rank agreement of the estimate with the exact effects on the neurons patched.
#
# **How to interpret.** Neurons with large patching effects carry the clean/corrupted difference, directly or
# through later layers; compare with their DLA (the scatter): on the diagonal the effect is direct. Single-neuron
# effects usually sum to less than the layer's: neurons act together. A neuron not patched exactly has only its
# estimate; a low rank agreement means the estimate is not a safe filter here (raise `n_exact`).

# %%
estimate = neurons.neuron_attribution(model, prompts)
ctx = patching.make_context(model, prompts,
                            extra_hooks=neurons.neuron_hook_names(model, chosen))
patched = neurons.candidates(estimate, chosen, n_exact)
effects = neurons.neuron_patching(ctx, chosen, patching_memory_mb, only=patched)
exact_cells = ~effects.isnan()
agreement = metrics.rank_correlation(effects, estimate[chosen])  # over the neurons patched exactly (the others NaN)
checks = pd.DataFrame([{"layer": layer, "all neurons patched": neurons.all_neurons_patched(ctx, layer),
                        "mlp_out patched (all positions)": neurons.all_neurons_patched(ctx, layer, get_act_name("mlp_out", layer)),
                        "neurons patched exactly": int(exact_cells[i].sum())} for i, layer in enumerate(chosen)])
display(checks.round(4))
print(f"attribution estimate vs exact patching on the {int(exact_cells.sum())} neurons patched: Spearman {agreement:.3f}")
by_patching = [{**n, "layer": chosen[n["layer"]]} for n in neurons.top_neurons(effects.nan_to_num(0.0), top_k, "abs", "patching")]
display(pd.DataFrame([{**n, "estimate": float(estimate[n["layer"], n["neuron"]]), "dla": float(ndla.values[n["layer"], n["neuron"]])}
                      for n in by_patching]).round(4))
labels = [f"L{layer}N{int(n)}" for layer in chosen for n in patched[layer]]
figs.show(plotting.scatter(torch.cat([ndla.values[layer, patched[layer]] for layer in chosen]),
                           torch.cat([effects[i, patched[layer]] for i, layer in enumerate(chosen)]),
                           "Neurons patched exactly: DLA vs patching effect", "DLA (logit diff)", "patching effect (recovered)",
                           hover=labels), "neuron_dla_vs_patching")

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 4. Where the top neurons fire
#
# **How it works.** For the top neurons by |DLA| and by |patching effect|, the prompt positions of the clean
# prompts where their activation is largest, with the text up to there.
#
# **How to interpret.** A neuron that fires at the same named position in every prompt (e.g. the final token)
# tracks the task's structure; one that fires on one word tracks that token. The task's prompts are a narrow
# sample: a neuron's role in general text needs a wider corpus.

# %%
top_both = list({(n["layer"], n["neuron"]): n for n in top_dla[:neurons_examined] + by_patching[:neurons_examined]})
examples = {f"L{layer}N{neuron}": neurons.top_activating(cache, prompts.clean_tokens, model.to_str_tokens, layer, neuron, n_examples)
            for layer, neuron in top_both}
for name, rows in examples.items():
    print(name)
    display(pd.DataFrame(rows).round(3))

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 5. What the top neurons write
#
# **How it works.** A neuron's output direction (its row of `W_out`) times the unembedding `W_U`: the tokens whose
# logits it raises and lowers most per unit of activation (its direct effect, before the final norm's scale).
#
# **How to interpret.** A neuron promoting the correct answers (or suppressing the incorrect ones) with positive
# activation writes the answer directly; one promoting unrelated tokens acts through later layers, or is
# polysemantic.

# %%
writes = {f"L{layer}N{neuron}": neurons.output_tokens(model, layer, neuron) for layer, neuron in top_both}
display(pd.DataFrame({name: {"promoted": ", ".join(repr(t) for t, _ in w["promoted"]), "suppressed": ", ".join(repr(t) for t, _ in w["suppressed"])}
                      for name, w in writes.items()}).T)

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 6. Results

# %%
results = {
    "template": "mlp_neurons",
    "params": s.params,
    "model": s.model_name,
    "layer_scores": layer_scores,
    "layers_patched": chosen,
    "neuron_dla": {"identity_error": ndla.identity_error, "frozen_scales": ndla.frozen_scales, "top": top_dla},
    "neuron_patching": {"layers": chosen, "exact": {str(layer): {str(int(n)): float(effects[i, n]) for n in patched[layer]}
                                                    for i, layer in enumerate(chosen)},
                        "estimate": estimate, "spearman_estimate_vs_exact": agreement, "top": by_patching,
                        "checks": checks.to_dict("records")},
    "top_activating": examples,
    "output_tokens": writes,
    "figures": figs.saved,
    "key_figures": figs.key,
}
print("wrote", s.write_results("mlp_neurons", results))

# %% [markdown]
# ## Your conclusions
#
# What this notebook shows for your task, what to check next. The notes cells (one per section and this one) are
# carried into the new notebook when this one is rerun; an edited notebook is also kept whole under `edited/`.

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.
