"""Training a recipe, top to bottom (`run.train`): the Trainer with LLaVA's two learning rates and batching,
what trains (LoRA, projector), the chunked loss, run folders and resume, signals and non-finite steps,
several stages in one command, the loss plot.
Imports evaluate (eval during training), model, data, runs, distributed, recipe, errors; never merging or cli.
"""
