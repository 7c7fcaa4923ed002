import pytest
import torch

import psoft_vision as pv


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def randomize_adapters(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Non-zero adapter parameters: q ~ N(0, std), scalings ~ 1 + N(0, std)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in pv.adapted_layers(model):
            for adapter in layer.adapters.values():
                for name, p in adapter.named_parameters():
                    noise = torch.randn(p.shape, generator=gen) * std
                    p.copy_(noise if name == "q" else 1 + noise)


@torch.no_grad()
def unet_out(unet: torch.nn.Module) -> torch.Tensor:
    """The noise prediction of a tiny-t2i UNet (train/pretrain_t2i.py) on fixed random inputs."""
    gen = torch.Generator().manual_seed(1)
    return unet(torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([10, 700]),
                torch.randn(2, 16, 64, generator=gen)).sample


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: on a 2-core machine busy with other jobs a second OpenMP
    thread only adds oversubscription. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
