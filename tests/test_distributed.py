"""vipamin_scale.distributed's collectives with one process (no process group, or `LOCAL`): the
identity, in place where they say so. The multi-process paths run under torchrun in
test_linalg.py, test_init_sharded.py, test_engines.py and test_world_size.py."""
from __future__ import annotations

import pytest
import torch

from vipamin_scale import distributed as D


@pytest.mark.parametrize("group", [None, D.LOCAL])
def test_single_process_collectives_are_the_identity(group):
    t = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    assert D.all_reduce_sum(t, group) is t and torch.equal(t, torch.arange(6, dtype=torch.float64).reshape(2, 3))
    assert D.all_reduce_max(t, group) is t
    assert D.broadcast(t, 0, group) is t
    stacked = D.all_gather(t, group)
    assert stacked.shape == (1, 2, 3) and torch.equal(stacked[0], t) and stacked.data_ptr() != t.data_ptr()
    assert D.gather(t, 0, group) == [t]
    obj = {"keys": ["a", "b"]}
    assert D.all_gather_object(obj, group) == [obj]
    assert D.broadcast_object(obj, 0, group) is obj
    assert D.rank(group) == 0 and D.world_size(group) == 1


def test_a_group_without_a_process_group_is_an_error():
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        D.all_reduce_sum(torch.zeros(1), group=object())
