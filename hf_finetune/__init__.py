"""hf-finetune: fine-tune Hugging Face checkpoints with full fine-tuning and PEFT methods on one Accelerate loop."""

__version__ = "0.1.0"
