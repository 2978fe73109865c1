"""Tests run with float64 enabled (convergence is measured in float64); behaviour users see is checked
with float32 samples explicitly."""
import jax

jax.config.update("jax_enable_x64", True)
