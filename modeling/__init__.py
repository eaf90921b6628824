"""The model, one home for training and serving: the MTL-LoRA layer and its injection, the relevance
model with its pooling, the base and its tokenizer, the pair format, merging and the trained-model folder."""
