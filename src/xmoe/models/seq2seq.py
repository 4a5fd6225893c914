"""A Transformer encoder-decoder for translation whose FFNs are, in chosen layers, XMoE layers.

References: Vaswani et al. (2017), "Attention Is All You Need": Transformer-base (6 + 6 layers,
d 512, FFN 2048, 8 heads), post-LN sub-layers ``LN(x + drop(f(x)))``, sinusoidal positions
(eq. in Sec. 3.5), embeddings scaled by sqrt(d) and shared by encoder, decoder and output
layer (joint vocabulary), Xavier-uniform linear layers. Pre-LN (``x + drop(f(LN(x)))`` with a
final LN per stack; Xiong et al. 2020) is an option. Beam search with the length penalty
``score / length ** alpha`` (as fairseq's ``--lenpen``). XMoE (Yang et al., 2024,
arXiv 2403.18926, Sec. 4, docs/method.md "Machine translation"): MoE replaces the FFN of encoder
layers 2, 4, 6; decoder MoE layers are an option here (``dec_moe_every``). The paper's model
sizes and MoE families are presets, in xmoe.presets.seq2seq.

Choices of ours, said once: the FFN (dense and experts) uses GeLU, as the rest of this package;
the experts keep their MoEConfig init (N(0, init_std)). Padding is never routed: every MoE layer
gets the non-padding mask, so pad tokens take no capacity or compute and enter neither the
balancing loss nor the statistics (the authors' translation code routes them).

The model returns logits and the *unscaled* sum of the MoE balancing losses; the training task
forms the label-smoothed loss. No training or file IO here.

Shape legend: B batch (sentences, or sentences x beams), S source length, L target length,
D model dim, V vocabulary, K beam size, H heads, A head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmoe.errors import UsageError
from xmoe.moe import MoEConfig, MoELayer, MoEOutput, RoutingStats

from .config import Seq2SeqConfig
from .counts import moe_flops_budget, seq2seq_params
from .layers import FeedForward, KVCache, SelfAttention

# Seq2SeqConfig and its counts are torch-free (xmoe.models.config, .counts); exported here as well.
__all__ = ["CrossAttention", "DecoderCache", "DecoderLayer", "EncoderLayer", "Memory", "Seq2Seq", "Seq2SeqConfig",
           "Seq2SeqOutput", "moe_flops_budget", "num_params", "sinusoidal_positions"]

def sinusoidal_positions(num_positions: int, d_model: int) -> Tensor:
    """Vaswani et al. (2017), Sec. 3.5: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)."""
    pos_P1 = torch.arange(num_positions, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    table = torch.zeros(num_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos_P1 * freq)
    table[:, 1::2] = torch.cos(pos_P1 * freq[: d_model // 2])
    return table.float()


class CrossAttention(nn.Module):
    """Decoder-to-encoder attention. The encoder's keys and values are projected once per
    sentence (``memory_kv``) and reused at every decoding step."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def memory_kv(self, memory_BSD: Tensor) -> tuple[Tensor, Tensor]:
        B, S, D = memory_BSD.shape
        k_BSD, v_BSD = self.kv(memory_BSD).split(D, dim=-1)
        return tuple(t.view(B, S, self.n_head, D // self.n_head).transpose(1, 2) for t in (k_BSD, v_BSD))

    def forward(self, x_BLD: Tensor, kv: tuple[Tensor, Tensor], attn_mask_B11S: Tensor) -> Tensor:
        B, L, D = x_BLD.shape
        q_BHLA = self.q(x_BLD).view(B, L, self.n_head, D // self.n_head).transpose(1, 2)
        y_BHLA = F.scaled_dot_product_attention(
            q_BHLA, *kv, attn_mask=attn_mask_B11S, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y_BHLA.transpose(1, 2).reshape(B, L, D))


class _Layer(nn.Module):
    """Shared by encoder and decoder layers: residual sub-layers in post- or pre-LN order, and
    the FFN (dense or MoE, the MoE seeing only real tokens)."""

    def __init__(self, cfg: Seq2SeqConfig, moe: MoEConfig | None, num_sublayers: int) -> None:
        super().__init__()
        self.pre_ln = cfg.norm == "pre"
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) for _ in range(num_sublayers))
        self.ffn: nn.Module = MoELayer(moe) if moe is not None else FeedForward(cfg.d_model, cfg.d_ff)
        self.drop = nn.Dropout(cfg.dropout)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoELayer)

    def residual(self, i: int, x_BLD: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
        if self.pre_ln:
            return x_BLD + self.drop(f(self.norms[i](x_BLD)))
        return self.norms[i](x_BLD + self.drop(f(x_BLD)))

    def feed_forward(self, x_BLD: Tensor, nonpad_BL: Tensor) -> tuple[Tensor, MoEOutput | None]:
        """The last sub-layer; returns the MoE output (losses, stats) too, or None."""
        moe_outputs: list[MoEOutput] = []

        def ffn(h_BLD: Tensor) -> Tensor:
            if not self.is_moe:
                return self.ffn(h_BLD)
            moe_outputs.append(self.ffn(h_BLD, mask=nonpad_BL))
            return moe_outputs[0].output

        x_BLD = self.residual(len(self.norms) - 1, x_BLD, ffn)
        return x_BLD, (moe_outputs[0] if moe_outputs else None)


class EncoderLayer(_Layer):
    def __init__(self, cfg: Seq2SeqConfig, *, moe: MoEConfig | None, layer_idx: int) -> None:
        super().__init__(cfg, moe, num_sublayers=2)
        self.attn = SelfAttention(cfg.d_model, cfg.n_head, cfg.dropout, causal=False, layer_idx=layer_idx)

    def forward(self, x_BSD: Tensor, nonpad_BS: Tensor, attn_mask_B11S: Tensor) -> tuple[Tensor, MoEOutput | None]:
        x_BSD = self.residual(0, x_BSD, partial(self.attn, attn_mask=attn_mask_B11S))
        return self.feed_forward(x_BSD, nonpad_BS)


class DecoderLayer(_Layer):
    def __init__(self, cfg: Seq2SeqConfig, *, moe: MoEConfig | None, layer_idx: int) -> None:
        super().__init__(cfg, moe, num_sublayers=3)
        self.layer_idx = layer_idx
        self.attn = SelfAttention(cfg.d_model, cfg.n_head, cfg.dropout, causal=True, layer_idx=layer_idx)
        self.cross = CrossAttention(cfg.d_model, cfg.n_head, cfg.dropout)

    def forward(
        self, x_BLD: Tensor, nonpad_BL: Tensor, memory: Memory, cache: DecoderCache | None
    ) -> tuple[Tensor, MoEOutput | None]:
        # Targets are right-padded, so causal masking alone keeps real tokens off padding keys.
        x_BLD = self.residual(0, x_BLD, partial(self.attn, cache=None if cache is None else cache.self_kv))
        kv = self.cross.memory_kv(memory.h_BSD) if cache is None else cache.cross_kv(self.layer_idx, self.cross, memory)
        x_BLD = self.residual(1, x_BLD, lambda h: self.cross(h, kv, memory.attn_mask_B11S))
        return self.feed_forward(x_BLD, nonpad_BL)


@dataclass(frozen=True)
class Memory:
    """The encoder's output for a batch of source sentences."""

    h_BSD: Tensor
    nonpad_BS: Tensor  # True at real source tokens
    moe_outputs: tuple[MoEOutput, ...]  # one per encoder MoE layer

    @property
    def attn_mask_B11S(self) -> Tensor:
        return self.nonpad_BS[:, None, None, :]

    def index_select(self, index_B: Tensor) -> Memory:
        """Rows ``index_B`` (e.g. each sentence repeated K times for beam search)."""
        return Memory(self.h_BSD.index_select(0, index_B), self.nonpad_BS.index_select(0, index_B), self.moe_outputs)


class DecoderCache:
    """Everything incremental decoding reuses: the decoder's self-attention keys and values, and
    each layer's projection of the encoder memory (computed at the first step)."""

    def __init__(self, *, num_layers: int, max_len: int) -> None:
        self.self_kv = KVCache(num_layers=num_layers, max_len=max_len)
        self._cross: list[tuple[Tensor, Tensor] | None] = [None] * num_layers

    @property
    def position(self) -> int:
        return self.self_kv.position

    def cross_kv(self, layer: int, attention: CrossAttention, memory: Memory) -> tuple[Tensor, Tensor]:
        if self._cross[layer] is None:
            self._cross[layer] = attention.memory_kv(memory.h_BSD)
        return self._cross[layer]

    def reorder(self, index_B: Tensor) -> None:
        """Keep rows ``index_B`` (the memory passed to later steps must be reordered alike)."""
        self.self_kv.reorder(index_B)
        self._cross = [None if kv is None else (kv[0].index_select(0, index_B), kv[1].index_select(0, index_B))
                       for kv in self._cross]


@dataclass(frozen=True)
class Seq2SeqOutput:
    logits_BLV: Tensor  # next-token logits at every target position, in the compute dtype
    aux_loss: Tensor  # fp32 scalar: sum over MoE layers of the unscaled balancing loss; 0 if dense
    z_loss: Tensor  # fp32 scalar: sum over MoE layers of the router z-loss
    entropy_loss: Tensor  # fp32 scalar: sum over MoE layers of the mean router entropy
    stats: tuple[RoutingStats, ...]  # encoder MoE layers, then decoder MoE layers


class Seq2Seq(nn.Module):
    """Shared embeddings (x sqrt(D)) + sinusoidal positions -> encoder layers; decoder layers
    with causal self-attention and cross-attention -> logits through the shared embeddings."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.register_buffer("pos_PD", sinusoidal_positions(cfg.max_len, cfg.d_model), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        enc, dec = set(cfg.enc_moe_layer_indices), set(cfg.dec_moe_layer_indices)
        self.encoder = nn.ModuleList(
            EncoderLayer(cfg, moe=cfg.moe if i in enc else None, layer_idx=i) for i in range(cfg.n_enc_layer))
        self.decoder = nn.ModuleList(
            DecoderLayer(cfg, moe=cfg.moe if i in dec else None, layer_idx=i) for i in range(cfg.n_dec_layer))
        pre = cfg.norm == "pre"
        self.enc_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if pre else nn.Identity()
        self.dec_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if pre else nn.Identity()
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Xavier-uniform linear layers, zero biases; embeddings N(0, D^-1/2), so that after the
        sqrt(D) scale they have unit variance (fairseq's Transformer). Experts keep their init."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.embed.weight, mean=0.0, std=self.cfg.d_model ** -0.5)
        self.embed.weight[self.cfg.pad_id].zero_()

    def moe_layers(self) -> list[MoELayer]:
        """Encoder MoE layers then decoder MoE layers (the order of Seq2SeqOutput.stats)."""
        return [layer.ffn for layer in (*self.encoder, *self.decoder) if layer.is_moe]

    def new_cache(self) -> DecoderCache:
        return DecoderCache(num_layers=self.cfg.n_dec_layer, max_len=self.cfg.max_len)

    def _embed(self, ids_BL: Tensor, start: int) -> Tensor:
        L = ids_BL.shape[1]
        if start + L > self.cfg.max_len:
            raise UsageError(
                f"a sequence of {start + L} positions is longer than Seq2SeqConfig.max_len="
                f"{self.cfg.max_len}; filter or crop longer sentences (data.max_len)"
            )
        x_BLD = self.embed(ids_BL) * math.sqrt(self.cfg.d_model) + self.pos_PD[start:start + L]
        return self.drop(x_BLD)

    def encode(self, src_BS: Tensor) -> Memory:
        """Encode right-padded source ids [B, S]; every row needs at least one real token (its
        cross-attention would otherwise have no key to attend to)."""
        nonpad_BS = src_BS != self.cfg.pad_id
        if not bool(nonpad_BS.any(dim=1).all()):
            raise UsageError(
                "Seq2Seq.encode: every source row needs at least one real token (not PAD), e.g. the "
                "EOS that data.translation.collate appends; drop or fill the empty rows"
            )
        attn_mask_B11S = nonpad_BS[:, None, None, :]
        x_BSD = self._embed(src_BS, 0)
        moe_outputs = []
        for layer in self.encoder:
            x_BSD, moe_out = layer(x_BSD, nonpad_BS, attn_mask_B11S)
            if moe_out is not None:
                moe_outputs.append(moe_out)
        return Memory(self.enc_norm(x_BSD), nonpad_BS, tuple(moe_outputs))

    def decode(self, tgt_in_BL: Tensor, memory: Memory, cache: DecoderCache | None = None
               ) -> tuple[Tensor, tuple[MoEOutput, ...]]:
        """Logits [B, L, V] for decoder inputs (BOS + target, right-padded), and the decoder's MoE
        outputs. With ``cache`` the inputs continue the ones already decoded (eval mode only)."""
        start = 0
        if cache is not None:
            if self.training:
                raise UsageError(
                    "Seq2Seq.decode got a cache in training mode; call model.eval() first (training "
                    "capacity makes routing depend on the whole batch, so a cache would not match)"
                )
            start = cache.position
        nonpad_BL = tgt_in_BL != self.cfg.pad_id
        x_BLD = self._embed(tgt_in_BL, start)
        moe_outputs = []
        for layer in self.decoder:
            x_BLD, moe_out = layer(x_BLD, nonpad_BL, memory, cache)
            if moe_out is not None:
                moe_outputs.append(moe_out)
        if cache is not None:
            cache.self_kv.advance(tgt_in_BL.shape[1])
        logits_BLV = F.linear(self.dec_norm(x_BLD), self.embed.weight)  # shared output embedding
        return logits_BLV, tuple(moe_outputs)

    def forward(self, src_BS: Tensor, tgt_in_BL: Tensor) -> Seq2SeqOutput:
        memory = self.encode(src_BS)
        logits_BLV, dec_moe = self.decode(tgt_in_BL, memory)
        moe_outputs = (*memory.moe_outputs, *dec_moe)
        zero = torch.zeros((), dtype=torch.float32, device=src_BS.device)
        return Seq2SeqOutput(
            logits_BLV=logits_BLV,
            aux_loss=sum((o.aux_loss for o in moe_outputs), zero),
            z_loss=sum((o.z_loss for o in moe_outputs), zero),
            entropy_loss=sum((o.entropy_loss for o in moe_outputs), zero),
            stats=tuple(o.stats for o in moe_outputs),
        )

    # --- decoding ------------------------------------------------------------------------------

    def max_output_len(self, src_len: int, max_len_a: float, max_len_b: int) -> int:
        """Most tokens to generate (EOS included) for a source of ``src_len`` real tokens."""
        return max(1, min(int(max_len_a * src_len + max_len_b), self.cfg.max_len - 1))

    def output_limits(self, src_BS: Tensor, max_len_a: float, max_len_b: int) -> Tensor:
        """[B] ``max_output_len`` of each row from its own number of real tokens, so that a
        sentence's translation does not depend on the padded width of its batch."""
        lengths = (src_BS != self.cfg.pad_id).sum(dim=1).tolist()
        return torch.tensor([self.max_output_len(n, max_len_a, max_len_b) for n in lengths], device=src_BS.device)

    def _allowed(self, logits_BV: Tensor, last_B: Tensor) -> Tensor:
        """PAD and BOS are never produced; in rows at their length limit (``last_B``) only EOS
        is (as fairseq). Works on logits or log-probabilities."""
        cfg = self.cfg
        allowed_BV = torch.ones_like(logits_BV, dtype=torch.bool)
        allowed_BV[:, [cfg.pad_id, cfg.bos_id]] = False
        allowed_BV[last_B] = False
        allowed_BV[:, cfg.eos_id] = True
        return logits_BV.masked_fill(~allowed_BV, float("-inf"))

    def _check_eval(self, search: str) -> None:
        if self.training:
            raise UsageError(
                f"Seq2Seq.{search} needs eval mode; call model.eval() first (training capacity makes "
                f"routing depend on the whole batch, and dropout would perturb the search)"
            )

    def greedy(self, src_BS: Tensor, *, max_len_a: float = 1.5, max_len_b: int = 10) -> list[list[int]]:
        """Greedy decoding (eval mode only): the argmax token until EOS, forced at each row's
        length limit; ids without BOS/EOS. Beam search with one beam is exactly that."""
        return self.beam_search(src_BS, beam=1, max_len_a=max_len_a, max_len_b=max_len_b)

    @torch.no_grad()
    def beam_search(self, src_BS: Tensor, *, beam: int = 4, length_penalty: float = 1.0,
                    max_len_a: float = 1.5, max_len_b: int = 10) -> list[list[int]]:
        """Batched beam search with the cache; the best hypothesis of each sentence, without
        BOS/EOS. A hypothesis ends at EOS and is scored ``sum log p / length ** length_penalty``
        (length counting EOS); a sentence is done once it has ``beam`` ended hypotheses, as in
        fairseq. ``beam=1`` is greedy decoding. Eval mode only; each sentence's length limit
        comes from its own source length."""
        if not isinstance(beam, int) or beam < 1:
            raise UsageError(f"beam must be a positive integer, got {beam!r}")
        self._check_eval("beam_search")
        B, K, V = src_BS.shape[0], beam, self.cfg.vocab_size
        rows = torch.arange(B, device=src_BS.device).repeat_interleave(K)
        memory = self.encode(src_BS).index_select(rows)
        search = _BeamState(B, K, self.cfg, length_penalty, src_BS.device)
        cache = self.new_cache()
        limit_B = self.output_limits(src_BS, max_len_a, max_len_b)
        for step in range(int(limit_B.max())):
            last_B = limit_B == step + 1
            logits_BKV = self.decode(search.last_tokens(), memory, cache)[0][:, -1].float()
            # masked after the softmax: a forced EOS keeps its own probability, as in fairseq
            logp_BKV = self._allowed(logits_BKV.log_softmax(dim=-1), last_B.repeat_interleave(K)).view(B, K, V)
            index_BK = search.step(logp_BKV, last_B=last_B.tolist())
            if search.all_done:
                break
            # index_BK only moves rows within a sentence's K rows, whose memory is the same
            # sentence's: the memory needs no reorder; the cache's self-attention keys do.
            cache.reorder(index_BK)
        return search.best()


class _BeamState:
    """The book-keeping of beam search: K live hypotheses per sentence, their scores, and the
    ended ones. Finished sentences keep K rows in the batch, fed padding (never routed)."""

    def __init__(self, B: int, K: int, cfg: Seq2SeqConfig, length_penalty: float, device: torch.device) -> None:
        self.B, self.K, self.cfg, self.alpha = B, K, cfg, length_penalty
        self.tokens: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(B)]
        # Only beam 0 is live at the start, so the first step does not pick K copies of one token.
        self.scores_BK = torch.full((B, K), float("-inf"), device=device)
        self.scores_BK[:, 0] = 0.0
        self.ended: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        self.done = [False] * B
        self.device = device

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def last_tokens(self) -> Tensor:
        """[B * K, 1]: BOS at the start, else each hypothesis' last token; padding when done."""
        cfg = self.cfg
        ids = [cfg.pad_id if self.done[b] else (hyp[-1] if hyp else cfg.bos_id)
               for b in range(self.B) for hyp in self.tokens[b]]
        return torch.tensor(ids, device=self.device)[:, None]

    def step(self, logp_BKV: Tensor, *, last_B: list[bool]) -> Tensor:
        """Extend every sentence by its 2K best (hypothesis, token) candidates; the flat row
        index [B * K] each new hypothesis continues from (always one of the same sentence's K
        rows). A sentence at its length limit (``last_B``) is done after this step."""
        B, K, V = logp_BKV.shape
        cand_BKV = self.scores_BK[:, :, None] + logp_BKV
        top_scores, top_index = cand_BKV.view(B, K * V).topk(min(2 * K, K * V), dim=-1)
        new_scores = self.scores_BK.clone()
        index = torch.arange(B * K, device=self.device).view(B, K).clone()
        for b, (scores, flat) in enumerate(zip(top_scores.tolist(), top_index.tolist())):
            if self.done[b]:
                continue
            live: list[tuple[float, int, int]] = []
            for rank, (score, i) in enumerate(zip(scores, flat)):
                k, token = divmod(i, V)
                if score == float("-inf"):
                    break
                if token == self.cfg.eos_id:
                    if rank < K:  # an ended hypothesis counts only among the K best candidates
                        self._end(b, score, self.tokens[b][k])
                elif len(live) < K:
                    live.append((score, k, token))
            if len(self.ended[b]) >= K or last_B[b] or not live:
                self.done[b] = True
                continue
            while len(live) < K:  # fewer live candidates than beams (tiny vocabularies): dead beams
                live.append((float("-inf"), live[0][1], live[0][2]))
            self.tokens[b] = [self.tokens[b][k] + [token] for _, k, token in live]
            new_scores[b] = torch.tensor([s for s, _, _ in live])
            index[b] = torch.tensor([b * K + k for _, k, _ in live])
        self.scores_BK = new_scores
        return index.view(-1)

    def _end(self, b: int, score: float, tokens: list[int]) -> None:
        length = len(tokens) + 1  # with EOS
        self.ended[b].append((score / length ** self.alpha, tokens))

    def best(self) -> list[list[int]]:
        return [max(ended, key=lambda e: e[0])[1] if ended else [] for ended in self.ended]


# --- parameters and MoE FLOPs ----------------------------------------------------------------


def num_params(model_or_cfg: nn.Module | Seq2SeqConfig) -> int:
    """Parameters of a model, or of the Seq2Seq a config builds (counted without building it)."""
    if isinstance(model_or_cfg, Seq2SeqConfig):
        return seq2seq_params(model_or_cfg)
    return sum(p.numel() for p in model_or_cfg.parameters())
