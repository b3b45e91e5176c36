"""Local backend: the same CptRun on one machine, torchrun subprocesses instead of Jobs."""
