"""Tasks, registered by name: the seed-004 toy and Sudoku (4×4, 9×9)."""
from .base import TASKS, Task, build_task
from . import toy, sudoku  # noqa: F401  (registration)
