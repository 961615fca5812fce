"""Model inputs: image preprocessing and box geometry (`images`), prompt templates and their tokenization
(`prompts`), GQA task files (`gqa`)."""
