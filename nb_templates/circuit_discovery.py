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
# # Circuit discovery
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/circuit-lab/circuit-lab/blob/main/nb_templates/circuit_discovery.ipynb)
#
# Ranking heads is not a circuit, and a circuit of most of the model is not an explanation. This notebook looks
# for the smallest set of *edges* that carries the behaviour. The model is cut into a graph: the embeddings, every
# head and every MLP send into every later head's query, key and value input, every later MLP's input and the
# logits. EAP and EAP-IG score every edge at once from gradients; circuits of growing size (the top edges, pruned
# to paths from the input to the logits) are then evaluated exactly and drawn as a faithfulness curve, scored by
# its areas (CPR, CMD; the MIB benchmark's protocol) against random circuits of the same size. The smallest
# circuit reaching `target` faithfulness goes to `minimal_circuit`, which tests it further.
# Results go to `circuit_discovery.json` and `edge_circuit.json`.
#
# Run it in Colab from the badge, or headlessly: `make run TASK=ioi TEMPLATE=circuit_discovery`.


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
input_dir = None  # where earlier templates' JSON is read from; default: the output folder
device = None  # default: CUDA if available, else CPU
dtype = "float32"  # or "bfloat16" / "float16" for big models
threads = None  # torch CPU threads (match processes x threads to the cores)
static_images = True  # also save every figure as PNG (and the diagram as SVG) next to the notebook
methods = ["eap", "eap-ig"]  # edge scoring methods (helpers.methods.scoring): "eap" (gradient at the clean run), "eap-ig" (integrated gradients); also "exact", "acdc" (slow)
ig_steps = 5  # EAP-IG: points on the path from the corrupted to the clean embeddings
fractions = None  # circuit sizes on the curve (fractions of all edges); default: MIB's 0.001 ... 1
n_random = 10  # random circuits per size (same number of edges) and per head count
target = 0.8  # faithfulness the smallest circuit must reach
max_single_edges = 5000  # exact single-edge patching of every edge (to check the scores) for graphs with at most this many edges;
check_top, check_random = 50, 100  # larger graphs: the top edges of each method and random others, patched exactly (each a run from its receiver on: ~0.7 s at 64 prompts on SmolLM2)
acdc_thresholds = []  # e.g. [0.003, 0.01, 0.03]: ACDC's greedy exact pass at each (one evaluation per edge, in sequence: small models)
memory_mb = 1024  # memory for one batched evaluation (variants per chunk follow from it)
seed = 0  # seed of the random controls

# %%
import time

import pandas as pd
import torch
from IPython.display import display

from helpers.analyses import discovery, mib_format
from helpers.engine import metrics
from helpers.methods import edges, scoring
from helpers.notebook import plotting, session

discovery.check_options(methods, fractions, target, n_random, ig_steps, acdc_thresholds)  # bad parameters stop here, before any work
s = session.start_session("circuit_discovery", task, params_file, model_name, n_prompts, output_dir, device, threads, static_images,
                              input_dir, dtype=dtype)
model, prompts, figs = s.model, s.prompts, s.figures
not_supported = edges.unsupported_reason(model)
if not_supported:
    print("NOT SUPPORTED:", not_supported)
    print("Nothing below runs for this model; minimal_circuit falls back to the heads head_functions gives a role.")
else:
    ectx = edges.edge_context(model, prompts)
    g = ectx.graph
    print(f"task {s.params.task} | model {s.model_name} | {len(g.senders)} senders, {len(g.receivers)} receiver inputs, "
          f"{g.n_edges} edges | logit diff clean {ectx.clean_logit_diff:.3f}, corrupted {ectx.corrupted_logit_diff:.3f}")
    print("Edges here:", g.definition(model))

# %% [markdown]
# ## 1. Edge scores
#
# **How it works.** An edge's score estimates how much of the clean − corrupted logit difference is lost when only
# that edge carries the corrupted sender's output: the sender's clean-minus-corrupted output dotted with the
# gradient of the logit difference at the receiver's input (EAP, gradient on the clean run; EAP-IG averages it over
# `ig_steps` points between the corrupted and clean embeddings). Cost is given in forward-pass equivalents: the
# time of the scoring over that of one plain forward of the same prompts.
#
# **How to interpret.** Large |scores| are candidate circuit edges. The scores are first-order estimates; the
# curve below checks them exactly.

# %%
timings, scores = {}, {}
if not not_supported:
    start = time.perf_counter()
    with torch.no_grad():
        model(prompts.clean_tokens)
    forward_s = time.perf_counter() - start
    for method in methods:
        start = time.perf_counter()
        scores[method] = scoring.score_edges(ectx, method, scoring.ScoringOptions(ig_steps=ig_steps, memory_mb=memory_mb))
        seconds = time.perf_counter() - start
        timings[method] = {"seconds": seconds, "forward_equivalents": seconds / forward_s}
    names = g.edge_names()
    index = g.edge_index
    top = pd.DataFrame({m: scores[m][index[:, 0], index[:, 1]] for m in methods}, index=names)
    display(top.reindex(top[methods[-1]].abs().sort_values(ascending=False).index).head(15).round(4))
    display(pd.DataFrame(timings).T.round(2))

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 2. Scores against exact single-edge patching
#
# **How it works.** For every edge (graphs up to `max_single_edges` edges; on larger graphs, such as a real
# model's tens of thousands, a sample: the `check_top` edges of each method by |score| and `check_random` others drawn
# at random, its size printed), the full model is run with only that edge corrupted, in batches; its exact effect is
# the share of the logit difference lost. Spearman's rank correlation says how well each method orders the edges.
#
# **How to interpret.** High correlation: the gradient estimate ranks edges as exact patching does. Points far off
# the diagonal are edges where the model is non-linear between clean and corrupted (EAP-IG usually fixes some).

# %%
agreement, exact_check = {}, None
if not not_supported:
    checked = index if g.n_edges <= max_single_edges else discovery.check_sample(g, scores, check_top, check_random, seed)
    how = "every edge" if len(checked) == g.n_edges else f"a sample: the top {check_top} of each method by |score| and {check_random} random others"
    exact_check = {"edges": len(checked), "of": g.n_edges, "how": how}
    exact = scoring.single_edge_effects(ectx, memory_mb, edges=None if len(checked) == g.n_edges else checked)
    pick = (checked[:, 0], checked[:, 1])
    for method in methods:
        agreement[method] = metrics.rank_correlation(exact[pick], scores[method][pick])
    print(f"Spearman with exact single-edge patching on {len(checked)} of {g.n_edges} edges ({how}):",
          {m: round(v, 3) for m, v in agreement.items()})
    checked_names = g.names_of(torch.zeros_like(g.allowed).index_put_(pick, torch.tensor(True)))
    figs.show(plotting.scatter(exact[pick], scores[methods[-1]][pick], f"{methods[-1]} score vs exact effect of each edge "
                               f"({len(checked)} of {g.n_edges} edges)", "exact effect (share of the logit diff lost)",
                               f"{methods[-1]} score", hover=checked_names, diagonal=True), "scores_vs_exact")

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 3. Faithfulness curves
#
# **How it works.** For each size, the top edges by |score| are kept, pruned to paths from the input to the logits,
# and everything else is patched from the corrupted run; faithfulness is exact. `n_random` random circuits of as many
# edges as requested (a pruned circuit keeps at most that many), drawn once per size and shared by the methods, run in
# the same batched call; one with no path from the input to the logits is the corrupted run (0) without a forward. CPR is the area under the curve (higher is better); CMD the area under
# |1 − faithfulness| (lower is better), both over the fraction of edges kept.
#
# **How to interpret.** A method that finds the circuit climbs to 1 at a small fraction; the random curve stays
# near 0 until most edges are in. With `acdc_thresholds`, ACDC's exact greedy pass (Conmy et al. 2023) adds one
# point per threshold: the reference the gradient methods approximate, at one forward pass per edge.

# %%
curves, acdc_circuits = {}, []
if not not_supported:
    sizes = tuple(fractions) if fractions else discovery.DEFAULT_FRACTIONS
    curves = discovery.faithfulness_curves(ectx, {m: scores[m] for m in methods}, sizes, n_random, seed, memory_mb)
    if acdc_thresholds:
        curves["acdc"], acdc_circuits = discovery.acdc_curve(ectx, tuple(acdc_thresholds), n_random, seed, memory_mb)
    first = curves[methods[0]]
    display(pd.DataFrame({m: {"CPR (higher is better)": c.cpr, "CMD (lower is better)": c.cmd} for m, c in curves.items()}
                         | {"random": {"CPR (higher is better)": first.random_cpr, "CMD (lower is better)": first.random_cmd}}).round(3))
    series = {m: ([p.fraction for p in c.points], [p.faithfulness for p in c.points]) for m, c in curves.items()}
    series["random (mean)"] = ([p.fraction for p in first.points], [p.random_mean for p in first.points])
    figs.show(plotting.curves(series, "Faithfulness by circuit size", "fraction of edges kept (after pruning; log scale)", "faithfulness"),
              "faithfulness_curves", key=True)
    display(pd.DataFrame([{"method": m, **vars(p)} for m, c in curves.items() for p in c.points]).round(4))

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 4. The smallest circuit
#
# **How it works.** The fewest top edges (of the last method) whose pruned circuit reaches `target`: a geometric
# grid of sizes evaluated in one batch (faithfulness need not rise with the number of edges), then bisection inside
# the grid step where it first reaches the target. Controls: random sets of as many edges; its heads' node-level
# circuit (every edge among them, the MLPs, input and logits) against random head sets of as many heads. Then the
# fewest of its heads whose node-level circuit *reproduces* the model, |1 − faithfulness| ≤ 1 − `target` (a circuit
# that exceeds the model, e.g. by dropping heads that write against the answer, does not): heads ordered by how much
# leaving each one out changes faithfulness (exactly for the 32 heads whose edges score highest, the rest by their
# edges' scores), the shortest prefix of that order that reproduces the model, then
# greedy pruning once few heads remain. `minimal_circuit` takes these core heads as its circuit.
#
# The circuit and every edge's score are also written in the MIB circuit format (`circuit_mib.json`: `cfg`,
# `nodes` such as `a3.h2`, edges such as `input->a0.h0<q>` with `score` and `in_graph`), which EAP-IG's and MIB's
# code read; `helpers.analyses.mib_format.load_mib` reads such a file back here.
#
# **How to interpret.** A real circuit is far above its random controls. Heads in the edge circuit but not in the
# core add little on their own.

# %%
found = None
if not not_supported:
    method = methods[-1]
    found = discovery.smallest_circuit(ectx, scores[method], method, target, n_random, seed, memory_mb)
    print(found.message())
    display(pd.DataFrame([{"edge": e, "score": found.circuit.scores.get(e)} for e in found.circuit.edges]).round(4))
    found.circuit.save(s.out_dir / "edge_circuit.json")
    mib_format.save_mib(s.out_dir / "circuit_mib.json", g, g.mask_of(found.circuit.edges), scores[method], mib_format.cfg_of(model))
    if found.random_core:
        figs.show(plotting.distribution(found.random_core, found.core_faithfulness, f"Core heads against {len(found.random_core)} random "
                                        f"sets of {len(found.core_heads)} heads", "faithfulness", "core heads"), "core_vs_random")

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 5. Circuit diagram
#
# **How it works.** The smallest circuit's nodes by layer (heads by index, then MLPs), its edges merged per sender
# and receiving node, width by the summed score and labelled with the inputs they enter (q, k, v or the residual
# input of an MLP or the logits); on a real model, the 300 strongest of them (`plotting.DIAGRAM_EDGES`; every edge
# is in `edge_circuit.json`), each named on hover at its middle. Saved as SVG and PNG.
#
# **How to interpret.** Follow the thick edges from the input to the logits: that is the mechanism to explain.

# %%
if found is not None and found.circuit.edges:
    nodes, diagram_edges = discovery.diagram_parts(g, found.circuit)
    figs.show(plotting.circuit_diagram(nodes, diagram_edges, f"Discovered circuit for {s.params.task} on {s.model_name}: "
                                       f"{len(found.circuit.edges)} edges, faithfulness {found.circuit.faithfulness:.2f}", "head"),
              "circuit_diagram", formats=("png", "svg"), key=True)

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.

# %% [markdown]
# ## 6. Results
#
# As data: `circuit_discovery.json` (and the circuit alone in `edge_circuit.json`) next to this notebook.

# %%
results = {
    "template": "circuit_discovery",
    "params": s.params,
    "model": s.model_name,
    "not_supported": not_supported,
    "graph": None if not_supported else {"senders": len(g.senders), "receivers": len(g.receivers), "edges": g.n_edges},
    "edge_definition": None if not_supported else g.definition(model),
    "baselines": None if not_supported else {"clean_logit_diff": ectx.clean_logit_diff, "corrupted_logit_diff": ectx.corrupted_logit_diff},
    "timings": timings,
    "agreement_with_exact": agreement,
    "exact_check": exact_check,
    "curves": {m: c.to_json() for m, c in curves.items()},
    "acdc": [c.to_json() for c in acdc_circuits],
    "smallest": found.to_json() if found else None,
    "figures": figs.saved,
    "key_figures": figs.key,
}
print("wrote", s.write_results("circuit_discovery", results))

# %% [markdown]
# ## Your conclusions
#
# What this notebook shows for your task, what to check next. The notes cells (one per section and this one) are
# carried into the new notebook when this one is rerun; an edited notebook is also kept whole under `edited/`.

# %% [markdown] tags=["notes"]
# **Your notes.** Write here: this cell is carried into the notebook when it is rerun.
