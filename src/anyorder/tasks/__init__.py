"""Tasks, registered by name: the marginals-vs-joint toy of "Why mask diffusion does not work",
Sudoku (4×4, 9×9), star-graph path-finding, in-context linear regression, text and chat (supervised rows for
Hugging Face tokenizers)."""
from .base import TASKS, Task, build_task
from . import toy, sudoku, star_graph, text, linear_regression, chat  # noqa: F401  (registration)
