"""Moved to ckptstore/bench/distributed.py: python -m ckptstore.bench distributed [options]."""

from ckptstore.bench.distributed import main

if __name__ == "__main__":
    main()
