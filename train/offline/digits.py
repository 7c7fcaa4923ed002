"""scikit-learn's 1,797 real handwritten 8x8 digits as image tensors: the smallest real image set offline."""

import torch
import torch.nn.functional as F


def load_digits_tensors(classes=range(10), image_size: int = 32, test_fraction: float = 0.25, seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``: 3-channel images in [-1, 1], labels renumbered 0..len(classes)-1."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    classes = list(classes)
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0 * 2 - 1
    labels = torch.tensor(digits.target)
    keep = torch.isin(labels, torch.tensor(classes))
    images, labels = images[keep], labels[keep]
    labels = torch.searchsorted(torch.tensor(sorted(classes)), labels)
    images = F.interpolate(images[:, None], size=image_size, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return images[train].contiguous(), labels[train], images[test].contiguous(), labels[test]
