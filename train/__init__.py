"""Training stage: datasets -> ViT_P / ViT_C checkpoints (`python -m train`, `python -m train.eval`)."""
