"""From documents to training batches: the corpus, reading any input, tokenizers, MDS shards and the loaders over
them. Imports slm.core only."""
