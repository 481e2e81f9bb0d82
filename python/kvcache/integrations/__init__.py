"""Serving-engine integrations: `kvcache.integrations.sglang` (SGLang HiCache L3 storage)."""
