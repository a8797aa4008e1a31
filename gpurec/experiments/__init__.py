"""Reproducible studies over the whole pipeline (`gpurec experiment <study>`).

- `collisionless`: collisionless (Monolith) vs hashed (id mod rows) embedding tables at equal
  embedding memory, on the synthetic world and MovieLens-100K (`gpurec.experiments.collisionless`).
"""
