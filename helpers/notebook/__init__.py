"""Layer 6, ``notebook``: what a template's cells call.

``session`` (the first cell: params, prompts, model, task check, results), ``sections`` (whole sections of a
template), ``plotting`` (plotly figures), ``figures`` (showing and saving them, static images), ``notes`` (the
researcher's notes, kept across reruns).
"""
