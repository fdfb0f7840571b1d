"""The Transformer encoder-decoder: tying, sharing, parameter counts, incremental decoding, and the
searches (greedy against re-scoring, beam search against exhaustive search, batching invariance)."""

from __future__ import annotations

import itertools

import pytest
import torch

from define_ops import DeFINEConfig
from models.nmt import NMTConfig, Transformer, count_parameters
from models.nmt_data import BOS, EOS, PAD, UNK
from models.translate import beam_search, greedy_search, length_penalty
from tests.nmt_fixtures import one_thread

_one_thread = pytest.fixture(autouse=True)(one_thread)
TINY_DEFINE = {"max_dim": 32, "depth": 2, "max_groups": 2}


def tiny(vocab=40, embedding="define", share=True, **kw) -> Transformer:
    config = NMTConfig(vocab, vocab if share else vocab + 7, src_embedding=embedding, tgt_embedding=embedding,
                       share_embeddings=share, table_dim=8, d_model=16, n_heads=2, ffn_dim=32, encoder_layers=2,
                       decoder_layers=2, define=TINY_DEFINE, **kw)  # fmt: skip
    return Transformer(config).eval()


def random_source(batch, length, vocab, generator=None):
    src = torch.randint(4, vocab, (batch, length), generator=generator)
    for row in range(1, batch):  # ragged: later rows shorter
        src[row, max(1, length - 2 * row) :] = PAD
        src[row, max(0, length - 2 * row - 1)] = EOS
    src[0, -1] = EOS
    return src


# ------------------------------------------------------------------------------- construction
def test_output_layer_is_tied_to_the_n_dim_table_through_a_projection():
    model = tiny()
    table = model.tgt_embed.define.weight
    assert model.output_table() is table and table.shape == (40, 8)
    assert model.src_embed is model.tgt_embed  # shared: one input layer for both sides and the output
    assert model.out_proj.weight.shape == (8, 16)  # m → n
    h = torch.randn(3, 16)
    torch.testing.assert_close(model.logits(h), model.out_proj(h) @ table.t())
    separate = tiny(share=False)
    assert separate.src_embed is not separate.tgt_embed and separate.output_table().shape == (47, 8)
    standard = tiny(embedding="standard")  # nn.Embedding(V, m): n = m, Vaswani's tied softmax, no projection
    assert standard.out_proj is None and standard.output_table().shape == (40, 16)


@pytest.mark.parametrize("embedding", ["define", "standard"])
def test_untied_output_layer_is_its_own_m_wide_matrix(embedding):
    model = tiny(embedding=embedding, output_layer="untied")
    assert model.out_proj is None and model.output.weight.shape == (40, 16)  # [V, m], no projection
    assert all(model.output.weight is not p for p in model.tgt_embed.parameters())
    h = torch.randn(3, 16)
    torch.testing.assert_close(model.logits(h), h @ model.output.weight.t())
    parts = count_parameters(model)
    assert parts["output"] == 40 * 16 and parts["out_proj"] == 0
    assert count_parameters(tiny(embedding=embedding))["output"] == 0  # tied: the table counts once, as the input
    src, tgt = random_source(2, 5, 40), torch.randint(4, 40, (2, 4))
    model(src, tgt).sum().backward()
    assert model.output.weight.grad is not None


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="one vocabulary"):
        Transformer(NMTConfig(10, 12, share_embeddings=True))
    with pytest.raises(ValueError, match="unknown embedding"):
        Transformer(NMTConfig(10, 10, src_embedding="adaptive"))
    with pytest.raises(ValueError, match="divisible"):
        Transformer(NMTConfig(10, 10, d_model=30, n_heads=4))
    with pytest.raises(ValueError, match="unknown output_layer 'shared'"):
        Transformer(NMTConfig(10, 10, output_layer="shared"))


def test_base_parameter_counts():
    """Transformer base (6+6, d 512, 8 heads, FFN 2048) with a shared 8000-piece vocabulary: the
    context model is the same for both inputs; DeFINE's input is its own config's count."""
    with torch.device("meta"):
        define = Transformer(NMTConfig(8000, 8000, share_embeddings=True, define=dict(max_dim=1024, depth=3,
                                                                                      max_groups=4)))  # fmt: skip
        standard = Transformer(NMTConfig(8000, 8000, "standard", "standard", share_embeddings=True))
    d, s = count_parameters(define), count_parameters(standard)
    layer = 4 * (512 * 512 + 512) + 2 * 512 * 2048 + 2048 + 512 + 2 * 2 * 512  # attention, FFN, 2 LayerNorms
    cross = 4 * (512 * 512 + 512) + 2 * 512
    assert d["encoder"] == s["encoder"] == 6 * layer + 2 * 512
    assert d["decoder"] == s["decoder"] == 6 * (layer + cross) + 2 * 512
    assert s["src_embed"] == 8000 * 512 and s["tgt_embed"] == s["out_proj"] == 0
    expected = DeFINEConfig(8000, 512, input_dim=128, max_dim=1024, depth=3, max_groups=4).num_parameters()
    assert d["src_embed"] == expected and d["tgt_embed"] == 0 and d["out_proj"] == 512 * 128
    assert s["total"] - d["total"] == 8000 * 512 - expected - 512 * 128


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("embedding,share", [("define", True), ("define", False), ("standard", False)])
def test_incremental_decoding_equals_the_teacher_forced_pass(embedding, share, norm_first):
    model = tiny(embedding=embedding, share=share, norm_first=norm_first)
    src = random_source(3, 7, 40)
    tgt = torch.randint(4, 40, (3, 6))
    with torch.no_grad():
        full = model(src, tgt)  # [B, T, V]
        memory, mask = model.encode(src)
        cache = model.init_cache()
        steps = [model.decode_step(tgt[:, t : t + 1], t, memory, mask, cache) for t in range(6)]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("embedding", ["define", "standard"])
def test_shared_input_layer_runs_once_on_both_sides(embedding):
    # The training forward embeds source and target in one call of the shared input layer
    # (embed_pair): same outputs and gradients as one call per side, with dropout off.
    model = tiny(embedding=embedding, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0).train()
    src, tgt = random_source(3, 7, 40), torch.randint(4, 40, (3, 5))
    calls = []
    model.src_embed.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))

    def loss_and_grads(logits):
        model.zero_grad(set_to_none=True)
        logits.square().mean().backward()
        return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    merged, merged_grads = loss_and_grads(model(src, tgt))
    assert calls == [torch.Size([3 * 7 + 3 * 5])]
    memory, mask = model.encode(src)
    separate, separate_grads = loss_and_grads(model.logits(model.decode(tgt, memory, mask)))
    assert calls[1:] == [src.shape, tgt.shape]
    torch.testing.assert_close(merged, separate, atol=1e-6, rtol=1e-5)
    for name, grad in merged_grads.items():
        torch.testing.assert_close(grad, separate_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_padding_does_not_change_the_encoding():
    model = tiny()
    src = torch.tensor([[5, 6, 7, EOS]])
    padded = torch.tensor([[5, 6, 7, EOS, PAD, PAD]])
    with torch.no_grad():
        torch.testing.assert_close(model.encode(padded)[0][:, :4], model.encode(src)[0], atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------- search
class PrefixModel:
    """A stand-in decoder for the searches: its next-token scores are pseudo-random functions of
    (source sentence, prefix), so every prefix has its own sharp distribution. The prefix lives in
    the self-attention cache slots, which beam search reorders as it does a real model's."""

    config = NMTConfig(7, 7, max_positions=64)

    def __init__(self, vocab: int = 7, sharpness: float = 3.0) -> None:
        self.vocab, self.sharpness = vocab, sharpness

    def encode(self, src):
        return src[..., None].float(), (src != PAD)[:, None, None, :]

    def init_cache(self):
        return [{"self": {}, "cross": {}}]

    reorder_cache = staticmethod(Transformer.reorder_cache)

    def logits(self, source: tuple, prefix: tuple):
        generator = torch.Generator().manual_seed(hash((source, prefix)) % 2**62)
        return torch.randn(self.vocab, generator=generator) * self.sharpness

    def decode_step(self, tokens, step, memory, mask, cache):
        slot = cache[0]["self"]
        new = tokens.view(-1, 1, 1, 1).float()
        slot["k"] = new if "k" not in slot else torch.cat([slot["k"], new], dim=2)
        slot["v"] = slot["k"]
        rows = []
        for row in range(tokens.size(0)):
            source = tuple(memory[row, :, 0].long().tolist())
            rows.append(self.logits(source, tuple(slot["k"][row, 0, :, 0].long().tolist())))
        return torch.stack(rows)

    def score(self, source: tuple, output: list[int]) -> float:
        """log p(output | source) with output ending in eos, as the searches see it."""
        prefix, total = (BOS,), 0.0
        for token in output:
            total += float(self.logits(source, prefix).log_softmax(-1)[token])
            prefix += (token,)
        return total


def test_greedy_takes_the_most_likely_token_at_every_step():
    model = tiny()
    src = random_source(4, 6, 40, torch.Generator().manual_seed(3))
    hyps = greedy_search(model, src, max_len_a=0.0, max_len_b=9)
    for row, hyp in enumerate(hyps):
        tgt_in = torch.tensor([[BOS, *hyp]])
        with torch.no_grad():
            lp = model(src[row : row + 1], tgt_in)[0].log_softmax(-1)
        lp[:, [PAD, BOS]] = float("-inf")
        picks = lp.argmax(-1).tolist()
        if len(hyp) + 1 < 9:
            assert picks == [*hyp, EOS]
        else:  # the length limit forced eos
            assert picks[:-1] == hyp
    assert beam_search(model, src, beam=1, max_len_a=0.0, max_len_b=9) == hyps


@pytest.mark.parametrize("lenpen", [0.0, 0.6, 1.5])
def test_wide_beam_finds_the_exhaustive_optimum(lenpen):
    """With 4 real tokens (+ unk) and at most 4 output tokens, a beam of 64 keeps every prefix: it
    must return the best of all 85 possible outputs under the length penalty, for each sentence of
    a ragged batch. A narrow beam and greedy search must fall short of it somewhere."""
    model = PrefixModel()
    src = torch.tensor([[4, 5, 6, EOS], [6, EOS, PAD, PAD], [5, 5, EOS, PAD], [4, 4, 4, EOS]])
    settings = dict(lenpen=lenpen, max_len_a=0.0, max_len_b=4)
    hyps = beam_search(model, src, beam=64, **settings)
    candidates = [[*c, EOS] for n in range(4) for c in itertools.product([UNK, 4, 5, 6], repeat=n)]
    assert len(candidates) == 85
    best = []
    for row in range(src.size(0)):
        source = tuple(src[row].tolist())
        scores = [model.score(source, c) / length_penalty(len(c), lenpen) for c in candidates]
        best.append(candidates[max(range(85), key=scores.__getitem__)][:-1])
    assert hyps == best
    assert beam_search(model, src, beam=2, **settings) != best or greedy_search(model, src, max_len_a=0.0,
                                                                               max_len_b=4) != best  # fmt: skip
    assert len({len(h) for h in hyps}) > 1  # the optimum's length varies: length handling is exercised


@pytest.mark.parametrize("embedding", ["define", "standard"])
def test_batched_decoding_equals_one_sentence_at_a_time(embedding):
    model = tiny(vocab=30, embedding=embedding).double()
    src = random_source(4, 9, 30, torch.Generator().manual_seed(11))
    for search in (lambda s: greedy_search(model, s), lambda s: beam_search(model, s, beam=3, lenpen=0.6)):
        together = search(src)
        alone = []
        for row in range(4):
            length = int((src[row] != PAD).sum())
            alone += search(src[row : row + 1, :length])
        assert together == alone
