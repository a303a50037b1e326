"""Run `lora-llava ARGS` but deliver SIGNAL to this process at STEP, during a training step or a checkpoint save.

    python tests/faults/kill_at.py step|save STEP SIGNAL -- train recipe.yaml ...

Used by tests to interrupt runs at exact points (SIGKILL mid-step, mid-save; SIGTERM).
"""

import os
import signal
import sys

from lora_llava.cli import main
from lora_llava.training import trainer as T

where, step, signame = sys.argv[1], int(sys.argv[2]), sys.argv[3]
argv = sys.argv[sys.argv.index("--") + 1 :]
signum = getattr(signal, signame)

if where == "save":
    original_save = T.LlavaTrainer._save_optimizer_and_scheduler

    def save(self, output_dir):
        if self.state.global_step == step:
            os.kill(os.getpid(), signum)  # after the adapter was written, before the optimizer state
        return original_save(self, output_dir)

    T.LlavaTrainer._save_optimizer_and_scheduler = save
else:
    original_loss = T.LlavaTrainer.compute_loss
    fired = []

    def compute_loss(self, *args, **kwargs):
        if self.state.global_step + 1 == step and not fired:
            fired.append(True)
            os.kill(os.getpid(), signum)  # inside step `step`, before its forward pass
        return original_loss(self, *args, **kwargs)

    T.LlavaTrainer.compute_loss = compute_loss

sys.exit(main(argv))
