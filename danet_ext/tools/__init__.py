"""The tools built on the library: the `danet-ext` command line (cli), the kernel
check, the benchmarks, the demo with its synthetic data, and segment. The library
itself (ops, reference, nn, models, official, checkpoint, build loading) does not
import anything from here."""
