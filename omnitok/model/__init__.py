"""The decoder LM: build, load and extend Hugging Face causal LMs; losses; sampling."""
