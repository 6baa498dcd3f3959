"""Models: `load_model(name_or_path)` -> (policy, tokenizer), the embedded default, tiny test models, LoRA."""

from posttrain.models.loading import EMBEDDED_DEFAULT, apply_lora, load_model, load_tokenizer
from posttrain.models.tiny import tiny_model, tiny_tokenizer

__all__ = ["EMBEDDED_DEFAULT", "apply_lora", "load_model", "load_tokenizer", "tiny_model", "tiny_tokenizer"]
