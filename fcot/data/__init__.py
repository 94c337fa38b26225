"""Training data for FCoT-VL: InternVL conversation records (``records``), dynamic tiling
(``tiling``) and synthetic text-rich documents (``synth``)."""
