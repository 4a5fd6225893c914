"""Decode benchmark script; the same as `xmoe bench decode` (see benchmarks/README.md)."""

from xmoe.bench.decode import main

if __name__ == "__main__":
    main()
