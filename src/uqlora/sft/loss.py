"""The SFT loss: label-smoothed next-token cross-entropy on the assistant tokens, through the fused LM head.

Huang, Lu & Zeng, "Calibrated Language Models and How to Find Them with Label Smoothing" (ICML 2025), sec. 3:
for every labelled position t with target y_t and logits z_t = softcap(W h_t / T + b / T) [V],

    loss_t = (1 - eps) * (-log softmax(z_t)[y_t]) + eps * mean_v(-log softmax(z_t)[v])

(PyTorch's label-smoothing convention), summed over the step's labelled tokens and divided by their number.
h_t is the decoder's final hidden state (after its last norm) at position t - 1; T is the temperature, applied
before the softcap; `linear_cross_entropy` never materialises the [tokens, V] logits. The decoder is called
directly (not the *ForCausalLM wrapper, which would compute every position's logits), and only the labelled
positions reach the head. Tied heads (SmolLM2, Gemma) are handled: the head's weight is the embedding Parameter.
"""

from __future__ import annotations

import torch

from ..errors import UqloraError
from ..head import apply_head, causal_lm, model_softcap
from ..losses import linear_cross_entropy
from .encode import IGNORE


def head_softcap(model, softcap: float | None) -> float | None:
    """The logit softcap: the configured one, else the model's own `final_logit_softcapping` (Gemma 2), else None."""
    return softcap if softcap is not None else model_softcap(model)


def sft_loss(model, batch: dict[str, torch.Tensor], *, label_smoothing: float = 0.0, temperature: float = 1.0,
             softcap: float | None = None, reduction: str = "sum") -> torch.Tensor:
    """Summed (or mean) SFT loss of a batch from `encode.collate` (input_ids, labels and attention_mask or
    position_ids [B, L]); `softcap` as given (see `head_softcap` for the model's default)."""
    lm = causal_lm(model)
    decoder, head = lm.base_model, lm.get_output_embeddings()  # e.g. LlamaModel, lm_head
    if type(head) is not torch.nn.Linear:
        raise UqloraError(f"the model's output layer is a {type(head).__name__}, not a plain linear layer; "
                          f"SFT computes the loss from its weight (do not put LoRA on the output layer)")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, :-1]  # [B, L-1, D]: predicts tokens 1..L-1
    target = batch["labels"][:, 1:]  # [B, L-1]
    keep = target != IGNORE
    h = hidden[keep] / temperature  # [N, D] labelled positions only
    bias = None if head.bias is None else head.bias / temperature
    return linear_cross_entropy(h, head.weight, target[keep], bias=bias, ignore_index=IGNORE,
                                label_smoothing=label_smoothing, softcap=softcap, reduction=reduction)


@torch.no_grad()
def check_head(model, batch: dict[str, torch.Tensor], softcap: float | None, n_tokens: int = 16) -> None:
    """Check on the first tokens of one row that the decoder's hidden states through the head's weight give the
    model's own logits: refuse models whose forward does more (e.g. a logit scale) than SFT's loss knows of."""
    lm = causal_lm(model)
    ids = batch["input_ids"][:1, :n_tokens]
    own = lm(input_ids=ids, use_cache=False).logits[0].float()  # [n, V]
    head = lm.get_output_embeddings()
    z = apply_head(head, lm.base_model(input_ids=ids, use_cache=False).last_hidden_state[0], softcap)  # [n, V]
    tol = 1e-4 if head.weight.dtype == torch.float32 else 5e-2
    if not torch.allclose(own, z, atol=tol * max(1.0, own.abs().max().item()), rtol=0):
        raise UqloraError("the model's logits are not its output layer applied to its decoder's hidden states "
                          "(it scales or transforms them); `uqlora sft` cannot compute its loss exactly")
