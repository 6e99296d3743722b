"""Speech conversation data (readers, features, tokenizer, collator, sampler: issue 4)."""
