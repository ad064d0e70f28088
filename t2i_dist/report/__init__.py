"""The comparison report (tables, sample grids, curves) over finished runs: `python -m t2i_dist.report`
(the command line is report/cli.py)."""
