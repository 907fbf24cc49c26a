"""The ``tda`` command line: one table of commands (:mod:`pipelines.cli.main`) and their functions."""
