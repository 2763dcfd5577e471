"""Demo helpers: a scriptable fake OpenAI-compatible upstream for local runs and tests."""
