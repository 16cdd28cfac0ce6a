"""`uqlora benchmark CONFIG.yaml`: a grid of methods × tasks × seeds (training, post-hoc fits, combines,
evaluations) run cell by cell with the ordinary `uqlora` commands, resumable, and its report folder.

    config.py   the YAML schema, validated into a Benchmark (docs/benchmark.md)
    plan.py     the cells: run directories, the configs they must hold, their `uqlora` command lines, their state
    runner.py   runs the cells that are not done (each in its own process), progress lines, dry run
    collect.py  reads the finished cells: metrics, OOD scores, costs
    report.py   the tables (Markdown, CSV) and figure.py the grid of reliability diagrams
"""

from .config import load_benchmark
from .runner import run_benchmark

__all__ = ["load_benchmark", "run_benchmark"]
