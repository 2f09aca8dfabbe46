"""Moved to ckptstore/bench/s3.py: python -m ckptstore.bench s3 [options]."""

from ckptstore.bench.s3 import main

if __name__ == "__main__":
    main()
