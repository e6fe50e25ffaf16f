"""Layer 2, ``task``: what a researcher asks for, turned into tokens and a model.

``params`` (one YAML file per task, validated), ``vocab`` (word pools), ``prompts`` (clean / corrupted prompts,
answers, named positions; ``PromptPair``, the base and source runs of one patching experiment), ``models`` (loading
by name or path, toys, real models, the hub), ``real_models`` (pretrained GGUF weights from registry packages,
dequantised once). Imports only ``schema``.
"""
