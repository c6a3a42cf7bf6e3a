def test_memory_is_sampled_only_for_shards_on_this_machine() -> None:
    import os
    import socket

    from dispers.simulation.driver import _local_pids, _MemorySampler

    here = socket.gethostname()
    assert _local_pids([(here, 11), (here, 12)]) == [11, 12]
    # A Ray worker elsewhere: a local process of the same id is not it.
    assert _local_pids([(here, 11), (here + "-other", os.getpid())]) is None
    remote = _MemorySampler(None)
    remote.start()
    remote.stop()
    assert not remote.visible and remote.peak == 0
    local = _MemorySampler([os.getpid()], every=0.01)
    local.start()
    local.stop()
    assert local.visible and local.peak > 0
