"""The output head: next-token logits only where the framings need them.

A causal LM's forward applies its output layer (lm_head) to every position it keeps. The framings need the logits
of few positions (cloze: a question's last token and each choice's real tokens; letter: the last token), so when
the model's logits are exactly lm_head(decoder hidden states) (after an optional softcap c·tanh(z / c)), they call
the decoder and apply the head to the selected positions as one [N, D] x [D, V] product. That skips the head
on padding, and avoids the batched product the model would make with a [rows, 1, D] slice, which on the CPU in
bf16 copied the whole [V, D] head once per row (1.7 s of a 2.6 s SmolLM2 evaluation batch).

`load_model` checks each model once, in eval mode on a few tokens, that decoder + head reproduce its own logits
(`check_separable_head`, which sets SEPARABLE); a model that scales or transforms its logits otherwise (or
whose head is not a plain linear layer) keeps the model's own forward, with the same result.
"""

from __future__ import annotations

import torch

SEPARABLE = "_uqlora_separable_head"  # attribute set on the *ForCausalLM model by check_separable_head
CHECK_TOKENS = 8


def causal_lm(model):
    """The *ForCausalLM model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_softcap(model) -> float | None:
    """The model's own final logit softcap (Gemma 2's `final_logit_softcapping`), or None."""
    return getattr(causal_lm(model).config, "final_logit_softcapping", None) or None


def apply_head(head: torch.nn.Linear, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Logits [N, V] float32 of hidden states [N, D]: softcap(head(hidden))."""
    z = torch.nn.functional.linear(hidden, head.weight, head.bias).float()
    return z if softcap is None else softcap * torch.tanh(z / softcap)


@torch.no_grad()
def check_separable_head(model, token_ids: list[int]) -> bool:
    """Whether the model's logits are its output layer applied to its decoder's last hidden states (on
    `token_ids`, in eval mode); records the answer on the model (SEPARABLE)."""
    lm = causal_lm(model)
    head, decoder = lm.get_output_embeddings(), getattr(lm, "base_model", None)
    separable = type(head) is torch.nn.Linear and decoder is not None and decoder is not lm
    if separable:
        ids = torch.tensor([token_ids[:CHECK_TOKENS]], device=head.weight.device)
        own = lm(input_ids=ids, use_cache=False).logits[0].float()  # [n, V]
        ours = apply_head(head, decoder(input_ids=ids, use_cache=False).last_hidden_state[0], model_softcap(lm))
        tol = 1e-4 if head.weight.dtype == torch.float32 else 5e-2
        separable = torch.allclose(own, ours, atol=tol * max(1.0, own.abs().max().item()), rtol=0)
    setattr(lm, SEPARABLE, separable)
    return separable


def next_token_logits(model, inputs: dict, select: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token logits [N, V] float32 at the positions `select` [rows, L] (bool) of a forward on `inputs`
    (input_ids, attention_mask, position_ids, a cache, ...), row by row; None: the last position of each row."""
    lm = causal_lm(model)
    if getattr(lm, SEPARABLE, False):
        hidden = lm.base_model(**inputs).last_hidden_state  # [rows, L, D]
        return apply_head(lm.get_output_embeddings(), hidden[:, -1] if select is None else hidden[select],
                          model_softcap(lm))
    if select is None:
        return model(**inputs, logits_to_keep=1).logits[:, -1].float()  # [rows, V]
    return model(**inputs).logits[select].float()  # [N, V]
