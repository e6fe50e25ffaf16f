"""Circuits that travel: the MIB circuit-localisation track's JSON format (the format EAP-IG's ``Graph.to_json`` writes).

A file holds the model's shape (``cfg``), every node with whether it is in the circuit (``nodes``: ``input``,
``a3.h2`` for layer 3 head 2, ``m1`` for MLP 1, ``logits``), and every edge of the graph with its score and whether it
is in the circuit (``edges``: ``input->a0.h0<q>``, ``a0.h1->m0``, ``m2->logits``). So a circuit found here can be
scored by MIB's evaluation code or compared with EAP-IG's, and theirs read back here and evaluated exactly
(``edges.evaluate_masks``).

Mapping to this project's graph (``helpers.methods.edges.Graph``): senders ``L3H2`` / ``MLP1`` / ``input`` are ``a3.h2`` /
``m1`` / ``input``; receivers ``L3H2.q`` and ``MLP2`` are ``a3.h2<q>`` and ``m2``. Under grouped-query attention this
project has one k and one v input per key/value group (``L3KV0.k``), MIB one per query head: an edge into a group is
written once per head of the group, with the group's score; reading back, a group edge is in the circuit when any of
its heads' edges is, and its score is their mean (the file says which heads share a group in ``cfg``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from helpers.engine.capabilities import kv_heads, parallel_blocks
from helpers.methods.edges import EdgeCircuit, Graph, circuit_of
from helpers.schema.artifacts import write_json

MIB_EDGE_RE = re.compile(r"(?P<sender>[^-]+)->(?P<receiver>[^<]+)(?:<(?P<c>[qkv])>)?")


class MIBFormatError(ValueError):
    """A circuit file does not match the MIB format or this model's graph; the message names the entry."""


def _node(name: str) -> str:
    """Our sender or receiver node name in MIB's convention."""
    if m := re.fullmatch(r"L(\d+)H(\d+)", name):
        return f"a{m[1]}.h{m[2]}"
    if m := re.fullmatch(r"MLP(\d+)", name):
        return f"m{m[1]}"
    return name  # input, logits


def mib_edges(graph: Graph) -> list[tuple[str, int, int]]:
    """Every MIB edge name of ``graph`` with the (sender, receiver) indices it stands for (several names per
    key/value-group receiver: one per query head of the group)."""
    out = []
    for s, r in graph.edge_index.tolist():
        sender, rec = _node(graph.senders[s].name), graph.receivers[r]
        if rec.kind in ("q", "k", "v"):
            out += [(f"{sender}->a{rec.layer}.h{h}<{rec.kind}>", s, r) for h in rec.heads]
        else:
            out.append((f"{sender}->{_node(rec.name)}", s, r))
    return out


def to_mib(
    graph: Graph, mask: Bool[Tensor, "sender receiver"], scores: Float[Tensor, "sender receiver"] | None = None, cfg: dict | None = None
) -> dict:
    """The MIB JSON of the circuit ``mask`` (every edge of the graph listed, ``in_graph`` for those in ``mask``), with
    ``scores`` per edge (0 when not given). ``cfg``: the model's shape (``n_layers``, ``n_heads``, ...)."""
    edges, in_nodes = {}, set()
    for name, s, r in mib_edges(graph):
        kept = bool(mask[s, r])
        edges[name] = {"score": float(scores[s, r]) if scores is not None else 0.0, "in_graph": kept}
        if kept:
            sender, receiver = MIB_EDGE_RE.fullmatch(name).group("sender", "receiver")
            in_nodes |= {sender, receiver}
    nodes = ["input"] + [_node(n.name) for n in graph.senders if n.kind != "input"] + ["logits"]
    return {"cfg": dict(cfg or {}), "nodes": {n: n in in_nodes for n in nodes}, "edges": edges}


def cfg_of(model) -> dict:
    """The shape fields MIB's files carry, from a model's config."""
    cfg = model.cfg
    return {
        "n_layers": int(cfg.n_layers),
        "n_heads": int(cfg.n_heads),
        "n_key_value_heads": int(kv_heads(cfg)),
        "d_model": int(cfg.d_model),
        "parallel_attn_mlp": parallel_blocks(cfg),
    }


def from_mib(
    graph: Graph, data: dict, where: str = "circuit file"
) -> tuple[Bool[Tensor, "sender receiver"], Float[Tensor, "sender receiver"]]:
    """The circuit mask and the edge scores of a MIB JSON ``data`` on ``graph``; MIBFormatError naming the first
    entry that does not fit (a missing key, another model's shape, an edge this graph does not have)."""
    if not isinstance(data, dict) or not isinstance(data.get("edges"), dict):
        raise MIBFormatError(f"{where}: expected a JSON object with an 'edges' object (MIB circuit format)")
    cfg = data.get("cfg") or {}
    n_layers = 1 + max(s.layer for s in graph.senders)
    n_heads = 1 + max((s.head for s in graph.senders if s.head is not None), default=-1)
    for key, ours in (("n_layers", n_layers), ("n_heads", n_heads)):
        if key in cfg and int(cfg[key]) != ours:
            raise MIBFormatError(f"{where}: cfg.{key} is {cfg[key]}, this model has {ours}: the circuit is for another model")
    index = {}
    for name, s, r in mib_edges(graph):
        index[name] = (s, r)
    mask = torch.zeros_like(graph.allowed)
    total = torch.zeros(graph.allowed.shape)
    count = torch.zeros(graph.allowed.shape)
    for name, entry in data["edges"].items():
        if name not in index:
            raise MIBFormatError(f"{where}: edges: {name!r} is not an edge of this model's graph (e.g. {next(iter(index))!r})")
        if not isinstance(entry, dict) or "in_graph" not in entry:
            raise MIBFormatError(f"{where}: edges: {name!r} needs an object with 'in_graph' (and 'score')")
        s, r = index[name]
        mask[s, r] |= bool(entry["in_graph"])
        total[s, r] += float(entry.get("score") or 0.0)
        count[s, r] += 1
    return mask, torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def save_mib(path: Path, graph: Graph, mask: Bool[Tensor, "sender receiver"], scores=None, cfg: dict | None = None) -> Path:
    """Write the MIB JSON of a circuit (atomically, strict JSON)."""
    return write_json(Path(path), to_mib(graph, mask, scores, cfg))


def load_mib(path: Path, graph: Graph, method: str = "mib") -> EdgeCircuit:
    """A MIB JSON file read back as an ``EdgeCircuit`` on ``graph`` (its in-graph edges, with their scores)."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise MIBFormatError(f"{path}: cannot read it as JSON ({err})") from None
    mask, scores = from_mib(graph, data, where=str(path))
    return circuit_of(graph, mask, scores, method)
