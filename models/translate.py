"""Translate with a checkpoint of ``models.train_nmt``; score with sacrebleu.

    python -m models.translate runs/nmt/x/best.pt < test.en > test.hyp.de
    python -m models.translate runs/nmt/x/best.pt --reference test.de < test.en > test.hyp.de   # + BLEU on stderr
    python -m models.translate CKPT --beam 5 --lenpen 1.0 --max-len-a 1.2 --max-len-b 10 --max-tokens 8000

Input is raw text, one sentence per line (UTF-8); it is segmented with the BPE model saved next to
the checkpoint (``spm.model``, ``vocab.json``), translated in batches of about ``--max-tokens``
source tokens (lines grouped by length) and written detokenised, one line per input line, in input
order (a blank line gives a blank line; a line longer than the model's positions is
translated from its start, with a warning on stderr naming it). Beam search keeps ``--beam`` live
hypotheses per sentence, scores finished ones by log-probability / ((5 + length) / 6)^lenpen
(Wu et al. 2016) and stops a sentence once no live hypothesis can beat its best finished one;
``--beam 1`` is greedy decoding. Outputs are at most max_len_a · source length + max_len_b tokens
(eos included). With ``--reference`` BLEU is computed by sacrebleu (its default 13a tokenisation,
cased) and printed with its signature. Exit status: 0 done, 2 bad input/checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .common import check_define_backend
from .data import DataError
from .nmt import Transformer
from .nmt_data import BOS, EOS, PAD, Subwords, collate_source, decode_utf8, eval_batches, split_lines
from .trainer import CheckpointError, load_checkpoint, resolve_device


# ------------------------------------------------------------------------------------- search
def _max_lengths(model: Transformer, memory_mask: Tensor, a: float, b: int) -> Tensor:
    """Per sentence: the most output tokens (eos included), a · source length + b, within the
    model's positions."""
    src_len = memory_mask.view(memory_mask.size(0), -1).sum(1)
    limit = (a * src_len.double() + b).floor().long()
    return limit.clamp(1, model.config.max_positions)


def _step_scores(model: Transformer, tokens: Tensor, step: int, memory: Tensor, mask: Tensor, cache: list,
                 last: Tensor) -> Tensor:  # fmt: skip
    """Log-probabilities [N, V] of the next token; pad/bos never; only eos where ``last`` [N]."""
    logp = model.decode_step(tokens, step, memory, mask, cache).float().log_softmax(-1)
    logp[:, PAD] = float("-inf")
    logp[:, BOS] = float("-inf")
    eos_only = torch.full_like(logp[0], float("-inf"))
    eos_only[EOS] = 0.0
    return torch.where(last[:, None], eos_only + logp[:, EOS : EOS + 1], logp)


@torch.no_grad()
def greedy_search(model: Transformer, src: Tensor, *, max_len_a: float = 1.0, max_len_b: int = 50) -> list[list[int]]:
    """src [B, S] → the most likely next token at every step, until eos: B lists of ids (no eos)."""
    memory, mask = model.encode(src)
    max_len = _max_lengths(model, mask, max_len_a, max_len_b)
    batch = src.size(0)
    tokens = torch.full((batch, 1), BOS, dtype=torch.long, device=src.device)
    done = torch.zeros(batch, dtype=torch.bool, device=src.device)
    cache = model.init_cache()
    for step in range(int(max_len.max())):
        logp = _step_scores(model, tokens[:, -1:], step, memory, mask, cache, step + 1 >= max_len)
        nxt = logp.argmax(-1).masked_fill(done, PAD)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done |= nxt == EOS
        if bool(done.all()):
            break
    return [_strip(row[1:]) for row in tokens.tolist()]


def _strip(ids: Sequence[int]) -> list[int]:
    out = []
    for i in ids:
        if i == EOS:
            break
        if i != PAD:
            out.append(i)
    return out


def length_penalty(length: int | Tensor, alpha: float) -> float | Tensor:
    """Wu et al. (2016): ((5 + |Y|) / 6)^alpha."""
    return ((5 + length) / 6) ** alpha


@torch.no_grad()
def beam_search(
    model: Transformer, src: Tensor, *, beam: int = 4, lenpen: float = 0.6, max_len_a: float = 1.0, max_len_b: int = 50
) -> list[list[int]]:
    """src [B, S] → B lists of ids (no eos): the best finished hypothesis of each sentence.

    Every step extends the K live hypotheses of each sentence, takes the 2K best extensions, moves
    those ending in eos into the sentence's K-best finished list (score / length penalty) and keeps
    the K best others live. A sentence is done once its best finished score is at least the best a
    live hypothesis could still reach (its log-probability only falls; the penalty is bounded by
    its values at the next and at the last allowed length); the batch stops when all are done.
    """
    if beam == 1:
        return greedy_search(model, src, max_len_a=max_len_a, max_len_b=max_len_b)
    batch, k, device = src.size(0), beam, src.device
    memory, mask = model.encode(src)
    max_len = _max_lengths(model, mask, max_len_a, max_len_b)  # [B]
    horizon = int(max_len.max())
    memory, mask = memory.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)  # [B*K, S, m], [B*K, 1, 1, S]
    last_step = (max_len - 1).repeat_interleave(k)  # [B*K]: the step that must emit eos
    neg_inf = float("-inf")
    alive = torch.full((batch, k), neg_inf, device=device)
    alive[:, 0] = 0.0  # one live hypothesis to start with: the others would duplicate it
    tokens = torch.full((batch * k, 1), BOS, dtype=torch.long, device=device)  # [B*K, t + 1]
    finished = torch.full((batch, k), neg_inf, device=device)
    finished_tokens = torch.full((batch, k, horizon), PAD, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)[:, None]
    cache = model.init_cache()
    for step in range(horizon):
        logp = _step_scores(model, tokens[:, -1:], step, memory, mask, cache, step >= last_step)  # [B*K, V]
        vocab = logp.size(-1)
        candidates = (alive.view(-1, 1) + logp).view(batch, k * vocab)
        top, index = candidates.topk(2 * k, dim=1)  # [B, 2K]
        source_beam, token = index // vocab, index % vocab
        ends = token == EOS
        # hypotheses ending now join the finished lists
        history = tokens.view(batch, k, -1)[rows, source_beam, 1:]  # [B, 2K, step]
        ended = torch.cat([history, token[..., None]], dim=2)  # [B, 2K, step + 1]
        ended = torch.nn.functional.pad(ended, (0, horizon - step - 1), value=PAD)
        pool = torch.cat([finished, torch.where(ends, top / length_penalty(step + 1, lenpen), neg_inf)], dim=1)
        finished, keep = pool.topk(k, dim=1)
        finished_tokens = torch.cat([finished_tokens, ended], dim=1)[rows, keep]
        # the others stay alive
        alive, keep = torch.where(ends, neg_inf, top).topk(k, dim=1)
        order = (rows * k + source_beam.gather(1, keep)).view(-1)
        tokens = torch.cat([tokens.index_select(0, order), token.gather(1, keep).view(-1, 1)], dim=1)
        model.reorder_cache(cache, order)
        # done when no live hypothesis can overtake the best finished one
        bound = torch.maximum(length_penalty(torch.full_like(max_len, step + 2), lenpen),
                              length_penalty(max_len, lenpen))  # fmt: skip
        if bool((finished[:, 0] >= alive[:, 0] / bound).all()):
            break
    return [_strip(row) for row in finished_tokens[:, 0].tolist()]


def truncate_sources(sources: Sequence[Sequence[int]], max_positions: int) -> tuple[list[list[int]], list[int]]:
    """(sources cut to what the encoder's positions hold: max_positions - 1 pieces and eos, the
    indices of those that were cut)."""
    limit = max_positions - 1
    return [list(s[:limit]) for s in sources], [i for i, s in enumerate(sources) if len(s) > limit]


def translate_ids(
    model: Transformer, sources: Sequence[Sequence[int]], *, beam: int = 4, lenpen: float = 0.6,
    max_len_a: float = 1.0, max_len_b: int = 50, max_tokens: int = 4096, rank: int = 0, world_size: int = 1,
) -> dict[int, list[int]]:  # fmt: skip
    """{index: output ids} for this rank's share of ``sources`` (source side ids, no eos, within
    the model's positions: see truncate_sources). An empty source (a blank line) translates to
    nothing, not to whatever the model says after eos alone."""
    device = next(model.parameters()).device
    out: dict[int, list[int]] = {i: [] for i, s in enumerate(sources) if not s}
    texts = [i for i, s in enumerate(sources) if s]
    for batch in eval_batches([len(sources[i]) + 1 for i in texts], max_tokens, rank, world_size):
        indices = [texts[j] for j in batch]
        src = collate_source([sources[i] for i in indices]).to(device)
        hyps = beam_search(model, src, beam=beam, lenpen=lenpen, max_len_a=max_len_a, max_len_b=max_len_b)
        out.update(zip(indices, hyps, strict=True))
    return out


# --------------------------------------------------------------------------------------- BLEU
def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, object]:
    """sacrebleu's corpus BLEU (default settings, as its command line): score, signature, details."""
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise DataError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    metric = BLEU()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return {"name": "BLEU", "score": score.score, "signature": str(metric.get_signature()), "verbose": str(score)}


# ------------------------------------------------------------------------------------ loading
def load_translator(checkpoint: str | Path, device: str | torch.device = "cpu", bpe_dir: str | Path | None = None,
                    define_backend: str | None = None) -> tuple[Transformer, Subwords, dict]:  # fmt: skip
    """The model (eval mode) and BPE model of a train_nmt checkpoint, and the run's settings
    (``define_backend``: how DeFINE runs here, default the checkpoint's)."""
    from .train_nmt import build_model

    device = torch.device(device)
    state = load_checkpoint(checkpoint)
    cfg = dict(state["config"])
    if "bpe_digest" not in cfg:
        raise CheckpointError(f"{checkpoint} is not a translation checkpoint (no BPE model recorded)")
    if define_backend is not None:
        cfg["define_backend"] = define_backend
    if "define" in (cfg["src_embedding"], cfg["tgt_embedding"]):
        check_define_backend(cfg["define_backend"], device)
    bpe = Subwords.load(bpe_dir or Path(checkpoint).parent)
    if bpe.digest() != cfg["bpe_digest"]:
        raise CheckpointError(
            f"the BPE model in {bpe_dir or Path(checkpoint).parent} (digest {bpe.digest()}) is not the one "
            f"{checkpoint} was trained with ({cfg['bpe_digest']})"
        )
    model = build_model(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint} does not fit the model its settings describe: {exc}") from exc
    return model.to(device).eval(), bpe, cfg


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="best.pt or last.pt of a models.train_nmt run")
    p.add_argument("--input", help="source text file (default: stdin)")
    p.add_argument("--output", help="where translations go (default: stdout)")
    p.add_argument("--reference", help="reference translations: report BLEU (sacrebleu) on stderr")
    p.add_argument("--bleu-json", help="also write the BLEU report to this file (JSON)")
    p.add_argument("--bpe-dir", help="directory of spm.model and vocab.json (default: the checkpoint's)")
    p.add_argument("--beam", type=int, default=4, help="beam size (1: greedy)")
    p.add_argument("--lenpen", type=float, default=0.6, help="length penalty alpha")
    p.add_argument("--max-len-a", type=float, default=1.0)
    p.add_argument("--max-len-b", type=int, default=50, help="outputs are at most a * source length + b tokens")
    p.add_argument("--max-tokens", type=int, default=4096, help="source tokens per batch")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--define-backend", default=None, help="auto | reference | cpu | cuda | triton (default: the "
                   "checkpoint's; the backend changes how DeFINE runs, not what it computes)")  # fmt: skip
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast (CUDA)")
    return p.parse_args(argv)


def _read_input(path: str | None) -> list[str]:
    data = Path(path).read_bytes() if path else sys.stdin.buffer.read()
    return split_lines(decode_utf8(data, path or "standard input")) if data else []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.beam < 1:
            raise ValueError(f"--beam must be >= 1, got {args.beam}")
        if args.input and not Path(args.input).is_file():
            raise DataError(f"{args.input} does not exist")
        device = resolve_device(args.device)
        model, bpe, _ = load_translator(args.checkpoint, device, args.bpe_dir, args.define_backend)
        lines = _read_input(args.input)
        references = None
        if args.reference:
            from .nmt_data import read_lines

            references = read_lines(args.reference)
            if len(references) != len(lines):
                raise DataError(f"{args.reference} has {len(references)} lines but the input has {len(lines)}")
        sources, cut = truncate_sources(bpe.encode(lines, "src"), model.config.max_positions)
        for i in cut:  # one long line must not cost the whole file: it is translated from its start
            print(f"warning: {args.input or 'standard input'} line {i + 1}: over the model's "
                  f"{model.config.max_positions} source positions; translated from its first "
                  f"{model.config.max_positions - 1} pieces", file=sys.stderr)  # fmt: skip
        autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
        with autocast:
            out = translate_ids(model, sources, beam=args.beam, lenpen=args.lenpen, max_len_a=args.max_len_a,
                                max_len_b=args.max_len_b, max_tokens=args.max_tokens)  # fmt: skip
        hypotheses = [bpe.decode(out[i]) for i in range(len(lines))]
        text = "".join(f"{h}\n" for h in hypotheses)
        if args.output:
            Path(args.output).write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
        if references is not None:
            report = corpus_bleu(hypotheses, references)
            print(f"{report['verbose']} | {report['signature']}", file=sys.stderr)
            if args.bleu_json:
                Path(args.bleu_json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        return 0
    except (DataError, CheckpointError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
