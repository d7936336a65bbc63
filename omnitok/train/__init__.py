"""Training: text tokenizer training, (as they land) VQ-GAN and codec training, and DeepSpeed pretraining."""
