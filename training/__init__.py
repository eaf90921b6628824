"""Training: MTL-LoRA on a frozen transformer through DeepSpeed ZeRO, tracked in MLflow."""
