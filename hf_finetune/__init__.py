"""hf-finetune: fine-tune Hugging Face checkpoints with full fine-tuning and PEFT methods on one Accelerate loop."""

import logging

__version__ = "0.1.0"

# bitsandbytes (imported by PEFT whenever it is installed) warns at import, on CPUs with AVX512-bf16, that an optional
# kernel from the Hugging Face Hub is missing; its built-in CPU kernels run instead, and the line would open the
# output of every command, error messages included.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
