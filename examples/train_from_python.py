"""Train the tiny offline model on generated shapes from Python, then list the run folder.

python examples/train_from_python.py
"""

from pathlib import Path

import lora_llava
from lora_llava.data.synthetic import make_shapes_dataset

work = Path("runs/example")
model = lora_llava.make_tiny(work / "tiny-llava", image_size=56) if not (work / "tiny-llava").exists() else work / "tiny-llava"
data = make_shapes_dataset(work / "shapes", n_images=16)

recipe = lora_llava.parse_recipe(
    {
        "stage": "instruct",
        "model": {"name_or_path": str(model), "dtype": "float32"},
        "lora": {"r": 8, "alpha": 16},
        "data": {"train": [{"path": str(data), "image_folder": str(work / "shapes/images")}], "max_length": 256},
        "train": {"output_dir": str(work / "run"), "max_steps": 5, "batch_size": 4, "learning_rate": 1e-3},
    }
)
run = lora_llava.train(recipe, overwrite=True)
print(sorted(p.name for p in run.iterdir()))
