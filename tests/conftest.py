"""Test-session setup that must happen before JAX creates its CPU client."""

import os

# GPU interpret mode (the Mosaic GPU prefill tests) runs each simulated warpgroup as a
# thread that blocks inside XLA callbacks; XLA sizes its CPU thread pool by $NPROC (else
# the core count), and on a 2-core machine the three warpgroups and the kernel's own
# callback cannot all hold a thread, so the interpreter deadlocks. Four threads suffice;
# machines with more cores keep their count.
os.environ.setdefault("NPROC", str(max(4, os.cpu_count() or 1)))
