"""Laplace-LoRA curvature (posthoc/curvature.py) against brute force built with torch.func.

The toy: class scores = B A x for one question with one position x [d] (A: LoRA A [r, d], B: LoRA B [C, r]).
K-FAC is exact there, so each block kron(G, A) must equal the block of the full GGN J^T (diag p - p p^T) J of
that weight, and the GLM logit covariance must equal J (GGN_block + λI)^{-1} J^T. With several questions K-FAC
is an approximation; the test states how close it stays."""

from __future__ import annotations

import pytest
import torch

from uqlora.data.question import Question
from uqlora.posthoc.curvature import fit_kfac, logit_covariance, logit_jacobians, pseudo_targets

D, R, C = 6, 3, 4


class Toy(torch.nn.Module):
    """scores [B, C] = lora_B(lora_A(x_q)) for each question's fixed input x_q [T, D], summed over positions."""

    def __init__(self, inputs: dict[str, torch.Tensor], seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lora_A = torch.nn.Linear(D, R, bias=False)
        self.lora_B = torch.nn.Linear(R, C, bias=False)
        torch.nn.init.normal_(self.lora_B.weight)
        self.inputs = inputs

    def forward(self, questions):
        x = torch.stack([self.inputs[q.id] for q in questions])  # [B, T, D]
        return self.lora_B(self.lora_A(x)).sum(1)  # [B, C]


def questions_and_inputs(n: int, positions: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    qs = [Question(id=f"q{i}", stem="s", choices=["a", "b", "c", "d"], label=i % C) for i in range(n)]
    return qs, {q.id: torch.randn(positions, D, generator=gen) for q in qs}


def brute_ggn(toy: Toy, questions, name: str) -> torch.Tensor:
    """Σ_n J_n^T (diag p_n - p_n p_n^T) J_n for one weight, J_n [C, P_w] by torch.func.jacrev (float64)."""
    weight = getattr(toy, name).weight
    params = {n: p.detach().double() for n, p in toy.named_parameters()}
    total = torch.zeros(weight.numel(), weight.numel(), dtype=torch.float64)
    for q in questions:
        x = toy.inputs[q.id].double()

        def scores(w, x=x):
            p = {**params, f"{name}.weight": w}
            return (x @ p["lora_A.weight"].T @ p["lora_B.weight"].T).sum(0)  # [C]

        w = params[f"{name}.weight"]
        jac = torch.func.jacrev(scores)(w).reshape(C, -1)  # [C, P_w]
        p = torch.softmax(scores(w), -1)
        total += jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac
    return total


def fit(toy, questions, curvature="ggn", seed=0, max_full_dim=64, rank=2):
    linears = {"lora_A": toy.lora_A, "lora_B": toy.lora_B}
    return fit_kfac(toy, linears, toy, questions, curvature=curvature, batch_size=2, max_full_dim=max_full_dim,
                    rank=rank, seed=seed, quiet=True)


def kron_dense(block) -> torch.Tensor:
    return torch.kron(block.G.dense().double(), block.A.dense().double())


@pytest.mark.parametrize("name", ["lora_A", "lora_B"])
def test_kfac_equals_ggn_for_one_question_one_position(name):
    """One question, one position: the K-FAC block equals the exact GGN block (float64 jacrev) to 1e-5."""
    qs, inputs = questions_and_inputs(1, 1)
    toy = Toy(inputs)
    block = fit(toy, qs).blocks[name]
    exact = brute_ggn(toy, qs, name)
    torch.testing.assert_close(kron_dense(block), exact, rtol=1e-5, atol=1e-6)


def test_kfac_close_to_ggn_with_many_questions():
    """20 questions, one position each: K-FAC is no longer exact. Measured on this toy over input seeds 1-3: relative
    Frobenius error 0.11-0.33 and trace ratio 1.03-1.07 for both blocks; asserted: error < 0.4, trace within 10 %."""
    qs, inputs = questions_and_inputs(20, 1)
    toy = Toy(inputs)
    for name in ("lora_A", "lora_B"):
        approx, exact = kron_dense(fit(toy, qs).blocks[name]), brute_ggn(toy, qs, name)
        assert torch.linalg.norm(approx - exact) / torch.linalg.norm(exact) < 0.4
        assert abs(approx.trace() / exact.trace() - 1) < 0.1


def test_glm_covariance_equals_brute_force():
    """One question, one position, lora_B block: logit_covariance == J (GGN + λI)^{-1} J^T by dense solve."""
    qs, inputs = questions_and_inputs(1, 1)
    toy = Toy(inputs)
    kfit = fit(toy, qs)
    prior = 0.7
    _, jacobians = logit_jacobians(toy, qs[0], [toy.lora_B.weight])
    cov = logit_covariance([kfit.blocks["lora_B"]], jacobians, prior).double()
    jac = jacobians[0].reshape(C, -1).double()
    exact = jac @ torch.linalg.solve(brute_ggn(toy, qs, "lora_B") + prior * torch.eye(jac.shape[1],
                                                                                    dtype=torch.float64), jac.T)
    torch.testing.assert_close(cov, exact, rtol=1e-4, atol=1e-7)


def test_pseudo_targets_factor_the_softmax_hessian():
    """ggn: Σ_k u_k u_k^T = diag(p) - p p^T exactly; fisher: the mean of u u^T over many label draws converges
    to the same matrix (20k draws, tolerance 5 standard errors ≈ 0.01); an absent choice (-inf) gets 0."""
    scores = torch.tensor([[0.3, -1.0, 2.0, float("-inf")]])
    p = torch.softmax(scores, -1)[0]
    hessian = torch.diag(p) - torch.outer(p, p)
    u = pseudo_targets(scores, "ggn", [torch.Generator()])[:, 0]  # [C, C]
    torch.testing.assert_close(u.T @ u, hessian, rtol=1e-5, atol=1e-6)
    assert torch.all(u[:, 3] == 0) and torch.all(u[3] == 0)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([pseudo_targets(scores, "fisher", [gen])[0, 0] for _ in range(20000)])  # [N, C]
    torch.testing.assert_close(draws.T @ draws / len(draws), hessian, rtol=0, atol=0.01)


def test_fisher_kfac_averages_to_ggn():
    """One question, one position: the `fisher` (one sampled label) G factor averaged over 3000 seeds matches
    the exact `ggn` one within 0.05 relative (Frobenius)."""
    qs, inputs = questions_and_inputs(1, 1)
    toy = Toy(inputs)
    exact = fit(toy, qs).blocks["lora_B"].G.dense()
    mean = sum(fit(toy, qs, "fisher", seed=s).blocks["lora_B"].G.dense() for s in range(3000)) / 3000
    assert torch.linalg.norm(mean - exact) / torch.linalg.norm(exact) < 0.05


def test_positions_without_gradient_are_left_out():
    """A position whose input is multiplied by zero (here: lora_A outputs masked at position 1) has zero gradient
    and must not enter the A factor: the fit equals the one on position 0 alone."""
    qs, inputs = questions_and_inputs(1, 2)

    class Masked(Toy):
        def forward(self, questions):
            x = torch.stack([self.inputs[q.id] for q in questions])  # [B, 2, D]
            h = self.lora_A(x) * torch.tensor([1.0, 0.0])[None, :, None]  # position 1 cannot reach the scores
            return self.lora_B(h).sum(1)

    masked = Masked(inputs)
    single = Toy({q.id: inputs[q.id][:1] for q in qs})
    torch.testing.assert_close(fit(masked, qs).blocks["lora_A"].A.dense(), fit(single, qs).blocks["lora_A"].A.dense())
    assert fit(masked, qs).positions["lora_A"] == 1


@pytest.mark.parametrize("framing", ["cloze", "letter"])
def test_batched_jacobians_equal_per_question_autograd(framing, tiny_model_dir):
    """batch_logit_jacobians (hooks, one forward of 3 questions with 3 and 4 choices, rows summed into their
    question) == torch.autograd.grad on each question alone (logit_jacobians); absent choices get 0 rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from uqlora.framing import class_scores
    from uqlora.models import add_lora
    from uqlora.posthoc.curvature import batch_logit_jacobians, lora_linears

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), r=4, alpha=8, dropout=0.0,
                     target_modules=["q_proj", "v_proj"])
    for m in lora_linears(model).values():
        torch.nn.init.normal_(m.weight, std=0.3)  # B = 0 at initialisation would make lora_A's Jacobian 0
    model.eval()
    qs = [Question(id="a", stem="Which is a color?", choices=("red", "table", "run"), label=0),
          Question(id="b", stem="Two plus two is", choices=("four", "five", "six", "one hundred"), label=0),
          Question(id="c", stem="The sky is", choices=("blue", "green", "loud"), label=0)]
    linears = lora_linears(model)

    def score_fn(batch):
        return class_scores(framing, model, tok, batch, 64)

    scores, jac = batch_logit_jacobians(score_fn, qs, linears)
    for b, q in enumerate(qs):
        ref_scores, ref = logit_jacobians(score_fn, q, [m.weight for m in linears.values()])
        torch.testing.assert_close(scores[b, : len(q.choices)], ref_scores[: len(q.choices)], rtol=1e-4, atol=1e-5)
        for (name, j), r in zip(jac.items(), ref):
            torch.testing.assert_close(j[b, : len(q.choices)], r, rtol=1e-3, atol=1e-5, msg=name)
            assert torch.all(j[b, len(q.choices):] == 0)
