"""Layer 4, ``methods``: the causal methods, each a batched sweep over the engine.

``patching`` (activation patching), ``attribution_patching`` (gradients, EAP-IG), ``path_patching``, ``edges``
(edge-level graphs, EAP / EAP-IG scores, exact circuit runs), ``scoring`` (edge scoring methods, registered),
``importance`` (ablation losses per head).
"""
