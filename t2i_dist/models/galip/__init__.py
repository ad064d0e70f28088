"""GALIP (Tao et al., CVPR 2023): Mate-G and Mate-D around one frozen CLIP, trained with MA-GP."""

from t2i_dist.models.base import FamilySpec
from t2i_dist.models.galip.config import GALIPConfig

SPEC = FamilySpec(
    name="galip",
    config_class=GALIPConfig,
    plugin="t2i_dist.models.galip.plugin:GALIPPlugin",
    description="generative adversarial CLIPs: one generator forward pass per image",
)
