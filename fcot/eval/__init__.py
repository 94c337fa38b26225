"""Evaluation: document-VQA metrics (:mod:`fcot.eval.metrics`) and ``fcot eval`` (:mod:`fcot.eval.run`)."""
