"""The core on real images, in about a minute on two CPU cores.

A small timm ViT is first trained in full on the digits 0-4 (standing in for a pretrained backbone), then
fine-tuned with PSOFT and a new head on the digits 5-9, beside a linear probe (a new head only). Printed: the
trainable parameters, the identity error at injection, accuracy, the step time, and the merged model's error.
"""

import argparse
import copy
import time

import timm
import torch
import torch.nn.functional as F

import psoft_vision as pv
from train.digits import load_digits_tensors


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def fit(model, x, y, steps: int, lr: float, batch_size: int = 64, seed: int = 0) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(seed)
    losses, times = [], []
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(y), (batch_size,), generator=gen)
        start = time.perf_counter()
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses, sorted(times)[len(times) // 2]


def small_vit(num_classes: int):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=96,
                             depth=4, num_heads=3, num_classes=num_classes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16, help="PSOFT rank (default 16)")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="full training steps on digits 0-4")
    parser.add_argument("--steps", type=int, default=150, help="PSOFT fine-tuning steps on digits 5-9")
    parser.add_argument("--lr", type=float, default=5e-3, help="adapter learning rate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    x0, y0, x0_test, y0_test = load_digits_tensors(range(5), seed=args.seed)
    backbone = small_vit(num_classes=5)
    fit(backbone, x0, y0, args.pretrain_steps, lr=1e-3, seed=args.seed)
    print(f"backbone: full training on digits 0-4, test accuracy {accuracy(backbone, x0_test, y0_test):.3f}")

    x, y, x_test, y_test = load_digits_tensors(range(5, 10), seed=args.seed)
    backbone.reset_classifier(5)
    probe = copy.deepcopy(backbone).requires_grad_(False)
    probe.head.requires_grad_(True)
    fit(probe, x, y, args.steps, lr=args.lr, seed=args.seed)
    probe_accuracy = accuracy(probe, x_test, y_test)
    probe_before = backbone(x_test).detach()
    pv.inject(backbone, pv.PSOFTConfig(rank=args.rank, train_modules=("head",)))
    identity_error = ((backbone(x_test) - probe_before).norm() / probe_before.norm()).item()
    print(f"\nPSOFT r={args.rank} injected; relative change of the output at init: {identity_error:.2e}")
    print(pv.trainable_summary(backbone))

    losses, step_time = fit(backbone, x, y, args.steps, lr=args.lr, seed=args.seed)
    print(f"\nfine-tuning on digits 5-9: loss {losses[0]:.3f} -> {sum(losses[-10:]) / 10:.3f}, "
          f"median step {1000 * step_time:.1f} ms, test accuracy {accuracy(backbone, x_test, y_test):.3f} "
          f"(linear probe, same steps: {probe_accuracy:.3f})")

    backbone.eval()
    with torch.no_grad():
        adapted = backbone(x_test)
        pv.merge(backbone)
        merged = backbone(x_test)
    print(f"merged: relative output error {((merged - adapted).norm() / adapted.norm()).item():.2e}, "
          f"test accuracy {accuracy(backbone, x_test, y_test):.3f}")


if __name__ == "__main__":
    main()
