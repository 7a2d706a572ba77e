import pytest
import torch

from kvshelf import KVLayout, Namespace, Shelf, load_config
from kvshelf.bench.redis_servers import RedisClusterServers, RedisServer

# Small enough to keep core tests fast; real model tests use the model's own layout.
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4)
CHUNK_SIZE = 4


@pytest.fixture
def namespace() -> Namespace:
    return Namespace("test-model@1", LAYOUT)


def random_kv(num_tokens: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.shape(num_tokens), generator=generator)


@pytest.fixture
def make_shelf(tmp_path):
    """Shelves over a disk tier in tmp_path; all closed at the end of the test."""
    shelves = []

    def make(**overrides) -> Shelf:
        values = {"chunk_size": CHUNK_SIZE, "disk_path": str(tmp_path / "disk"), **overrides}
        shelf = Shelf(load_config(environ={}, **values))
        shelves.append(shelf)
        return shelf

    yield make
    for shelf in shelves:
        shelf.close()


@pytest.fixture
def opened():
    """Closes what a test opens (receivers before their shelves: last opened, first closed)."""
    things = []
    yield things
    for thing in reversed(things):
        thing.close()


@pytest.fixture
def redis_server(tmp_path):
    """A private redis-server on a free loopback port, stopped after the test."""
    with RedisServer(tmp_path) as server:
        yield server


@pytest.fixture
def redis_cluster(tmp_path):
    """Three redis-server primaries joined into a cluster, stopped after the test."""
    with RedisClusterServers(tmp_path) as cluster:
        yield cluster
