"""A few optimiser steps on real images (scikit-learn's digits) lower the loss through the adapters."""

import pytest
import timm
import torch
import torch.nn.functional as F

import psoft_vision as pv
from train.offline.digits import load_digits_tensors


@pytest.fixture(scope="module")
def digits():
    return load_digits_tensors(range(10), image_size=32)


@pytest.mark.parametrize("config", [pv.PSOFTConfig(rank=32), pv.PSOFTConfig(rank=32, neumann_terms=4),
                                    pv.OFTConfig(block_size=16)], ids=["psoft", "psoft-neumann", "oft"])
def test_adapter_steps_lower_the_loss(digits, config):
    torch.manual_seed(0)
    x, y, _, _ = digits
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                              depth=2, num_heads=2, num_classes=10)
    pv.inject(model, config)  # the head stays frozen: only the adapters can lower the loss
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-2)
    batch = torch.arange(128)
    with torch.no_grad():
        before = F.cross_entropy(model(x[batch]), y[batch]).item()
    for _ in range(20):
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = F.cross_entropy(model(x[batch]), y[batch]).item()
    assert after < 0.9 * before
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
