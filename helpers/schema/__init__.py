"""Layer 1, ``schema``: the small typed values every other layer passes around, and where they live on disk.

``heads`` (``Head``, ranking heads), ``results`` (the typed JSON each template writes and the next reads),
``artifacts`` (strict JSON writing), ``outputs`` (the ``nb_outputs/<task>/<model>/`` layout, atomic publishing,
locks). No torch at import; imports nothing above itself.
"""
