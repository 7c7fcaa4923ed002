"""Pretrain the offline backbone ``vit_pico_patch8_32`` on the Fashion-MNIST *train* split (60k images).

    apt-get install dataset-fashion-mnist
    python -m train.offline.pretrain_backbone --epochs 8 --seed 0

Writes ``assets/vit_pico_patch8_32.fmnist.safetensors`` (fp16) and prints the test accuracy for the model card.
Augmentation: random translation (pad 4, crop), horizontal flip and a random colour tint, so that the features are
not tied to grey pixels; the downstream tasks of VTAB-offline use the *test* split and other image sources only.
"""

import argparse
import math
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from . import backbone
from .data import fashion_mnist


def to_batch(images: np.ndarray) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 3, 32, 32) in [-1, 1], framed by 2 black pixels."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1)
    return F.pad(x, (2, 2, 2, 2), value=-1.0).unsqueeze(1).expand(-1, 3, -1, -1)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4), value=-1.0)
    offsets = torch.randint(0, 9, (n, 2), generator=gen)
    rows = (offsets[:, :1] + torch.arange(32))[:, None, :, None]
    cols = (offsets[:, 1:] + torch.arange(32))[:, None, None, :]
    x = padded[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    tint = torch.rand(n, 3, 1, 1, generator=gen) * 0.8 + 0.2
    return (x + 1) * tint - 1


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m train.offline.pretrain_backbone", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(backbone.BACKBONE_FILE))
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train_images, train_labels = fashion_mnist("train")
    test_images, test_labels = fashion_mnist("test")
    x_train, y_train = to_batch(train_images), torch.from_numpy(train_labels.astype(np.int64))
    model = timm.create_model("vit_pico_patch8_32", pretrained=False, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(x_train) // args.batch_size
    total, warmup = args.epochs * steps_per_epoch, steps_per_epoch // 2
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))

    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}")
        for step in bar:
            index = order[step * args.batch_size:(step + 1) * args.batch_size]
            loss = F.cross_entropy(model(augment(x_train[index], gen)), y_train[index], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")

    state = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() for k, v in state.items()})  # measure what ships: the fp16 weights
    model.eval()
    with torch.no_grad():
        x_test = to_batch(test_images)
        predictions = torch.cat([model(x_test[i:i + 500]).argmax(1) for i in range(0, len(x_test), 500)])
    accuracy = (predictions.numpy() == test_labels).mean()
    save_file(state, args.output, metadata={"architecture": "vit_pico_patch8_32", "seed": str(args.seed),
                                            "epochs": str(args.epochs), "test_accuracy": f"{accuracy:.4f}"})
    print(f"Fashion-MNIST test accuracy {accuracy:.4f} after {args.epochs} epochs, {time.time() - start:.0f} s; "
          f"wrote {args.output}")


if __name__ == "__main__":
    main()
