"""`uqlora mix EVAL_DIR... --out DIR`: the ensemble (MultiSWAG) predictive of evaluations already made, from their
predictions.jsonl alone — no model is loaded, and the members' weights need not exist any more.

Deep ensembles (Lakshminarayanan et al. 2017: the uniformly weighted mixture of the members' predictives) and
MultiSWAG (Wilson & Izmailov 2020: M SWAG posteriors, S draws each, every draw weighted 1/(M·S)). Member
m's evaluation holds, per question, its predictive p̄_m = mean of its S draws, H(p̄_m) and its mutual information
I_m = H(p̄_m) − mean_s H(p_ms) (0 when S = 1). With the same S for every member:

    p̄ = (1/M) Σ_m p̄_m                                      the mean of all M·S draws
    I = H(p̄) − (1/(M·S)) Σ_m Σ_s H(p_ms) = H(p̄) − (1/M) Σ_m (H(p̄_m) − I_m)

so the mixture's predictive and its mutual information are exact, not approximations. For map members this is
what `uqlora evaluate` of the combined ensemble computes (tested); for swag members the draws are the members' own
evaluations' (`draw_generator(seed, 0, s)` of each run) rather than `evaluate`'s of a multiswag run
(`draw_generator(seed, m, s)`): other draws of the same posteriors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from . import runs
from .combine import ENSEMBLE_OF
from .errors import UqloraError
from .evaluation.metrics import classification_metrics, predictive_entropy
from .evaluation.reliability import plot_reliability
from .io import write_json, write_jsonl

SAME = ("task", "split", "n_bins", "framing", "method", "n_samples", "n")  # must agree between the members


def mixed_method(member_method: str) -> str:
    """The name of a mixture of `member_method` evaluations: ensemble (map), multiswag (swag), else METHOD-ensemble."""
    return ENSEMBLE_OF.get(member_method, f"{member_method}-ensemble")


def mix_evaluations(eval_dirs: list[Path], out: Path) -> dict:
    """Write the mixture of the evaluations in `eval_dirs` to `out` (metrics.json, predictions.jsonl,
    reliability.png; the folder appears whole or not at all); returns its metrics."""
    eval_dirs, out = [Path(d) for d in eval_dirs], Path(out)
    if len(eval_dirs) < 2:
        raise UqloraError("mix needs the evaluations of at least two runs")
    if len(set(map(str, eval_dirs))) < len(eval_dirs):
        raise UqloraError("mix: an evaluation is given twice (an ensemble never counts a member twice)")
    if out.exists() and any(out.iterdir()):
        raise UqloraError(f"{out} already exists and is not empty; choose another --out")
    metrics = [_read_metrics(d) for d in eval_dirs]
    for d, m in zip(eval_dirs[1:], metrics[1:]):
        differ = [f"{k} {m.get(k)!r} (not {metrics[0].get(k)!r})" for k in SAME if m.get(k) != metrics[0].get(k)]
        if differ:
            raise UqloraError(f"{d} differs from {eval_dirs[0]} in {', '.join(differ)}; mix evaluations of one "
                              "method on the same questions with the same number of draws")
    rows = [_read_predictions(d, int(metrics[0]["n_samples"])) for d in eval_dirs]
    ids = [(r["id"], r["label"], len(r["probs"])) for r in rows[0]]
    for d, member in zip(eval_dirs[1:], rows[1:]):
        other = [(r["id"], r["label"], len(r["probs"])) for r in member]
        if other != ids:
            i = next(i for i, (a, b) in enumerate(zip(ids, other)) if a != b)
            raise UqloraError(f"{d / 'predictions.jsonl'} line {i + 1} is question {other[i]} where "
                              f"{eval_dirs[0]} has {ids[i]} (id, label, choices): not the same questions")
    width = max(n for _, _, n in ids)
    probs = torch.tensor([[r["probs"] + [0.0] * (width - len(r["probs"])) for r in member] for member in rows],
                         dtype=torch.float64)  # [M, N, C]
    draw_entropy = torch.tensor([[r["entropy"] - r.get("mutual_information", 0.0) for r in member]
                                 for member in rows], dtype=torch.float64)  # [M, N] mean_s H(p_ms) per member
    mixed = probs.mean(dim=0)  # [N, C]
    entropy = predictive_entropy(mixed)  # [N]
    mutual_info = (entropy - draw_entropy.mean(dim=0)).clamp_min(0.0)  # [N]; rounding below 0 -> 0
    labels = torch.tensor([label for _, label, _ in ids])
    first = metrics[0]
    result = classification_metrics(mixed, labels, n_bins=int(first["n_bins"]))
    result.update(method=mixed_method(first["method"]), members=len(eval_dirs),
                  n_samples=len(eval_dirs) * int(first["n_samples"]), mean_entropy=float(entropy.mean()),
                  mean_mutual_information=float(mutual_info.mean()), task=first["task"], split=first["split"],
                  framing=first["framing"], **_seconds(metrics), **_peak(metrics),
                  mixed_from=[str(d) for d in eval_dirs])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write_jsonl(tmp / "predictions.jsonl", (
            {"id": i, "label": label, "probs": mixed[q, :n].tolist(), "entropy": float(entropy[q]),
             "mutual_information": float(mutual_info[q])} for q, (i, label, n) in enumerate(ids)))
        plot_reliability(mixed, labels, int(first["n_bins"]), tmp / "reliability.png",
                         title=f"{out.parent.parent.name}: {first['task']} {first['split']} ({result['method']})")
        write_json(tmp / "metrics.json", result)
        runs.replace_dir(tmp, out)  # `out` is absent or empty
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _read_metrics(eval_dir: Path) -> dict:
    path = eval_dir / "metrics.json"
    if not path.is_file():
        raise UqloraError(f"{path} is missing: {eval_dir} is not a finished evaluation (`uqlora evaluate` it first)")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UqloraError(f"{path} is not valid JSON ({err})") from None
    missing = [k for k in SAME if k not in metrics]
    if missing:
        raise UqloraError(f"{path} lacks {', '.join(missing)}: not written by `uqlora evaluate`")
    return metrics


def _read_predictions(eval_dir: Path, n_samples: int) -> list[dict]:
    """The rows of predictions.jsonl, each checked for what the mixture reads."""
    path = eval_dir / "predictions.jsonl"
    if not path.is_file():
        raise UqloraError(f"{path} is missing: {eval_dir} is not a finished evaluation")
    needed = ("id", "label", "probs", "entropy", *(("mutual_information",) if n_samples > 1 else ()))
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UqloraError(f"{path} line {line_no} is not valid JSON ({err})") from None
        if not isinstance(row, dict) or any(k not in row for k in needed) or not isinstance(row["probs"], list):
            raise UqloraError(f"{path} line {line_no} lacks one of {', '.join(needed)}")
        rows.append(row)
    return rows


def _seconds(metrics: list[dict]) -> dict:
    """The members' prediction seconds added up (the ensemble predicts by running every member), where all have
    them."""
    values = [m.get("seconds") for m in metrics]
    return {} if any(v is None for v in values) else {"seconds": round(sum(values), 2)}


def _peak(metrics: list[dict]) -> dict:
    """The largest member peak (members run one after another), where all were measured the same way."""
    measures = {m.get("peak_memory_measure") for m in metrics}
    peaks = [m.get("peak_memory_bytes") for m in metrics]
    if len(measures) != 1 or any(p is None for p in peaks):
        return {}
    return {"peak_memory_bytes": max(peaks), "peak_memory_measure": measures.pop()}
