"""Moved to ckptstore/bench/gc.py: python -m ckptstore.bench gc [options]."""

from ckptstore.bench.gc import main

if __name__ == "__main__":
    main()
