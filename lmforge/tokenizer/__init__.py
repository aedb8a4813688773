"""Tokenizers: a byte-level baseline and byte-level BPE (training, fast encoding, file formats).

Modules: byte (ByteTokenizer), bpe (Tokenizer), added (finding special and other added tokens in a text, as HF's
AddedVocabulary does), train (train_bpe), reference (pure-Python encoder),
agreement (the fast path's check, its passes remembered on disk), pretokenize (split patterns and safe cut
points), formats (GPT-2 / tiktoken files, byte <-> printable character tables), hf_json (HF tokenizer.json),
sentencepiece (SentencePiece-style BPE tokenizer.json, its normalizer / pre-tokenizer / decoder steps in
sentencepiece_steps), corpus (files -> token shards, statistics), load (load_tokenizer).

Every tokenizer offers: `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `eot_id`
(the document-separator id or None), `save(path)`; `load_tokenizer(spec)` opens any of them.
"""
