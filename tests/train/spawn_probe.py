"""The rank function of tests/train/test_distributed.py's fork-or-spawn test, in a module of its own: a spawned
rank imports the module of the function it runs, and the test module's imports (the Trainer, and the
torch.distributed modules tests/parallel/forked.py imports for forked ranks) took longer than the test itself."""

SET_AFTER_IMPORT: list[int] = []


def sees_parent_state(rank: int, world: int) -> bool:
    return bool(SET_AFTER_IMPORT)  # a forked child copies the parent's memory; a spawned one imports afresh
