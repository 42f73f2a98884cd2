"""The embedded default's synthetic data: chest-X-ray-like images, question phrasings and paraphrase pairs."""
