"""Moved to ckptstore/bench/history.py: python -m ckptstore.bench history [options]."""

from ckptstore.bench.history import main

if __name__ == "__main__":
    main()
