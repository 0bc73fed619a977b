"""Drop-in kvbucket tiers for serving engines (vLLM, SGLang HiCache, LMCache); each imports its engine lazily."""
