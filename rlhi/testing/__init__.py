"""Test helpers shared by the test suite and the benchmarks (no jax here either).

`openai_server.OpenAIServer` is a loopback OpenAI-compatible chat-completions server with
scripted answers and fault injection.
"""
