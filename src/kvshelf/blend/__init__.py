"""CacheBlend building blocks: reuse KV of text that is not a prompt's prefix (RAG)."""
