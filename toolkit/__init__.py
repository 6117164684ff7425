"""bitfleet's laptop side: data, training, search, compression, simulation and fleet control.

Importing ``toolkit`` is cheap and torch-free; submodules that need torch import it themselves.
"""
