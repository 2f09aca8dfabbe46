"""Moved to ckptstore/bench/gc_suite.py: python -m ckptstore.bench gc [options]."""

from ckptstore.bench.gc_suite import main

if __name__ == "__main__":
    main()
