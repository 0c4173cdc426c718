"""Evaluation: perplexity and bits per byte (:mod:`.perplexity`, also behind ``clara train``'s ``ppl_dev``),
domain QA through the serving engine (:mod:`.qa`), style coherence (:mod:`.style`), and the orchestration of
``clara eval`` / ``clara eval matrix`` with recording and the regression gate (:mod:`.runner`).

Nothing here imports torch or transformers at module top.
"""
