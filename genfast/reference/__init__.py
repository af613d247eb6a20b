"""Plain-PyTorch implementations of every genfast op: the fallback on devices
without a kernel, and the oracle every test compares against."""
