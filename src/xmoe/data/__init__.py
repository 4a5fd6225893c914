"""xmoe.data: corpora, byte-level BPE tokenizer, token cache and resumable LM batches.

Imports nothing else from xmoe but ``xmoe.errors`` and ``xmoe.extras`` (the errors a user sees).

    from xmoe.data import DataConfig, prepare_lm_data
    data = prepare_lm_data(DataConfig(path=None, vocab_size=4096), run_dir)
    train = data.train_batches(batch_size=16, seq_len=256, seed=0)
    x_BL, y_BL = train.batch(step)          # pure function of (seed, step): exact resume
    for x_BL, y_BL in data.val_batches(batch_size=16, seq_len=256, max_batches=20): ...

    # evaluation of new text with a run's tokenizer
    tokens = load_eval_tokens("new.txt", run_dir)
    batches = ValBatches(tokens=tokens, batch_size=16, seq_len=256, name="'new.txt'")

Translation's parallel text is xmoe.data.translation, not imported here: a language-model run
loads none of it.
"""

from .batches import TrainBatches, ValBatches
from .corpus import DEFAULT_MODULES, corpus_fingerprint, default_corpus, load_corpus, split_documents
from .lm import DataConfig, LMData, default_cache_dir, load_eval_tokens, load_tokenizer, prepare_lm_data
from .tokenizer import EOT, TOKENIZER_FILE, BPETokenizer

__all__ = ["BPETokenizer", "DEFAULT_MODULES", "DataConfig", "EOT", "LMData", "TOKENIZER_FILE", "TrainBatches",
           "ValBatches", "corpus_fingerprint", "default_cache_dir", "default_corpus", "load_corpus", "load_eval_tokens",
           "load_tokenizer", "prepare_lm_data", "split_documents"]
