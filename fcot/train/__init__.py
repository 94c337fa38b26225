"""FCoT-VL training: configs (``config``), checkpoint merging (``merge``); the Trainer subclasses
for stage 1 (self-distillation) and stage 2 (post-training) build on these."""
