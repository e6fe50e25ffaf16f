"""Layer 3, ``engine``: running a model with interventions, exactly and fast.

``hooks`` (hook names, checked caches), ``metrics`` (logit difference, normalisation, faithfulness; ``Metric``, what
a run measures), ``capabilities`` (what this architecture supports, its probes; ``NotSupported``), ``interventions``
(the intervention value and its hooks), ``forward`` (the one batched runner, any metric: from the first layer and
position a patch changes), ``kv_cache`` (a base run's keys and values), ``shortcuts`` (savings verified against the
plain forward), ``chunks`` (the one chunk planner: variants and prompts per forward within a memory budget),
``forks`` (per-head copies of a layer's input), ``norms`` (post-sublayer norms), ``memory`` (memory handed back to
the system), ``flops`` (the minimal arithmetic of a sweep). Imports ``schema`` and ``task``.
"""
