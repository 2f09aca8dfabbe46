"""Moved to ckptstore/bench/quantize.py: python -m ckptstore.bench quantize [options]."""

from ckptstore.bench.quantize import main

if __name__ == "__main__":
    main()
