"""`lora-llava merge`, top to bottom (`run.merge`): what a merge starts from (`source`), each merged tensor
(`weights`), safetensors shards (`shards`), the parity check (`parity`), release files and model card.
Imports model, data, runs, recipe, io, errors; never training or cli.
"""
