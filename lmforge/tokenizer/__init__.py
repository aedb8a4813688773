"""Tokenizers: a byte-level baseline and byte-level BPE (training, fast encoding, file formats).

Every tokenizer offers: `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `eot_id`
(the document-separator id or None), `save(path)`; `load_tokenizer(spec)` opens any of them.
"""
