"""`lora-llava estimate`: a recipe's peak GPU memory from the model's shape alone (`shapes`, `estimate`),
and the cheapest changes that make it fit (`fit`). Imports training.loss (its chunk size), recipe, errors.
"""

from .estimate import Estimate, estimate
from .fit import cheapest_fit
from .shapes import BUILTIN_SHAPES, ModelShape, model_shape

__all__ = ["BUILTIN_SHAPES", "Estimate", "ModelShape", "cheapest_fit", "estimate", "model_shape"]
