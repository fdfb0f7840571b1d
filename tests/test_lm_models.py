"""Model pieces: adaptive input/softmax, tying, the LSTM LM, AWD-LSTM's regularisers and NT-ASGD,
Transformer-XL's relative attention and memory, and the paper's parameter counts."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from models.adaptive import AdaptiveInput, AdaptiveSoftmax
from models.awd_lstm import AWDLSTM, NTASGD, AWDLSTMConfig
from models.common import embedding_dropout_tables, locked_dropout
from models.lstm_lm import LSTMLM, LSTMLMConfig
from models.transformer_xl import TransformerXL, TransformerXLConfig, rel_shift
from tests.lm_fixtures import one_thread

V = 60
DEFINE = {"max_dim": 32, "depth": 2, "max_groups": 2}

_one_thread = pytest.fixture(autouse=True)(one_thread)


def ids(t=7, b=3, v=V, seed=0):
    return torch.randint(0, v, (t, b), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- adaptive
@pytest.mark.parametrize("bias", [False, True])
def test_adaptive_softmax_is_a_distribution(bias):
    softmax = AdaptiveSoftmax(V, 8, [10, 30], [8, 4, 2], bias=bias)
    for p in softmax.parameters():
        torch.nn.init.normal_(p, 0.0, 0.5)
    hidden = torch.randn(5, 8)
    total = sum(torch.exp(-softmax(hidden, torch.full((5,), w))) for w in range(V))
    torch.testing.assert_close(total, torch.ones(5))


def test_adaptive_softmax_without_cutoffs_is_the_full_softmax():
    softmax = AdaptiveSoftmax(V, 8, [], [8], bias=True)
    torch.nn.init.normal_(softmax.biases[0])
    hidden, target = torch.randn(11, 8), ids(11, 1).view(-1)
    expected = F.cross_entropy(F.linear(hidden, softmax.tables[0], softmax.biases[0]), target, reduction="none")
    torch.testing.assert_close(softmax(hidden, target), expected)


def test_adaptive_input_bands_and_every_parameter_in_the_graph():
    layer = AdaptiveInput(V, 8, 8, [10, 30], div_val=2)  # bands 8, 4, 2 wide
    assert [p is None for p in layer.projs] == [True, False, False]
    tokens = torch.tensor([[3, 12]])  # bands 0 and 1 only
    out = layer(tokens)
    torch.testing.assert_close(out[0, 0], layer.tables[0][3] * math.sqrt(8))
    torch.testing.assert_close(out[0, 1], F.linear(layer.tables[1][2] * 2.0, layer.projs[1]))
    out.sum().backward()
    # band 2 saw no token, yet takes part (zero gradient): DDP needs the same parameters every step
    assert all(p.grad is not None for p in layer.parameters())
    assert layer.tables[2].grad.abs().sum() == 0


# ------------------------------------------------------------------------------------ LSTM LM
@pytest.mark.parametrize("embedding", ["define", "standard", "adaptive"])
@pytest.mark.parametrize("tie", ["width", "proj", "none"])
@pytest.mark.parametrize("softmax", ["adaptive", "full"])
def test_lstm_lm_every_input_tie_and_softmax(embedding, tie, softmax):
    div_val = 2 if embedding == "adaptive" and softmax == "adaptive" else 1
    config = LSTMLMConfig(V, embedding, table_dim=8, input_dim=12 if tie != "width" else 8, hidden=16, layers=2,
                          tie=tie, softmax=softmax, cutoffs=[10, 30], div_val=div_val, define=DEFINE)  # fmt: skip
    model = LSTMLM(config)
    x = ids()
    out = model(x, ids(seed=1), model.init_state(3))
    assert out.nll.shape == () and math.isfinite(out.nll.item())
    assert [h.shape for h, _ in out.state] == [(1, 3, 16), (1, 3, 8 if tie == "width" else 16)]
    out.nll.backward()
    assert all(p.grad is not None for p in model.parameters())
    tied = tie != "none"
    assert (model.softmax.tables is None) == tied
    if tied:  # the output layer reads the input's own n-dim table: one parameter, both gradients
        table = model.embed.band_tables()[0]
        assert table.size(1) == 8
        assert not any(p is table for p in model.softmax.parameters())


def test_tied_table_gets_the_output_gradient_too():
    model = LSTMLM(LSTMLMConfig(V, "define", table_dim=8, input_dim=8, hidden=16, layers=1, define=DEFINE,
                                cutoffs=[10], dropout=0, dropouth=0, dropouti=0))  # fmt: skip
    x = torch.full((4, 2), 45)  # only word 45 (tail band) is ever input ...
    y = torch.full((4, 2), 7)  # ... and only word 7 (head band) is a target: the tail band is not scored
    model(x, y, model.init_state(2)).nll.backward()
    grad = model.embed.define.weight.grad.abs().sum(1)
    assert grad[45] > 0 and grad[7] > 0 and grad[3] > 0  # input path; output path (head softmax)
    assert grad[50] == 0  # neither input nor scored


# ------------------------------------------------------------------------------------ AWD-LSTM
def awd(**overrides):
    cfg = dict(vocab_size=V, table_dim=8, input_dim=12, hidden=16, layers=2, define=DEFINE)
    return AWDLSTM(AWDLSTMConfig(**{**cfg, **overrides}))


def test_awd_output_has_the_originals_per_word_bias_and_the_lstm_lm_none():
    # The original AWD-LSTM decoder is nn.Linear(nhid, ntoken): weight tied to the input table, bias its own.
    model = awd(dropout=0, dropouth=0, dropouti=0, dropoute=0, wdrop=0)
    biases = [p for name, p in model.softmax.named_parameters() if "bias" in name]
    assert [tuple(b.shape) for b in biases] == [(V,)]
    x, y = ids(), ids(seed=1)
    model(x, y, model.init_state(3)).nll.sum().backward()
    assert biases[0].grad is not None and biases[0].grad.abs().sum() > 0
    lstm = LSTMLM(LSTMLMConfig(vocab_size=V, table_dim=8, input_dim=12, hidden=16, layers=2, define=DEFINE))
    assert not [name for name, _ in lstm.softmax.named_parameters() if "bias" in name and "cluster" not in name]


def test_weight_drop_and_dropouts_only_in_training():
    model = awd(dropout=0, dropouth=0, dropouti=0, dropoute=0, wdrop=0.9)
    x, y = ids(), ids(seed=1)
    model.eval()
    a = model(x, y, model.init_state(3)).nll
    b = model(x, y, model.init_state(3)).nll
    assert a == b
    model.train()
    c = model(x, y, model.init_state(3)).nll
    assert c != a  # DropConnect on weight_hh changes the recurrence
    raw = copy.deepcopy(model.rnns[0].lstm.weight_hh_l0)
    model(x, y, model.init_state(3)).nll.backward()
    assert torch.equal(raw, model.rnns[0].lstm.weight_hh_l0) and model.rnns[0].lstm.weight_hh_l0.grad is not None


def test_embedding_dropout_drops_whole_words():
    table = torch.randn(50, 4)
    torch.manual_seed(0)
    (dropped,) = embedding_dropout_tables([table], 0.5, True)
    kept = dropped.abs().sum(1) > 0
    assert 10 < kept.sum() < 40
    torch.testing.assert_close(dropped[kept], table[kept] * 2)
    assert embedding_dropout_tables([table], 0.5, False) is None


def test_locked_dropout_shares_the_mask_over_time():
    x = torch.ones(6, 2, 10)
    y = locked_dropout(x, 0.5, True)
    assert torch.equal(y, y[:1].expand_as(y)) and (y == 0).any()


def test_ar_tar_penalty_in_training_only():
    model = awd(dropout=0, dropouth=0, dropouti=0, dropoute=0, wdrop=0)
    x, y = ids(), ids(seed=1)
    out = model(x, y, model.init_state(3))
    assert out.penalty > 0
    model.eval()
    assert model(x, y, model.init_state(3)).penalty == 0


def test_ntasgd_is_sgd_until_triggered_then_averages():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    ref = torch.nn.Parameter(w.detach().clone())
    ours, sgd = NTASGD([w], lr=0.1, weight_decay=0.01, nonmono=2), torch.optim.SGD([ref], lr=0.1, weight_decay=0.01)
    iterates = []
    for step in range(6):
        for p, opt in ((w, ours), (ref, sgd)):
            p.grad = torch.sin(p.detach() + step)
            opt.step()
        if ours.triggered:
            iterates.append(w.detach().clone())
        torch.testing.assert_close(w, ref)
        ours.observe([3.0, 2.0, 1.0, 1.5, 0.5, 0.4][step])
    assert not ours.triggered  # never worse than the best from more than `nonmono` validations ago
    ours.observe(5.0)  # worse than min(3, 2, 1, 1.5)
    assert ours.triggered
    for step in range(3):
        w.grad = torch.cos(w.detach() + step)
        ours.step()
        iterates.append(w.detach().clone())
    mean = torch.stack(iterates).mean(0)
    current = w.detach().clone()
    with ours.averaged():
        torch.testing.assert_close(w.detach(), mean)
    assert torch.equal(w.detach(), current)
    restored = NTASGD([torch.nn.Parameter(current.clone())], lr=0.1)
    restored.load_state_dict(ours.state_dict())
    assert restored.triggered and restored.param_groups[0]["history"] == ours.param_groups[0]["history"]


# ------------------------------------------------------------------------------- Transformer-XL
def txl(**overrides):
    cfg = dict(vocab_size=V, embedding="standard", table_dim=8, d_model=16, n_layer=2, n_head=2, d_head=8, d_inner=32,
               dropout=0.0, tgt_len=6, mem_len=6, eval_mem_len=64, cutoffs=[10, 30], define=DEFINE)  # fmt: skip
    return TransformerXL(TransformerXLConfig(**{**cfg, **overrides})).eval()


def test_rel_shift_aligns_relative_distances():
    t, k = 3, 5
    # scores[i, r] = r-th relative position counted from the farthest (distance k-1-r)
    scores = torch.arange(k).float().expand(t, k)[..., None, None]  # [T, K, 1, 1]
    shifted = rel_shift(scores)[..., 0, 0]
    m = k - t
    for i in range(t):
        for j in range(m + i + 1):  # the positions a query may see
            assert shifted[i, j] == k - 1 - (m + i - j)  # holds the score of distance (m + i) - j


@pytest.mark.parametrize("embedding", ["define", "standard", "adaptive"])
def test_segments_with_memory_equal_one_long_segment(embedding):
    model = txl(embedding=embedding, div_val=2 if embedding == "adaptive" else 1)
    x = ids(12, 2)
    with torch.no_grad():
        full, _ = model.hidden_states(x, model.init_state(2))
        first, mems = model.hidden_states(x[:5], model.init_state(2))
        second, mems = model.hidden_states(x[5:9], mems)
        third, _ = model.hidden_states(x[9:], mems)
    torch.testing.assert_close(torch.cat([first, second, third]), full, rtol=1e-5, atol=1e-5)


def test_causal_and_memory_is_bounded():
    model = txl()
    x = ids(8, 2)
    y = x.clone()
    y[5:] = (y[5:] + 1) % V
    with torch.no_grad():
        a, mems = model.hidden_states(x, model.init_state(2))
        b, _ = model.hidden_states(y, model.init_state(2))
    torch.testing.assert_close(a[:5], b[:5])
    assert not torch.allclose(a[5:], b[5:])
    model.train()
    _, mems = model.hidden_states(x, model.init_state(2))
    assert [m.shape for m in mems] == [(6, 2, 16)] * 2  # training keeps mem_len states per layer
    model.eval()
    _, mems = model.hidden_states(x, model.init_state(2))
    assert mems[0].shape == (8, 2, 16)


def test_clamp_len_only_matters_beyond_it():
    x = ids(6, 2)  # distances 0..5 without memory
    outputs = {}
    for clamp in (0, 10, 2):
        torch.manual_seed(1234)  # the same weights for each
        model = txl(clamp_len=clamp)
        with torch.no_grad():
            outputs[clamp] = model.hidden_states(x, model.init_state(2))[0]
    torch.testing.assert_close(outputs[10], outputs[0])
    assert not torch.allclose(outputs[2], outputs[0])


def test_txl_loss_and_gradients_for_each_input():
    for embedding in ("define", "standard", "adaptive"):
        model = txl(embedding=embedding, div_val=2 if embedding == "adaptive" else 1).train()
        out = model(ids(), ids(seed=1), model.init_state(3))
        out.nll.backward()
        assert math.isfinite(out.nll.item()) and all(p.grad is not None for p in model.parameters())


# -------------------------------------------------------------------- the paper's parameter counts
WT103_V = 267_735


def test_lstm_context_matches_table_1a():
    # 4 LSTM layers of 1024, the first reading m, the last m wide (tied): 23.36M / 24.73M / 26.24M
    with torch.device("meta"):
        for m, expected in ((256, 23_357_440), (384, 24_734_720), (512, 26_243_072)):
            model = LSTMLM(LSTMLMConfig(WT103_V, "standard", table_dim=m, input_dim=m, hidden=1024, layers=4,
                                        cutoffs=[20_000, 40_000, 200_000]))  # fmt: skip
            assert sum(p.numel() for p in model.rnns.parameters()) == expected
            assert round(expected / 1e6, 2) == {256: 23.36, 384: 24.73, 512: 26.24}[m]


def test_adaptive_io_matches_table_1a():
    # adaptive input (factor 4, cutoffs 20k/40k/200k) with the tied adaptive softmax: 9.25M at n = 256
    with torch.device("meta"):
        model = LSTMLM(LSTMLMConfig(WT103_V, "adaptive", table_dim=256, input_dim=256, hidden=1024, layers=4,
                                    cutoffs=[20_000, 40_000, 200_000], div_val=4))  # fmt: skip
    io = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("rnns."))
    assert round(io / 1e6, 2) == 9.25


def test_transformer_xl_context_and_io_match_table_2():
    base = dict(vocab_size=WT103_V, n_layer=16, n_head=10, d_head=41, cutoffs=[20_000, 40_000, 200_000])
    with torch.device("meta"):
        ours = TransformerXL(TransformerXLConfig(**base, embedding="standard", table_dim=384, d_model=384,
                                                 d_inner=1920))  # fmt: skip
        original = TransformerXL(TransformerXLConfig(**base, embedding="standard", table_dim=410, d_model=410,
                                                     d_inner=2100))  # fmt: skip
        small = TransformerXL(TransformerXLConfig(**base, embedding="adaptive", table_dim=256, d_model=384,
                                                  d_inner=1920))  # fmt: skip

    def context(model):
        return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("embed.", "softmax.")))

    def io(model):
        return sum(p.numel() for n, p in model.named_parameters() if n.startswith(("embed.", "softmax.")))

    assert round(context(ours) / 1e6, 2) == 36.25 and round(context(original) / 1e6, 2) == 41.07
    assert round(io(ours) / 1e6, 2) == 103.08 and round(io(original) / 1e6, 2) == 110.04
    assert round(io(small) / 1e6, 2) == 69.20  # 4 clusters n wide, 4 tied n×384 projections, token bias


def test_define_with_adaptive_map_ties_the_paper_io_parameters():
    # Table 1a R3: adaptive input as DeFINE's Map, the adaptive softmax tied to its band tables and
    # projections: the input/output part is the 9.25M of R2, DeFINE's own layers come on top.
    with torch.device("meta"):
        model = LSTMLM(LSTMLMConfig(WT103_V, "define", table_dim=256, input_dim=256, hidden=1024, layers=4,
                                    cutoffs=[20_000, 40_000, 200_000], div_val=4,
                                    define={"map": "adaptive", "max_dim": 1024, "depth": 3,
                                            "max_groups": 4}))  # fmt: skip
        plain = LSTMLM(LSTMLMConfig(WT103_V, "adaptive", table_dim=256, input_dim=256, hidden=1024, layers=4,
                                    cutoffs=[20_000, 40_000, 200_000], div_val=4))  # fmt: skip
    hgt = ("embed.define.layers.", "embed.define.reduce.")
    io = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("rnns.", *hgt)))
    plain_io = sum(p.numel() for n, p in plain.named_parameters() if not n.startswith("rnns."))
    assert io == plain_io and round(io / 1e6, 2) == 9.25  # tables + projections + the softmax head
    assert model.embed.define.config.num_map_parameters() == 9_252_444
    assert model.tied_proj


def test_define_adaptive_map_model_trains_a_step():
    model = LSTMLM(
        LSTMLMConfig(
            500,
            "define",
            table_dim=16,
            input_dim=16,
            hidden=32,
            layers=2,
            cutoffs=[50, 200],
            div_val=2,
            define={"map": "adaptive", "max_dim": 32, "depth": 2, "max_groups": 2},
        )
    )
    ids = torch.randint(0, 500, (7, 3))
    out = model(ids, ids.roll(1, 0), model.init_state(3))
    out.nll.backward()
    assert model.embed.define.map.bands[2].weight.grad is not None
    assert model.embed.define.map.bands[1].projection.weight.grad.abs().sum() > 0
