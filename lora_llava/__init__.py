"""lora-llava: LoRA / QLoRA domain adaptation of LLaVA-1.5, faithful to the paper."""
__version__ = "0.1.0"
