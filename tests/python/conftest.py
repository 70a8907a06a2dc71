"""Fixtures shared by the Python tests: pools of ranks, one per world size."""
import pytest

from rank_pool import RankPool


@pytest.fixture(scope="session")
def ranks():
    """ranks(p) -> the session's RankPool of p ranks (started on first use)."""
    pools = {}

    def pool_of(world_size):
        pool = pools.get(world_size)
        if pool is None or pool.broken:
            if pool is not None:
                pool.close()
            pool = pools[world_size] = RankPool(world_size)
        return pool

    yield pool_of
    for pool in pools.values():
        pool.close()
