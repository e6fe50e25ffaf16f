"""Circuit discovery scored by faithfulness curves (the MIB benchmark's circuit-localisation protocol).

A scoring method (any registered in ``methods.scoring``: EAP, EAP-IG, exact, ACDC) ranks every edge. Circuits of increasing size are the top-k
edges by |score|, pruned to paths from the input to the logits (``edges.prune``), each evaluated *exactly*
(``edges.evaluate_masks``; one batched call per size, with the random controls as extra variants of that call).
The curve of faithfulness over circuit size (the fraction of the graph's edges kept) is summarised by two areas
(Mueller et al. 2025):

* **CPR** (circuit performance ratio): the area under faithfulness — higher is better;
* **CMD** (circuit-model distance): the area under |1 − faithfulness| — lower is better (0: every circuit on
  the curve behaves like the full model).

Both are trapezoids over the kept fraction, with the empty circuit (0, 0) and the full model (1, 1) as the ends.
Random circuits of the requested number of edges, shared by the methods, give the chance curve. ``smallest_circuit`` bisects the ranking for
the fewest top edges whose pruned circuit reaches a target faithfulness. ACDC (``methods.scoring.acdc``) is the exact greedy
reference (one evaluation per edge, in sequence), whose thresholds give its own curve (``acdc_curve``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.std import tqdm  # noqa: I001 - text bars, as in patching

from helpers.methods.edges import EdgeCircuit, EdgeContext, Graph, circuit_of, evaluate_masks, head_closure, prune
from helpers.methods.scoring import SCORERS, acdc

DEFAULT_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # as MIB's circuit-localisation track


def top_edges(graph: Graph, scores: Float[Tensor, "sender receiver"], k: int) -> Bool[Tensor, "sender receiver"]:
    """The ``k`` edges with the largest |score| (ties broken by the graph's edge order), pruned to input->logits paths."""
    index = graph.edge_index
    values = scores[index[:, 0], index[:, 1]].abs()
    order = torch.sort(values, descending=True, stable=True).indices[:k]
    mask = torch.zeros_like(graph.allowed)
    mask[index[order, 0], index[order, 1]] = True
    return prune(graph, mask)


def random_edge_masks(graph: Graph, n_edges: int, n: int, generator: torch.Generator) -> Bool[Tensor, "n sender receiver"]:
    """``n`` circuits of ``n_edges`` edges drawn uniformly from the graph (not pruned: exactly that many edges)."""
    index = graph.edge_index
    masks = torch.zeros((n, *graph.allowed.shape), dtype=torch.bool)
    for i in range(n):
        pick = torch.randperm(len(index), generator=generator)[:n_edges]
        masks[i, index[pick, 0], index[pick, 1]] = True
    return masks


def random_head_sets(graph: Graph, n_heads: int, n: int, generator: torch.Generator) -> list[list[str]]:
    names = [s.name for s in graph.senders if s.kind == "head"]
    return [[names[i] for i in torch.randperm(len(names), generator=generator)[:n_heads].tolist()] for _ in range(n)]


def _trapezoid(points: dict[float, float]) -> float:
    xy = sorted(points.items())
    return float(sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(xy, xy[1:])))


def area(fractions: list[float], values: list[float]) -> float:
    """CPR: trapezoid area over [0, 1] of faithfulness ``values`` at kept ``fractions``, the empty circuit (0, 0) and
    the full model (1, 1) as the ends."""
    return _trapezoid({0.0: 0.0, **dict(zip(fractions, values)), 1.0: 1.0})


@dataclass
class CurvePoint:
    """One circuit size: ``k`` top edges requested, ``n_edges`` kept after pruning (``fraction`` of the graph),
    the heads they involve, the exact faithfulness, and that of random circuits of ``k`` edges (the mean and the
    largest)."""

    k: int
    n_edges: int
    fraction: float
    n_heads: int
    faithfulness: float
    random_mean: float
    random_max: float


@dataclass
class FaithfulnessCurve:
    """Faithfulness over circuit size for one scoring method, with its areas and the random baseline's."""

    method: str
    n_edges_total: int
    points: list[CurvePoint] = field(default_factory=list)

    def _column(self, key: str) -> tuple[list[float], list[float]]:
        return [p.fraction for p in self.points], [getattr(p, key) for p in self.points]

    @property
    def cpr(self) -> float:
        return area(*self._column("faithfulness"))

    @property
    def cmd(self) -> float:
        return distance_area(*self._column("faithfulness"))

    @property
    def random_cpr(self) -> float:
        return area(*self._column("random_mean"))

    @property
    def random_cmd(self) -> float:
        return distance_area(*self._column("random_mean"))

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "n_edges_total": self.n_edges_total,
            "cpr": self.cpr,
            "cmd": self.cmd,
            "random_cpr": self.random_cpr,
            "random_cmd": self.random_cmd,
            "points": [asdict(p) for p in self.points],
        }


def distance_area(fractions: list[float], values: list[float]) -> float:
    """CMD: trapezoid area over [0, 1] of |1 - faithfulness|, the empty circuit (distance 1) and the full model (0)
    as the ends."""
    return _trapezoid({0.0: 1.0, **{x: abs(1 - y) for x, y in zip(fractions, values)}, 1.0: 0.0})


def faithfulness_curves(
    ectx: EdgeContext,
    scores: dict[str, Float[Tensor, "sender receiver"]],
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
    n_random: int = 10,
    seed: int = 0,
    memory_mb: float = 1024,
    progress: bool = True,
) -> dict[str, FaithfulnessCurve]:
    """Each method's curve: the exact faithfulness of its top-k circuit at each fraction of the graph's edges (k at
    least 1). At each size one batched evaluation holds every method's circuit and ``n_random`` random circuits of k
    edges, the requested size (a pruned top-k circuit keeps at most k, so the control never has fewer edges than the
    circuit it is compared with), drawn once and shared by the methods."""
    graph = ectx.graph
    generator = torch.Generator().manual_seed(seed)
    curves = {method: FaithfulnessCurve(method, graph.n_edges) for method in scores}
    for fraction in tqdm(fractions, desc=f"{' / '.join(scores)} curves", disable=not progress):
        k = max(1, round(fraction * graph.n_edges))
        masks = [top_edges(graph, s, k) for s in scores.values()]
        for curve, point in zip(curves.values(), _curve_points(ectx, masks, k, n_random, generator, memory_mb)):
            curve.points.append(point)
    return curves


def faithfulness_curve(
    ectx: EdgeContext,
    scores: Float[Tensor, "sender receiver"],
    method: str,
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
    n_random: int = 10,
    seed: int = 0,
    memory_mb: float = 1024,
    progress: bool = True,
) -> FaithfulnessCurve:
    """One method's ``faithfulness_curves`` (the same random controls as when it is drawn with others)."""
    return faithfulness_curves(ectx, {method: scores}, fractions, n_random, seed, memory_mb, progress)[method]


def _curve_points(
    ectx: EdgeContext, masks: list[Bool[Tensor, "sender receiver"]], k: int, n_random: int, generator: torch.Generator, memory_mb: float
) -> list[CurvePoint]:
    """The circuits ``masks`` (``k`` edges requested of each) and ``n_random`` random circuits of ``k`` edges, evaluated
    in one batched call; one point per circuit, sharing the random controls."""
    graph = ectx.graph
    values = evaluate_masks(ectx, torch.cat([torch.stack(masks), random_edge_masks(graph, k, n_random, generator)]), memory_mb)
    controls = values[len(masks) :]
    mean, top = (float(controls.mean()), float(controls.max())) if n_random else (float("nan"), float("nan"))
    points = []
    for mask, value in zip(masks, values):
        n_kept = int(mask.sum())
        heads = {graph.senders[s].name for s in mask.nonzero()[:, 0].tolist() if graph.senders[s].kind == "head"}
        points.append(CurvePoint(k, n_kept, n_kept / graph.n_edges, len(heads), float(value), mean, top))
    return points


@dataclass
class Discovered:
    """The smallest top-k circuit reaching ``target`` and its controls.

    * ``random_edges``: random edge sets with as many edges;
    * ``heads_closure``: the node-level circuit of its heads (every edge among them, the MLPs, input and logits,
      ``head_closure``), and ``random_heads``: random head sets of as many heads closed the same way;
    * ``core_heads``: the fewest of those heads whose closure still reproduces the model (|1 - F| <= 1 - ``target``,
      ``fewest_heads``: ordered by leave-one-out effect, exact for the 32 heads the edge scores rank highest,
      scanned by prefix, pruned greedily when few), its faithfulness
      ``core_faithfulness`` and ``random_core`` for random head sets of that size.

    ``evaluations``: circuits evaluated exactly in the bisection."""

    circuit: EdgeCircuit
    target: float
    reached: bool
    k: int
    random_edges: list[float]
    heads_closure: float
    random_heads: list[float]
    core_heads: list[str]
    core_faithfulness: float
    random_core: list[float]
    evaluations: int

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "circuit"}
        return {"circuit": self.circuit.to_json(), **out}

    def message(self) -> str:
        c = self.circuit
        verdict = "reaches" if self.reached else "does NOT reach"
        return (
            f"{len(c.edges)} edges ({c.method} top {self.k}, pruned) over {len(c.heads)} heads {verdict} faithfulness "
            f"{self.target:g}: {c.faithfulness:.3f} (random sets of {len(c.edges)} edges: mean {_mean(self.random_edges):.3f}). "
            f"Its heads with every edge among them and the MLPs: {self.heads_closure:.3f} (random sets of {len(c.heads)} heads: "
            f"mean {_mean(self.random_heads):.3f}). Fewest of them reproducing the model (|1 - F| <= {1 - self.target:.2g}): {', '.join(self.core_heads)} "
            f"({len(self.core_heads)} heads): {self.core_faithfulness:.3f} (random sets of {len(self.core_heads)} heads: "
            f"mean {_mean(self.random_core):.3f}, max {max(self.random_core, default=float('nan')):.3f})"
        )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def reproduces(value: float, target: float) -> bool:
    """Whether a circuit with faithfulness ``value`` reproduces the model to the tolerance that ``target`` sets:
    |1 - F| <= 1 - target (target 0.8: F in [0.8, 1.2]). A circuit that *exceeds* the model (e.g. F = 2.4 once the heads
    that write against the answer are dropped) does not reproduce it, as CMD measures."""
    return abs(1.0 - value) <= 1.0 - target + 1e-9


def _grid(n: int) -> list[int]:
    """Prefix sizes 1..n, dense at the start, then about 25% apart (a few dozen evaluations for hundreds of heads)."""
    sizes, k = [], 1
    while k < n:
        sizes.append(k)
        k = max(k + 1, int(k * 1.25))
    return sizes + [n]


def first_passing(
    ectx: EdgeContext,
    sizes: list[int],
    mask_of: Callable[[int], Bool[Tensor, "sender receiver"]],
    passes: Callable[[float], bool],
    memory_mb: float = 1024,
    step: int = 4,
) -> tuple[int | None, dict[int, float]]:
    """The first of ``sizes`` (ascending) whose circuit ``mask_of(size)`` ``passes``, and the exact faithfulness of
    every size evaluated: ``step`` sizes per batched call, smallest first, none past the call that finds it (the
    larger circuits a one-call scan also evaluated are the dearest). None if no size passes (all evaluated)."""
    values: dict[int, float] = {}
    for first in range(0, len(sizes), step):
        part = sizes[first : first + step]
        values.update(zip(part, evaluate_masks(ectx, torch.stack([mask_of(k) for k in part]), memory_mb).tolist()))
        hit = next((k for k in part if passes(values[k])), None)
        if hit is not None:
            return hit, values
    return None, values


def head_estimates(graph: Graph, scores: Float[Tensor, "sender receiver"], heads: list[str]) -> dict[str, float]:
    """First-order estimate of leaving each of ``heads`` out of their closure: the sum of the edge ``scores`` (the
    share of the logit difference each edge carries, EAP's linearisation) of its edges into the closure."""
    closure = head_closure(graph, heads)
    index = {s.name: i for i, s in enumerate(graph.senders)}
    return {h: float((scores[index[h]] * closure[index[h]]).sum()) for h in heads}


def fewest_heads(
    ectx: EdgeContext,
    heads: list[str],
    target: float,
    memory_mb: float = 1024,
    greedy_limit: int = 24,
    estimate: dict[str, float] | None = None,
    exact_limit: int = 32,
) -> tuple[list[str], float]:
    """The fewest of ``heads`` whose closure (``head_closure``) reproduces the model, ``reproduces(F, target)``; the
    heads in their order of importance and the closure's faithfulness. Scales to hundreds of heads:

    1. **order** the heads by |F(all) - F(all without that head)| (one batched evaluation of every leave-one-out).
       Given an ``estimate`` of those effects (``head_estimates``) and more than ``exact_limit`` heads, only the
       ``exact_limit`` largest by |estimate| are left out exactly and come first; the rest follow by |estimate|
       (the order only guides the search: every faithfulness below is exact);
    2. **scan** prefixes of that order on a geometric grid, smallest first, up to the first that reproduces
       (``first_passing``), then every size between the grid point below it and it: the smallest prefix that
       reproduces; nothing assumes faithfulness rises with the number of heads;
    3. **prune** greedily while at most ``greedy_limit`` heads remain: leave each head out (one batched call), drop
       the one whose removal leaves |1 - F| smallest, then the next ones in that order, one exact evaluation each,
       while the rest still reproduces; when a drop fails, leave each remaining head out again.

    About min(h, ``exact_limit``) + 2 log h + a few times g evaluations (g <= ``greedy_limit``; h with no ``estimate``),
    against h^2 / 2 for greedy elimination from all h.
    If no prefix reproduces the model, all ``heads`` are returned with their closure's faithfulness."""
    graph = ectx.graph

    def closures(head_sets: list[list[str]]) -> list[float]:
        return evaluate_masks(ectx, torch.stack([head_closure(graph, hs) for hs in head_sets]), memory_mb).tolist()

    if len(heads) <= 1:
        return list(heads), closures([list(heads)])[0]
    exact, rest = list(heads), []
    if estimate is not None and len(heads) > exact_limit:
        by_estimate = sorted(heads, key=lambda h: -abs(estimate[h]))
        exact, rest = by_estimate[:exact_limit], by_estimate[exact_limit:]
    values = closures([list(heads)] + [[h for h in heads if h != x] for x in exact])
    whole, without = values[0], values[1:]
    order = [exact[i] for i in sorted(range(len(exact)), key=lambda i: -abs(whole - without[i]))] + rest

    def prefix(k: int) -> Bool[Tensor, "sender receiver"]:
        return head_closure(graph, order[:k])

    grid = _grid(len(order))
    first, on_grid = first_passing(ectx, grid, prefix, lambda v: reproduces(v, target), memory_mb)
    if first is None:
        return list(heads), whole
    below = max([k for k in grid if k < first], default=0)
    size, found = first_passing(ectx, list(range(below + 1, first)), prefix, lambda v: reproduces(v, target), memory_mb)
    size = first if size is None else size
    current, value = order[:size], {**on_grid, **found}[size]
    while 1 < len(current) <= greedy_limit:
        trial = closures([[h for h in current if h != x] for x in current])
        ranked = sorted((i for i in range(len(current)) if reproduces(trial[i], target)), key=lambda i: abs(1.0 - trial[i]))
        if not ranked:
            break
        weakest = [current[i] for i in ranked]
        current, value = [h for h in current if h != weakest[0]], trial[ranked[0]]
        for x in weakest[1:]:  # the next weakest, in that order, while the rest still reproduces
            fewer = [h for h in current if h != x]
            if not fewer or not reproduces(v := closures([fewer])[0], target):
                break
            current, value = fewer, v
    return current, value


def smallest_circuit(
    ectx: EdgeContext,
    scores: Float[Tensor, "sender receiver"],
    method: str,
    target: float = 0.8,
    n_random: int = 10,
    seed: int = 0,
    memory_mb: float = 1024,
) -> Discovered:
    """The fewest top edges (by |score|, pruned) whose circuit's exact faithfulness reaches ``target``: the first size
    that reaches it on a geometric grid of sizes (no assumption that faithfulness rises with k), refined by bisection
    inside that grid step (the returned circuit is always evaluated), with the controls of ``Discovered``. If every edge together does not reach it, the full graph is returned, ``reached`` False."""
    graph = ectx.graph
    cache: dict[int, float] = {}

    def faith(k: int) -> float:
        if k not in cache:
            cache[k] = float(evaluate_masks(ectx, top_edges(graph, scores, k)[None], memory_mb)[0])
        return cache[k]

    # Faithfulness need not rise with k: scan a geometric grid of sizes (smallest first, to the first that reaches the
    # target), then bisect only inside the bracket between the grid size below it and it.
    grid = _grid(graph.n_edges)
    hi, values = first_passing(ectx, grid, lambda k: top_edges(graph, scores, k), lambda v: v >= target, memory_mb)
    cache.update(values)
    hi = graph.n_edges if hi is None else hi
    lo = max([k for k in grid if k < hi], default=0) + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if faith(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    mask = top_edges(graph, scores, hi)
    circuit = circuit_of(graph, mask, scores, method)
    circuit.faithfulness = faith(hi)
    generator = torch.Generator().manual_seed(seed)
    random_edges = (
        evaluate_masks(ectx, random_edge_masks(graph, int(mask.sum()), n_random, generator), memory_mb).tolist() if n_random else []
    )
    estimate = head_estimates(graph, scores, circuit.heads)
    core, core_value = fewest_heads(ectx, circuit.heads, target, memory_mb, estimate=estimate) if circuit.heads else ([], 0.0)

    def closures(head_sets: list[list[str]]) -> list[float]:
        return evaluate_masks(ectx, torch.stack([head_closure(graph, hs) for hs in head_sets]), memory_mb).tolist() if head_sets else []

    whole = closures([circuit.heads] + random_head_sets(graph, len(circuit.heads), n_random, generator))
    random_core = closures(random_head_sets(graph, len(core), n_random, generator))
    return Discovered(
        circuit, target, circuit.faithfulness >= target, hi, random_edges, whole[0], whole[1:], core, core_value, random_core, len(cache)
    )


def check_sample(
    graph: Graph, scores: dict[str, Float[Tensor, "sender receiver"]], n_top: int, n_random: int, seed: int = 0
) -> Int[Tensor, "edge 2"]:
    """The edges to patch exactly when a graph is too large to patch them all: the ``n_top`` with the largest |score|
    of each method (where a ranking matters most) and ``n_random`` others drawn uniformly (so the correlation is not
    only among the top), unique, in the graph's edge order."""
    index = graph.edge_index
    picked = torch.zeros(len(index), dtype=torch.bool)
    for values in scores.values():
        picked[values[index[:, 0], index[:, 1]].abs().argsort(descending=True, stable=True)[:n_top]] = True
    rest = (~picked).nonzero().flatten()
    picked[rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[:n_random]]] = True
    return index[picked]


def roc_auc(scores: Float[Tensor, " n"], positive: Bool[Tensor, " n"]) -> float:
    """Area under the ROC curve of ``scores`` for telling ``positive`` items from the rest: the chance that a random
    positive outranks a random negative (ties count half; Mann-Whitney U)."""
    from scipy.stats import rankdata

    ranks = torch.tensor(rankdata(scores.numpy()))
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class Recovery:
    """How well a found circuit matches one known in advance: precision and recall of its edges, and the ROC AUC of
    the method's |edge scores| for telling the known edges from the rest."""

    found: int
    known: int
    precision: float
    recall: float
    auc: float

    def to_json(self) -> dict:
        return asdict(self)


def recovery(graph: Graph, scores: Float[Tensor, "sender receiver"], found: list[str], known: list[str]) -> Recovery:
    hit = len(set(found) & set(known))
    index = graph.edge_index
    truth = graph.mask_of(list(known))[index[:, 0], index[:, 1]]
    auc = roc_auc(scores[index[:, 0], index[:, 1]].abs(), truth)
    return Recovery(len(found), len(known), hit / len(found) if found else float("nan"), hit / len(known), auc)


def diagram_parts(graph: Graph, circuit: EdgeCircuit, roles: dict[str, str] | None = None) -> tuple[list[dict], list[dict]]:
    """Nodes and edges for ``plotting.circuit_diagram``: the input, the circuit's heads (by head index and layer,
    coloured by ``roles`` where given), MLPs and the logits; one edge per sender and receiving node, weighted by the
    sum of its q/k/v edges' scores, ``via`` naming the inputs it enters."""
    receivers = {r.name: r for r in graph.receivers}
    senders = {s.name: s for s in graph.senders}
    merged: dict[tuple[str, str], dict] = {}
    for edge in circuit.edges:
        source, target = edge.split("->")
        rec = receivers[target]
        targets = [f"L{rec.layer}H{h}" for h in rec.heads] if rec.kind in ("q", "k", "v") else [target]
        for node in targets:
            if rec.kind in ("q", "k", "v") and node not in circuit.heads and len(targets) > 1:
                continue  # a shared key/value group: drawn into its query heads that are in the circuit
            entry = merged.setdefault((source, node), {"source": source, "target": node, "weight": 0.0, "via": []})
            entry["weight"] += circuit.scores.get(edge, 1.0)
            entry["via"].append(rec.kind if rec.kind in ("q", "k", "v") else "resid")
    names = {n for pair in merged for n in pair}
    nodes = []
    for name in sorted(names, key=lambda n: (senders[n].layer if n in senders else graph.senders[-1].layer + 1, n)):
        node = senders.get(name)
        if name == "logits":
            nodes.append({"label": "logits", "layer": graph.senders[-1].layer + 1, "x": "logits", "role": "logits"})
        elif node.kind == "input":
            nodes.append({"label": "input", "layer": -1, "x": "input", "role": "input"})
        elif node.kind == "mlp":
            nodes.append({"label": name, "layer": node.layer, "x": "MLP", "role": "MLP"})
        else:
            nodes.append({"label": name, "layer": node.layer, "x": f"H{node.head}", "role": (roles or {}).get(name, "head")})
    column = {"input": -1, "MLP": 10**6, "logits": 10**6 + 1}
    nodes.sort(key=lambda n: (column.get(n["x"], int(n["x"][1:]) if n["x"].startswith("H") else 0), n["layer"]))
    edges = [{**e, "via": "+".join(sorted(set(e["via"])))} for e in merged.values()]
    return nodes, edges


def check_options(methods, fractions, target: float, n_random: int, ig_steps: int, acdc_thresholds=()) -> None:
    """Refuse bad ``circuit_discovery`` parameters before any work, naming the parameter and the fix."""
    if isinstance(methods, str) or not methods or any(m not in SCORERS for m in methods):
        raise ValueError(
            f"circuit_discovery parameter `methods` must be a non-empty list of registered scoring methods "
            f"{list(SCORERS)} (helpers.methods.scoring), not {methods!r}"
        )
    if "acdc" in methods and acdc_thresholds:
        raise ValueError(
            "circuit_discovery parameters `methods` and `acdc_thresholds` both draw a curve named 'acdc': drop 'acdc' "
            "from `methods` (its scores at one threshold) or set `acdc_thresholds = []` (its circuits at several)"
        )
    if fractions is not None and (
        isinstance(fractions, (str, int, float))
        or not fractions
        or any(not isinstance(f, (int, float)) or not 0 < f <= 1 for f in fractions)
    ):
        raise ValueError(
            f"circuit_discovery parameter `fractions` must be a list of edge fractions in (0, 1], or None for "
            f"MIB's sizes, not {fractions!r}"
        )
    if not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ValueError(f"circuit_discovery parameter `target` must be a faithfulness in (0, 1], not {target!r}")
    if not isinstance(n_random, int) or n_random < 0:
        raise ValueError(f"circuit_discovery parameter `n_random` must be a whole number >= 0, not {n_random!r}")
    if not isinstance(ig_steps, int) or ig_steps < 1:
        raise ValueError(f"circuit_discovery parameter `ig_steps` must be a whole number >= 1, not {ig_steps!r}")


def acdc_curve(
    ectx: EdgeContext, thresholds: tuple[float, ...], n_random: int = 10, seed: int = 0, memory_mb: float = 1024, progress: bool = True
) -> tuple[FaithfulnessCurve, list[EdgeCircuit]]:
    """ACDC at each threshold as the points of a faithfulness curve (largest threshold, smallest circuit, first), each
    with random circuits of its size; and the circuits."""
    graph = ectx.graph
    generator = torch.Generator().manual_seed(seed)
    curve, found = FaithfulnessCurve("acdc", graph.n_edges), []
    for threshold in sorted(thresholds, reverse=True):
        circuit = acdc(ectx, threshold, memory_mb, progress)
        curve.points += _curve_points(ectx, [graph.mask_of(circuit.edges)], len(circuit.edges), n_random, generator, memory_mb)
        found.append(circuit)
    return curve, found
