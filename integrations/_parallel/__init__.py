"""Checks in a ``torch.distributed`` job.

Every collective a check makes, and failures known to all ranks (`ranks`); FSDP2 models
checked over their own local shards (`sharded`), whose results `merge` makes one.
"""
