"""Backends behind one translator interface: OpenAI, Azure OpenAI, Anthropic, demo."""
