"""Where a LLaVA model comes from: load a checkpoint (dtype, quantization), compose one from CLIP + LLM,
the projector and its files, the processor, conversion of original checkpoints, the tiny test model, and
the one function (`build.load_for_training`) that builds a recipe's model and processor.
Imports only recipe, runs, distributed and errors.
"""
