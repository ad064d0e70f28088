"""The benchmark suite: `python -m t2i_dist.bench [--quick]` prints one table and writes tools/benchmarks.md.

The machines this runs on are shared and noisy, so no number here is a bare absolute time: every benchmark
runs the things it compares side by side in the same invocation, alternating them round after round, and
reports medians over the rounds of their ratios. One module per benchmark; each exposes
`run(ctx) -> list[Row]`.
"""
