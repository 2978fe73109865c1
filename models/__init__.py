"""Models: exact analytic oracles (``models.analytic``) and, later, Flax score networks."""
