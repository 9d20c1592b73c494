"""The official toolbox's files: released MCIBI++ checkpoints, ImageNet backbones, their parameter names, and where
they come from (mirrors) and how they are read."""
