"""A group of one made in a plain process (DeepSpeed needs one) leaves the environment as it
found it: a later stage in the same process is not taken for a torchrun worker."""

import os

from mlps_dist import dist


def test_a_group_of_one_puts_the_environment_back():
    before = {key: os.environ.get(key) for key in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    assert not dist.read_env().launched  # the suite runs outside torchrun
    env = dist.init("gloo", 60, force_group=True)
    try:
        assert env.launched and dist.get_world_size() == 1
    finally:
        dist.teardown()
    assert {key: os.environ.get(key) for key in before} == before
    assert not dist.read_env().launched and not dist.env().launched
