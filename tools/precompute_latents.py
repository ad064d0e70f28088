"""Encode image shards into latent shards once (frozen VAE + text encoder, fanned out over Ray).

    python tools/precompute_latents.py --config ldm-tiny --out data/synthetic-latents
    python -m t2i_dist.train --config ldm-tiny-latents

Same as `python -m t2i_dist.precompute`; see its --help.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from t2i_dist.precompute import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
