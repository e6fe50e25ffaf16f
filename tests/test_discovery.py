"""Circuit discovery: curves and their areas, the smallest circuit and its controls, and recovery of circuits known
in advance (a planted-circuit model, toy-induction's K-composition)."""

from __future__ import annotations

import pytest
import torch

from helpers.analyses import discovery as D
from helpers.analyses.pattern_scores import induction_task
from helpers.methods import edges as E
from helpers.methods import scoring as S
from helpers.task.prompts import PromptPair
from helpers.toys.planted import PLANTED_EDGES, build_planted_model, planted_task


@pytest.fixture(scope="module")
def ioi_ectx(toy_ioi, ioi_prompts):
    return E.edge_context(toy_ioi, ioi_prompts)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from transformers import AutoTokenizer

    from helpers import MODELS_DIR
    from helpers.task.models import load_model

    tok = AutoTokenizer.from_pretrained(MODELS_DIR / "toy-ioi")
    model = load_model(str(build_planted_model(tok, tmp_path_factory.mktemp("planted"))), device="cpu")
    return E.edge_context(model, PromptPair.denoising(*planted_task(model, batch=8)))


def test_areas_of_known_curves():
    assert D.area([0.5], [1.0]) == pytest.approx(0.75)  # (0,0) -> (0.5,1) -> (1,1)
    assert D.distance_area([0.5], [1.0]) == pytest.approx(0.25)
    assert D.area([0.25, 0.5], [0.0, 0.0]) == pytest.approx(0.25)  # only the last segment up to (1,1)
    assert D.distance_area([0.5], [1.5]) == pytest.approx(0.5)  # overshooting the model is a distance too


def test_roc_auc():
    pos = torch.tensor([True, True, False, False])
    assert D.roc_auc(torch.tensor([4.0, 3.0, 2.0, 1.0]), pos) == 1.0
    assert D.roc_auc(torch.tensor([1.0, 2.0, 3.0, 4.0]), pos) == 0.0
    assert D.roc_auc(torch.tensor([1.0, 1.0, 1.0, 1.0]), pos) == 0.5


def test_curve_one_batched_call_per_size_and_full_graph_is_one(ioi_ectx, monkeypatch):
    calls = []
    real = D.evaluate_masks
    monkeypatch.setattr(D, "evaluate_masks", lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k))
    scores = E.edge_scores(ioi_ectx, "eap")
    fractions = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0)
    curve = D.faithfulness_curve(ioi_ectx, scores, "eap", fractions, n_random=3, progress=False)
    assert calls == [4] * len(fractions)  # the circuit and its 3 random controls, together
    assert curve.points[-1].faithfulness == pytest.approx(1.0, abs=1e-5)
    assert curve.points[-1].random_mean == pytest.approx(1.0, abs=1e-5)  # every edge: no randomness left
    assert 0 < curve.random_cpr < curve.cpr <= 1.0 and 0 <= curve.cmd < curve.random_cmd
    again = D.faithfulness_curve(ioi_ectx, scores, "eap", fractions, n_random=3, progress=False)
    assert again.to_json() == curve.to_json()  # deterministic, random controls included


def test_methods_share_one_call_and_the_random_controls_per_size(ioi_ectx, monkeypatch):
    """Both methods' circuits and one set of random controls of k edges go into one batched call per size; each
    method's curve is what it is alone, and its random controls are the ones drawn for it alone."""
    scores = {m: E.edge_scores(ioi_ectx, m) for m in ("eap", "eap-ig")}
    fractions = (0.02, 0.1, 0.5)
    alone = {m: D.faithfulness_curve(ioi_ectx, s, m, fractions, n_random=4, progress=False) for m, s in scores.items()}
    calls = []
    real = D.evaluate_masks
    monkeypatch.setattr(D, "evaluate_masks", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    curves = D.faithfulness_curves(ioi_ectx, scores, fractions, n_random=4, progress=False)
    assert [len(masks) for masks in calls] == [2 + 4] * len(fractions)
    for masks, point in zip(calls, curves["eap"].points):  # the controls have k edges; a pruned circuit at most k
        assert masks[2:].flatten(1).sum(1).tolist() == [point.k] * 4 and masks[:2].flatten(1).sum(1).max() <= point.k
    for m in scores:
        for p, q in zip(curves[m].points, alone[m].points):
            assert p.faithfulness == pytest.approx(q.faithfulness, abs=1e-6) and p.random_mean == pytest.approx(q.random_mean, abs=1e-6)
    assert [p.random_mean for p in curves["eap"].points] == [p.random_mean for p in curves["eap-ig"].points]


def test_first_passing_scans_smallest_first_and_stops_at_the_call_that_finds_it(ioi_ectx, monkeypatch):
    """On a known faithfulness of the size (passing at 7 and 9, not at 8: nothing assumes it rises), the scan returns
    the smallest passing size with every size's exact value, and evaluates none past the call (of ``step`` sizes)
    that holds it; no size passing: every size evaluated, None."""
    g = ioi_ectx.graph
    calls = []

    def known(ectx, masks, memory_mb=1024, **_):
        calls.append(len(masks))
        return torch.tensor([float(int(m.sum()) in (7, 9, 30)) for m in masks])

    def mask_of(k):
        mask = torch.zeros_like(g.allowed)
        mask[g.edge_index[:k, 0], g.edge_index[:k, 1]] = True
        return mask

    monkeypatch.setattr(D, "evaluate_masks", known)
    sizes = [1, 2, 3, 5, 7, 8, 9, 12, 15, 30]
    hit, values = D.first_passing(ioi_ectx, sizes, mask_of, lambda v: v >= 0.8, step=4)
    assert hit == 7 and calls == [4, 4] and sorted(values) == sizes[:8] and values[7] == 1.0 and values[8] == 0.0
    calls.clear()
    hit, values = D.first_passing(ioi_ectx, sizes[:4], mask_of, lambda v: v >= 0.8, step=4)
    assert hit is None and calls == [4] and sorted(values) == sizes[:4]


def test_a_circuit_given_twice_is_run_once_with_the_same_value(ioi_ectx, monkeypatch):
    g = ioi_ectx.graph
    scores = E.edge_scores(ioi_ectx, "eap")
    a, b = D.top_edges(g, scores, 30), D.top_edges(g, scores, 60)
    alone = E.evaluate_masks(ioi_ectx, torch.stack([a, b]))
    runs = []
    real = E._logit_diffs
    monkeypatch.setattr(E, "_logit_diffs", lambda ectx, masks, memory_mb: runs.append(len(masks)) or real(ectx, masks, memory_mb))
    values = E.evaluate_masks(ioi_ectx, torch.stack([b, a, b, g.allowed, a, g.allowed]))
    assert runs == [3]
    expected = [alone[1], alone[0], alone[1], 1.0, alone[0], 1.0]
    assert values.tolist() == pytest.approx([float(x) for x in expected], abs=1e-5)


def test_smallest_circuit_on_toy_ioi_beats_its_controls(ioi_ectx):
    scores = E.edge_scores(ioi_ectx, "eap-ig")
    found = D.smallest_circuit(ioi_ectx, scores, "eap-ig", target=0.8, n_random=5)
    assert found.reached and found.circuit.faithfulness >= 0.8
    assert E.evaluate(ioi_ectx, [E.EdgeCircuit(found.circuit.edges)])[0] == pytest.approx(found.circuit.faithfulness, abs=1e-6)
    fewer = D.top_edges(ioi_ectx.graph, scores, found.k - 1)
    assert E.evaluate_masks(ioi_ectx, fewer[None])[0] < 0.8  # the bisection's answer is the smallest k
    assert max(found.random_edges) < 0.3 and found.core_faithfulness >= 0.8
    assert sum(found.random_core) / len(found.random_core) < found.core_faithfulness
    assert set(found.core_heads) <= set(found.circuit.heads) and "L3H2" in found.core_heads  # the name mover


def test_single_edge_effects_are_what_removing_the_edge_does(ioi_ectx):
    exact = S.single_edge_effects(ioi_ectx, progress=False)
    g = ioi_ectx.graph
    mask = g.allowed.clone()
    s, r = g.edge_index[5].tolist()
    mask[s, r] = False
    assert float(exact[s, r]) == pytest.approx(1 - float(E.evaluate_masks(ioi_ectx, mask[None])[0]), abs=1e-6)
    assert not exact[~g.allowed].any()


def test_planted_circuit_is_recovered(planted):
    g = planted.graph
    truth = g.mask_of(list(PLANTED_EDGES))
    assert float(E.evaluate_masks(planted, truth[None])[0]) > 0.95  # the planted edges carry the behaviour
    exact = S.single_edge_effects(planted, progress=False)
    assert exact[g.allowed & ~truth].abs().max() < 0.02 < exact[truth].abs().min()  # and nothing else does
    for method in ("eap", "eap-ig"):
        scores = E.edge_scores(planted, method)
        found = D.smallest_circuit(planted, scores, method, target=0.95, n_random=3)
        rec = D.recovery(g, scores, found.circuit.edges, list(PLANTED_EDGES))
        assert rec.precision == 1.0 and rec.recall == 1.0 and rec.auc == 1.0
        assert found.core_heads == ["L0H0", "L1H0", "L1H1"]


def test_toy_induction_k_composition_is_found(toy_induction):
    ectx = E.edge_context(toy_induction, PromptPair.denoising(*induction_task(toy_induction, 20, 8, seed=0)))
    for method in ("eap", "eap-ig"):
        found = D.smallest_circuit(ectx, E.edge_scores(ectx, method), method, target=0.8, n_random=0)
        assert found.reached
        assert any(e.startswith("L0H0->L1H") and e.endswith(".k") for e in found.circuit.edges), found.circuit.edges


@pytest.mark.parametrize(
    "bad,field",
    [
        ({"methods": ["nonsense"]}, "methods"),
        ({"methods": ["acdc"], "acdc_thresholds": [0.01]}, "acdc_thresholds"),
        ({"methods": "eap"}, "methods"),
        ({"fractions": [0.0, 0.5]}, "fractions"),
        ({"fractions": [2]}, "fractions"),
        ({"target": 1.5}, "target"),
        ({"n_random": -1}, "n_random"),
        ({"ig_steps": 0}, "ig_steps"),
    ],
)
def test_bad_options_are_refused_with_the_parameter_named(bad, field):
    options = {"methods": ["eap", "eap-ig"], "fractions": None, "target": 0.8, "n_random": 10, "ig_steps": 5} | bad
    with pytest.raises(ValueError, match=f"`{field}`"):
        D.check_options(**options)
    D.check_options(["eap"], [0.1, 1.0], 0.8, 0, 1)  # good options pass


def test_acdc_recovers_the_planted_circuit(planted):
    found = S.acdc(planted, 0.02, progress=False)
    assert sorted(found.edges) == sorted(PLANTED_EDGES) and found.faithfulness > 0.95


def test_acdc_curve_reports_exact_faithfulness(ioi_ectx):
    curve, circuits = D.acdc_curve(ioi_ectx, (0.003, 0.03), n_random=2, progress=False)
    assert [p.n_edges for p in curve.points] == [len(c.edges) for c in circuits]
    assert curve.points[0].n_edges <= curve.points[1].n_edges  # a larger threshold keeps fewer edges
    for c in circuits:
        assert E.evaluate(ioi_ectx, [E.EdgeCircuit(c.edges)])[0] == pytest.approx(c.faithfulness, abs=1e-6)
        assert abs(1 - c.faithfulness) < 0.5


def test_core_heads_reproduce_the_model_not_exceed_it(ioi_ectx):
    """The scalable core-heads search (order by leave-one-out, scan prefixes, prune when few) returns heads whose
    closure is within 1 - target of the model on both sides, and finds toy-ioi's name mover as greedy elimination did."""
    scores = E.edge_scores(ioi_ectx, "eap-ig")
    heads = D.smallest_circuit(ioi_ectx, scores, "eap-ig", target=0.8, n_random=0).circuit.heads
    core, value = D.fewest_heads(ioi_ectx, heads, 0.8)
    assert D.reproduces(value, 0.8) and "L3H2" in core and len(core) < len(heads)
    assert value == pytest.approx(float(E.evaluate_masks(ioi_ectx, D.head_closure(ioi_ectx.graph, core)[None])[0]), abs=1e-6)
    assert not D.reproduces(2.42, 0.8) and not D.reproduces(0.79, 0.8) and D.reproduces(1.19, 0.8)


def test_core_heads_with_few_exact_leave_one_outs_are_still_exact(ioi_ectx, monkeypatch):
    """With an estimate, only the ``exact_limit`` heads it ranks highest are left out exactly (one call of 1 + that many
    closures); the heads returned still reproduce the model, with their closure's exact faithfulness."""
    scores = E.edge_scores(ioi_ectx, "eap-ig")
    heads = D.smallest_circuit(ioi_ectx, scores, "eap-ig", target=0.8, n_random=0).circuit.heads
    estimate = D.head_estimates(ioi_ectx.graph, scores, heads)
    assert len(heads) > 3 and set(estimate) == set(heads)
    calls = []
    real = D.evaluate_masks
    monkeypatch.setattr(D, "evaluate_masks", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    core, value = D.fewest_heads(ioi_ectx, heads, 0.8, estimate=estimate, exact_limit=3)
    assert calls[0] == 1 + 3
    assert D.reproduces(value, 0.8) and len(core) < len(heads)
    monkeypatch.setattr(D, "evaluate_masks", real)
    assert value == pytest.approx(float(E.evaluate_masks(ioi_ectx, D.head_closure(ioi_ectx.graph, core)[None])[0]), abs=1e-6)


def test_core_heads_pruning_stops_where_the_rest_no_longer_reproduces(ioi_ectx, monkeypatch):
    """On a known faithfulness (1 when the set holds one of two redundant heads of each of two roles, else 0; every
    leave-one-out is 0, so the prefix scan keeps four heads), pruning drops heads while the rest reproduces and stops
    at the drop that breaks it: two heads, one per role."""
    g = ioi_ectx.graph

    def faith(heads: set[str]) -> float:
        return float(bool({"L0H1", "L0H2"} & heads) and bool({"L1H0", "L1H1"} & heads))

    def known(ectx, masks, memory_mb=1024, **_):
        kept = [{g.senders[s].name for s in m.any(1).nonzero().flatten().tolist() if g.senders[s].kind == "head"} for m in masks]
        return torch.tensor([faith(heads) for heads in kept])

    monkeypatch.setattr(D, "evaluate_masks", known)
    core, value = D.fewest_heads(ioi_ectx, ["L0H0", "L0H1", "L0H2", "L1H0", "L1H1"], 0.8)
    assert value == 1.0 and len(core) == 2 and faith(set(core)) == 1.0


@pytest.mark.parametrize("model_fixture", ["toy_ioi", "toy_ioi_llama"])
def test_mib_json_round_trips_a_circuit_and_its_scores(model_fixture, request, tmp_path):
    """A discovered circuit written in the MIB circuit format and read back is the same circuit with the same scores
    (under GQA too, where one key/value-group edge is a MIB edge per query head), and evaluates the same."""
    from helpers.analyses import mib_format as M
    from helpers.task.params import load_params
    from helpers.task.prompts import make_prompts

    model = request.getfixturevalue(model_fixture)
    prompts = make_prompts(load_params("ioi", n_prompts=8), model.tokenizer, verbose=False)
    ectx = E.edge_context(model, prompts)
    scores = E.edge_scores(ectx, "eap")
    mask = D.top_edges(ectx.graph, scores, 40)
    path = M.save_mib(tmp_path / "circuit.json", ectx.graph, mask, scores, M.cfg_of(model))
    data = __import__("json").loads(path.read_text())
    assert set(data) == {"cfg", "nodes", "edges"} and data["nodes"]["input"] and data["nodes"]["logits"]
    assert all(set(e) == {"score", "in_graph"} for e in data["edges"].values())
    assert sum(e["in_graph"] for e in data["edges"].values()) >= int(mask.sum())
    assert any(name.endswith("<k>") and name.startswith("input->a1.h") for name in data["edges"])
    back = M.load_mib(path, ectx.graph)
    assert back.edges == ectx.graph.names_of(mask)
    assert all(back.scores[e] == pytest.approx(float(scores[ectx.graph.mask_of([e])].item()), abs=1e-6) for e in back.edges)
    values = E.evaluate_masks(ectx, torch.stack([mask, ectx.graph.mask_of(back.edges)]))
    assert float(values[0]) == float(values[1])
    data["cfg"]["n_layers"] = 99
    with pytest.raises(M.MIBFormatError, match="cfg.n_layers is 99"):
        M.from_mib(ectx.graph, data)
    data["cfg"]["n_layers"] = model.cfg.n_layers
    data["edges"]["a9.h9->logits"] = {"score": 0.0, "in_graph": True}
    with pytest.raises(M.MIBFormatError, match="not an edge of this model's graph"):
        M.from_mib(ectx.graph, data)


def test_every_registered_scoring_method_scores_the_graphs_edges_alike(planted):
    """One signature, one result: each registered method gives [sender, receiver] scores, 0 off the graph, that the
    curve code ranks alike; exact and EAP are what their functions compute; ACDC's scores are its own decisions."""
    g = planted.graph
    options = S.ScoringOptions(ig_steps=3, acdc_threshold=0.02, progress=False)
    scores = {name: S.score_edges(planted, name, options) for name in S.SCORERS}
    assert set(scores) >= {"eap", "eap-ig", "exact", "acdc"}
    for name, values in scores.items():
        assert values.shape == g.allowed.shape and torch.isfinite(values).all(), name
        assert not values[~g.allowed].any(), name
    assert torch.equal(scores["exact"], S.single_edge_effects(planted, progress=False))
    assert torch.equal(scores["eap"], E.edge_scores(planted, "eap"))
    circuit, effects = S.acdc_pass(planted, 0.02, progress=False)
    assert torch.equal(effects, scores["acdc"])
    assert effects[g.mask_of(circuit.edges)].min() >= 0.02  # every edge ACDC kept moved the distance by at least tau
    for name in ("exact", "acdc"):
        assert D.recovery(g, scores[name], circuit.edges, list(PLANTED_EDGES)).auc == 1.0, name
    curves = D.faithfulness_curves(planted, scores, [0.01, 1.0], n_random=0, progress=False)
    assert set(curves) == set(scores) and all(c.points[-1].faithfulness == pytest.approx(1.0, abs=1e-5) for c in curves.values())


def test_a_new_scoring_method_is_one_registration(planted):
    def by_receiver(ectx, options):
        return ectx.graph.allowed.float() * torch.arange(ectx.graph.allowed.shape[1])

    scorer = S.register(S.Scorer("by-receiver", by_receiver, exact=False, about="later receivers first (a test)"))
    try:
        with pytest.raises(ValueError, match="already registered"):
            S.register(scorer)
        D.check_options(["by-receiver", "eap"], None, 0.8, 0, 1)
        assert torch.equal(S.score_edges(planted, "by-receiver"), by_receiver(planted, None))
        found = D.smallest_circuit(planted, S.score_edges(planted, "by-receiver"), "by-receiver", target=0.5, n_random=0)
        assert found.circuit.method.startswith("by-receiver")
    finally:
        del S.SCORERS["by-receiver"]
    with pytest.raises(ValueError, match="registered"):
        S.score_edges(planted, "by-receiver")
