"""AWD-LSTM (Merity et al. 2018b) with a DeFINE input, for Penn Treebank (define_paper.md §5.3).

The LSTM LM of ``lstm_lm`` plus AWD-LSTM's regularisers: DropConnect on the hidden-to-hidden
weights (weight drop), word-level dropout on the lookup table (embedding dropout), activation
regularisation (AR, on the dropped last-layer output) and temporal activation regularisation
(TAR, on the raw one); trained with NT-ASGD.

Defaults are AWD-LSTM's PTB recipe (its README command and argument defaults): 3 layers of 1150,
dropout 0.4 / dropouth 0.25 / dropouti 0.4 / dropoute 0.1 / wdrop 0.5, α = 2, β = 1, full tied
softmax. The paper's DeFINE: n = 128, k = 1024, N = 7, m = 400; the last LSTM layer is n wide so
the softmax ties to the 128-d table (define_paper.md §5.3 [D]).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .common import LMOutput, embedding_dropout_tables, locked_dropout
from .lstm_lm import LSTMLM, LSTMLMConfig


@dataclass
class AWDLSTMConfig(LSTMLMConfig):
    table_dim: int = 128
    input_dim: int = 400
    hidden: int = 1150
    layers: int = 3
    softmax: str = "full"
    softmax_bias: bool = True  # the original's decoder: nn.Linear(nhid, ntoken), its weight tied, its bias not
    dropout: float = 0.4
    dropouth: float = 0.25
    dropouti: float = 0.4
    dropoute: float = 0.1
    wdrop: float = 0.5
    alpha: float = 2.0
    beta: float = 1.0
    define: dict[str, Any] = field(default_factory=lambda: {"max_dim": 1024, "depth": 7, "max_groups": 8})


class AWDLSTM(LSTMLM):
    def __init__(self, config: AWDLSTMConfig) -> None:
        super().__init__(config, weight_drop=config.wdrop)

    def embed_tokens(self, ids: Tensor) -> Tensor:
        tables = embedding_dropout_tables(self.embed.band_tables(), self.config.dropoute, self.training)
        return self.embed(ids, tables)  # [T, B, m]

    def forward(self, ids: Tensor, target: Tensor, state: list) -> LMOutput:
        c = self.config
        x = locked_dropout(self.embed_tokens(ids), c.dropouti, self.training)
        out, raw, new_state = self.run_rnns(x, state)
        nll = self.nll(out, target).mean()
        penalty = nll.new_zeros(())
        if self.training and c.alpha:
            penalty = penalty + c.alpha * out.pow(2).mean()  # AR
        if self.training and c.beta and raw.size(0) > 1:
            penalty = penalty + c.beta * (raw[1:] - raw[:-1]).pow(2).mean()  # TAR
        return LMOutput(nll, new_state, penalty)


class NTASGD(torch.optim.Optimizer):
    """Non-monotonically triggered averaged SGD (Merity et al. 2018b).

    Plain SGD (with L2 weight decay) until ``observe`` sees a validation loss worse than the best
    one from more than ``nonmono`` validations ago; from then on it also keeps the running mean of
    the iterates (what ``torch.optim.ASGD`` does with t0 = 0, λ = 0), and evaluation should run on
    that mean: ``with optimizer.averaged(): …``. Everything, the validation history included,
    lives in ``state_dict`` so a resumed run triggers exactly when the uninterrupted one would.
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, nonmono: int = 5) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.param_groups[0].update(nonmono=nonmono, history=[], averaging=False, averaged_steps=0)

    @property
    def triggered(self) -> bool:
        return bool(self.param_groups[0]["averaging"])

    def observe(self, val_loss: float) -> None:
        group = self.param_groups[0]
        history, nonmono = group["history"], group["nonmono"]
        if not group["averaging"] and len(history) > nonmono and val_loss > min(history[:-nonmono]):
            group["averaging"] = True
        history.append(float(val_loss))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        first = self.param_groups[0]
        if first["averaging"]:
            first["averaged_steps"] += 1
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                p.add_(grad, alpha=-group["lr"])
                if first["averaging"]:
                    state = self.state[p]
                    if "mean" not in state:
                        state["mean"] = p.detach().clone()
                    else:  # running mean of the iterates since the switch
                        state["mean"].add_(p - state["mean"], alpha=1.0 / first["averaged_steps"])
        return loss

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """Swap the averaged weights in (for evaluation) and the training weights back after."""
        swapped = []
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    mean = self.state[p].get("mean") if p in self.state else None
                    if mean is not None:
                        saved = p.detach().clone()
                        p.copy_(mean)
                        swapped.append((p, saved))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in swapped:
                    p.copy_(saved)
