"""Layer 3, ``engine``: running a model with interventions, exactly and fast.

``hooks`` (hook names, checked caches), ``metrics`` (logit difference, normalisation), ``capabilities`` (what this
architecture supports; ``NotSupported``), ``interventions`` (the intervention value, the batched runner, KV-prefix
reuse, verified shortcuts), ``forks`` (per-head copies of a layer's input), ``norms`` (post-sublayer norms),
``memory`` (memory budgets), ``flops`` (the minimal arithmetic of a sweep). Imports ``schema`` and ``task``.
"""
