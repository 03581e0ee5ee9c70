"""Loading teachers and students (HF directories or ids, GGUF files, the embedded default)."""
