#!/usr/bin/env python3
"""Reference numbers for the text metrics (src/train/metrics.rs).

usage: metrics_reference.py CORPUS_JSON

CORPUS_JSON holds a list of corpora, each {"hypotheses": [...], "references":
[...]} (paired by index) and optionally "multi_references": [[ref, ref, ...], ...]
(the references of each hypothesis, the same number for every hypothesis).

Prints on stdout a JSON list with, for each corpus, an object of:
  bleu            sacrebleu.corpus_bleu(hypotheses, [references]).score (all defaults)
  bleu_counts, bleu_totals, bleu_sys_len, bleu_ref_len, bleu_bp: its statistics
  bleu_multi      corpus_bleu(hypotheses, reference streams) when multi_references is given
  tokens_13a      the 13a tokenization of every hypothesis (after BLEU's rstrip)
  rouge_l         per-pair ROUGE-L F from RougeScorer(['rougeL'], use_stemmer=False)
                  .score(target=reference, prediction=hypothesis)
  rouge_l_mean    the mean of rouge_l

Needs: sacrebleu (2.x), rouge-score.
"""
import json
import sys

import sacrebleu
from rouge_score import rouge_scorer


def score(corpus, scorer):
    hyps = corpus["hypotheses"]
    refs = corpus["references"]
    assert len(hyps) == len(refs), "hypotheses and references differ in length"

    bleu = sacrebleu.corpus_bleu(hyps, [refs])
    metric = sacrebleu.BLEU()
    out = {
        "sacrebleu_version": sacrebleu.__version__,
        "bleu": bleu.score,
        "bleu_counts": list(bleu.counts),
        "bleu_totals": list(bleu.totals),
        "bleu_sys_len": bleu.sys_len,
        "bleu_ref_len": bleu.ref_len,
        "bleu_bp": bleu.bp,
        "tokens_13a": [metric._preprocess_segment(h) for h in hyps],
    }

    multi = corpus.get("multi_references")
    if multi is not None:
        assert len(multi) == len(hyps)
        streams = [list(stream) for stream in zip(*multi)]
        out["bleu_multi"] = sacrebleu.corpus_bleu(hyps, streams).score

    fs = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)]
    out["rouge_l"] = fs
    out["rouge_l_mean"] = sum(fs) / len(fs) if fs else 0.0

    return out


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        corpora = json.load(f)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    json.dump([score(c, scorer) for c in corpora], sys.stdout, ensure_ascii=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
