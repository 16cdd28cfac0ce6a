"""Instruction tuning with label smoothing (`uqlora sft`; docs/sft.md).

    data.py    instruction / chat files -> conversations
    encode.py  chat template -> token ids, assistant-only labels, truncation, packing, batches
    loss.py    label-smoothed next-token loss through the fused LM head (uqlora.losses)
    config.py  SftConfig: YAML = flags = the run's config.yaml
    train.py   the training loop and the run directory
"""

from .config import SftConfig
from .train import sft

__all__ = ["SftConfig", "sft"]
