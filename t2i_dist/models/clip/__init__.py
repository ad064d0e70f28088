"""open_clip models: the frozen text encoder and vision tower the families condition on."""
