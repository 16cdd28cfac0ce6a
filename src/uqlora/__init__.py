"""uqlora: calibrated, uncertainty-aware LoRA fine-tuning of Hugging Face causal LMs."""

__version__ = "0.1.0"
