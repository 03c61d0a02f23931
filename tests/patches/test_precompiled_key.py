"""The precompiled artifact's key for a block called on a Ulysses split: stable across processes and jobs."""
from __future__ import annotations

from types import SimpleNamespace

from patches.precompiled import _meta
from wan_engine.ulysses import SequenceShard


def test_a_split_call_is_keyed_by_its_group_name_rank_and_sizes_not_by_the_group_object():
    def shard(name="0", rank=1, size=2, tokens=27):   # a new group object every time, as in every job
        return SequenceShard(SimpleNamespace(group_name=name), rank, size, tokens)

    assert _meta(shard()) == _meta(shard())
    assert repr(_meta((shard(),))) == repr(_meta((shard(),)))   # the hashed text holds no object address
    for other in (shard(name="1"), shard(rank=0), shard(size=4), shard(tokens=28)):
        assert _meta(other) != _meta(shard())
