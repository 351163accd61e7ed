"""Tasks, registered by name: the seed-004 toy, Sudoku (4×4, 9×9), star-graph path-finding."""
from .base import TASKS, Task, build_task
from . import toy, sudoku, star_graph, text, linear_regression  # noqa: F401  (registration)
