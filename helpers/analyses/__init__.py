"""Layer 5, ``analyses``: what the methods' numbers mean for a circuit.

``dla`` (direct logit attribution, logit lens), ``pattern_scores`` (attention-pattern detectors: induction, previous
token, ...), ``head_functions`` (copy scores, attention vs contribution), ``weights`` (OV / QK circuits from the
weights), ``neurons``, ``position_vs_token``, ``roles``, ``circuits`` (one circuit, one verdict: faithfulness and
controls), ``discovery`` (edge-level discovery, faithfulness curves, the smallest circuit), ``mib_format``.
"""
