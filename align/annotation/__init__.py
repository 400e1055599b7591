"""The collection file (store, its schema, and the counts that keep assignment fast): where pairs wait for annotators
and their verdicts are kept. Below the stages, so the closed loop's label stage can send pairs to people and wait for
their verdicts; `align collect` (the web app, AI judges, export) is built on it."""
