"""Bias probes: items from the standard sets (``standard_sets``), keeltune's generated set (``builtin``) and
users' files (``probe_files``), the configured probes and their amplification over the base (``probes``,
torch-free), and their log-likelihoods on a model (``score``)."""
