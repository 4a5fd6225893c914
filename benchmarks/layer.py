"""Layer benchmark script; the same as `xmoe bench layer` (see benchmarks/README.md)."""

from xmoe.bench.layer import main

if __name__ == "__main__":
    main()
