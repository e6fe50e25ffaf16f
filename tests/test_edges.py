"""Edge-level circuits: exact evaluation against TransformerLens and plain hooks, attribution identities, pruning,
serialisation, and an honest NotSupported on every family that lacks what exact edges need."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import patching as tl_patching

from helpers.engine.capabilities import NotSupported, model_state
from helpers.engine.metrics import logit_diff
from helpers.methods import edges as E
from helpers.methods.attribution_patching import attribution_patch, metric_gradients
from helpers.toys.families import FAMILIES


@pytest.fixture(scope="module")
def ioi_ectx(toy_ioi, ioi_prompts):
    return E.edge_context(toy_ioi, ioi_prompts)


def _index(graph, name):
    return [n.name for n in graph.senders].index(name)


def _tl_metric(answers):
    return lambda logits: logit_diff(logits, answers).mean()


def _without_sender(graph, name):
    mask = graph.allowed.clone()
    mask[_index(graph, name)] = False
    return mask


def test_graph_of_toy_ioi(ioi_ectx, toy_ioi):
    g = ioi_ectx.graph
    L, H = toy_ioi.cfg.n_layers, toy_ioi.cfg.n_heads
    assert len(g.senders) == 1 + L * (H + 1) and len(g.receivers) == L * (3 * H + 1) + 1
    # input -> everything; a head -> q/k/v of later layers, its own layer's MLP and later ones, the logits
    per_head_sender = [3 * H * (L - 1 - l) + (L - l) + 1 for l in range(L)]
    per_mlp_sender = [3 * H * (L - 1 - l) + (L - 1 - l) + 1 for l in range(L)]
    assert g.n_edges == len(g.receivers) + sum(H * a + b for a, b in zip(per_head_sender, per_mlp_sender))
    assert g.names_of(g.mask_of(["L0H1->L2H3.k", "MLP0->logits"])) == ["L0H1->L2H3.k", "MLP0->logits"]
    with pytest.raises(KeyError, match="L3H0->L1H0.q"):
        g.mask_of(["L3H0->L1H0.q"])  # later to earlier is not an edge


def test_all_edges_is_clean_and_none_is_corrupted(ioi_ectx, monkeypatch):
    g = ioi_ectx.graph
    monkeypatch.setattr(E, "SKIP_PATHLESS", False)  # the empty circuit run, not skipped
    f = E.evaluate_masks(ioi_ectx, torch.stack([g.allowed, torch.zeros_like(g.allowed)]))
    assert f.tolist() == pytest.approx([1.0, 0.0], abs=1e-5)


def test_removing_a_senders_edges_equals_patching_its_output(ioi_ectx, toy_ioi, ioi_prompts):
    """No edge out of head h = h's output corrupted for every reader = TL's head_out patch of corrupted z into clean."""
    g = ioi_ectx.graph
    _, corr_cache = toy_ioi.run_with_cache(ioi_prompts.corrupted_tokens)
    ref = tl_patching.get_act_patch_attn_head_out_all_pos(
        toy_ioi, ioi_prompts.clean_tokens, corr_cache, _tl_metric(ioi_prompts.answer_tokens)
    )
    heads = ["L0H3", "L2H1", "L3H2"]
    ours = E.evaluate_masks(ioi_ectx, torch.stack([_without_sender(g, h) for h in heads]), per_prompt=True).mean(-1)
    for h, value in zip(heads, ours):
        layer, head = (int(x) for x in h[1:].split("H"))
        assert abs(float(value) - float(ref[layer, head])) < 1e-4


def test_removing_an_mlps_edges_equals_patching_its_output(ioi_ectx, toy_ioi, ioi_prompts):
    _, corr_cache = toy_ioi.run_with_cache(ioi_prompts.corrupted_tokens, names_filter="blocks.1.hook_mlp_out")
    patched = toy_ioi.run_with_hooks(
        ioi_prompts.clean_tokens, fwd_hooks=[("blocks.1.hook_mlp_out", lambda act, hook: corr_cache["blocks.1.hook_mlp_out"])]
    )
    ours = E.evaluate_masks(ioi_ectx, _without_sender(ioi_ectx.graph, "MLP1")[None], per_prompt=True)[0]
    assert (ours - logit_diff(patched, ioi_prompts.answer_tokens)).abs().max() < 1e-4


def direct_path_circuit(graph, sender: str, receiver: str):
    """The circuit whose exact evaluation is TL's direct path patching from ``sender`` into ``receiver`` (q/k/v):
    the sender sees only clean inputs (every edge into it and its ancestors), its one edge into the receiver, and
    every edge out of nodes the receiver's change can reach (they carry that change on; everything else is
    corrupted, as in TL's corrupted base run). Built independently of ``prune``."""
    s = _index(graph, sender)
    s_layer, s_head = graph.senders[s].layer, graph.senders[s].head
    r_node = graph.receivers[[r.name for r in graph.receivers].index(receiver)]
    mask = torch.zeros_like(graph.allowed)
    for j, rec in enumerate(graph.receivers):
        if rec.kind != "logits" and (rec.layer < s_layer or (rec.layer == s_layer and rec.kind in E.COMPONENTS and s_head in rec.heads)):
            mask[:, j] = True  # every edge into the sender (its key/value group's too) and its ancestors
    mask[s, [r.name for r in graph.receivers].index(receiver)] = True
    for i, node in enumerate(graph.senders):
        downstream = (
            (node.kind == "head" and node.layer == r_node.layer and node.head in r_node.heads)
            or node.layer > r_node.layer
            or (node.kind == "mlp" and node.layer == r_node.layer)
        )
        if downstream:
            mask[i] = True
    return mask & graph.allowed


@pytest.mark.parametrize("sender,receiver", [("L0H3", "L2H1.q"), ("L1H0", "L3H2.q"), ("L0H2", "L3H2.q")])
def test_a_direct_path_circuit_equals_transformer_lens_direct_path(ioi_ectx, toy_ioi, ioi_prompts, sender, receiver):
    clean_cache = toy_ioi.run_with_cache(ioi_prompts.clean_tokens)[1]
    corr_cache = toy_ioi.run_with_cache(ioi_prompts.corrupted_tokens)[1]
    s_layer, s_head = (int(x) for x in sender[1:].split("H"))
    ref = tl_patching.get_act_patch_direct_path(
        toy_ioi,
        ioi_prompts.corrupted_tokens,
        clean_cache,
        corr_cache,
        _tl_metric(ioi_prompts.answer_tokens),
        s_layer,
        s_head,
        component="q",
    )
    r_layer, r_head = (int(x) for x in receiver.split(".")[0][1:].split("H"))
    ours = E.evaluate_masks(ioi_ectx, direct_path_circuit(ioi_ectx.graph, sender, receiver)[None], per_prompt=True)[0].mean()
    assert abs(float(ours) - float(ref[r_layer, r_head])) < 1e-4


def test_eap_sums_over_receivers_to_the_heads_attribution(ioi_ectx, toy_ioi, ioi_prompts):
    """Every reader of a head's output is one of its edges, so its edge scores sum to d LD / d z · (z_clean - z_corr)
    taken at the clean run on hook_z (no forks): an independent route through autograd."""
    scores = E.edge_scores(ioi_ectx, "eap")
    hooks = [f"blocks.{l}.attn.hook_z" for l in range(toy_ioi.cfg.n_layers)]
    grads, clean_z, _ = metric_gradients(toy_ioi, ioi_prompts.clean_tokens, ioi_prompts.answer_tokens, hooks)
    corr_z = toy_ioi.run_with_cache(ioi_prompts.corrupted_tokens, names_filter=hooks)[1]
    gap = ioi_ectx.clean_logit_diff - ioi_ectx.corrupted_logit_diff
    for l, h in [(0, 3), (1, 1), (2, 0), (3, 2)]:
        node = ((clean_z[hooks[l]] - corr_z[hooks[l]])[:, :, h] * grads[hooks[l]][:, :, h]).sum() / gap
        assert abs(float(scores[_index(ioi_ectx.graph, f"L{l}H{h}")].sum()) - float(node)) < 1e-4


def test_eap_ig_sums_to_attribution_patching_with_ig(ioi_ectx, toy_ioi, ioi_prompts):
    """EAP-IG over a head's outgoing edges = attribution patching's IG estimate of its head_out sweep cell."""
    scores = E.edge_scores(ioi_ectx, "eap-ig", steps=4)
    ref = attribution_patch(toy_ioi, ioi_prompts, ["head_out"], ig_steps=4).values["head_out"]
    per_head = torch.stack([scores[_index(ioi_ectx.graph, f"L{l}H{h}")].sum() for l in range(4) for h in range(4)]).reshape(4, 4)
    assert (per_head - ref).abs().max() < 1e-4


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_edge_scores_do_not_depend_on_the_gradient_chunks(ioi_ectx, method):
    """Edge scores are added up chunk by chunk of rows (prompts x IG steps): a budget that forces one row a forward
    gives the scores of one big forward."""
    whole = E.edge_scores(ioi_ectx, method, steps=3)
    one_row = E.edge_scores(ioi_ectx, method, steps=3, memory_mb=1e-3)
    assert whole.abs().max() > 0.01 and torch.allclose(whole, one_row, atol=1e-5)


def test_prune_keeps_only_paths_from_input_to_logits(ioi_ectx):
    g = ioi_ectx.graph
    kept = E.prune(
        g,
        g.mask_of(
            [
                "input->L0H3.v",
                "L0H3->L3H2.v",
                "L3H2->logits",  # a path
                "L1H0->L2H0.q",  # L1H0 gets nothing from the input: dead
                "input->L2H1.k",
            ]
        ),
    )  # L2H1 writes nowhere: dead
    assert g.names_of(kept) == ["input->L0H3.v", "L0H3->L3H2.v", "L3H2->logits"]
    assert torch.equal(E.prune(g, g.allowed), g.allowed)
    assert not E.prune(g, g.mask_of(["L0H3->L3H2.v"])).any()


def test_circuit_round_trips_through_json(ioi_ectx, tmp_path):
    c = E.EdgeCircuit(["input->L0H3.v", "L0H3->L3H2.v", "L3H2->logits"], "eap-ig", None, {"L3H2->logits": 0.5})
    E.evaluate(ioi_ectx, [c])
    c.save(tmp_path / "c.json")
    import json

    back = E.EdgeCircuit.from_json(json.loads((tmp_path / "c.json").read_text()))
    assert back == c and back.heads == ["L0H3", "L3H2"] and "3 edges" in repr(back)
    tiny = E.EdgeCircuit(c.edges, "eap", float("nan"), {"L3H2->logits": 3e-9})  # undefined faithfulness, a tiny score
    with pytest.warns(UserWarning, match="faithfulness"):  # artifacts' NonFiniteWarning names it
        tiny.save(tmp_path / "tiny.json")
    text = (tmp_path / "tiny.json").read_text()
    assert "NaN" not in text and json.loads(text)["faithfulness"] is None  # strict JSON
    assert E.EdgeCircuit.from_json(json.loads(text)).scores == {"L3H2->logits": 3e-9}  # not rounded away


def test_evaluation_is_independent_of_chunking(ioi_ectx):
    g = ioi_ectx.graph
    masks = torch.rand((5, *g.allowed.shape), generator=torch.Generator().manual_seed(0)) < 0.5
    assert torch.allclose(E.evaluate_masks(ioi_ectx, masks), E.evaluate_masks(ioi_ectx, masks, memory_mb=0.001), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exact(family, family_models, monkeypatch):
    """All edges = the clean run, none = the corrupted run, a head's (an MLP's) out-edges removed = its output patched
    (through the receiver forks and as node-level runs), one variant per chunk = all in one, and EAP / EAP-IG edge
    scores summing to node attributions: on every family, including those whose forks are made at the projections
    (OPT, GPT-J) and those whose heads write through a post-attention norm (Gemma-2/3)."""
    model, prompts = family_models(family)
    ectx = E.edge_context(model, prompts)
    g = ectx.graph
    head = f"L{model.cfg.n_layers - 1}H1"
    clean = logit_diff(model(prompts.clean_tokens), prompts.answer_tokens)
    corrupted = logit_diff(model(prompts.corrupted_tokens), prompts.answer_tokens)
    _, corr_cache = model.run_with_cache(prompts.corrupted_tokens)
    ref = tl_patching.get_act_patch_attn_head_out_all_pos(model, prompts.clean_tokens, corr_cache, _tl_metric(prompts.answer_tokens))
    mlp_out = "blocks.0.hook_mlp_out"
    patched = model.run_with_hooks(prompts.clean_tokens, fwd_hooks=[(mlp_out, lambda act, hook: corr_cache[mlp_out])])
    for node_runs in (False, True):
        monkeypatch.setattr(E, "NODE_RUNS", node_runs)
        lds = E.evaluate_masks(ectx, torch.stack([g.allowed, torch.zeros_like(g.allowed), _without_sender(g, head)]), per_prompt=True)
        assert (lds[0] - clean).abs().max() < 1e-4 and (lds[1] - corrupted).abs().max() < 1e-4
        assert abs(float(lds[2].mean()) - float(ref[model.cfg.n_layers - 1, 1])) < 1e-4
        without_mlp = E.evaluate_masks(ectx, _without_sender(g, "MLP0")[None], per_prompt=True)[0]
        assert (without_mlp - logit_diff(patched, prompts.answer_tokens)).abs().max() < 1e-4
    masks = torch.rand((3, *g.allowed.shape), generator=torch.Generator().manual_seed(0)) < 0.5  # chunking changes nothing
    assert torch.allclose(E.evaluate_masks(ectx, masks), E.evaluate_masks(ectx, masks, memory_mb=0.001), atol=1e-5)
    # EAP: a head's edges sum to its node attribution, also under grouped-query k/v receivers
    scores = E.edge_scores(ectx, "eap")
    hook = f"blocks.{model.cfg.n_layers - 1}.attn.hook_z"
    grads, clean_z, _ = metric_gradients(model, prompts.clean_tokens, prompts.answer_tokens, [hook])
    gap = ectx.clean_logit_diff - ectx.corrupted_logit_diff
    node = ((clean_z[hook] - corr_cache[hook])[:, :, 1] * grads[hook][:, :, 1]).sum() / gap
    assert abs(float(scores[_index(g, head)].sum()) - float(node)) < 1e-4 * max(1.0, abs(float(node)))
    # EAP-IG: the same at every point of the path (under a post-attention norm, its Jacobian at each point)
    scores = E.edge_scores(ectx, "eap-ig", steps=3)
    ref = attribution_patch(model, prompts, ["head_out"], ig_steps=3)
    node = ref.values["head_out"][model.cfg.n_layers - 1, 1]
    assert abs(float(scores[_index(g, head)].sum()) - float(node)) < 1e-4 * max(1.0, abs(float(node)))


def _every_kind_of_mask(graph):
    """Masks as the templates make them: dense and sparse random edge sets, the full graph minus one edge (exact
    single-edge checks), head closures (the core-heads search, random head sets), all and nothing."""
    from helpers.analyses.discovery import head_closure

    g = torch.Generator().manual_seed(1)
    shape = graph.allowed.shape
    one_out = graph.allowed.repeat(3, 1, 1)
    index = graph.edge_index
    picked = index[torch.tensor([0, len(index) // 2, len(index) - 1])]
    one_out[torch.arange(3), picked[:, 0], picked[:, 1]] = False
    heads = [n.name for n in graph.senders if n.kind == "head"]
    closures = torch.stack([head_closure(graph, heads[:2]), head_closure(graph, heads[1::3]), head_closure(graph, heads[:-1])])
    return torch.cat(
        [
            torch.rand((2, *shape), generator=g) < 0.5,
            torch.rand((2, *shape), generator=g) < 0.03,
            one_out,
            closures,
            torch.stack([graph.allowed, torch.zeros_like(graph.allowed)]),
        ]
    )


def _forms_read(ectx, masks) -> set[str]:
    """Which of ``_fork_choices``' forms some fork of some variant takes."""
    forms = set()
    for c in E._fork_choices(ectx.graph, ~(masks & ectx.graph.allowed)).values():
        forms |= {"node set"} if bool(c.minus_kept.any()) else set()
        forms |= {"complement"} if bool((c.weights < 0).any()) else set()
        forms |= {"absent"} if bool((c.weights > 0).any()) else set()
    return forms


def test_reading_fewer_senders_changes_no_number(ioi_ectx, monkeypatch):
    """Each fork reads its update in the cheapest exact form (running totals for node sets, else its absent edges'
    senders or the complement); the same masks evaluated with the absent form only give the same logit differences."""
    masks = _every_kind_of_mask(ioi_ectx.graph)
    assert _forms_read(ioi_ectx, masks) == {"node set", "complement", "absent"}  # so the comparison tests each
    fast = E.evaluate_masks(ioi_ectx, masks, per_prompt=True)
    monkeypatch.setattr(E, "COMPLEMENT", False)
    plain = E.evaluate_masks(ioi_ectx, masks, per_prompt=True)
    assert (fast - plain).abs().max() < 1e-4
    assert fast[:, 0].std() > 0.1  # the masks differ in what they keep


def test_forks_that_do_not_reproduce_the_forward_are_not_supported(family_models, monkeypatch):
    """OPT's attention cannot fork in the bridge; the forks made at its projections are verified against the plain
    forward, and a wrong one (here: doubled queries) makes edges refuse, saying why, before any work."""
    from helpers.engine import forks

    model, prompts = family_models("opt")
    verdicts = model_state(model, "fast_paths")
    saved = verdicts.pop(("made_forks", "k", "q", "v"), None)
    monkeypatch.setattr(forks._ProjectionFork, "__call__", lambda self, act, hook=None: None if not self.fork.has_hooks() else 2 * act)
    try:
        with pytest.raises(NotSupported, match="do not reproduce the model's forward"):
            E.edge_context(model, prompts)
    finally:
        verdicts.pop(("made_forks", "k", "q", "v"), None)
        if saved is not None:
            verdicts[("made_forks", "k", "q", "v")] = saved


@pytest.mark.parametrize("family", FAMILIES)
def test_reading_fewer_senders_changes_no_number_on_every_family(family, family_models, monkeypatch):
    """Grouped-query k/v receivers (Llama, Mistral, Qwen), parallel attention and MLP (Pythia: an MLP fork cannot
    read the complement, its own layer's heads come first), learned positions (GPT-2)."""
    model, prompts = family_models(family)
    ectx = E.edge_context(model, prompts)
    masks = _every_kind_of_mask(ectx.graph)
    fast = E.evaluate_masks(ectx, masks, per_prompt=True)
    monkeypatch.setattr(E, "COMPLEMENT", False)
    assert (fast - E.evaluate_masks(ectx, masks, per_prompt=True)).abs().max() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_forks_read_in_bands_and_split_where_hooked_change_no_number(family, family_models, monkeypatch):
    """Two savings of the fork runs change no number on any family: a band of forks reads the stored sender changes
    once between them (``_EdgeRun._band_sum``), against each fork reading them alone; and the bridge forks q/k/v
    inputs only in blocks with a hook on one (``engine.forks``), against every block forked."""
    from helpers.engine import forks

    model, prompts = family_models(family)
    ectx = E.edge_context(model, prompts)
    masks = _every_kind_of_mask(ectx.graph)
    fast = E.evaluate_masks(ectx, masks, per_prompt=True)
    monkeypatch.setattr(E, "RECEIVERS_PER_BAND", 1)
    monkeypatch.setattr(forks, "SPLIT_WHERE_HOOKED", False)
    assert (fast - E.evaluate_masks(ectx, masks, per_prompt=True)).abs().max() < 1e-4


def test_blocks_without_a_hooked_fork_run_unforked(family_models):
    """With a hook on one block's query fork, only that block's attention copies the residual stream per head."""
    from helpers.engine.forks import receiver_forks

    model, prompts = family_models("llama")
    split = []
    with receiver_forks(model), torch.no_grad(), model.hooks(fwd_hooks=[("blocks.1.hook_q_input", lambda act, hook: act)]):
        seen = [b.attn.register_forward_pre_hook(lambda attn, args: split.append(attn.config.use_split_qkv_input)) for b in model.blocks]
        try:
            model(prompts.clean_tokens)
        finally:
            for handle in seen:
                handle.remove()
    assert split == [layer == 1 for layer in range(model.cfg.n_layers)]


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_a_single_edge_under_a_post_attention_norm_equals_plain_hooks(family, family_models):
    """Gemma's layers write N(sum of head outputs): removing the one edge L0H1 -> L1H2.q means that head's query input
    reads layer 0's output with head 1 corrupted, N(A - change). Built here from a cache with plain hooks (the clean
    run, one query fork edited), independently of the engine's running mixes."""
    model, prompts = family_models(family)
    ectx = E.edge_context(model, prompts)
    g = ectx.graph
    assert g.post_norm
    names = ["blocks.0.attn.hook_z", "blocks.0.ln1_post.hook_in"]
    _, clean = model.run_with_cache(prompts.clean_tokens, names_filter=names)
    _, corr = model.run_with_cache(prompts.corrupted_tokens, names_filter=names)
    w_o = model.blocks[0].attn.W_O[1]
    change = (clean[names[0]][:, :, 1] - corr[names[0]][:, :, 1]) @ w_o
    norm = model.blocks[0].ln1_post._original_component
    attn = clean[names[1]]
    update = norm(attn) - norm(attn - change)
    assert update.abs().max() > 1e-3  # the edge carries something

    def edit(act, hook):
        act = act.clone()
        act[:, :, 2] -= update
        return act

    with E.receiver_forks(model):
        ref = logit_diff(
            model.run_with_hooks(prompts.clean_tokens, fwd_hooks=[("blocks.1.attn.hook_q_input", edit)]), prompts.answer_tokens
        )
    mask = g.allowed.clone()
    mask[_index(g, "L0H1"), [r.name for r in g.receivers].index("L1H2.q")] = False
    ours = E.evaluate_masks(ectx, mask[None], per_prompt=True)[0]
    assert (ours - ref).abs().max() < 1e-4 and (ours - logit_diff(model(prompts.clean_tokens), prompts.answer_tokens)).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_direct_path_patching_under_a_post_attention_norm_equals_the_edge_circuit(family, family_models):
    """Two implementations of one quantity under Gemma's post-attention norm: path patching's direct path (the
    receiver's fork in the corrupted run gets N(A + change) - N(A)) and the exact evaluation of the circuit that is
    that direct path (``direct_path_circuit``, the engine's per-receiver normed mixes). TransformerLens's own
    ``get_act_patch_direct_path`` adds z @ W_O, the write of an architecture without the norm."""
    from helpers.methods.patching import make_context
    from helpers.methods.path_patching import direct_path_effects
    from helpers.schema.heads import Head

    model, prompts = family_models(family)
    ectx = E.edge_context(model, prompts)
    ctx = make_context(model, prompts)
    effects = direct_path_effects(ctx, Head(0, 1), "q")
    for r_head in range(model.cfg.n_heads):
        ours = E.evaluate_masks(ectx, direct_path_circuit(ectx.graph, "L0H1", f"L1H{r_head}.q")[None])[0]
        assert abs(float(ours) - float(effects[1, r_head])) < 1e-4
    assert effects[1].abs().max() > 1e-3


def test_made_forks_nest_without_firing_twice(family_models):
    """A fork made at the projections inside another (path patching inside an edge run) is made once: a hook on it
    fires once per forward."""
    from helpers.engine.forks import receiver_forks, split_qkv_input

    model, prompts = family_models("gptj")
    calls = []
    hook = [("blocks.1.hook_q_input", lambda act, hook: calls.append(1))]
    with receiver_forks(model):
        with split_qkv_input(model):
            model.run_with_hooks(prompts.clean_tokens[:1], fwd_hooks=hook)
        model.run_with_hooks(prompts.clean_tokens[:1], fwd_hooks=hook)  # the outer forks still take hooks
    assert len(calls) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_runs_that_start_at_the_first_receiver_change_no_number(family, family_models, monkeypatch):
    """Single-edge removals into every receiver layer (and circuits mixing them, in shuffled order) start at the first
    block an absent edge reaches, the senders before it clean; the same masks run from block 0 give the same logit
    differences, in the caller's order. Under post-attention norms (Gemma) the earlier layers' attention outputs and
    head changes come from the clean run."""
    model, prompts = family_models(family)
    ectx = E.edge_context(model, prompts)
    g = ectx.graph
    edges = g.edge_index
    layer_of = torch.tensor([g.receivers[int(r)].layer for r in edges[:, 1]])
    from_head = edges[:, 0] == g.first_head(0)  # and from a head of block 0, read through the earlier layers' norms
    picked = torch.cat(
        [edges[layer_of == layer][:2] for layer in layer_of.unique()] + [edges[from_head & (layer_of == layer_of.max())][:2]]
    )
    masks = g.allowed[None].repeat(len(picked) + 2, 1, 1)
    masks[torch.arange(len(picked)), picked[:, 0], picked[:, 1]] = False
    masks[-2] = g.allowed & (torch.rand(g.allowed.shape, generator=torch.Generator().manual_seed(0)) < 0.7)
    order = torch.randperm(len(masks), generator=torch.Generator().manual_seed(1))
    masks = masks[order]
    layers = E.start_layers(ectx, masks)
    assert int(layers.max()) == model.cfg.n_layers - 1
    fast = E.evaluate_masks(ectx, masks, memory_mb=1, per_prompt=True)  # small chunks: several start layers
    monkeypatch.setattr(E, "START_AT_RECEIVERS", False)
    plain = E.evaluate_masks(ectx, masks, memory_mb=1, per_prompt=True)
    assert (fast - plain).abs().max() < 1e-4
    assert fast.std(0).max() > 0  # the masks differ


@pytest.mark.parametrize("family", FAMILIES)
def test_circuits_without_a_path_are_the_corrupted_run(family, family_models, monkeypatch):
    """``Graph.has_path`` agrees with ``prune`` (an independent walk), and a circuit with no path from the input to the
    logits, run in full, is the corrupted run: skipping its forward changes no number."""
    model, prompts = family_models(family)
    ectx = E.edge_context(model, prompts)
    g = ectx.graph
    generator = torch.Generator().manual_seed(0)
    masks = torch.cat([g.allowed & (torch.rand((8, *g.allowed.shape), generator=generator) < p) for p in (0.01, 0.03, 0.1, 0.3)])
    path = g.has_path(masks)
    assert path.tolist() == [bool(E.prune(g, m).any()) for m in masks]
    assert 0 < int(path.sum()) < len(masks)  # both kinds
    fast = E.evaluate_masks(ectx, masks)
    monkeypatch.setattr(E, "SKIP_PATHLESS", False)
    full = E.evaluate_masks(ectx, masks)
    assert full[~path].abs().max() < 1e-4  # run in full, a pathless circuit is the corrupted run
    assert (fast[~path] == 0).all() and (fast - full).abs().max() < 1e-4


def _node_level_masks(graph, generator):
    """Node-level circuits as the searches make them (head closures), with MLPs left out too, the full graph, a
    sender's out-edges removed, and masks that are not node-level (one edge out, a random edge set)."""
    from helpers.analyses.discovery import head_closure

    heads = [n.name for n in graph.senders if n.kind == "head"]
    kinds = [head_closure(graph, heads[:2]), head_closure(graph, heads[1::3]), head_closure(graph, heads[:-1])]
    for p in (0.3, 0.7):  # random node sets, MLPs included: every edge among the kept senders (the input kept)
        keep = torch.rand(len(graph.senders), generator=generator) < p
        keep[0] = True
        matters = (graph.reads.float() @ keep.float()) > 0
        matters[-1] = True
        kinds.append(graph.allowed & keep[:, None] & matters[None, :])
    kinds += [graph.allowed, _without_sender(graph, heads[-1])]
    one_out, to_logits = graph.allowed.clone(), graph.allowed.clone()
    one_out[tuple(graph.edge_index[len(graph.edge_index) // 2])] = False
    to_logits[graph.first_head(0), -1] = False  # the logits read every kept sender: this is not node-level
    random = graph.allowed & (torch.rand(graph.allowed.shape, generator=generator) < 0.5)
    return torch.stack(kinds + [one_out, to_logits, random])


@pytest.mark.parametrize("family", FAMILIES)
def test_node_level_circuits_run_as_one_patched_forward_exactly(family, family_models, monkeypatch):
    """A node-level circuit (every receiver that matters reads the same kept senders: head closures, node sets with
    MLPs left out, the full graph, a sender removed) is evaluated as one plain forward with the left-out nodes'
    outputs patched from the corrupted run; its logit differences equal the receiver-fork evaluation's, on every
    family (post-attention norms included), and the other masks still go through the forks."""
    model, prompts = family_models(family)
    ectx = E.edge_context(model, prompts)
    masks = _node_level_masks(ectx.graph, torch.Generator().manual_seed(0))
    nodes, _ = E.node_sets(ectx.graph, masks)
    assert nodes.tolist() == [True] * (len(masks) - 3) + [False] * 3
    fast = E.evaluate_masks(ectx, masks, memory_mb=1, per_prompt=True)  # small chunks: several start layers
    monkeypatch.setattr(E, "NODE_RUNS", False)
    forks = E.evaluate_masks(ectx, masks, memory_mb=1, per_prompt=True)
    assert (fast - forks).abs().max() < 1e-4
    assert fast[:-3].std(0).max() > 0  # the circuits differ


@pytest.mark.parametrize("family", FAMILIES)
def test_leave_one_outs_start_from_the_union_run_exactly(family, family_models, monkeypatch):
    """A batch of one head set's leave-one-outs (as ``fewest_heads`` evaluates them) starts each circuit at its
    left-out head's block from the run of the set itself, the batch's union: the same logit differences as running
    every circuit from the first block it changes, on every family (post-attention norms included), with the union's
    run made once."""
    from helpers.analyses.discovery import head_closure

    model, prompts = family_models(family)
    ectx = E.edge_context(model, prompts)
    graph = ectx.graph
    heads = [n.name for n in graph.senders if n.kind == "head"]
    chosen = heads[:1] + heads[len(heads) // 2 :]  # the input's block and the later half: most start late
    masks = torch.stack([head_closure(graph, [h for h in chosen if h != x]) for x in chosen])
    runs = []
    monkeypatch.setattr(E, "NODE_BASE_GAIN", 0)  # the toy models have 2 blocks: the saving is small, the path the same
    monkeypatch.setattr(E, "_node_run_resid", lambda *a, _f=E._node_run_resid: runs.append(1) or _f(*a))
    fast = E.evaluate_masks(ectx, masks, per_prompt=True)
    assert runs == [1]
    monkeypatch.setattr(E, "NODE_BASE", False)
    plain = E.evaluate_masks(ectx, masks, per_prompt=True)
    assert runs == [1]
    assert (fast - plain).abs().max() < 1e-4
    assert fast.std(0).max() > 0  # the circuits differ


@pytest.mark.parametrize("family", FAMILIES)
def test_edge_scores_from_the_first_difference_equal_every_position(family, family_models, monkeypatch):
    """EAP and EAP-IG computed from the first position where the runs differ (the earlier positions' keys and values
    cached: every sender's change is 0 before it) equal the scores of forwards over every position, on every family
    (post-attention norms included); the saving is verified and used, not silently switched off."""
    from helpers.engine.shortcuts import fast_paths
    from helpers.methods import attribution_patching as AP

    model, prompts = family_models(family)
    ectx = E.edge_context(model, prompts)
    assert ectx.first_difference > 0
    fast = {m: E.edge_scores(ectx, m, steps=3) for m in ("eap", "eap-ig")}  # one chunk: each row its prompt's keys, values
    verdicts = [ok for key, ok in fast_paths(model).items() if key[0] == "gradient_suffix"]
    assert verdicts and all(verdicts)
    monkeypatch.setattr(AP, "SUFFIX_GRADIENTS", False)
    for method, scores in fast.items():
        full = E.edge_scores(ectx, method, steps=3, memory_mb=1)  # (and one row a chunk)
        assert (scores - full).abs().max() <= 1e-5 * (1 + full.abs().max()), (family, method)
        assert full.abs().max() > 0
