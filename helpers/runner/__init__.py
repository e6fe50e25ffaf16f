"""Layer 7, ``runner``: running templates, on top of everything, torch-free until a kernel starts.

``cli`` (``python -m helpers.runner.run``'s arguments and checks), ``batch`` (every template × task × model,
up-to-date runs skipped by fingerprint), ``run`` (one template through papermill, published atomically),
``dependencies`` (which modules a template executes), ``report`` (the offline ``index.html``), ``workcopy``
(``make copy``), ``badges`` (Colab badges), ``task_table`` (which tasks a model can do).
"""
