"""The official toolbox's files: released MCIBI++ checkpoints, ImageNet backbones, and their parameter names."""
