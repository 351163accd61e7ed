"""A user-defined task, registered by name (load with `plugins: [examples/reverse_task.py]`).

``reverse``: the prompt is n random digits, the answer the same digits reversed. Its data are
generated from a seed (nothing downloaded); ``metrics`` scores decoded answers.
"""
import torch

from anyorder.tasks import TASKS, Task


@TASKS.register("reverse")
class ReverseTask(Task):
    threshold = ("seq_acc", ">=", 0.9)   # what a study report counts as "learned"

    def __init__(self, n: int = 6, digits: int = 10, n_eval: int = 256, seed: int = 0):
        self.n, self.digits, self.n_eval, self.seed = int(n), int(digits), int(n_eval), int(seed)
        self.vocab_size, self.mask_id, self.seq_len = self.digits + 1, self.digits, 2 * self.n

    def _batch(self, batch_size: int, gen: torch.Generator):
        prompt = torch.randint(0, self.digits, (batch_size, self.n), generator=gen)
        x0 = torch.cat([prompt, prompt.flip(-1)], dim=1)
        answer = torch.zeros_like(x0, dtype=torch.bool)
        answer[:, self.n:] = True
        return x0, answer

    def train_batch(self, batch_size, gen):
        return self._batch(batch_size, gen)

    def eval_set(self, n):
        return self._batch(min(n, self.n_eval), torch.Generator().manual_seed(self.seed + 1))
