"""Outside the layers, ``toys``: test and demo support that nothing in the layers imports.

``toy_models`` (training the bundled toys), ``planted`` (a model with a known circuit), ``families`` (tiny random
models of every architecture family).
"""
