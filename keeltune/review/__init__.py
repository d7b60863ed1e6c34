"""Human review: blind side-by-side judgement of models' answers (torch-free: it runs on a login node)."""
