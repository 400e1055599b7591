"""`align sweep`: hyperparameter search over any recipe key on Optuna (align.sweep.study), the sweep file that says
what to search and score (align.sweep.space), and what a sweep leaves behind (align.sweep.report)."""
