"""The embedded default's recipe: the three tasks its experts learned (arithmetic, sorting, json), their
synthetic data, and the evaluation. The X-LoRA library itself (`xlora_core`) does not depend on it."""
