"""Scripts that torchrun and mp.spawn launch for the distributed tests."""
