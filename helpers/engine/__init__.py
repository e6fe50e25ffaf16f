"""Layer 3, ``engine``: running a model with interventions, exactly and fast.

``hooks`` (hook names, checked caches), ``metrics`` (logit difference, normalisation, faithfulness),
``capabilities`` (what this architecture supports, its probes; ``NotSupported``), ``interventions`` (the intervention
value and its hooks), ``forward`` (the one batched runner: from the first layer and position a patch changes),
``kv_cache`` (a base run's keys and values), ``shortcuts`` (savings verified against the plain forward), ``forks``
(per-head copies of a layer's input), ``norms`` (post-sublayer norms), ``memory`` (memory budgets), ``flops`` (the
minimal arithmetic of a sweep). Imports ``schema`` and ``task``.
"""
