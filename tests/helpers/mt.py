"""Tiny seq2seq configs, a deterministic toy translation task, and a recorder of routing decisions."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import torch

from xmoe.models.seq2seq import Seq2Seq, Seq2SeqConfig
from xmoe.moe import MoEConfig

PAD, BOS, EOS = 0, 2, 3
FIRST_WORD = 4  # ids 4 .. V-1 are words in the id-level toy task

WORDS = "sun moon star tree river stone cloud bird fish wolf".split()
# The toy "language": each word has a fixed translation, and the sentence is reversed.
LEXICON = {w: w[::-1].upper() for w in WORDS}


def toy_sentence_pair(rng: random.Random) -> tuple[str, str]:
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
    return " ".join(words), " ".join(LEXICON[w] for w in reversed(words))


def write_toy_corpus(prefix: Path, n: int, *, seed: int) -> tuple[str, str]:
    rng = random.Random(seed)
    pairs = [toy_sentence_pair(rng) for _ in range(n)]
    src, tgt = Path(f"{prefix}.src"), Path(f"{prefix}.tgt")
    src.write_text("".join(s + "\n" for s, _ in pairs))
    tgt.write_text("".join(t + "\n" for _, t in pairs))
    return str(src), str(tgt)


def tiny_config(*, router: str | None = "threshold", dec_moe_every: int = 0, norm: str = "post",
                dropout: float = 0.0, vocab_size: int = 40, **moe_kw) -> Seq2SeqConfig:
    moe = None
    if router is not None:
        moe_kw = {"num_experts": 8, "expert_dim": 16, "threshold": 0.9, "top_k": 2, "init_std": 0.02} | moe_kw
        moe = MoEConfig(model_dim=32, router=router, **moe_kw)
    return Seq2SeqConfig(vocab_size=vocab_size, max_len=48, n_enc_layer=2, n_dec_layer=2, n_head=2, d_model=32,
                         d_ff=64, dropout=dropout, norm=norm, enc_moe_every=1, dec_moe_every=dec_moe_every, moe=moe)


def sharpen_routers(model: Seq2Seq, std: float = 1.0) -> None:
    """Larger router weights than the init, so tokens pick different numbers of experts."""
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.weight.normal_(std=std)


def random_batch(B: int, S: int, L: int, *, vocab_size: int = 40, generator=None):
    """Right-padded (src_BS, tgt_in_BL) of random words with random lengths (>= 1 real token)."""
    g = generator or torch.Generator().manual_seed(0)
    src = torch.randint(FIRST_WORD, vocab_size, (B, S), generator=g)
    tgt = torch.randint(FIRST_WORD, vocab_size, (B, L), generator=g)
    src_len = torch.randint(1, S + 1, (B,), generator=g)
    tgt_len = torch.randint(1, L + 1, (B,), generator=g)
    src_len[0], tgt_len[0] = S, L  # one full row, so the padded width is as given
    src[torch.arange(S)[None, :] >= src_len[:, None]] = PAD
    tgt[:, 0] = BOS
    tgt[torch.arange(L)[None, :] >= tgt_len[:, None]] = PAD
    return src, tgt


@contextlib.contextmanager
def record_routing(model: Seq2Seq):
    """Yield {MoE layer index: [RouterOutput of each call]} recorded by hooks on the routers."""
    calls: dict[int, list] = {i: [] for i in range(len(model.moe_layers()))}
    handles = [layer.router.register_forward_hook(lambda _m, _inp, out, i=i: calls[i].append(out))
               for i, layer in enumerate(model.moe_layers())]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()
