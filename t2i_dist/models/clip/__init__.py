"""open_clip models: the frozen text encoder and vision tower the families use, and the `clip` family that
trains one."""

from t2i_dist.models.base import FamilySpec
from t2i_dist.models.clip.family import ClipTrainingConfig

SPEC = FamilySpec(
    name="clip",
    config_class=ClipTrainingConfig,
    plugin="t2i_dist.models.clip.plugin:ClipPlugin",
    generates_images=False,
    export_hint="model.text.pretrained (ldm) or model.clip.pretrained (galip)",
    description="open_clip model trained contrastively (ClipLoss, features gathered across ranks)",
)
