"""The toy training job, kept at its old path: `trainwarden.demo.toy_job` is the real one.

Run it under torchrun with two ranks (gloo, DDP)::

    .venv/bin/python -m torch.distributed.run --nproc-per-node 2 --master-port 29611 \\
        examples/train_toy.py --steps 60 --ckpt-dir /tmp/toy-ckpt --ckpt-every 10 --out /tmp/toy-out

Flags and behaviour are described in `trainwarden/demo/toy_job.py` (`--help` lists them).
"""

from __future__ import annotations

import sys

from trainwarden.demo.toy_job import main

if __name__ == "__main__":
    sys.exit(main())
