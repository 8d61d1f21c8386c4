"""The asv suite (asv.conf.json: benchmark_dir). asv imports this folder as a package; it lives
below benchmarks/ rather than being benchmarks/ itself so that benchmarks/ stays a plain folder,
which keeps the simulated TEE's runtime measurement (every package folder of isthmus) off it."""
