"""Moved to ckptstore/bench/gpu.py: python -m ckptstore.bench gpu [options]."""

from ckptstore.bench.gpu import main

if __name__ == "__main__":
    main()
