"""Model adapters: output functions (tasks), Hugging Face and causal-LM support, the demo models,
checkpoint recording and its manifest."""
