"""Binary object segmentation from frozen ViT features: extract -> train-head -> predict."""
