"""Prefill/decode disaggregation: the KV transfer channel (transfer), the OpenAI-compatible
proxy in front of prefill and decode instances (proxy), and a 1P1D launcher (launch)."""
