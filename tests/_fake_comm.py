"""A fake in-process communicator for fastbn.sync's tests: R "ranks" as R Python threads, with
mpi4py's lowercase ``allgather(obj) -> list`` (every rank's obj, in rank order)."""
import threading


class FakeGroup:
    """R ranks that meet in allgather; ``calls`` counts the collectives (per rank 0)."""

    def __init__(self, size, timeout=60):
        self.size = size
        self.slots = [None] * size
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.calls = 0

    def comm(self, rank):
        return FakeComm(self, rank)


class FakeComm:
    def __init__(self, group, rank):
        self.group, self.rank = group, rank

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.group.size

    def allgather(self, obj):
        g = self.group
        g.slots[self.rank] = obj
        g.barrier.wait()  # everyone has written
        out = list(g.slots)
        if self.rank == 0:
            g.calls += 1
        g.barrier.wait()  # everyone has read: the slots may be written again
        return out


class NoComm:
    """A communicator that must not be used (evaluation mode)."""

    def allgather(self, obj):
        raise AssertionError("no collective expected here")


def run_ranks(size, fn, timeout=60):
    """Run fn(comm, rank) on ``size`` threads; returns (group, [result or exception per rank])."""
    group = FakeGroup(size, timeout)
    results = [None] * size

    def body(r):
        try:
            results[r] = fn(group.comm(r), r)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            results[r] = e

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a rank hung"
    return group, results
