"""Answers and their scores: generation and chat (`generate`), pure metrics with no torch (`metrics`), eval
files (`questions`), `lora-llava eval` / batch predict (`run`), eval during training (`callback`).
Imports model, data, runs, recipe, errors; never training, merging or cli.
"""
