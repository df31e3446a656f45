"""The paper-claims study (`python -m train.sweep`): convergence, SGD vs AdamW and lr/wd stability (EDF).

Modules: spec (a run and its id), sampling (log-uniform lr/wd), plan (what a study trains), presets (full /
reduced), runner (one `python -m train` subprocess per worker, resumable), edf, analysis, claims (verdicts),
plots, report (summary.json, claims.md, PNGs) and study (the whole pipeline).
"""
