import pytest
import torch

from bench.zoo import randomize_adapters  # noqa: F401  one helper for the tests and the zoo sweep


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


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
