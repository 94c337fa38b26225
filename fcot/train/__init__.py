"""FCoT-VL training, top down: ``trainer`` (the one ``Trainer`` subclass and the module whose
forward computes the loss), the stages ``distill`` (stage 1, self-distillation) and ``posttrain``
(stage 2), ``distributed`` (FSDP2 on CPUs), ``checkpoint`` (the run folder), ``engine`` (model
parts, data, TrainingArguments), ``config`` (the run config) and ``merge`` (checkpoint averaging)."""
