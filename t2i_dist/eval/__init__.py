"""Evaluation: FID / KID / IS / CLIP score / text alignment from mergeable sums, fanned out over workers.

sources.py     evaluation inputs as an ordered, indexed item list (shards or image folders, local or S3)
inception.py   TF-Inception-2015-12-05 weights (sha1-checked), documented resize, features, IS head
stats.py       float64 sufficient statistics, Frechet distance, KID, Inception Score
metrics.py     what a worker accumulates (Partial), merging, the final numbers
fanout.py      K contiguous chunks over Ray tasks, or all_reduce inside a torch.distributed group
generation.py  images from a checkpoint with per-caption seeds
reference.py   cached real-image statistics (.npz, local or s3://)
alignment.py   the synthetic data set's attribute classifier (text alignment), refused below 0.95 accuracy
alignment_cache.py  classifiers trained on first use, cached by the shards' contents
clip_score.py  CLIP score with configured CLIP weights
in_training.py evaluation every eval.every steps inside the training worker group
runs.py, render.py  the report's MLflow reading and its tables/figures/HTML/Markdown
protocols/     evaluation protocols (python -m t2i_dist.evaluate --protocol NAME)
"""
