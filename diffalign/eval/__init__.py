"""Evaluation of aligned models against their base, and relabelling of pair datasets with scorers.

``diffalign eval configs/eval_x.yaml`` (:func:`evaluate`) samples the base and the aligned model on the same
prompts with the same seeds, scores both with any scorers of :mod:`diffalign.rewards` and writes a report folder::

    report.json   per scorer: mean ± CI of base and aligned, the paired difference, the win rate of aligned
                  over base with its CI; every sample's prompt, seed and scores
    report.md     the same as a table, with the grid and the plot
    grid.png      base samples (top row) over aligned samples (bottom row); audio: spectrograms.png + clips/
    plot.png      score means with their intervals, win rates
    samples/      every sample, base/ and aligned/ (PNG or WAV)

``diffalign relabel`` (:func:`relabel`) rewrites the labels of a Pick-a-Pic or audio-alpaca parquet dataset from
a scorer's preferences (AI feedback).

The package imports nothing itself, so that its light parts (``statistics``, ``prompts``) serve the LLM trainer
without loading diffusers. Modules: ``config`` (the ``kind: eval`` config), ``prompts`` (prompt files and benchmark presets), ``generation``
(models and sampling), ``run`` (an evaluation from config to report), ``scoring``, ``statistics`` (intervals and win rates), ``report``, ``media``
(images, audio, reference sets), ``relabel``.
"""
