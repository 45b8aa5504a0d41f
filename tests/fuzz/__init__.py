"""Fuzzing: mutated valid artefacts of every format, fed to the parsers that receive them.

Only :class:`securethread.Error` may escape a parser.  ``test_fuzz.py`` runs a short,
reproducible hypothesis campaign in CI; ``python -m tests.fuzz --inputs 100000`` is the long
mode (docs/fuzzing.md).
"""
