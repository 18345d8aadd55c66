"""GPU benchmark and check scripts: ``python -m experiments.bench.<name> ...``.

Nothing is imported here; each script sets the JAX allocator's environment before JAX starts.
"""
