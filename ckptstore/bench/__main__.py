"""``python -m ckptstore.bench SUITE [options]``; see :mod:`ckptstore.bench`."""

from ckptstore.bench import main

if __name__ == "__main__":
    main()
