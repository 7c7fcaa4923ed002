"""The learning-rate schedule of both trainers and of the tiny text-to-image pipeline's pretraining."""

import math


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    """A ``LambdaLR`` factor: linear warm-up over ``warmup_steps``, then a cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
