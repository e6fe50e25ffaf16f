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
# # Minimal circuit
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/circuit-lab/circuit-lab/blob/main/nb_templates/minimal_circuit.ipynb)
#
# Ranking heads is not a circuit. This notebook takes a circuit (by default the core heads `circuit_discovery`
# found, grouped by the roles `head_functions` gave them; with `circuit_from = "roles"` every head with a role
# plus the unclassified heads whose output patching effect is at least `min_patch_effect`; or one given as the
# `circuit` parameter), knocks
# out every head output outside it, and asks: how much of the logit difference does the circuit keep
# (faithfulness), how does that compare with random circuits of the same shape, which role groups carry it,
# is every head needed (minimality), and does removing heads hurt the circuit as it hurts the model
# (completeness)? Exact path patching then shows which connections carry the effect, drawn as a diagram.
# Results go to `circuit.json` and `minimal_circuit.json`.
#
# Run it in Colab from the badge, or headlessly: `make run TASK=ioi TEMPLATE=minimal_circuit`.


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
input_dir = None  # where head_functions.json and circuit_expms.json are read from; default: the output folder
device = None  # default: CUDA if available, else CPU
dtype = "float32"  # or "bfloat16" / "float16" for big models (half the memory; identities then hold to ~1e-2 only)
threads = None  # torch CPU threads (match processes x threads to the cores)
static_images = True  # also save every figure as PNG (and the diagram as SVG) next to the notebook
circuit = None  # {"groups": {role: ["L3H2", ...]}, "positions": {"L3H2": ["end"]}}; default: the params' `circuit`, else as circuit_from says
circuit_from = "discovery"  # default circuit: "discovery" (circuit_discovery's core heads, grouped by role) or "roles" (head_functions' roles)
ablation = None  # how heads outside the circuit are knocked out: "mean", "zero" or "resample"; default: "resample" (patched from
#   the corrupted prompts: the intervention circuit_discovery found the circuit with) for a discovered circuit, else "mean"
reference = "corrupted"  # prompts the means (or resamples) come from: "corrupted" (IOI's ABC) or "clean"
min_patch_effect = 0.1  # default circuit: unclassified heads need |output patching effect| at least this (share of the gap)
n_random = 50  # random control circuits (as many heads per layer, or as many heads: circuits.ControlDesign); p can reach 1/51, about 0.02
minimality_max_k = 3  # largest set K searched (greedily) per head for minimality
completeness_subsets = 20  # random subsets K for the completeness check
direct_path_senders = None  # senders whose direct edges are compared with their exact paths (None: every circuit head)
seed = 0  # seed of the random controls and subsets

# %%
import pandas as pd
import torch
from IPython.display import display

from helpers.analyses import circuits
from helpers.methods import patching, path_patching
from helpers.notebook import plotting, session
from helpers.schema import artifacts
from helpers.schema.heads import Head, rank_heads

s = session.start_session("minimal_circuit", task, params_file, model_name, n_prompts, output_dir, device, threads, static_images,
                              input_dir, dtype=dtype)
model, prompts, figs = s.model, s.prompts, s.figures
n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
choice = None
if circuit is not None or s.params.circuit is not None:
    proposed = circuits.Circuit.from_json(circuit or s.params.circuit.model_dump())
else:
    discovery = session.load_results(s, "circuit_discovery") if circuit_from == "discovery" else None
    if discovery and discovery.not_supported:
        print("circuit_discovery:", discovery.not_supported, "-> the circuit comes from head_functions' roles")
    role_rows = [row.model_dump() for row in session.load_results(s, "head_functions").roles.table]
    choice = circuits.default_circuit(role_rows, prompts.positions, min_patch_effect, discovery.smallest if discovery else None)
    proposed = choice.circuit
    print("default circuit:", choice.message())
ref_tokens = {"corrupted": prompts.corrupted_tokens, "clean": prompts.clean_tokens}[reference]
ablation = ablation or ("resample" if choice and choice.source == "discovery" else "mean")
ev_args = (model, prompts.clean_tokens, prompts.answer_tokens, prompts.positions, ref_tokens)
ev = circuits.make_evaluator(*ev_args, ablation, prompts.templates, circuits.normalisation_for(ablation, reference))
print(f"task {s.params.task} | model {s.model_name} | {len(proposed.heads)} heads | {ablation} ablation over {reference} prompts "
      f"| faithfulness normalised as {ev.normalisation} ({circuits.NORMALISATION_TEXT[ev.normalisation]})")
display(pd.DataFrame([{"group": g, "head": h, "kept at": ", ".join(proposed.positions.get(h) or ["all positions"])}
                      for g, hs in proposed.groups.items() for h in hs]))
artifacts.write_json(s.out_dir / "circuit.json", proposed.to_json())

# %% [markdown]
# ## 1. Faithfulness
#
# **How it works.** Every head output outside the circuit (and every circuit head's output at positions where
# it is not kept) is replaced by its mean over the reference prompts at that position (or zero, or the
# corrupted prompt's value). Faithfulness is the circuit's logit difference over the full model's. Controls:
# the empty circuit (everything knocked out), random circuits with the same number of heads per layer (never the
# circuit itself), and the circuit with each role group removed. When the circuit's layers hold fewer other head
# sets than `n_random` (a circuit with every head of a layer, on a model with 4 heads per layer), layer-matched
# controls would be a handful of near-copies of the circuit and could never tell it from chance; the controls are
# then random circuits of as many heads from any layers, and the verdict says so.
#
# **How to interpret.** A good circuit keeps most of the logit difference and random circuits of its shape
# keep much less. A group whose removal costs a lot carries the behaviour; one whose removal costs nothing may
# not belong in the circuit.

# %%
everyone = circuits.Circuit({"all": [h.label for h in Head.all(n_layers, n_heads)]})
empty = circuits.Circuit({})
groups_removed = {f"without {g}": proposed.without(hs) for g, hs in proposed.groups.items()}
rows = {"full model (all heads)": everyone, "circuit": proposed, **groups_removed, "empty circuit": empty}
values = ev.faithfulness(list(rows.values()))
control_design = circuits.control_design(proposed, n_layers, n_heads, n_random)
controls = ev.faithfulness(circuits.random_circuits(proposed, n_layers, n_heads, n_random, seed))
faithfulness = {name: float(v) for name, v in zip(rows, values)}
faithfulness[f"random circuits (mean of {n_random})"] = float(controls.mean())
faithfulness[f"random circuits (max of {n_random})"] = float(controls.max())
table = pd.DataFrame({"faithfulness": faithfulness, "logit diff": {k: v * ev.full_logit_diff for k, v in faithfulness.items()}})
display(table.round(3))
versus_random = circuits.compare_with_controls(faithfulness["circuit"], controls, design=control_design)
print(versus_random.message())
figs.show(plotting.distribution(controls, faithfulness["circuit"], f"Faithfulness: the circuit against {n_random} random circuits "
                                "of its shape", "faithfulness", "circuit"), "random_controls", key=True)

# %% [markdown]
# ### 1b. The same circuit under the other intervention
#
# **How it works.** Two ways of removing what is outside a circuit answer two questions. *Patching from the
# corrupted prompts* (`resample` over the corrupted prompts, normalised by the clean − corrupted gap: the
# intervention `circuit_discovery` and MIB use) asks whether the circuit carries the *difference* between clean and
# corrupted prompts. *Mean ablation* (normalised as F(C)/F(M), the IOI paper's) replaces the rest by its average
# output and asks whether the circuit alone produces the logit difference. With a circuit from
# `circuit_discovery`, the first is exactly its closure of these heads (the number `circuit_discovery` reported);
# the second is the labelled alternative.
#
# **How to interpret.** When the two verdicts differ, the heads outside the circuit matter for *how large* the
# logit difference is (their average output writes toward or against the answer) but not for the clean −
# corrupted difference, or the other way round. The verdict of the intervention that found the circuit is the one
# this notebook reports (`versus_random`); the other is shown, never hidden.

# %%
other_ablation = "mean" if ablation == "resample" else "resample"
ev_other = circuits.make_evaluator(*ev_args, other_ablation, prompts.templates, circuits.normalisation_for(other_ablation, reference))
other_value = float(ev_other.faithfulness([proposed])[0])
other_controls = ev_other.faithfulness(circuits.random_circuits(proposed, n_layers, n_heads, n_random, seed))
other_versus = circuits.compare_with_controls(other_value, other_controls, design=control_design)
alternative = {"ablation": other_ablation, "normalisation": ev_other.normalisation, "faithfulness": other_value,
               "random_controls": other_controls, "versus_random": other_versus.to_json()}
display(pd.DataFrame([
    {"intervention": f"{ablation} ({ev.normalisation}) — this notebook's verdict", "circuit": faithfulness["circuit"],
     "random mean": float(controls.mean()), "p": versus_random.p_value, "better than random": versus_random.beats_random},
    {"intervention": f"{other_ablation} ({ev_other.normalisation}) — alternative", "circuit": other_value,
     "random mean": float(other_controls.mean()), "p": other_versus.p_value, "better than random": other_versus.beats_random},
]).round(3))
if choice and choice.source == "discovery" and ablation == "resample" and reference == "corrupted":
    print(f"circuit_discovery found these heads' closure at faithfulness {choice.discovery['core_faithfulness']:.3f}; "
          f"the same intervention here gives {faithfulness['circuit']:.3f}")

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 2. Minimality
#
# **How it works.** (IOI paper §4.2.) For each head v, a set K of heads from v's group is grown greedily to
# make v's removal matter most: the score is |F(C \ (K ∪ {v})) − F(C \ K)| as a fraction of the full model.
#
# **How to interpret.** A head with a score near 0 for every K adds nothing the circuit does not already do
# without it; the IOI paper kept heads scoring above a few percent.

# %%
minimal = circuits.minimality(ev, proposed, minimality_max_k)
display(pd.DataFrame(minimal).T.sort_values("score", ascending=False))
figs.show(plotting.bars([m["score"] for m in minimal.values()], list(minimal), "Minimality: change in faithfulness when v is removed with K",
                        "head v", "|F(C \\ (K ∪ {v})) − F(C \\ K)|", color=[m["group"] for m in minimal.values()]), "minimality")

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 3. Completeness
#
# **How it works.** Remove the same random subset K from the circuit and from the full model; compare the
# circuit's faithfulness F(C \ K) with the model's F(M \ K).
#
# **How to interpret.** A complete circuit behaves like the model under every knockout: points on the
# diagonal. Points far below it mean the model has what the circuit lacks (for example backup heads).

# %%
complete = circuits.completeness(ev, proposed, completeness_subsets, seed)
if complete:
    figs.show(plotting.scatter([c["model"] for c in complete], [c["circuit"] for c in complete], "Completeness: F(C \\ K) vs F(M \\ K)",
                               "full model without K", "circuit without K", hover=[", ".join(c["K"]) for c in complete], diagonal=True),
              "completeness")
    print(f"mean |F(C\\K) - F(M\\K)| over {len(complete)} subsets: {sum(abs(c['circuit'] - c['model']) for c in complete) / len(complete):.3f}")

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 4. Path patching
#
# **How it works.** (IOI paper, Appendix B.) In the corrupted run, one sender head's output takes its clean
# value while every other head is frozen to its corrupted output; MLPs are recomputed. To the logits: what
# reaches the final residual stream. To a receiver: the receiver's q, k or v input from that run is patched
# into an otherwise normal corrupted run. Normalised like activation patching: 1 = clean logit diff restored.
# Only the circuit's own heads are senders into the circuit's heads (what the table and the diagram show).
# The direct edge alone (the sender's clean-minus-corrupted write added only to the receiver's own copy of the
# residual stream, as TransformerLens's `get_act_patch_direct_path`, which the tests check it equals) is shown
# next to the exact path: the difference is what reaches the receiver through MLPs and other heads.
#
# **How to interpret.** Senders with large effects to the logits are the heads the output depends on along
# direct paths; senders into a mover's query or key change where it attends (S-inhibition-like).

# %%
upstream = session.load_results(s, "circuit_expms")  # path patching to the logits and backup heads: computed there once
ctx = patching.make_context(model, prompts)
to_logits = torch.tensor(upstream.path_patching.to_logits)
figs.show(plotting.heatmap(to_logits, "Path patching: each sender to the final residual stream", "head", "layer", color_label="recovered"),
          "path_to_logits")
top_senders = rank_heads(to_logits, s.params.analysis.top_k, "abs")
print("top senders to the logits:", [str(h) for h in top_senders])
members = circuits.circuit_heads(proposed, n_layers, n_heads)
effects = path_patching.receiver_effects(ctx, members, senders=members.values())  # the circuit's own edges
direct, direct_note = path_patching.compare_with_direct_path(ctx, members, effects, direct_path_senders)
display(pd.DataFrame(direct).sort_values("exact path", key=abs, ascending=False).head(12).round(4) if direct
        else "no circuit head has an earlier circuit head to compare")
if direct_note:
    print("not compared:", direct_note)

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 5. Backup heads
#
# **How it works.** From `circuit_expms` (§ backup heads): the top positive-DLA head was mean-ablated at the end
# and the heads whose DLA rose were listed. Here each of them is marked in or out of the circuit.
#
# **How to interpret.** Heads whose DLA rises take over part of the ablated head's job; a circuit without
# them underestimates what the model can do when a head is missing (completeness, §3, shows the same gap).

# %%
backup = upstream.backup
risers = [h.model_copy(update={"in_circuit": h.label in proposed.heads}) for h in backup.risers]
print(f"ablated {backup.ablated}: logit diff {backup.logit_diff_before:.3f} -> {backup.logit_diff_after:.3f}")
display(pd.DataFrame([{"head": h.label, "DLA before": h.dla_before, "DLA after": h.dla_after, "in the circuit": h.in_circuit}
                      for h in risers]).round(3))

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 6. Circuit diagram
#
# **How it works.** Circuit heads placed by layer and by the positions where they are kept, coloured by role;
# edges weighted by path-patching effects between circuit heads (the strongest of q, k, v) and into the
# logits. Saved as SVG and PNG next to the notebook.
#
# **How to interpret.** Thick edges are the connections that carry the behaviour; a head with no thick edge
# in or out may not belong in the circuit.

# %%
edges = circuits.circuit_edges(members, to_logits, effects)
nodes = circuits.circuit_nodes(proposed, n_layers, n_heads)
figs.show(plotting.circuit_diagram(nodes, edges, f"Circuit for {s.params.task} on {s.model_name} (faithfulness {faithfulness['circuit']:.2f})"),
          "circuit_diagram", formats=("png", "svg"), key=True)

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 7. Results
#
# As data: `minimal_circuit.json` (and `circuit.json`) next to this notebook.

# %%
results = {
    "template": "minimal_circuit",
    "params": s.params,
    "model": s.model_name,
    "circuit": proposed.to_json(),
    "circuit_choice": choice.to_json() if choice else None,
    "ablation": ablation,
    "reference": reference,
    "normalisation": ev.normalisation,
    "alternative": alternative,
    "interventions": [iv.to_json() for iv in circuits.knockout_interventions(ev.keep([proposed]), ablation)],
    "full_logit_diff": ev.full_logit_diff,
    "faithfulness": faithfulness,
    "random_controls": controls,
    "versus_random": versus_random.to_json(),
    "minimality": minimal,
    "completeness": complete,
    "path_patching": {"to_logits": to_logits, "top_senders": top_senders, "direct_path_comparison": direct, "direct_path_note": direct_note, "edges": edges},
    "backup": {"ablated": backup.ablated, "logit_diff_after": backup.logit_diff_after, "risers": risers},
    "figures": figs.saved,
    "key_figures": figs.key,
}
print("wrote", s.write_results("minimal_circuit", results))

# %% [markdown]
# ## Your conclusions
#
# What this notebook shows for your task, what to check next. The notes cells (one per section and this one) are
# carried into the new notebook when this one is rerun; an edited notebook is also kept whole under `edited/`.

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.
