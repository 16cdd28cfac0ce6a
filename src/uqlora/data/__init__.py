"""Multiple-choice QA data: the task registry and the readers of every source.

    from uqlora.data import load_questions
    questions = load_questions("arc-e", "test", max_examples=200)

See docs/data.md for the tasks, splits, sources and the user JSONL schema.
"""

from uqlora.data.load import SOURCES, load_questions
from uqlora.data.question import Question
from uqlora.data.sources import resolve_data_dir
from uqlora.data.tasks import TASKS, Task

__all__ = ["SOURCES", "TASKS", "Question", "Task", "load_questions", "resolve_data_dir"]
