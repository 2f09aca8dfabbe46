"""Moved to ckptstore/bench/metadata_sim.py: python -m ckptstore.bench metadata-sim [options]."""

from ckptstore.bench.metadata_sim import main

if __name__ == "__main__":
    main()
