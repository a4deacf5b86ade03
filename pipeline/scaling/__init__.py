"""Scaling laws from the pipeline's own pretraining: `rlhf sweep CONFIG` pretrains a grid of model sizes × compute
budgets (grid) on one shared corpus and tokenizer (corpus), fits L(N, D) = E + A/N^α + B/D^β and the IsoFLOP
frontier (fit, analysis), asks every point whether it can read a story (probe), and writes a JSON of every run and
an HTML page with the plots (sweep, page)."""
